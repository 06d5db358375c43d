"""Config: TOML + overrides -> one validated object; every bad input gets one clear error."""

import re
import tomllib
from pathlib import Path

import pytest

from fedimb.config import (
    DEFAULT_CONFIG,
    Config,
    ConfigError,
    dump_toml,
    load_config,
    parse_overrides,
)

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_loads_with_documented_shape():
    config = load_config()
    assert config["dataset"] == "digits"
    assert config.partition.name == "label-skew"
    assert config.partition.params["classes-per-client"] == 2
    assert config.loss.name == "ce"
    assert config.strategy.name == "fedavg"
    assert config["engine"] == "ray"


def test_overrides_reach_component_tables():
    config = load_config(
        overrides=parse_overrides(
            [
                "loss.name=ldam-drw",
                "partition.classes-per-client=1",
                "lr=0.1",
                "loss.max-m=0.3",
            ]
        )
    )
    assert config.loss.name == "ldam-drw"
    assert config.loss.kwargs()["max_m"] == 0.3
    assert config.partition.params["classes-per-client"] == 1
    assert config["lr"] == 0.1


def test_flat_round_trip_is_flower_run_config_shape():
    config = load_config(overrides={"loss.name": "focal", "loss.gamma": 2.0})
    flat = config.to_flat()
    assert flat["loss.name"] == "focal" and flat["loss.gamma"] == 2.0
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
    assert Config.from_flat(flat) == config


def test_toml_round_trip(tmp_path):
    config = load_config(overrides={"strategy.name": "fedprox", "strategy.proximal-mu": 0.01})
    path = tmp_path / "c.toml"
    path.write_text(config.to_toml())
    assert load_config(path) == config
    assert tomllib.loads(dump_toml({"a": 'x"y', "t": {"k-1": 1.5}})) == {
        "a": 'x"y',
        "t": {"k-1": 1.5},
    }


def test_shared_loss_table_gives_each_loss_its_own_params():
    # A sweep over loss.name shares one [loss] table: focal takes gamma, ce ignores it.
    base = {"loss.gamma": 2.0}
    assert load_config(overrides={**base, "loss.name": "focal"}).loss.params == {"gamma": 2.0}
    assert load_config(overrides={**base, "loss.name": "ce"}).loss.params == {}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num-rond": 3}, "did you mean 'num-rounds'"),
        # A table's key given at the top level: the tables that have it.
        ({"fraction-train": 0.5}, "did you mean 'strategy.fraction-train'?"),
        ({"alpha": 0.1}, "did you mean 'partition.alpha' or 'loss.alpha'"),
        ({"ratio": 10}, "did you mean 'long-tail.ratio'?"),
        ({"num-rounds": 0}, "num-rounds = 0: must be an integer >= 1"),
        ({"num-rounds": "ten"}, "expected an integer"),
        ({"lr": -1}, "lr = -1.0: must be a number > 0"),
        ({"engine": "spark"}, "one of 'ray', 'inprocess'"),
        ({"loss.name": "ldma"}, "unknown loss 'ldma'"),
        ({"loss.betta": 0.9}, "unknown config key 'loss.betta'"),
        ({"loss.name": "class-balanced", "loss.beta": 1.5}, "beta"),
        ({"loss.name": "focal", "loss.gamma": -1.0}, "gamma"),
        ({"loss.name": "fedrs", "loss.alpha": 2.0}, "alpha"),
        ({"strategy.name": "fedavgg"}, "did you mean 'fedavg'"),
        (
            {"strategy.fraction-train": 1.5},
            "strategy.fraction-train = 1.5: must be a number in (0, 1]",
        ),
        ({"strategy.min-train-clients": 50}, "must be <= num-clients"),
        ({"partition.name": "dirichlet", "partition.alpha": 0.0}, None),  # checked with the data
        ({"long-tail.ratio": 0.5}, "long-tail.ratio = 0.5: must be a number >= 1"),
        (
            {"long-tail.many-shot-above": 50, "long-tail.few-shot-below": 60},
            "long-tail.few-shot-below = 60: must be <= long-tail.many-shot-above + 1 (51)",
        ),
        ({"model.name": "vgg"}, "unknown model 'vgg'"),
        ({"loss": 3}, "'loss' is a table"),
        ({"faults.raise-clients": "a,b"}, "comma-separated integers"),
        ({"faults.raise-clients": "99"}, "99 is outside 0..19, the run's client ids"),
        ({"faults.rounds": "0,2"}, "faults.rounds = '0,2': 0 is outside 1..20, the run's rounds"),
        ({"loss.name": "ldam-drw", "loss.drw-start": 50}, "drw"),
        ({"strategy.name": "no_such_pkg.mod:Strategy"}, "cannot import module 'no_such_pkg.mod'"),
        ({"loss.name": "no_such_mod:factory"}, "is its folder on PYTHONPATH (PYTHONPATH=. for"),
        ({"strategy.name": "fedimb.config:Config"}, "not a subclass"),
        (
            {"strategy.name": "strategies.example_custom:ServerLRFedAvg", "strategy.server-lr": -1},
            "server-lr must be > 0",
        ),
        ({"loss.name": "tests.nowhere:factory"}, "cannot import module 'tests.nowhere'"),
        # Component parameters: the type of their default, and the range of the known ones.
        ({"model.cosine-head": "False"}, "model.cosine-head = 'False': expected true or false"),
        ({"loss.name": "class-balanced", "loss.prior-init": 1}, "prior-init must be true or false"),
        ({"model.hidden": "abc"}, "model.hidden = 'abc': expected an integer"),
        ({"model.hidden": 64.5}, "model.hidden = 64.5: expected an integer"),
        ({"model.hidden": True}, "expected an integer"),
        ({"model.name": "cnn", "model.hidden": 0}, "model.hidden = 0: must be an integer >= 1"),
        ({"partition.name": "dirichlet", "partition.alpha": "x"}, "expected a number"),
        ({"strategy.fraction-evaluate": "abc"}, "strategy.fraction-evaluate = 'abc'"),
        ({"strategy.name": "fedprox", "strategy.proximal-mu": -1}, "must be a number >= 0"),
        ({"strategy.name": "fedavgm", "strategy.server-momentum": -3}, "in [0, 1)"),
        ({"strategy.name": "fedadam", "strategy.eta": -1}, "strategy.eta = -1: must be"),
        ({"strategy.weighted-by-key": 3}, "expected a string"),
        ({"strategy.min-train-nodes": 50}, "strategy.min-train-nodes = 50: must be <= num-"),
        ({"strategy.min-available-nodes": 21}, "must be <= num-clients (20)"),
        ({"strategy.name": "qfedavg"}, "requires strategy.client-learning-rate (no default)"),
        (  # Flower's default min-evaluate-nodes (2) would wait forever for a second node
            {"num-clients": 1, "strategy.min-train-clients": 1, "strategy.fraction-evaluate": 0.5},
            "strategy.min-evaluate-nodes = 2: must be <= num-clients (1) (the strategy's default)",
        ),
        (
            {"strategy.name": "flwr.serverapp.strategy:FedAvg", "strategy.min-train-nodes": "3"},
            "strategy.min-train-nodes = '3': expected an integer",
        ),
    ],
)
def test_bad_values_get_one_clear_error(overrides, message):
    if message is None:
        load_config(overrides=overrides)  # syntactically fine; the partitioner rejects it later
        return
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert message in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("num-rounds = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_bad_set_syntax():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["lr"])
    assert parse_overrides(["a=1", "b=true", "c=ldam", "d=0.5"]) == {
        "a": 1,
        "b": True,
        "c": "ldam",
        "d": 0.5,
    }


def test_shipped_configs_are_valid_and_work_as_flower_run_configs():
    # `flwr run --run-config` only accepts keys that pyproject's [tool.flwr.app.config] has.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    from fedimb.config import flatten

    app_keys = set(flatten(pyproject["tool"]["flwr"]["app"]["config"]))
    assert Config.from_flat(flatten(pyproject["tool"]["flwr"]["app"]["config"])) == load_config(
        DEFAULT_CONFIG
    )
    for path in sorted((ROOT / "configs").glob("*.toml")):
        nested = tomllib.loads(path.read_text())
        if "grid" in nested:  # a sweep file
            continue
        load_config(path)
        missing = set(flatten(nested)) - app_keys
        assert not missing, f"{path.name}: keys unknown to flwr run: {sorted(missing)}"


def test_component_parameters_are_coerced_to_their_defaults_types():
    config = load_config(
        overrides={"model.hidden": 64.0, "strategy.name": "fedprox", "strategy.proximal-mu": 1}
    )
    assert config.model.params["hidden"] == 64 and isinstance(config.model.params["hidden"], int)
    assert config.strategy.params["proximal-mu"] == 1
    # An int where the default is a float stays an int: drs-start 5 is round 5, not 5.0.
    drs = load_config(overrides={"sampling.name": "drs", "sampling.drs-start": 5})
    assert isinstance(drs.sampling.params["drs-start"], int)
    assert load_config(overrides={"model.cosine-head": True}).model.params["cosine-head"] is True


def test_config_changes_name_what_changes_results_only():
    from fedimb.config import config_changes

    base = load_config()
    assert (
        config_changes(
            base,
            base.with_overrides({"engine": "inprocess", "threads": 1, "cudnn-benchmark": True}),
        )
        == ""
    )
    changed = config_changes(base, base.with_overrides({"num-rounds": 3, "engine": "inprocess"}))
    assert changed == "num-rounds 20 -> 3"
    # Evaluation off: its minimum does not matter.
    load_config(overrides={"num-clients": 1, "strategy.min-train-clients": 1})


def test_the_learning_rate_follows_its_schedule_round_by_round():
    from fedimb.config import lr_in_round

    constant = load_config(overrides={"lr": 0.1})
    assert {lr_in_round(constant, r) for r in range(1, 11)} == {0.1}
    # LDAM-DRW's recipe over 200 rounds: 100x lower from round 161, again from 181.
    steps = load_config(
        overrides={
            "num-rounds": 200,
            "lr": 0.1,
            "lr-schedule.milestones": "0.8, 0.9",
            "lr-schedule.gamma": 0.01,
        }
    )
    got = [lr_in_round(steps, r) for r in (1, 160, 161, 180, 181, 200)]
    assert got == pytest.approx([0.1, 0.1, 1e-3, 1e-3, 1e-5, 1e-5])
    decay = load_config(
        overrides={"lr": 0.1, "lr-schedule.decay": 0.9, "lr-schedule.milestones": "3"}
    )
    assert [lr_in_round(decay, r) for r in (1, 2, 3)] == pytest.approx(
        [0.1, 0.09, 0.1 * 0.81 * 0.1]
    )


@pytest.mark.parametrize(
    ("given", "kept"), [(0.8, "0.8"), (15, "15"), ([0.8, 0.9], "0.8,0.9"), ("150, 180", "150, 180")]
)
def test_lr_milestones_may_be_a_number_or_an_array(given, kept):
    # `--set lr-schedule.milestones=0.8` reads a TOML number, and a sweep grid an array.
    config = load_config(overrides={"num-rounds": 200, "lr-schedule.milestones": given})
    assert config["lr-schedule.milestones"] == kept
    assert load_config(overrides={"faults.rounds": [1, 3]})["faults.rounds"] == "1,3"


@pytest.mark.parametrize(
    ("milestones", "message"),
    [
        ("0.8,x", "'x' is not a number"),
        ("30", "after the last round (num-rounds=20)"),
        ("0", "round number >= 1 or a fraction in (0, 1)"),
        ("1.5", "in (0, 1), got 1.5"),
    ],
)
def test_bad_lr_milestones_are_one_line_errors(milestones, message):
    with pytest.raises(ConfigError, match=r"lr-schedule.milestones = .*" + re.escape(message)):
        load_config(overrides={"num-rounds": 20, "lr-schedule.milestones": milestones})


def test_fednova_takes_the_clients_momentum_from_the_run():
    # FedNova normalises by the momentum the clients train with: a value of its own
    # would weigh the clients wrongly.
    fednova = {"strategy.name": "fednova", "momentum": 0.9}
    assert load_config(None, fednova).strategy_kwargs()["momentum"] == 0.9
    subclass = {**fednova, "strategy.name": "strategies.fednova:FedNova"}
    assert load_config(None, subclass).strategy_kwargs()["momentum"] == 0.9
    assert load_config(None, {**fednova, "strategy.momentum": 0.9})  # the same value: fine
    with pytest.raises(ConfigError, match=r"strategy.momentum = 0.5, but .* momentum = 0.9"):
        load_config(None, {**fednova, "strategy.momentum": 0.5})
    assert "momentum" not in load_config(None, {"momentum": 0.9}).strategy_kwargs()


@pytest.mark.parametrize(
    ("overrides", "autotune"), [({}, False), ({"cudnn-benchmark": True}, True)]
)
def test_cudnn_benchmark_reaches_the_training_settings(overrides, autotune):
    from fedimb.client import train_settings
    from fedimb.federation import get_federation

    config = load_config(None, {"device": "cpu", **overrides})
    assert train_settings(config, get_federation(config), 1).cudnn_benchmark is autotune


def test_a_switch_given_as_text_is_refused_with_its_spelling():
    with pytest.raises(ConfigError, match="cudnn-benchmark = 'yes': expected true or false"):
        load_config(None, {"cudnn-benchmark": "yes"})
