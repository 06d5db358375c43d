"""Plug-ins by import path: their parameters are config keys like a built-in's."""

import logging
import re
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from fedimb.config import DEFAULT_CONFIG, ConfigError, load_config
from fedimb.federation import loss_kwargs, model_kwargs
from fedimb.preflight import prepare, warn_about_settings
from fedimb.sweep import Sweep
from fedimb.sweep.command import sweep_plugins
from strategies.stock import FedAvg

HERE = __name__


def smoothed_ce(class_counts, *, server_round=1, num_rounds=1, smoothing=0.1, tempered=False):
    return lambda z, y: nn.functional.cross_entropy(z, y, label_smoothing=smoothing)


def scaled_ce(class_counts, *, server_round=1, num_rounds=1, s=1.0):
    return lambda z, y: nn.functional.cross_entropy(s * z, y)


def open_ended(class_counts, **params):
    return lambda z, y: nn.functional.cross_entropy(z, y)


def last_class_weighted(class_counts, *, server_round=1, num_rounds=1, cls=9):
    weight = torch.ones(len(class_counts))
    weight[cls] = 2.0  # an IndexError on fewer classes than the data has
    return lambda z, y: nn.functional.cross_entropy(z, y, weight=weight)


def small_net(input_shape, num_classes, *, width=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))


def needs_width(input_shape, num_classes, *, width):
    return small_net(input_shape, num_classes, width=width)


def repeated(labels, rng, *, server_round, num_rounds, times=1):
    return np.tile(rng.permutation(len(labels)), times)


class LambdaFedAvg(FedAvg):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.scale = lambda x: x  # cannot be pickled


class CountingFedAvg(FedAvg):
    """Keeps each client's class counts, as a class-aware strategy would read them."""

    seen: ClassVar[dict[int, list[int]]] = {}

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        for reply in replies:
            metrics = reply.content["metrics"]
            CountingFedAvg.seen[int(metrics["partition-id"])] = list(metrics["class-counts"])
        return super().aggregate_train(server_round, replies)


def config(**overrides):
    """``loss__name=x`` -> ``loss.name = x``; ``model__cosine_head`` -> ``model.cosine-head``."""
    return load_config(
        None, {k.replace("__", ".").replace("_", "-"): v for k, v in overrides.items()}
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"loss.smoothnig": 0.2},
            "unknown config key 'loss.smoothnig' (did you mean 'smoothing'?); "
            f"loss '{HERE}:smoothed_ce' accepts: smoothing, tempered",
        ),
        ({"loss.tempered": "false"}, "loss.tempered = 'false': expected true or false"),
        ({"loss.smoothing": "0.2"}, "loss.smoothing = '0.2': expected a number"),
    ],
)
def test_a_plugins_parameters_are_checked_like_a_builtins(overrides, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        load_config(None, {"loss.name": f"{HERE}:smoothed_ce", **overrides})
    model = {"model.name": f"{HERE}:small_net", "model.width": "8"}
    with pytest.raises(ConfigError, match=r"model\.width = '8': expected an integer"):
        load_config(None, model)


def test_a_plugin_takes_its_own_keys_of_a_shared_table_and_ignores_the_builtins():
    shared = {"loss.name": f"{HERE}:smoothed_ce", "loss.smoothing": 0.3, "loss.gamma": 2.0}
    loss = load_config(None, shared).loss
    assert loss.kwargs() == {"smoothing": 0.3}
    assert loss.ignored == {"gamma"}  # focal's: named in a warning
    # **kwargs: it receives every key and checks them itself.
    loss = load_config(None, {**shared, "loss.name": f"{HERE}:open_ended"}).loss
    assert loss.kwargs() == {"smoothing": 0.3, "gamma": 2.0}


def test_a_sweeps_shared_table_may_carry_its_plugins_keys_for_the_other_cells():
    plugin = f"{HERE}:smoothed_ce"
    sweep = Sweep(
        base=DEFAULT_CONFIG,
        name="mix",
        fixed={"loss.smoothing": 0.3},
        grid={"loss.name": ["ce", plugin]},
    )
    plugins = sweep_plugins(sweep)
    assert plugins == {"loss": [plugin]}
    ce = load_config(None, {"loss.name": "ce", "loss.smoothing": 0.3}, plugins=plugins)
    assert ce.loss.ignored == {"smoothing"} and "loss.smoothing" not in ce.to_flat()
    with pytest.raises(ConfigError, match=r"unknown config key 'loss\.smoothing'"):
        load_config(None, {"loss.name": "ce", "loss.smoothing": 0.3})  # a typo elsewhere


def test_a_plugin_loss_is_built_on_the_datas_counts_and_its_errors_are_one_line():
    # Built on 10 digit classes it works; on fewer, its own IndexError is one line.
    prepare(config(loss__name=f"{HERE}:last_class_weighted", engine="inprocess"))
    bad = config(loss__name=f"{HERE}:last_class_weighted", loss__cls=12, engine="inprocess")
    with pytest.raises(ConfigError, match=r"^\[loss\] .*last_class_weighted: IndexError: "):
        prepare(bad)


def test_a_cosine_head_scales_a_plugins_logits_when_it_takes_s(caplog):
    with caplog.at_level(logging.WARNING, logger="fedimb.preflight"):
        scaled = config(loss__name=f"{HERE}:scaled_ce", model__cosine_head=True)
        assert loss_kwargs(scaled) == {"s": 30.0}
        warn_about_settings(scaled)
        assert "takes no s" not in caplog.text
        unscaled = config(loss__name=f"{HERE}:smoothed_ce", model__cosine_head=True)
        assert "s" not in loss_kwargs(unscaled)
        warn_about_settings(unscaled)
    assert "takes no s: on a cosine head" in caplog.text


def test_ldam_turns_on_only_a_cosine_head_the_model_has(caplog):
    headless = config(loss__name="ldam", model__name=f"{HERE}:small_net")
    assert "cosine_head" not in model_kwargs(headless)  # it would be a TypeError
    assert model_kwargs(config(loss__name="ldam"))["cosine_head"] is True
    with caplog.at_level(logging.WARNING, logger="fedimb.preflight"):
        warn_about_settings(headless)
    assert "takes no cosine_head" in caplog.text


def test_a_strategy_that_cannot_be_pickled_fails_before_the_run():
    name = f"{HERE}:LambdaFedAvg"
    with pytest.raises(ConfigError, match="cannot be pickled, which every checkpoint does"):
        load_config(None, {"strategy.name": name})
    assert load_config(None, {"strategy.name": name, "checkpoint-every": 0})  # no checkpoints


@pytest.mark.slow
def test_a_strategy_reads_each_clients_class_counts_from_its_reply(tmp_path):
    from fedimb.results import read_json, read_jsonl
    from fedimb.sim import run_experiment

    CountingFedAvg.seen.clear()
    run = config(
        strategy__name=f"{HERE}:CountingFedAvg", engine="inprocess", num_rounds=1, num_clients=6
    )
    run_experiment(run, tmp_path, progress=False)
    counts = read_json(tmp_path / "partition.json")["counts"]
    assert CountingFedAvg.seen == dict(enumerate(counts))
    assert all("class-counts" not in row for row in read_jsonl(tmp_path / "clients.jsonl"))


def test_a_plugin_sampler_gets_its_parameters():
    from fedimb.train import TrainSettings, make_plan

    name = f"{HERE}:repeated"
    run = config(sampling__name=name, sampling__times=3, engine="inprocess")
    prepare(run)  # builds client 0's epoch with the parameter
    labels = np.arange(40) % 2
    plan = make_plan(
        labels,
        TrainSettings(batch_size=8),
        np.random.default_rng(0),
        sampler=name,
        **run.sampling.kwargs(),
    )
    assert plan.num_steps == 15  # 3 x 40 samples in batches of 8


def test_a_plugins_required_parameter_must_be_set():
    name = f"{HERE}:needs_width"
    with pytest.raises(ConfigError, match=r"model\.width is required: model .* has no default"):
        load_config(None, {"model.name": name})
    assert load_config(None, {"model.name": name, "model.width": 4}).model.kwargs() == {"width": 4}


def test_a_plugin_strategys_parameters_are_its_classs_and_its_bases():
    name = "strategies.example_custom:ServerLRFedAvg"
    with pytest.raises(ConfigError, match=r"strategy\.server-lr = '0\.5': expected a number"):
        load_config(None, {"strategy.name": name, "strategy.server-lr": "0.5"})
    taken = load_config(None, {"strategy.name": name, "strategy.fraction-evaluate": 0.5})
    assert taken.strategy.kwargs() == {"fraction_evaluate": 0.5}  # FedAvg's, by **kwargs
    fedprox_key = load_config(None, {"strategy.name": name, "strategy.proximal-mu": 0.1})
    assert fedprox_key.strategy.ignored == {"proximal-mu"}  # another strategy's: a warning


def test_a_plugin_with_kwargs_lets_the_other_cells_carry_any_key():
    plugins = {"loss": [f"{HERE}:open_ended"]}
    ce = load_config(None, {"loss.name": "ce", "loss.anything": 1}, plugins=plugins)
    assert ce.loss.ignored == {"anything"}


@pytest.mark.slow
def test_a_plain_callable_loss_says_it_trains_one_client_at_a_time(tmp_path, caplog, monkeypatch):
    # batched = auto vectorises the MLP on CPU; a plain callable cannot be: said once.
    from fedimb import client
    from fedimb.sim import run_experiment

    monkeypatch.setattr(client, "_WARNED", set())
    run = config(loss__name=f"{HERE}:smoothed_ce", engine="inprocess", num_rounds=2)
    with caplog.at_level(logging.WARNING, logger="fedimb.client"):
        run_experiment(run, tmp_path, progress=False)
    said = [r.getMessage() for r in caplog.records if "one at a time" in r.getMessage()]
    why = "a loss is a plain callable, not LossParams"
    assert said == [f"batched = 'auto' but clients train one at a time: {why}"]

    # One client a round trains alone anyway: nothing to say.
    monkeypatch.setattr(client, "_WARNED", set())
    caplog.clear()
    alone = {"strategy.fraction-train": 0.25, "strategy.min-train-clients": 1}
    with caplog.at_level(logging.WARNING, logger="fedimb.client"):
        run_experiment(
            run.with_overrides({"num-clients": 4, **alone}), tmp_path / "b", progress=False
        )
    assert "one at a time" not in caplog.text


class SamplesItsOwnWay(FedAvg):
    """A plug-in whose constructor takes no sampling argument: FedAvg's stay."""

    def __init__(self, max_norm: float = 1.0) -> None:
        super().__init__()
        self.max_norm = max_norm


class SwallowsItsKwargs(FedAvg):
    """Takes any key (``**kwargs``) but passes none on."""

    def __init__(self, max_norm: float = 1.0, **kwargs) -> None:
        super().__init__()


class FixesItsOwnFraction(FedAvg):
    def __init__(self) -> None:
        super().__init__(fraction_train=0.5)


@pytest.mark.parametrize("cls", ["SamplesItsOwnWay", "SwallowsItsKwargs"])
def test_sampling_a_plugin_strategy_would_not_do_is_refused_not_dropped(cls):
    name = f"{HERE}:{cls}"
    with pytest.raises(
        ConfigError,
        match=r"fraction-train = 0.5 cannot apply, the strategy keeps fraction_train = 1.0",
    ):
        load_config(None, {"strategy.name": name, "strategy.fraction-train": 0.5})
    with pytest.raises(
        ConfigError,
        match=r"min-train-clients = 3 cannot apply, the strategy keeps min_train_nodes = 2",
    ):
        load_config(None, {"strategy.name": name, "strategy.min-train-clients": 3})
    load_config(None, {"strategy.name": name})  # the config's defaults are FedAvg's
    # A plug-in may fix its own sampling where the config keeps the default.
    assert load_config(None, {"strategy.name": f"{HERE}:FixesItsOwnFraction"})


def three_extra_logits(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes + 3))


def per_sample_ce(class_counts, *, server_round=1, num_rounds=1):
    return lambda z, y: nn.functional.cross_entropy(z, y, reduction="none")


def float_ce(class_counts, *, server_round=1, num_rounds=1):
    return lambda z, y: float(nn.functional.cross_entropy(z, y))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"model.name": f"{HERE}:three_extra_logits"},
            r"^\[model\] .*: it returned shape \[2, 13\] for 2 samples of 10 classes; a model "
            r"must return logits of shape \[batch, num_classes\]",
        ),
        (
            {"loss.name": f"{HERE}:per_sample_ce"},
            r"^\[loss\] .*: it returned a tensor of shape \[2\]; a loss must return one number",
        ),
        ({"loss.name": f"{HERE}:float_ce"}, r"^\[loss\] .*: it returned a float; a loss must"),
    ],
)
def test_a_plugin_that_cannot_train_fails_before_the_run_in_one_line(overrides, message):
    """Checked on one batch of client 0 before any round: otherwise every client fails
    its first step (or, vectorised, the whole round raises a shape error)."""
    with pytest.raises(ConfigError, match=message):
        prepare(load_config(None, {"engine": "inprocess", **overrides}))


def one_part_short(labels, num_clients, rng):
    return np.array_split(np.arange(len(labels)), num_clients - 1)


def last_client_empty(labels, num_clients, rng):
    return [*np.array_split(np.arange(len(labels)), num_clients - 1), np.array([], dtype=int)]


def index_past_the_end(labels, num_clients, rng):
    parts = np.array_split(np.arange(len(labels)), num_clients)
    return [*parts[:-1], np.append(parts[-1], len(labels))]


def rows_of_a_matrix(labels, num_clients, rng):
    n = len(labels) // num_clients * num_clients
    return rng.permutation(n).reshape(num_clients, -1)


def all_in_one_array(labels, num_clients, rng):
    return np.arange(len(labels))


def float_indices(labels, num_clients, rng):
    return [p.astype(float) for p in np.array_split(np.arange(len(labels)), num_clients)]


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        ("one_part_short", r"returned 19 parts for num-clients = 20; it must return one"),
        ("all_in_one_array", r"returned no sequence of parts for num-clients = 20"),
        ("last_client_empty", r"client\(s\) 19 would get no data: partitioner .* must give"),
        ("index_past_the_end", r"client 19's part holds index 1497, outside the 1497 samples"),
        ("float_indices", r"client 0's part has dtype float64 .* 1-D array of integer"),
    ],
)
def test_a_plugin_partition_is_checked_before_the_run(fn, message):
    with pytest.raises(ConfigError, match=message):
        prepare(load_config(None, {"partition.name": f"{HERE}:{fn}", "engine": "inprocess"}))


def test_a_plugin_partition_may_return_the_rows_of_a_matrix():
    prepare(
        load_config(None, {"partition.name": f"{HERE}:rows_of_a_matrix", "engine": "inprocess"})
    )


def not_a_model(input_shape, num_classes):
    return "mlp"


def not_a_dataset(root, cache_dir):
    return np.zeros((4, 2)), np.arange(4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"model.name": f"{HERE}:not_a_model"},
            r"^\[model\] .*: model .* returned a str; a model factory must return a torch",
        ),
        (
            {"dataset": f"{HERE}:not_a_dataset"},
            r"dataset .* returned a tuple; a dataset loader must return a fedimb",
        ),
    ],
)
def test_a_plugin_factory_returning_the_wrong_kind_is_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        prepare(load_config(None, {"engine": "inprocess", **overrides}))


class DropsALayer(FedAvg):
    """Aggregates as FedAvg, then loses the model's first array."""

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        del arrays[next(iter(arrays.keys()))]
        return arrays, metrics


def test_a_global_model_that_does_not_fit_the_model_fails_the_run_in_one_line(tmp_path, capsys):
    from fedimb import cli
    from fedimb.results import read_json

    out = tmp_path / "run"
    args = ["run", "--engine", "inprocess", "--set", "num-rounds=2", "-q", "--out", str(out)]
    assert cli.main([*args, "--set", f"strategy.name={HERE}:DropsALayer"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert f"round 1: strategy '{HERE}:DropsALayer' returned a global model that does not " in err
    assert "fit model 'mlp': missing '1.weight'" in err and "Traceback" not in err
    summary = read_json(out / "summary.json")
    assert summary["status"] == "failed" and "missing '1.weight'" in summary["error"]


class NeverAggregates(FedAvg):
    def aggregate_train(self, server_round, replies):
        return None, None


def test_a_strategy_that_returns_no_model_from_replies_is_named_once(tmp_path, caplog):
    from fedimb.sim import run_experiment

    config = load_config(
        None,
        {"engine": "inprocess", "num-rounds": 3, "strategy.name": f"{HERE}:NeverAggregates"},
    )
    with caplog.at_level(logging.WARNING, logger="fedimb.server"):
        run_experiment(config, tmp_path / "run", progress=False)
    said = [r.message for r in caplog.records if "returned no global model" in r.message]
    assert said == [
        "round 1: the strategy returned no global model from 20 replies, so the model stays "
        "as it was (said once)"
    ]


class ReportsItsStep(FedAvg):
    """FedAvg that also reports a number of its own, as a user's strategy may."""

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        metrics["step-size"] = 0.5 * server_round
        return arrays, metrics


@pytest.mark.parametrize(("strategy", "extra"), [("ReportsItsStep", True), ("fedavg", False)])
def test_what_a_strategy_reports_of_its_own_is_in_the_metrics(tmp_path, strategy, extra):
    from fedimb.results import read_jsonl
    from fedimb.sim import run_experiment

    name = f"{HERE}:{strategy}" if extra else strategy
    config = load_config(None, {"engine": "inprocess", "num-rounds": 2, "strategy.name": name})
    run_experiment(config, tmp_path / "run", progress=False)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    own = [{k: v for k, v in row.items() if k.startswith("strategy_")} for row in rows]
    # The clients' own metrics, which FedAvg averages, are not repeated as the strategy's.
    assert own == (
        [{}, {"strategy_step_size": 0.5}, {"strategy_step_size": 1.0}] if extra else [{}] * 3
    )


WIDTH = {"hidden": 8}


def resizable(input_shape, num_classes):
    """A plug-in model whose code 'changes' between a run and its resume."""
    hidden = WIDTH["hidden"]
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )


def test_a_checkpoint_that_no_longer_fits_the_model_is_refused_on_resume(
    tmp_path, capsys, monkeypatch
):
    from fedimb import cli, client

    out = tmp_path / "run"
    run = ["run", "--engine", "inprocess", "-q", "--set", f"model.name={HERE}:resizable"]
    assert cli.main([*run, "--set", "num-rounds=1", "--out", str(out)]) == 0
    monkeypatch.setitem(WIDTH, "hidden", 16)
    monkeypatch.setattr(client, "_MODELS", {})  # the process's model cache, as a new process
    assert cli.main(["run", "--resume", str(out), "-q", "--set", "num-rounds=2"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt: its model does not fit model" in err
    assert "'1.weight' has shape [16, 64], the model's" not in err  # saved vs model, not reversed
    assert "'1.weight' has shape [8, 64], the model's [16, 64]" in err


def test_a_loss_that_is_not_a_factory_says_what_a_factory_is():
    with pytest.raises(
        ConfigError,
        match=r"^\[loss\] torch\.nn:CrossEntropyLoss: loss .* cannot be called as a loss factory "
        r"\(got an unexpected keyword argument 'server_round'\): it must be "
        r"factory\(class_counts, \*, server_round, num-rounds",
    ):
        prepare(load_config(None, {"loss.name": "torch.nn:CrossEntropyLoss"}))


def test_a_misspelt_plugin_name_gets_the_closest_one():
    with pytest.raises(ConfigError, match=rf"did you mean '{HERE}:SamplesItsOwnWay'\?"):
        load_config(None, {"strategy.name": f"{HERE}:samplesitsownway"})
    with pytest.raises(ConfigError, match=rf"did you mean '{HERE}:smoothed_ce'\?"):
        load_config(None, {"loss.name": f"{HERE}:smoothed_cee"})


def test_a_strategys_own_min_train_nodes_still_wins_over_min_train_clients():
    """README: min-train-clients sets Flower's min-train-nodes; either, set too, wins."""
    config = load_config(
        None, {"strategy.min-train-clients": 3, "strategy.min-train-nodes": 5, "num-clients": 20}
    )
    assert config.strategy_kwargs()["min_train_nodes"] == 5
