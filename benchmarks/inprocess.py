"""Train and score one configuration in-process with exactly the pipeline's code, for sweeps and
seed studies that would otherwise pay DVC, MLflow and Ray start-up per run.

Training is `pipeline.training.train` (Ray Train, the DDP workers params.yaml asks for, selection
on the held-out split); scoring is what the calibrate and evaluate stages do: per-exit test top-1,
thresholds fitted on the held-out split for each `calibrate.budgets` entry, applied to the test
split. Ray must be initialised by the caller (`ray.init(**ray_init_kwargs())`, after
`rayenv.prepare_ray()` and before `import ray`), once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline import paths
from pipeline.boosting import BoostNet
from pipeline.calibration import operate, thresholds_for_budget
from pipeline.config import Params, parse_with_overrides
from pipeline.data import load_split
from pipeline.evaluation import collect_scores, eval_source, exit_costs
from pipeline.io import read_json

STORAGE = Path(".boostpipe/benchmark-ray")


def compose(overrides: dict[str, Any], path: Path = paths.PARAMS) -> Params:
    """params.yaml with dotted-key overrides (`model.n_blocks`), validated like the stages do."""
    return parse_with_overrides(
        yaml.safe_load(path.read_text()), overrides, f"{path} + {overrides}"
    )


@dataclass
class Scored:
    exit_mflops: list[float]
    exit_top1: list[float]
    budget_mflops: list[float]  # average cost on the test split at each calibrated budget
    budget_top1: list[float]
    train_seconds: float
    best_epoch: int
    history: list[dict[str, Any]]


def score(net: BoostNet, params: Params) -> tuple[list[float], ...]:
    """Per-exit MFLOPs and test top-1, and test (MFLOPs, top-1) at every calibrated budget."""
    batch, cpu = params.evaluate.batch_size, torch.device("cpu")
    val, test = load_split(paths.PREPARED, "val"), load_split(paths.PREPARED, "test")
    val_scores, _ = collect_scores(net, eval_source(params, val, batch), cpu)
    test_scores, _ = collect_scores(net, eval_source(params, test, batch), cpu)
    flops = exit_costs(net, params)
    budget_mflops, budget_top1 = [], []
    for budget in params.calibrate.budgets:
        _, point = thresholds_for_budget(val_scores, flops, budget)
        thresholds = torch.tensor(point.thresholds, dtype=torch.float64)
        on_test = operate(test_scores, thresholds, flops)
        budget_mflops.append(on_test.expected_flops / 1e6)
        budget_top1.append(on_test.top1)
    exit_top1 = test_scores.top1()
    return [f / 1e6 for f in flops], exit_top1, budget_mflops, budget_top1


def train_and_score(params: Params) -> Scored:
    """One training run as the train stage does it, then the calibrate/evaluate figures."""
    from pipeline.storage import open_storage
    from pipeline.training import run_name, train  # imports ray: after the caller's prepare_ray()

    fingerprint = read_json(paths.DATASET_INFO)["fingerprint"]
    start = time.perf_counter()
    storage = open_storage(params.ray, STORAGE)
    outcome = train(params, paths.PREPARED, storage, run_name(params, fingerprint))
    seconds = time.perf_counter() - start
    net = BoostNet.from_params(params)
    net.load_state_dict(outcome.model_state)
    exit_mflops, exit_top1, budget_mflops, budget_top1 = score(net.eval(), params)
    return Scored(
        exit_mflops,
        exit_top1,
        budget_mflops,
        budget_top1,
        seconds,
        outcome.best_epoch,
        [record.as_json() for record in outcome.history],
    )
