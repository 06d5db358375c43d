"""A strategy's own start(), the configs it sends and edits, and its errors (issue #24)."""

import pickle
from typing import ClassVar

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedimb.config import load_config, lr_in_round
from fedimb.engines.inprocess_grid import task_identity
from fedimb.results import read_json, read_jsonl
from fedimb.server import (
    SentConfigs,
    StartSkipsEvaluation,
    StrategyFailed,
    StrategyHooks,
    load_checkpoint,
    own_class,
)
from fedimb.sim import run_experiment
from strategies.stock import FedAvg

HERE = __name__


class KeepsBest(FedAvg):
    """Flower's advanced-pytorch pattern: start() wraps evaluate_fn to keep the best
    round, calls super().start(), then does its own work."""

    best: ClassVar[list[tuple[int, float]]] = []
    finished: ClassVar[list[int]] = []

    def start(self, *, grid, initial_arrays, num_rounds, evaluate_fn, **kwargs):
        def watched(server_round, arrays):
            result = evaluate_fn(server_round, arrays)
            error = result["balanced_error"]
            if not KeepsBest.best or error < KeepsBest.best[-1][1]:
                KeepsBest.best.append((server_round, error))
            return result

        result = super().start(
            grid=grid,
            initial_arrays=initial_arrays,
            num_rounds=num_rounds,
            evaluate_fn=watched,
            **kwargs,
        )
        KeepsBest.finished.append(num_rounds)
        return result


class OwnLoop(FedAvg):
    """A start() that copies Flower's round loop instead of calling super().start()."""

    rounds: ClassVar[list[int]] = []

    def start(self, *, grid, initial_arrays, num_rounds, timeout, train_config, **kwargs):
        evaluate_fn, arrays = kwargs["evaluate_fn"], initial_arrays
        evaluate_fn(0, arrays)
        for current in range(1, num_rounds + 1):
            messages = self.configure_train(current, arrays, train_config, grid)
            replies = grid.send_and_receive(messages, timeout=timeout)
            arrays, _ = self.aggregate_train(current, replies)
            OwnLoop.rounds.append(current)
            evaluate_fn(current, arrays)


class SkipsEvaluation(FedAvg):
    def start(self, **kwargs):
        return super().start(**{**kwargs, "evaluate_fn": None})


class HalvesLr(FedAvg):
    """Flower's example pattern: edits the train config start() passes, in place."""

    def configure_train(self, server_round, arrays, config, grid):
        if server_round == 5:
            config["lr"] *= 0.5
        return super().configure_train(server_round, arrays, config, grid)


class StopsInRound3(FedAvg):
    def aggregate_train(self, server_round, replies):
        if server_round == 3:
            raise StopIteration
        return super().aggregate_train(server_round, replies)


class FailsAfterItsRounds(FedAvg):
    def start(self, **kwargs):
        super().start(**kwargs)
        raise OSError("cannot save the best model")


def small(strategy, **overrides):
    return load_config(
        None,
        {
            "engine": "inprocess",
            "num-clients": 6,
            "num-rounds": 3,
            "strategy.name": f"{HERE}:{strategy}",
            **overrides,
        },
    )


def rows_of(out):
    return [
        {k: v for k, v in r.items() if k != "elapsed_s"} for r in read_jsonl(out / "metrics.jsonl")
    ]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["inprocess", "ray"])
def test_a_strategys_own_start_runs_and_fedimb_still_records(tmp_path, engine):
    KeepsBest.best.clear()
    KeepsBest.finished.clear()
    summary = run_experiment(small("KeepsBest", engine=engine), tmp_path, progress=False)
    assert summary["status"] == "completed"
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    # Its own work ran, on the numbers fedimb evaluated.
    assert KeepsBest.finished == [3]
    assert KeepsBest.best[0] == (0, rows[0]["balanced_error"])
    assert min(e for _, e in KeepsBest.best) == min(r["balanced_error"] for r in rows)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["round"] == 3
    assert type(load_checkpoint(tmp_path / "checkpoint.pt")["strategy"]) is KeepsBest


@pytest.mark.slow
def test_a_start_with_its_own_loop_goes_through_fedimbs_hooks(tmp_path):
    OwnLoop.rounds.clear()
    run_experiment(small("OwnLoop", **{"strategy.fraction-train": 0.5}), tmp_path, progress=False)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert OwnLoop.rounds == [1, 2, 3]
    assert [r["clients"] for r in rows[1:]] == [3, 3, 3]
    assert len({r["balanced_error"] for r in rows}) > 1  # the model trained


@pytest.mark.slow
def test_a_start_that_skips_evaluate_fn_is_refused_before_round_1(tmp_path):
    with pytest.raises(StartSkipsEvaluation) as caught:
        run_experiment(small("SkipsEvaluation"), tmp_path, progress=False)
    message = str(caught.value)
    assert message.startswith(f"strategy '{HERE}:SkipsEvaluation': its start() reached round 1")
    assert "cannot evaluate the global model, write metrics.jsonl, checkpoint" in message
    assert read_json(tmp_path / "summary.json")["error"] == message
    assert not (tmp_path / "metrics.jsonl").exists() or not read_jsonl(tmp_path / "metrics.jsonl")


@pytest.mark.slow
def test_lr_is_what_the_clients_were_sent_and_resume_keeps_the_strategys_edit(tmp_path, run_until):
    config = small("HalvesLr", **{"num-rounds": 8})
    run_experiment(config, tmp_path / "full", progress=False)
    full = rows_of(tmp_path / "full")
    assert [r["lr"] for r in full[1:]] == [0.05] * 4 + [0.025] * 4
    assert [r.get("sent_lr") for r in full[1:]] == [None] * 4 + [0.025] * 4

    cut = tmp_path / "cut"
    run_until(config, cut, 6, stop=KeyboardInterrupt)
    assert read_json(cut / "summary.json")["status"] == "interrupted"
    run_experiment(config, cut, resume=True, progress=False)
    assert rows_of(cut) == full  # rounds 7-8 trained at the halved lr, as uninterrupted
    weights = [
        load_checkpoint(out / "checkpoint.pt")["state_dict"] for out in (cut, tmp_path / "full")
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])


@pytest.mark.slow
def test_under_ray_the_recorded_lr_is_the_one_a_strategy_sent(tmp_path):
    config = small("HalvesLr", engine="ray", **{"num-rounds": 6})
    run_experiment(config, tmp_path, progress=False)
    rows = rows_of(tmp_path)
    assert [r["lr"] for r in rows[1:]] == [0.05] * 4 + [0.025] * 2
    assert [r.get("sent_lr") for r in rows[1:]] == [None] * 4 + [0.025] * 2


@pytest.mark.slow
def test_a_resumed_run_of_a_strategy_with_its_own_start_equals_an_uninterrupted_one(
    tmp_path, run_until
):
    config = small("KeepsBest", **{"num-rounds": 5})
    KeepsBest.best.clear()
    run_experiment(config, tmp_path / "full", progress=False)
    full = rows_of(tmp_path / "full")

    cut = tmp_path / "cut"
    run_until(config, cut, 3, stop=KeyboardInterrupt)
    KeepsBest.finished.clear()
    run_experiment(config, cut, resume=True, progress=False)
    assert KeepsBest.finished == [2]  # its start() ran again, for the rounds left
    assert rows_of(cut) == full
    weights = [
        load_checkpoint(out / "checkpoint.pt")["state_dict"] for out in (cut, tmp_path / "full")
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])


@pytest.mark.slow
def test_a_strategys_error_is_one_line_naming_it_and_the_round(tmp_path, capsys):
    from fedimb import cli

    out = tmp_path / "run"
    args = ["run", "--engine", "inprocess", "--set", "num-rounds=3", "--set", "num-clients=4"]
    args += ["--set", f"strategy.name={HERE}:StopsInRound3", "-q", "--out", str(out)]
    assert cli.main(args) == cli.EXIT_FAILED
    line = f"strategy '{HERE}:StopsInRound3' failed in round 3 (aggregate_train): "
    line += "StopIteration (no message)"
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"fedimb: error: {line}"
    assert "Traceback" not in err
    assert read_json(out / "summary.json")["error"] == line
    assert read_jsonl(out / "metrics.jsonl")[-1]["round"] == 2

    assert cli.main([*args[:-2], "--out", str(tmp_path / "verbose"), "-v"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "Traceback" in err and "raise StopIteration" in err and line in err


@pytest.mark.slow
def test_an_error_in_a_strategys_own_start_names_it_and_the_last_round(tmp_path):
    with pytest.raises(StrategyFailed) as caught:
        run_experiment(small("FailsAfterItsRounds", **{"num-rounds": 2}), tmp_path, progress=False)
    line = f"strategy '{HERE}:FailsAfterItsRounds' failed in round 2 (start): "
    assert str(caught.value) == line + "OSError: cannot save the best model"
    assert read_json(tmp_path / "summary.json")["error"] == str(caught.value)


def test_a_hooked_strategy_pickles_as_its_own_class_and_hooks_again_on_resume():
    strategy = StrategyHooks("x", 0, seed=0).attach(HalvesLr())
    assert isinstance(strategy, HalvesLr) and type(strategy) is not HalvesLr
    assert type(strategy).__name__ == "HalvesLr" and own_class(strategy) is HalvesLr
    strategy.marker = 7
    copy = pickle.loads(pickle.dumps(strategy))
    assert type(copy) is HalvesLr and copy.marker == 7
    assert own_class(strategy) is HalvesLr  # still hooked after pickling
    again = StrategyHooks("x", 4, seed=0).attach(strategy)  # not a subclass of a subclass
    assert type(again).__bases__ == (HalvesLr,)


def test_a_hook_shifts_the_round_by_the_resumed_offset():
    seen = []

    class Records(FedAvg):
        def aggregate_train(self, server_round, replies):
            seen.append(server_round)
            return None, None

    hooks = StrategyHooks("x", 4, seed=0)
    strategy = hooks.attach(Records())
    strategy.aggregate_train(1, [])
    assert seen == [5] and hooks.round == 5


def sent(lrs, config=None, **extra):
    """One train message per lr, each carrying ``config`` (the default's) with that lr."""
    base = (config or load_config(None, {"engine": "inprocess"})).to_flat()
    return [
        Message(
            RecordDict({"config": ConfigRecord({**base, "lr": lr, "server-round": 2, **extra})}),
            dst_node_id=node,
            message_type=MessageType.TRAIN,
        )
        for node, lr in enumerate(lrs, start=1)
    ]


def test_sent_configs_record_what_the_clients_train_with():
    config = load_config(None, {"engine": "inprocess"})
    record = SentConfigs(config)
    with task_identity(run_id=1):
        record.record(2, sent([0.05, 0.05]))
        record.record(3, sent([0.02, 0.04], **{"local-epochs": 3, "server-round": 3}))
    assert record.row(1) == {"lr": 0.05}  # nothing sent: the config's
    assert record.row(2) == {"lr": 0.05}  # nothing changed: no sent_ columns
    assert record.row(3) == pytest.approx(
        {"lr": 0.03, "sent_lr": 0.03, "sent_local_epochs": 3.0}
    )  # clients sent different values: their mean


def test_sent_lr_follows_the_schedule_as_the_client_computes_it():
    schedule = {"engine": "inprocess", "lr-schedule.milestones": "2"}
    with task_identity(run_id=1):
        record = SentConfigs(load_config(None, schedule))
        record.record(2, sent([0.1], load_config(None, schedule)))
    expected = lr_in_round(load_config(None, {**schedule, "lr": 0.1}), 2)
    assert expected < 0.1 and record.row(2)["lr"] == pytest.approx(expected)


def test_a_strategy_error_outside_a_hook_is_blamed_on_start():
    hooks = StrategyHooks("x", 2, seed=0)
    failure = hooks.failed("start", ValueError("bad"))
    assert isinstance(failure, StrategyFailed)
    assert str(failure) == "strategy 'x' failed before round 3 (start): ValueError: bad"
    hooks.round = 4
    assert str(hooks.failed("start", KeyError())) == (
        "strategy 'x' failed in round 4 (start): KeyError (no message)"
    )
