"""Per-round loggers: a plug-in by import path, TensorBoard as a built-in (a fake writer
here: tensorboard is an optional extra), bad names refused before a run starts."""

import textwrap

import pytest

from fedimb import loggers
from fedimb.cli import EXIT_BAD_INPUT, main
from fedimb.config import ConfigError, load_config
from fedimb.loggers import check_loggers, round_scalars

RUN = ["run", "--engine", "inprocess", "--set", "num-clients=4", "--set", "num-rounds=3", "-q"]

FAKE_LOGGER = """
    CALLS = []


    class FakeLogger:
        def __init__(self, run_dir, config):
            CALLS.append(("open", run_dir.name, config["num-rounds"]))

        def log_round(self, server_round, scalars):
            CALLS.append(("round", server_round, scalars))

        def close(self):
            CALLS.append(("close",))


    class Broken(FakeLogger):
        def log_round(self, server_round, scalars):
            raise OSError("the tracking server is down")
"""


@pytest.fixture()
def fake_logger(tmp_path, monkeypatch):
    (tmp_path / "fake_logger.py").write_text(textwrap.dedent(FAKE_LOGGER))
    monkeypatch.syspath_prepend(str(tmp_path))
    import fake_logger

    fake_logger.CALLS.clear()
    yield fake_logger
    monkeypatch.delitem(__import__("sys").modules, "fake_logger")


def test_round_scalars_name_each_class_and_leave_out_what_a_round_lacks():
    row = {
        "round": 2,
        "balanced_error": 0.25,
        "accuracy": 0.75,
        "worst_class_error": 0.5,
        "per_class_error": [0.0, 0.5, None],
        "train_loss": float("nan"),
        "lr": 0.05,
        "clients": 4,
    }
    assert round_scalars(row, ["cat", "dog", "eel"]) == {
        "balanced_error": 0.25,
        "accuracy": 0.75,
        "worst_class_error": 0.5,
        "lr": 0.05,
        "per_class_error/cat": 0.0,
        "per_class_error/dog": 0.5,
    }


@pytest.mark.slow
def test_a_plugin_logger_gets_every_rounds_scalars_and_is_closed(tmp_path, fake_logger):
    out = tmp_path / "run"
    assert main([*RUN, "--set", "loggers=fake_logger:FakeLogger", "--out", str(out)]) == 0
    calls = fake_logger.CALLS
    assert calls[0] == ("open", "run", 3) and calls[-1] == ("close",)
    rounds = [c for c in calls if c[0] == "round"]
    assert [r[1] for r in rounds] == [0, 1, 2, 3]
    last = rounds[-1][2]
    assert {"balanced_error", "accuracy", "worst_class_error", "train_loss", "lr"} <= set(last)
    assert sum(k.startswith("per_class_error/") for k in last) == 10  # digits' classes
    assert "train_loss" not in rounds[0][2]  # round 0: the initial model, nothing trained


@pytest.mark.slow
def test_a_logger_that_fails_is_dropped_and_the_run_goes_on(tmp_path, fake_logger, caplog):
    out = tmp_path / "run"
    assert main([*RUN, "--set", "loggers=fake_logger:Broken", "--out", str(out)]) == 0
    assert "logger 'fake_logger:Broken' failed in round 0 (OSError: the tracking" in caplog.text
    assert caplog.text.count("failed in round") == 1


@pytest.mark.slow
def test_tensorboard_writes_each_scalar_by_round(tmp_path, monkeypatch):
    written, opened = [], []

    class FakeWriter:
        def __init__(self, log_dir):
            opened.append(log_dir)

        def add_scalar(self, tag, value, step):
            written.append((tag, step))

        def close(self):
            opened.append("closed")

    monkeypatch.setattr(loggers, "_summary_writer", FakeWriter)
    monkeypatch.setattr(loggers.TensorBoardLogger, "check_available", staticmethod(lambda: None))
    out = tmp_path / "run"
    assert main([*RUN, "--set", "loggers=tensorboard", "--out", str(out)]) == 0
    assert opened == [out / "tensorboard", "closed"]
    assert ("balanced_error", 3) in written and ("per_class_error/9", 3) in written
    assert ("lr", 1) in written and ("lr", 0) not in written


def test_bad_loggers_are_refused_before_a_run_starts(tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigError, match="unknown logger 'tensorbord' \\(did you mean"):
        check_loggers(load_config(None, {"loggers": "tensorbord"}))
    with pytest.raises(ConfigError, match="cannot import module 'nowhere'"):
        check_loggers(load_config(None, {"loggers": "nowhere:Logger"}))
    monkeypatch.setattr(loggers.TensorBoardLogger, "check_available", _missing_tensorboard)
    out = tmp_path / "run"
    assert main([*RUN, "--set", "loggers=tensorboard", "--out", str(out)]) == EXIT_BAD_INPUT
    assert "pip install tensorboard" in capsys.readouterr().err
    assert not out.exists()


def _missing_tensorboard():
    raise ConfigError(
        "loggers = 'tensorboard' needs the tensorboard package: pip install tensorboard"
    )
