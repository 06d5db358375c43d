"""The light registries: the catalogue `fedimb list` reads and the engine registry that the
config and the CLI read, without torch or Flower."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedimb.catalog import HOMES, registered_names


def real_names(kind: str) -> list[str]:
    import strategies
    from fedimb import losses, models, sampling
    from fedimb.data import datasets
    from fedimb.data.partition import PARTITIONERS

    return {
        "datasets": datasets.list_datasets,
        "partitions": PARTITIONERS.names,
        "losses": losses.list_losses,
        "samplers": sampling.list_samplers,
        "models": models.list_models,
        "strategies": strategies.list_strategies,
    }[kind]()


@pytest.mark.parametrize("kind", list(HOMES))
def test_the_catalogue_names_what_the_registries_hold(kind):
    # A registration whose name is not a string literal, or in a module missing from
    # HOMES, is missed here: register with a literal name, in the kind's home.
    assert registered_names(kind) == real_names(kind)


def test_list_names_every_component_without_torch_or_flower():
    code = (
        "import sys, contextlib, io\n"
        "from fedimb.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    main(['list'])\n"
        "print(sorted(m for m in ('torch', 'flwr', 'ray') if m in sys.modules))\n"
        "print(out.getvalue(), end='')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded, *lines = run.stdout.splitlines()
    assert loaded == "[]"
    assert lines[: len(HOMES)] == [f"{k}: {', '.join(real_names(k))}" for k in HOMES]


def test_config_cli_and_launcher_read_one_engine_registry():
    from fedimb import config
    from fedimb.cli import build_parser
    from fedimb.engines import ENGINES, Engine, engine_names, get_engine

    assert engine_names() == config.ENGINES == ("ray", "inprocess")  # the default first
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    engine_arg = next(a for a in run._actions if a.dest == "engine")
    assert tuple(engine_arg.choices) == engine_names()
    assert all(issubclass(get_engine(name), Engine) for name in ENGINES)
    with pytest.raises(ValueError, match=r"unknown engine 'spark'.*valid: inprocess, ray"):
        get_engine("spark")


def test_the_engine_registry_imports_neither_torch_nor_flower():
    code = (
        "import sys\n"
        "import fedimb.config, fedimb.engines\n"
        "print(sorted(m for m in ('torch', 'flwr', 'ray') if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"
