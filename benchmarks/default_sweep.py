"""Candidate default experiments, trained and scored in-process with the pipeline's own code, to
choose params.yaml's model/train settings (the targets: `dvc repro` <= 300 s on 2 cores, last
exit >= 91 % test top-1, exit 1 at most half the last exit's FLOPs and >= 2 points below it, and
the middle calibrated budget within 0.5 points of the last exit at clearly lower cost).

    python benchmarks/default_sweep.py probe [NAME ...]   # FLOPs and train-step speed only
    python benchmarks/default_sweep.py train [NAME ...]   # full training of each, then the table

Training runs `pipeline.training.train` with params.yaml's scaling (two 1-thread DDP workers),
so its seconds are the train stage's; the `dvc repro` estimate adds the rest of the pipeline
(prepare, calibrate, evaluate, Ray/MLflow/DVC start-up) as one fixed overhead, measured once on
this machine for the old default (`PIPELINE_OVERHEAD_S`). Budgets not given by a candidate are
placed at 1/4, 1/2 and 3/4 of the way from exit 1's cost to the last exit's. Every candidate is
the old default (`old`) plus its overrides; `b5s1-h8f32-e3-b32` is params.yaml's default since
issue 12.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch
from inprocess import Scored, compose, train_and_score

from pipeline.augment import normalise
from pipeline.boosting import BoostNet
from pipeline.config import Params
from pipeline.evaluation import exit_costs

PIPELINE_OVERHEAD_S = 86.0
OLD_DEFAULT = {
    "model.n_blocks": 4, "model.base": 1, "model.step": 1, "model.step_mode": "even",
    "model.n_channels": 8, "model.growth_rate": 4, "model.head_channels": 64,
    "model.first_head_channels": None,
    "train.epochs": 2, "train.augment": "none", "train.lr": 0.1, "train.batch_size": 64,
}  # fmt: skip
CANDIDATES: dict[str, dict[str, Any]] = {
    "old": OLD_DEFAULT,
    "lin16-h32-e3": {
        "model.step_mode": "lin_grow", "model.n_channels": 8, "model.growth_rate": 4,
        "model.head_channels": 32, "train.epochs": 3,
    },
    "lin16-h32-e3-cf": {
        "model.step_mode": "lin_grow", "model.head_channels": 32, "train.epochs": 3,
        "train.augment": "crop-flip",
    },
    "b5s1-h32-e3": {"model.n_blocks": 5, "model.head_channels": 32, "train.epochs": 3},
    "b5s1-h32-e3-cf": {
        "model.n_blocks": 5, "model.head_channels": 32, "train.epochs": 3,
        "train.augment": "crop-flip",
    },
    "b5s1-h32-e3-b128": {
        "model.n_blocks": 5, "model.head_channels": 32, "train.epochs": 3,
        "train.batch_size": 128, "train.lr": 0.2,
    },
    "b5s1-h8f-e3": {
        "model.n_blocks": 5, "model.first_head_channels": 8, "model.head_channels": 32,
        "train.epochs": 3,
    },
    "b5s1-h4f-e3": {
        "model.n_blocks": 5, "model.first_head_channels": 4, "model.head_channels": 32,
        "train.epochs": 3,
    },
    "b5s1-h8f48-e3": {
        "model.n_blocks": 5, "model.first_head_channels": 8, "model.head_channels": 48,
        "train.epochs": 3,
    },
    "b5s1-h8f32-e3-oc": {
        "model.n_blocks": 5, "model.first_head_channels": 8, "model.head_channels": 32,
        "train.epochs": 3, "train.schedule": "onecycle",
    },
    "b4s1-h8f64-e3-oc": {
        "model.first_head_channels": 8, "model.head_channels": 64, "train.epochs": 3,
        "train.schedule": "onecycle",
    },
    "b5s1-h8f32-e3-b32": {
        "model.n_blocks": 5, "model.first_head_channels": 8, "model.head_channels": 32,
        "train.epochs": 3, "train.batch_size": 32,
    },
    "b4s1-h8f48-e3": {"model.first_head_channels": 8, "model.head_channels": 48, "train.epochs": 3},
    "b4s1-h8f64-e3": {"model.first_head_channels": 8, "model.head_channels": 64, "train.epochs": 3},
    "b4s2-h32-e3": {"model.step": 2, "model.head_channels": 32, "train.epochs": 3},
    "b4s2-h16-e3": {"model.step": 2, "model.head_channels": 16, "train.epochs": 3},
    "lin-c12g6-h32-e3": {
        "model.step_mode": "lin_grow", "model.n_channels": 12, "model.growth_rate": 6,
        "model.head_channels": 32, "train.epochs": 3,
    },
    "b4s2-h32-e4": {"model.step": 2, "model.head_channels": 32, "train.epochs": 4},
}  # fmt: skip


def candidate(name: str) -> Params:
    overrides = {**OLD_DEFAULT, **CANDIDATES[name]}
    params = compose(overrides)
    if "calibrate.budgets" in overrides:
        return params
    flops = exit_costs(BoostNet.from_params(params), params)
    budgets = [flops[0] + f * (flops[-1] - flops[0]) for f in (0.25, 0.5, 0.75)]
    return compose({**overrides, "calibrate.budgets": budgets})


def step_rate(params: Params, steps: int = 15) -> float:
    """1-thread training images/s on a fixed batch (one DDP worker's view)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec, batch = params.data.spec, params.train.batch_size
    net = BoostNet.from_params(params).train()
    optimiser = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    images = torch.randint(0, 256, (batch, params.in_channels, spec.image_size, spec.image_size))
    x = normalise(images.to(torch.uint8), spec.mean, spec.std)
    y = torch.randint(0, params.num_classes, (batch,))
    for i in range(steps + 3):
        if i == 3:
            start = time.perf_counter()
        loss = net.total_loss(net.exit_losses(net(x), y))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return steps * batch / (time.perf_counter() - start)


def probe(names: list[str]) -> None:
    for name in names:
        params = candidate(name)
        flops = [f / 1e6 for f in exit_costs(BoostNet.from_params(params), params)]
        rate = step_rate(params)
        print(
            f"{name:20s} exits MFLOPs {' '.join(f'{f:.2f}' for f in flops):30s} "
            f"1-thread {rate:5.0f} img/s, exit1/last {flops[0] / flops[-1]:.2f}",
            flush=True,
        )


def row(name: str, params: Params, result: Scored) -> str:
    top1, mflops = result.exit_top1, result.exit_mflops
    middle = len(result.budget_top1) // 2
    checks = [
        mflops[0] <= mflops[-1] / 2,
        top1[-1] - top1[0] >= 2,
        top1[-1] >= 91,
        top1[-1] - result.budget_top1[middle] <= 0.5,
    ]
    estimate = result.train_seconds + PIPELINE_OVERHEAD_S
    budgets = (result.budget_mflops, result.budget_top1)
    return (
        f"{name:20s} | {' '.join(f'{m:.2f}' for m in mflops)} | "
        f"{' '.join(f'{t:.2f}' for t in top1)} | "
        + " ".join(f"{t:.2f}@{m:.2f}" for m, t in zip(*budgets, strict=True))
        + f" | {result.train_seconds:.0f} s (epoch {result.best_epoch}/{params.train.epochs}) | "
        f"~{estimate:.0f} s | {''.join('y' if c else 'n' for c in checks)}"
    )


def train_all(names: list[str]) -> None:
    from pipeline.rayenv import prepare_ray

    prepare_ray()  # before `import ray`
    import ray

    from pipeline.cluster import ray_init_kwargs

    ray.init(**ray_init_kwargs())
    rows = []
    try:
        for name in names:
            params = candidate(name)
            result = train_and_score(params)
            rows.append(row(name, params, result))
            print(rows[-1], flush=True)
    finally:
        ray.shutdown()
    print(
        "\ncandidate | exit MFLOPs | test top-1 per exit | test top-1@MFLOPs per budget | "
        "train (2 DDP workers) | dvc repro estimate | checks: exit1<=half, gap>=2, last>=91, "
        "mid budget within 0.5"
    )
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["probe", "train"])
    parser.add_argument("names", nargs="*", help=f"default: all of {list(CANDIDATES)}")
    args = parser.parse_args()
    names = args.names or list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        sys.exit(f"unknown candidate(s): {' '.join(unknown)}")
    probe(names) if args.what == "probe" else train_all(names)


if __name__ == "__main__":
    main()
