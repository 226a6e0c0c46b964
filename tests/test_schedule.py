"""Learning-rate schedules, stepped once per batch as the training loop does."""

from __future__ import annotations

from itertools import pairwise

import torch
from helpers import compose

from pipeline.fitting import make_optimizer, make_scheduler


def _lrs(schedule: str, epochs: int = 2, steps: int = 50) -> list[float]:
    params = compose(**{"train.schedule": schedule, "train.epochs": epochs, "train.lr": 0.1})
    optimiser = make_optimizer(torch.nn.Linear(2, 2), params.train)
    scheduler = make_scheduler(optimiser, params.train, steps)
    lrs = []
    for _ in range(epochs * steps):
        lrs.append(optimiser.param_groups[0]["lr"])
        optimiser.step()
        scheduler.step()
    return lrs


def test_onecycle_warms_up_to_lr_then_anneals_to_almost_nothing():
    lrs = _lrs("onecycle")
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert 0.2 * len(lrs) <= peak <= 0.4 * len(lrs)
    assert abs(lrs[peak] - 0.1) < 1e-3
    assert lrs[0] < 0.01 and lrs[-1] < 1e-4
    assert all(a <= b for a, b in pairwise(lrs[: peak + 1]))


def test_cosine_starts_at_lr_and_decreases():
    lrs = _lrs("cosine")
    assert lrs[0] == 0.1 and lrs[-1] < 1e-3
    assert all(a >= b for a, b in pairwise(lrs))
