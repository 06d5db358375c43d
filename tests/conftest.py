"""Shared test set-up: `gpu` tests are skipped where CUDA is not available."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class CutShort(Exception):
    """What a test's ``on_round`` hook raises to end a run early (its status: failed)."""


@pytest.fixture
def run_until():
    """Run a config to the end of round ``last`` and stop it there with ``stop``:
    ``CutShort`` (the run fails) or ``KeyboardInterrupt`` (it is interrupted)."""
    from fedimb.sim import run_experiment

    def run(config, out, last, *, stop=CutShort):
        def on_round(server_round, row):
            if server_round == last:
                raise stop

        with pytest.raises(stop):
            run_experiment(config, out, progress=False, on_round=on_round)

    return run
