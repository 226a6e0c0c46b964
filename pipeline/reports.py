"""What DVC shows of a run: metric names without dots, and per-epoch curves as a plot file.

`dvc metrics show` flattens nested keys with dots, so a budget written as `2.5e+06` becomes an
ambiguous name; budgets are keyed `budget_2M5` instead. The training curves are one row per
epoch and exit, which the `per_exit` plot template (.dvc/plots/) draws as one line per exit
for any exit count.
"""

from __future__ import annotations

from typing import Any


def _marked(value: float, mark: str) -> str:
    """`value` with `mark` as the decimal point and no trailing zeros: 2.5, "M" -> 2M5."""
    whole, _, fraction = f"{value:.6f}".rstrip("0").rstrip(".").partition(".")
    return f"{whole}{mark}{fraction}"


def budget_key(flops: float) -> str:
    """`budget_2M5` for 2.5e6 FLOPs: MFLOPs with `M` as the decimal point (as 4k7 writes
    4.7 kOhm on a resistor), `budget_3M` for 3e6, `budget_600M` for 6e8."""
    return f"budget_{_marked(flops / 1e6, 'M')}"


def time_budget_key(stated: float | str, regime: str) -> str:
    """`batch-N_0ms25` for 0.25 ms per image at batch N, in the style of `budget_key`;
    `batch-1_62pct5` for "62.5%" of the last exit's cost (the same key on every machine)."""
    if isinstance(stated, str):
        return f"{regime}_{_marked(float(stated.removesuffix('%')), 'pct')}"
    return f"{regime}_{_marked(stated, 'ms')}"


def epoch_curves(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Held-out top-1 (null without a held-out split) and training loss per epoch and exit."""
    rows = []
    for record in history:
        losses = record["train_loss"]
        top1 = record["val_top1"] or [None] * len(losses)
        for index, (loss, accuracy) in enumerate(zip(losses, top1, strict=True), start=1):
            rows.append(
                {"epoch": record["epoch"], "exit": index, "val_top1": accuracy, "train_loss": loss}
            )
    return rows


def training_seconds(history: list[dict[str, Any]]) -> float:
    """Wall time of the epochs the selected run trained, resumed attempts included."""
    return sum(record["epoch_seconds"] for record in history)
