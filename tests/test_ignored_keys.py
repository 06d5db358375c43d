"""A component key is called ignored only where the user set it, not where a base file's
key for the file's own component was left behind by ``--set TABLE.name=...``."""

import logging

import pytest

from fedimb.config import load_config
from fedimb.preflight import warn_about_ignored_keys

IGNORED = "partition.classes-per-client is ignored: partition 'dirichlet' does not take it"


def warnings_for(caplog, path=None, **overrides) -> str:
    caplog.clear()
    config = load_config(path, {k.replace("__", "."): v for k, v in overrides.items()})
    with caplog.at_level(logging.WARNING, logger="fedimb.preflight"):
        warn_about_ignored_keys(config, ["partition"])
    return caplog.text


@pytest.mark.parametrize(
    "own",
    [{"partition__name": "dirichlet", "partition__alpha": 0.1}, {"partition__name": "shards"}],
)
def test_a_base_files_key_left_behind_by_set_name_is_not_named(caplog, own):
    # The README's examples: the quickstart config has classes-per-client = 2.
    assert "is ignored" not in warnings_for(caplog, **own)


def test_a_key_the_user_sets_beside_a_component_that_ignores_it_is_named(caplog):
    text = warnings_for(caplog, partition__name="dirichlet", **{"partition__classes-per-client": 3})
    assert IGNORED in text


def test_a_files_own_key_for_another_component_is_named(caplog, tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[partition]\nname = "dirichlet"\nclasses-per-client = 2\n')
    assert IGNORED in warnings_for(caplog, path)
