"""The names and rows DVC shows: budget keys without dots, one curve row per epoch and exit."""

import pytest

from pipeline.reports import budget_key, epoch_curves, training_seconds


@pytest.mark.parametrize(
    ("flops", "key"),
    [(2.5e6, "budget_2M5"), (3e6, "budget_3M"), (2.2e6, "budget_2M2"), (6e8, "budget_600M"),
     (3.4e5, "budget_0M34"), (1.25e9, "budget_1250M")],
)  # fmt: skip
def test_budget_keys_read_as_mflops_and_carry_no_dot(flops, key):
    assert budget_key(flops) == key


def test_epoch_curves_have_a_row_per_epoch_and_exit():
    history = [
        {"epoch": 1, "train_loss": [2.0, 1.5], "val_top1": [50.0, 60.0], "epoch_seconds": 3.0},
        {"epoch": 2, "train_loss": [1.0, 0.5], "val_top1": [], "epoch_seconds": 4.5},
    ]
    assert epoch_curves(history) == [
        {"epoch": 1, "exit": 1, "val_top1": 50.0, "train_loss": 2.0},
        {"epoch": 1, "exit": 2, "val_top1": 60.0, "train_loss": 1.5},
        {"epoch": 2, "exit": 1, "val_top1": None, "train_loss": 1.0},  # no held-out split
        {"epoch": 2, "exit": 2, "val_top1": None, "train_loss": 0.5},
    ]
    assert training_seconds(history) == 7.5
