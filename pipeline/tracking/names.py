"""The names of the metrics a training run logs to MLflow, and what they were called before.

MLflow's UI puts a run's charts into one section per name prefix before "/", sections in
alphabetical order: `budgets/` (accuracy against cost), `exits/` (test accuracy per exit, step =
exit index), `exits_cost/` (MFLOPs and profiled time per exit), `test/` (the evaluation's single
figures: bar charts), `train/` and `val/` (per epoch). Runs logged before the sections carry
flat names (`legacy`), which the readers here still accept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Run

EXIT_TOP1 = "exits/test_top1"
EXIT_TOP5 = "exits/test_top5"
EXIT_MFLOPS = "exits_cost/mflops"
BUDGET_TOP1 = "budgets/top1_by_kflops"
BUDGET_TOP1_FLAT = "budgets/top1_flat_by_kflops"
EPOCH_SECONDS = "train/epoch_seconds"
FINAL_TOP1 = "test/final_top1"
MEAN_TOP1 = "test/mean_top1"


def exit_ms(column: str) -> str:
    """`column` is ms_batch_1 or ms_batch_n: the profile's time per image at each exit."""
    return f"exits_cost/{column}"


def budget_top1_by_us(regime: str) -> str:
    """`regime` is batch_1 or batch_n: the flat curve against predicted microseconds."""
    return f"budgets/top1_flat_by_us_{regime}"


def per_exit(quantity: str, index: int) -> str:
    """An epoch's value at exit `index`: train/loss, train/effective_samples or val/top1."""
    return f"{quantity}_exit_{index}"


def flops_budget(target_mflops: float, key: str) -> str:
    return f"test/budget_{target_mflops:g}M_{key}"  # MLflow names allow no "+": MFLOPs


def time_budget(name: str, key: str) -> str:
    return f"test/time_{name}_{key}"


# The names whose old form follows no rule (see `legacy`).
IRREGULAR = {
    EXIT_TOP1: "test_top1_by_exit",
    EXIT_TOP5: "test_top5_by_exit",
    EXIT_MFLOPS: "mflops_by_exit",
    exit_ms("ms_batch_1"): "ms_batch_1_by_exit",
    exit_ms("ms_batch_n"): "ms_batch_n_by_exit",
    BUDGET_TOP1: "budget_top1_by_kflops",
    BUDGET_TOP1_FLAT: "budget_top1_flat_by_kflops",
    budget_top1_by_us("batch_1"): "budget_top1_flat_by_us_batch_1",
    budget_top1_by_us("batch_n"): "budget_top1_flat_by_us_batch_n",
    FINAL_TOP1: "test_final_top1",
    MEAN_TOP1: "test_mean_top1",
}


def legacy(name: str) -> str:
    """The flat name `name` had before the sections: val/x was val_x, train/loss_exit_k was
    train_loss_exit_k, the other train/ and test/ names lost their prefix (train/lr was lr,
    test/budget_1.5M_top1 was budget_1.5M_top1)."""
    if name in IRREGULAR:
        return IRREGULAR[name]
    section, _, rest = name.partition("/")
    if section == "val" or (section == "train" and rest.startswith("loss_")):
        return f"{section}_{rest}"
    return rest or name


def metric_history(client: MlflowClient, run_id: str, name: str) -> list[Metric]:
    """A metric's history by its name, or by its old name in a run logged before the rename."""
    found = client.get_metric_history(run_id, name)
    return found or client.get_metric_history(run_id, legacy(name))


def latest(run: Run, name: str) -> float | None:
    """A metric's last value in `run`, under its name or its old one."""
    metrics = run.data.metrics
    return metrics.get(name, metrics.get(legacy(name)))
