"""Exit thresholds for budgeted batch classification (SPEC section 6).

Following MSDNet (Huang et al., ICLR 2018, Sec. 5) as BoostNet evaluates it: for a target exit
distribution pi_k = p^k / sum_j p^j, thresholds are fitted on the held-out split so that a
fraction pi_k of it leaves at exit k; the test split then exits at the first k with c_k >= T_k,
c_k being the max softmax probability of exit k's (ensemble) logits. Sweeping p traces an
accuracy-vs-average-cost curve; the inverse problem picks p so validation meets a given budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline.config import ConfigError

P_GRID: tuple[float, ...] = tuple(i / 20 for i in range(1, 40))


def exit_distribution(p: float, n_exits: int) -> torch.Tensor:
    """pi_k = p^k / sum_j p^j for k = 1..N: p < 1 favours early exits, p > 1 late ones."""
    weights = torch.tensor(p, dtype=torch.float64) ** torch.arange(1, n_exits + 1)
    return weights / weights.sum()


def confidences(logits: torch.Tensor) -> torch.Tensor:
    """c_k per sample, [n_exits, n], from [n_exits, n, classes] logits."""
    return logits.float().softmax(dim=-1).amax(dim=-1)


def fit_thresholds(confidence: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """T_k for every exit, [n_exits] float64. Among samples still present, sorted by c_k
    descending, the floor(n*pi_k)-th one's confidence becomes T_k and all with c_k >= T_k leave.
    A target of zero or more than what remains sends nobody (T_k = +inf); T_N = -inf."""
    n_exits, n = confidence.shape
    thresholds = torch.full((n_exits,), float("inf"), dtype=torch.float64)
    thresholds[-1] = float("-inf")
    remaining = torch.ones(n, dtype=torch.bool)
    for k in range(n_exits - 1):
        target = int(n * float(pi[k]))
        available = int(remaining.sum())
        if target == 0 or target > available:
            continue
        ranked = confidence[k][remaining].sort(descending=True).values
        thresholds[k] = float(ranked[target - 1])
        remaining &= confidence[k] < thresholds[k]
    return thresholds


def assign_exits(confidence: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """0-based exit of every sample: the first k with c_k >= T_k (T_N = -inf takes the rest)."""
    passes = confidence.double() >= thresholds[:, None]
    passes[-1] = True
    return passes.int().argmax(dim=0)


@dataclass(frozen=True)
class Operating:
    """One set of thresholds and what it does on a split."""

    thresholds: list[float]
    expected_flops: float  # sum_k (n_k / n) * C_k
    top1: float  # %
    exit_fractions: list[float]


def operate(
    logits: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor, exit_flops: Sequence[int]
) -> Operating:
    """Apply thresholds to a split's logits: accuracy, average cost, where samples leave."""
    exits = assign_exits(confidences(logits), thresholds)
    n_exits, n = logits.shape[:2]
    predictions = logits.argmax(dim=-1)[exits, torch.arange(n)]
    fractions = torch.bincount(exits, minlength=n_exits).double() / n
    cost = float((fractions * torch.tensor(exit_flops, dtype=torch.float64)).sum())
    top1 = 100.0 * float((predictions == targets).double().mean())
    return Operating(thresholds.tolist(), cost, top1, fractions.tolist())


def sweep(
    logits: torch.Tensor, targets: torch.Tensor, exit_flops: Sequence[int]
) -> list[tuple[float, Operating]]:
    """Thresholds fitted for every p of the grid, with their validation operating point."""
    confidence = confidences(logits)
    return [
        (
            p,
            operate(
                logits,
                targets,
                fit_thresholds(confidence, exit_distribution(p, len(logits))),
                exit_flops,
            ),
        )
        for p in P_GRID
    ]


def flat_envelope(
    costs: Sequence[float], val_top1: Sequence[float], test_top1: Sequence[float]
) -> list[float]:
    """The reference's monotone curve: walking points by increasing cost, a point keeps the
    previous test accuracy unless its validation accuracy beats every cheaper point's."""
    flat = [0.0] * len(costs)
    best_val, current = float("-inf"), float("nan")
    for i in sorted(range(len(costs)), key=costs.__getitem__):
        if val_top1[i] > best_val:
            best_val, current = val_top1[i], test_top1[i]
        flat[i] = current
    return flat


def thresholds_for_budget(
    logits: torch.Tensor,
    targets: torch.Tensor,
    exit_flops: Sequence[int],
    budget: float,
    resolution: int = 400,
) -> tuple[float, Operating]:
    """The inverse problem: among p on a fine log-spaced grid (1/20 .. 20), the thresholds whose
    validation cost is within `budget` and highest; ties go to the better validation accuracy.
    A budget below exit 1's cost is impossible; one above the last exit's sends all there."""
    if budget < exit_flops[0]:
        raise ConfigError(
            f"calibrate.budgets: {budget:.4g} FLOPs is below the first exit's cost "
            f"({exit_flops[0]:.4g})"
        )
    confidence = confidences(logits)
    best: tuple[float, Operating] | None = None
    for p in torch.logspace(-1.3, 1.3, resolution, dtype=torch.float64).tolist():
        point = operate(
            logits,
            targets,
            fit_thresholds(confidence, exit_distribution(p, len(logits))),
            exit_flops,
        )
        if point.expected_flops <= budget and (
            best is None
            or (point.expected_flops, point.top1) > (best[1].expected_flops, best[1].top1)
        ):
            best = (p, point)
    if best is None:  # even the most front-loaded p overshoots: send everyone to exit 1
        only_first = torch.full((len(logits),), float("-inf"), dtype=torch.float64)
        best = (0.0, operate(logits, targets, only_first, exit_flops))
    return best


def budget_auc(logits: torch.Tensor, targets: torch.Tensor, exit_flops: Sequence[int]) -> float:
    """One number for a whole budgeted curve, the objective `boostpipe tune` maximises: the
    mean, over budgets B from the first exit's cost to the last's, of the best top-1 (%) that
    thresholds fitted on this split reach at an average cost within B. Equal to the area under
    that monotone accuracy-vs-FLOPs step curve divided by its width. The end points are "all
    at exit 1" and "all at the last exit"; the 39 points of the p grid lie between."""
    n_exits = len(exit_flops)
    first_only = torch.full((n_exits,), float("-inf"), dtype=torch.float64)
    last_only = torch.full((n_exits,), float("inf"), dtype=torch.float64)
    last_only[-1] = float("-inf")
    points = [operate(logits, targets, t, exit_flops) for t in (first_only, last_only)]
    points += [point for _, point in sweep(logits, targets, exit_flops)]
    points.sort(key=lambda point: point.expected_flops)
    low, high = float(exit_flops[0]), float(exit_flops[-1])
    area, best = 0.0, float("-inf")
    for point, following in zip(points, [*points[1:], None], strict=True):
        best = max(best, point.top1)
        end = high if following is None else min(following.expected_flops, high)
        area += best * max(0.0, end - max(point.expected_flops, low))
    return area / (high - low)
