"""The clients' learning rate by round: warm-up, decay and milestone drops."""

import re
from pathlib import Path

import pytest

from fedimb.config import ConfigError, config_changes, load_config, lr_in_round
from fedimb.schedule import scheduled_lr

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def reference_lr(epoch: int, lr: float = 0.1) -> float:
    """LDAM-DRW's ``adjust_learning_rate`` (cifar_train.py), epochs 0-based."""
    epoch = epoch + 1
    if epoch <= 5:
        return lr * epoch / 5
    if epoch > 180:
        return lr * 0.0001
    if epoch > 160:
        return lr * 0.01
    return lr


def test_the_centralised_recipe_has_the_reference_codes_learning_rate_every_round():
    config = load_config(CONFIGS / "cifar10-lt-centralised.toml")
    assert config["num-rounds"] == 200 and config["local-epochs"] == 1
    got = [lr_in_round(config, r) for r in range(1, 201)]
    assert got == pytest.approx([reference_lr(e) for e in range(200)], rel=1e-12)


def test_warm_up_ramps_linearly_then_composes_with_decay_and_drops():
    config = load_config(
        overrides={
            "num-rounds": 10,
            "lr": 0.2,
            "lr-schedule.warmup-rounds": 4,
            "lr-schedule.milestones": "3",
            "lr-schedule.gamma": 0.5,
            "lr-schedule.decay": 0.9,
        }
    )
    want = [0.2 * 0.9 ** (r - 1) * (0.5 if r >= 3 else 1) * min(r / 4, 1) for r in range(1, 8)]
    assert [lr_in_round(config, r) for r in range(1, 8)] == pytest.approx(want, rel=1e-12)
    # No warm-up: the very values of the schedule before warm-up existed.
    assert scheduled_lr(0.1, 5, milestones=[3], gamma=0.1, decay=0.9) == 0.1 * 0.9**4 * 0.1
    assert scheduled_lr(0.1, 1, warmup_rounds=1) == 0.1


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "lr-schedule.warmup-rounds = -1: must be an integer >= 0"),
        (2.5, "lr-schedule.warmup-rounds = 2.5: expected an integer >= 0"),
        ("5", "lr-schedule.warmup-rounds = '5': expected an integer >= 0"),
        (True, "lr-schedule.warmup-rounds = True: expected an integer >= 0"),
        (21, "lr-schedule.warmup-rounds = 21: must be <= num-rounds (20)"),
    ],
)
def test_bad_warm_up_is_a_one_line_error(value, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_config(overrides={"num-rounds": 20, "lr-schedule.warmup-rounds": value})
    assert "\n" not in str(info.value)


def test_warm_up_and_optimizer_state_change_results_so_a_resume_names_them():
    base = load_config(overrides={"num-rounds": 20})
    warm = base.with_overrides({"lr-schedule.warmup-rounds": 5})
    assert config_changes(base, warm) == "lr-schedule.warmup-rounds 0 -> 5"
    kept = base.with_overrides({"optimizer-state": "keep"})
    assert config_changes(base, kept) == "optimizer-state 'reset' -> 'keep'"
    with pytest.raises(
        ConfigError, match=r"optimizer-state = 'kept': must be one of 'reset', 'keep'"
    ):
        load_config(overrides={"optimizer-state": "kept"})
