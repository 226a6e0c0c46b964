"""Exit thresholds for budgeted batch classification.

Following MSDNet (Huang et al., ICLR 2018, Sec. 5) as BoostNet evaluates it: for a target exit
distribution pi_k = p^k / sum_j p^j, thresholds are fitted on the held-out split so that a
fraction pi_k of it leaves at exit k; the test split then exits at the first k with c_k >= T_k,
c_k being the max softmax probability of exit k's (ensemble) logits. Sweeping p traces an
accuracy-vs-average-cost curve; the inverse problem picks p so validation meets a given budget.

The arithmetic takes any per-exit cost vector: counted FLOPs (the paper's currency) or the
milliseconds per image the profile stage measured, so a time budget is met the same way.
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


def topk_hits(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """[n_exits, n] bool: the target is among exit k's top-k classes."""
    k = min(k, logits.shape[-1])
    return (logits.topk(k, dim=-1).indices == targets[None, :, None]).any(dim=-1)


def accuracy(hits: torch.Tensor) -> list[float]:
    """Per-exit accuracy in % from [n_exits, n] hits."""
    return (100.0 * hits.float().mean(dim=1)).tolist()


@dataclass(frozen=True)
class ExitScores:
    """All that calibration and evaluation need of every exit's output on a split: its
    confidence c_k, prediction and top-5 hit per sample. A few bytes per sample and exit, so
    memory does not grow with the number of classes (logits would: 1000 x 50k x exits)."""

    confidence: torch.Tensor  # [n_exits, n] float32 max softmax probability
    prediction: torch.Tensor  # [n_exits, n] int64
    top5: torch.Tensor  # [n_exits, n] bool
    targets: torch.Tensor  # [n] int64

    @classmethod
    def from_logits(cls, logits: torch.Tensor, targets: torch.Tensor) -> ExitScores:
        """From [n_exits, n, classes] logits, e.g. one batch's."""
        confidence, prediction = logits.float().softmax(dim=-1).max(dim=-1)
        return cls(confidence, prediction, topk_hits(logits, targets, 5), targets)

    @classmethod
    def cat(cls, parts: Sequence[ExitScores], n_exits: int) -> ExitScores:
        """Batches' scores joined along the sample axis."""
        if not parts:
            empty = torch.empty(n_exits, 0)
            return cls(empty, empty.long(), empty.bool(), torch.empty(0, dtype=torch.int64))
        return cls(
            torch.cat([p.confidence for p in parts], dim=1),
            torch.cat([p.prediction for p in parts], dim=1),
            torch.cat([p.top5 for p in parts], dim=1),
            torch.cat([p.targets for p in parts]),
        )

    @property
    def n_exits(self) -> int:
        return len(self.confidence)

    def top1(self) -> list[float]:
        return accuracy(self.prediction == self.targets)

    def top5_accuracy(self) -> list[float]:
        return accuracy(self.top5)


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
    expected_cost: float  # sum_k (n_k / n) * C_k, in the currency of the costs given
    top1: float  # %
    exit_fractions: list[float]

    def cost_in(self, costs: Sequence[float]) -> float:
        """The average cost per sample in another currency (per-exit `costs`)."""
        return expected_cost(self.exit_fractions, costs)


def expected_cost(fractions: Sequence[float], costs: Sequence[float]) -> float:
    """sum_k f_k * C_k: what a sample costs on average when a fraction f_k leaves at exit k."""
    return float(sum(f * c for f, c in zip(fractions, costs, strict=True)))


def operate(scores: ExitScores, thresholds: torch.Tensor, costs: Sequence[float]) -> Operating:
    """Apply thresholds to a split's scores: accuracy, average cost, where samples leave."""
    exits = assign_exits(scores.confidence, thresholds)
    n_exits, n = scores.confidence.shape
    predictions = scores.prediction[exits, torch.arange(n)]
    fractions = torch.bincount(exits, minlength=n_exits).double() / n
    cost = float((fractions * torch.tensor(costs, dtype=torch.float64)).sum())
    top1 = 100.0 * float((predictions == scores.targets).double().mean())
    return Operating(thresholds.tolist(), cost, top1, fractions.tolist())


def _fitted(scores: ExitScores, p: float) -> torch.Tensor:
    return fit_thresholds(scores.confidence, exit_distribution(p, scores.n_exits))


def sweep(scores: ExitScores, costs: Sequence[float]) -> list[tuple[float, Operating]]:
    """Thresholds fitted for every p of the grid, with their validation operating point."""
    return [(p, operate(scores, _fitted(scores, p), costs)) for p in P_GRID]


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


def check_budget(
    budget: float, costs: Sequence[float], key: str, unit: str, above_last: bool = True
) -> None:
    """A budget below exit 1's cost cannot be met; `above_last=False` also refuses one above
    the last exit's (a time budget there says the profile is not the one the user meant)."""
    if budget < costs[0]:
        raise ConfigError(
            f"{key}: {budget:.4g} {unit} is below the first exit's cost ({costs[0]:.4g} {unit})"
        )
    if not above_last and budget > costs[-1]:
        raise ConfigError(
            f"{key}: {budget:.4g} {unit} is above the last exit's cost ({costs[-1]:.4g} {unit})"
        )


def thresholds_for_budget(
    scores: ExitScores,
    costs: Sequence[float],
    budget: float,
    resolution: int = 400,
    key: str = "calibrate.budgets",
    unit: str = "FLOPs",
) -> tuple[float, Operating]:
    """The inverse problem: among p on a fine log-spaced grid (1/20 .. 20), the thresholds whose
    validation cost is within `budget` and highest; ties go to the better validation accuracy.
    One below exit 1's cost is refused naming `key`; one above the last exit's sends all
    there."""
    check_budget(budget, costs, key, unit)
    best: tuple[float, Operating] | None = None
    for p in torch.logspace(-1.3, 1.3, resolution, dtype=torch.float64).tolist():
        point = operate(scores, _fitted(scores, p), costs)
        if point.expected_cost <= budget and (
            best is None
            or (point.expected_cost, point.top1) > (best[1].expected_cost, best[1].top1)
        ):
            best = (p, point)
    if best is None:  # even the most front-loaded p overshoots: send everyone to exit 1
        only_first = torch.full((scores.n_exits,), float("-inf"), dtype=torch.float64)
        best = (0.0, operate(scores, only_first, costs))
    return best


def budget_auc(scores: ExitScores, exit_flops: Sequence[int]) -> float:
    """One number for a whole budgeted curve, the objective `boostpipe tune` maximises: the
    mean, over budgets B from the first exit's cost to the last's, of the best top-1 (%) that
    thresholds fitted on this split reach at an average cost within B. Equal to the area under
    that monotone accuracy-vs-FLOPs step curve divided by its width. The end points are "all
    at exit 1" and "all at the last exit"; the 39 points of the p grid lie between."""
    n_exits = len(exit_flops)
    first_only = torch.full((n_exits,), float("-inf"), dtype=torch.float64)
    last_only = torch.full((n_exits,), float("inf"), dtype=torch.float64)
    last_only[-1] = float("-inf")
    points = [operate(scores, t, exit_flops) for t in (first_only, last_only)]
    points += [point for _, point in sweep(scores, exit_flops)]
    points.sort(key=lambda point: point.expected_cost)
    low, high = float(exit_flops[0]), float(exit_flops[-1])
    area, best = 0.0, float("-inf")
    for point, following in zip(points, [*points[1:], None], strict=True):
        best = max(best, point.top1)
        end = high if following is None else min(following.expected_cost, high)
        area += best * max(0.0, end - max(point.expected_cost, low))
    return area / (high - low)
