"""A quick look: --version and `list keys` without torch, a seeded training subsample."""

import subprocess
import sys

import numpy as np
import pytest

from fedimb.cli import main
from fedimb.config import COMPONENT_OWN_KEYS, FIXED_TABLES, TOP_LEVEL, ConfigError, load_config
from fedimb.data.subsample import subsample
from fedimb.federation import build_federation, get_federation
from fedimb.keys import MEANINGS


def test_version_names_fedimb_and_the_packages_that_decide_results(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("fedimb ") and "torch " in out and "flwr " in out


def test_list_keys_gives_every_key_its_default_and_meaning(capsys):
    assert main(["list", "keys"]) == 0
    out = capsys.readouterr().out
    keys = [*TOP_LEVEL, *(f"{t}.{k}" for t, f in FIXED_TABLES.items() for k in f)]
    keys += [f"{t}.{k}" for t, f in COMPONENT_OWN_KEYS.items() for k in f]
    missing = [k for k in keys if not MEANINGS.get(k)]
    assert not missing, f"no meaning in fedimb/keys.py for {missing}"
    assert "  lr = 0.05: the clients' SGD learning rate" in out
    assert "[subsample]\n  fraction = 1.0: " in out
    assert "(each loss's parameters: fedimb list losses)" in out


def test_version_help_and_list_keys_start_without_torch_or_flower():
    code = (
        "import sys, contextlib, io\n"
        "from fedimb.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['list', 'keys'])\n"
        "    for flag in ('--version', '--help'):\n"
        "        with contextlib.suppress(SystemExit): main([flag])\n"
        "print(sorted(m for m in ('torch', 'flwr', 'ray') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_subsample_keeps_a_seeded_share_of_each_class_up_to_a_cap():
    labels = np.repeat(np.arange(3), [100, 50, 4])
    keep = np.arange(len(labels))[::2]  # a long tail's subset, say: 50, 25, 2
    picked = subsample(labels, keep, np.random.default_rng(0), fraction=0.2)
    assert set(picked) <= set(keep) and list(picked) == sorted(picked)
    assert np.bincount(labels[picked]).tolist() == [10, 5, 1]  # every class keeps one
    again = subsample(labels, keep, np.random.default_rng(0), fraction=0.2)
    assert picked.tolist() == again.tolist()
    capped = subsample(labels, keep, np.random.default_rng(0), fraction=1.0, per_class_cap=8)
    assert np.bincount(labels[capped]).tolist() == [8, 8, 2]
    assert subsample(labels, keep, np.random.default_rng(0)) is keep


def test_the_subsample_is_applied_before_the_partition_and_keys_the_federation():
    base = {"num-clients": 4, "device": "cpu", "partition.name": "iid"}
    full = build_federation(load_config(None, base))
    config = load_config(None, {**base, "subsample.fraction": 0.25, "subsample.per-class-cap": 30})
    small = build_federation(config)
    expected = np.minimum(np.round(0.25 * full.global_counts), 30)
    assert small.global_counts.tolist() == expected.astype(int).tolist()
    assert sum(len(p) for p in small.parts) == len(small.train_index)
    assert get_federation(config) is not get_federation(load_config(None, base))


@pytest.mark.parametrize(
    ("key", "value"), [("subsample.fraction", 0.0), ("subsample.per-class-cap", -1)]
)
def test_a_bad_subsample_is_refused(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, {key: value})
