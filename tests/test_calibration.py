"""Threshold calibration and budgeted classification on hand-made tensors."""

import json
import math

import pytest
import torch
from helpers.project import ROOT

from pipeline.budgets import Calibration, calibrate, time_budgets
from pipeline.calibration import (
    P_GRID,
    ExitScores,
    assign_exits,
    exit_distribution,
    fit_thresholds,
    flat_envelope,
    operate,
    sweep,
    thresholds_for_budget,
)
from pipeline.config import CalibrateConfig, ConfigError, TimeBudgets, load_params
from pipeline.profiling import BATCH_1, BATCH_N, ExitProfile, Machine

INF = math.inf
MACHINE = Machine("cpu", "test CPU", 1)


def test_exit_distribution_favours_early_exits_below_p_1_and_late_ones_above():
    for p, n in [(0.3, 4), (1.0, 5), (1.7, 3)]:
        pi = exit_distribution(p, n)
        assert float(pi.sum()) == pytest.approx(1.0)
    assert torch.all(exit_distribution(0.5, 4).diff() < 0)
    assert torch.all(exit_distribution(1.5, 4).diff() > 0)
    assert len(P_GRID) == 39 and P_GRID[0] == 0.05 and P_GRID[-1] == pytest.approx(1.95)


def test_thresholds_by_hand():
    # 10 samples, 3 exits. pi for p=0.5 is [4/7, 2/7, 1/7]: floor(10*pi) = 5 and 2.
    c1 = torch.tensor([0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5])
    c2 = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.99, 0.3, 0.98, 0.2, 0.97])
    confidence = torch.stack([c1, c2, torch.zeros(10)])
    thresholds = fit_thresholds(confidence, exit_distribution(0.5, 3))
    # exit 1: 5th highest c1 is 0.75; exit 2: 2nd highest c2 among the other five is 0.98
    assert thresholds.tolist() == pytest.approx([0.75, 0.98, -INF])
    exits = assign_exits(confidence, thresholds)
    assert exits.tolist() == [0, 0, 0, 0, 0, 1, 2, 1, 2, 2]


def test_a_target_of_nobody_gives_an_infinite_threshold():
    confidence = torch.rand(3, 10, generator=torch.Generator().manual_seed(0))
    thresholds = fit_thresholds(confidence, torch.tensor([0.05, 0.05, 0.9]))  # floor(0.5) = 0
    assert thresholds[0] == INF and thresholds[1] == INF and thresholds[2] == -INF
    assert assign_exits(confidence, thresholds).tolist() == [2] * 10


def test_assign_exits_takes_the_first_exit_over_its_threshold():
    confidence = torch.tensor([[0.2, 0.9, 0.5], [0.8, 0.95, 0.1], [0.0, 0.0, 0.0]])
    thresholds = torch.tensor([0.6, 0.7, -INF], dtype=torch.float64)
    assert assign_exits(confidence, thresholds).tolist() == [1, 0, 2]


def _logits_for(predicted, confident):
    """[n_exits, n, 2] logits: class `predicted`, softmax max ~0.99 when confident else ~0.6."""
    margin = torch.where(confident, 5.0, 0.4)
    sign = torch.where(predicted == 1, 1.0, -1.0)
    return torch.stack([-sign * margin / 2, sign * margin / 2], dim=-1)


def test_operate_counts_accuracy_cost_and_exit_fractions():
    targets = torch.tensor([0, 1, 1, 0])
    predicted = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]])  # exit 1 gets two right, exit 2 four
    confident = torch.tensor([[True, False, True, False], [True, True, True, True]])
    logits = _logits_for(predicted, confident)
    thresholds = torch.tensor([0.9, -INF], dtype=torch.float64)
    point = operate(ExitScores.from_logits(logits, targets), thresholds, costs=[10, 30])
    # samples 0 and 2 leave at exit 1 (both right); 1 and 3 go on and exit 2 gets them right
    assert point.top1 == 100.0
    assert point.exit_fractions == [0.5, 0.5]
    assert point.expected_cost == pytest.approx(0.5 * 10 + 0.5 * 30)


def test_flat_envelope_holds_the_test_accuracy_until_validation_improves():
    costs = [1.0, 2.0, 3.0, 4.0]
    val = [70.0, 69.0, 72.0, 71.0]
    test = [68.0, 71.0, 70.0, 75.0]
    assert flat_envelope(costs, val, test) == [68.0, 68.0, 70.0, 70.0]
    shuffled = [2, 0, 3, 1]  # order of the inputs does not matter
    assert flat_envelope(
        [costs[i] for i in shuffled], [val[i] for i in shuffled], [test[i] for i in shuffled]
    ) == [70.0, 68.0, 70.0, 68.0]


def _random_problem(seed=0, n=500, n_exits=4, classes=5):
    generator = torch.Generator().manual_seed(seed)
    logits = (
        torch.randn(n_exits, n, classes, generator=generator)
        * torch.linspace(1, 4, n_exits)[:, None, None]
    )
    return ExitScores.from_logits(logits, torch.randint(0, classes, (n,), generator=generator))


def test_sweep_spans_the_exit_costs_and_fits_the_target_fractions():
    scores = _random_problem()
    flops = [100, 200, 300, 400]
    points = sweep(scores, flops)
    assert len(points) == 39
    for p, point in points:
        assert 100 <= point.expected_cost <= 400
        pi = exit_distribution(p, 4)
        # on the data it was fitted on, exit 1 takes exactly floor(n * pi_1) samples (no ties)
        assert point.exit_fractions[0] == pytest.approx(int(500 * float(pi[0])) / 500)
    costs = [point.expected_cost for _, point in points]
    assert costs[0] < 150 and costs[-1] > 300  # p small: mostly exit 1; p large: mostly exit 4


@pytest.mark.parametrize("budget", [120, 180, 250, 330, 400, 1000])
def test_thresholds_for_budget_meet_the_budget_on_validation(budget):
    scores = _random_problem(seed=1)
    flops = [100, 200, 300, 400]
    _, point = thresholds_for_budget(scores, flops, budget)
    assert point.expected_cost <= budget
    assert point.expected_cost >= min(budget, 400) - 40  # and uses most of it


def test_an_impossible_budget_is_a_clear_error():
    scores = _random_problem()
    with pytest.raises(ConfigError, match=r"calibrate\.budgets: 50 FLOPs is below"):
        thresholds_for_budget(scores, [100, 200, 300, 400], 50)


def test_time_budgets_use_the_flops_arithmetic_on_the_measured_cost_vector():
    """A time budget is fitted exactly as a FLOPs budget is, with ms in place of FLOPs: given a
    profile whose ms are the FLOPs scaled, the same budgets scaled give the same thresholds."""
    scores = _random_problem(seed=2)
    flops = [100, 200, 300, 400]
    scale = {BATCH_1: 0.01, BATCH_N: 0.002}
    profile = ExitProfile(flops, {r: [f * s for f in flops] for r, s in scale.items()}, 64, MACHINE)
    budgets = [150.0, 250.0, 330.0]
    config = CalibrateConfig(
        budgets=budgets,
        budgets_ms=TimeBudgets(
            batch_1=[b * scale[BATCH_1] for b in budgets],
            batch_n=[b * scale[BATCH_N] for b in budgets],
        ),
    )
    result = calibrate(scores, flops, profile, config)
    assert [p.currency for p in result.time_budgets] == [BATCH_1] * 3 + [BATCH_N] * 3
    for regime, timed in ((BATCH_1, result.time_budgets[:3]), (BATCH_N, result.time_budgets[3:])):
        for by_flops, by_time in zip(result.budgets, timed, strict=True):
            assert by_time.thresholds == by_flops.thresholds and by_time.p == by_flops.p
            assert by_time.expected_ms[regime] == pytest.approx(
                by_flops.expected_flops * scale[regime]
            )
    # The p grid in all three currencies.
    assert len(result.grid) == 39
    for point in result.grid:
        for regime, factor in scale.items():
            assert point.expected_ms[regime] == pytest.approx(point.expected_flops * factor)
    assert Calibration.from_json(json.loads(json.dumps(result.to_json()))) == result


@pytest.mark.parametrize(
    ("budgets_ms", "message"),
    [
        ({"batch_n": [0.1]}, r"calibrate\.budgets_ms\.batch_n: 0\.1 ms is below the first exit"),
        ({"batch_1": [9.0]}, r"calibrate\.budgets_ms\.batch_1: 9 ms is above the last exit"),
        (
            {"batch_1": ["20%"]},
            r"calibrate\.budgets_ms\.batch_1: 20% of the last exit's 4 ms: 0\.8 ms is below",
        ),
    ],
)
def test_a_time_budget_outside_the_exits_measured_costs_is_refused(budgets_ms, message):
    profile = ExitProfile([1, 2], {BATCH_1: [1.0, 4.0], BATCH_N: [0.2, 0.5]}, 64, MACHINE)
    config = CalibrateConfig(budgets_ms=TimeBudgets(**budgets_ms))
    with pytest.raises(ConfigError, match=message):
        time_budgets(config, profile)
    with pytest.raises(ConfigError, match="need the profile"):
        time_budgets(config, None)


@pytest.mark.parametrize("speed", [0.1, 1.0, 10.0])
def test_the_default_time_budgets_hold_on_a_machine_of_any_speed(speed):
    """params.yaml states its time budgets as shares of the last exit's cost, so a profile 10x
    faster or slower than this machine's resolves them in range (ms would fall outside)."""
    ms = {BATCH_1: [0.56, 0.98, 1.35, 1.66, 1.88], BATCH_N: [0.058, 0.114, 0.166, 0.197, 0.223]}
    scaled = {r: [c * speed for c in costs] for r, costs in ms.items()}
    profile = ExitProfile([1, 2, 3, 4, 5], scaled, 512, MACHINE)
    config = load_params(ROOT / "params.yaml").calibrate
    budgets = time_budgets(config, profile)
    assert budgets and all(isinstance(b.stated, str) for b in budgets)
    for budget in budgets:
        share = float(budget.stated.removesuffix("%")) / 100
        assert budget.ms == pytest.approx(share * scaled[budget.regime][-1])
    scores = _random_problem(seed=3, n_exits=5)
    result = calibrate(scores, [1, 2, 3, 4, 5], profile, config)
    for point, budget in zip(result.time_budgets, budgets, strict=True):
        assert point.stated == budget.stated and point.budget == budget.ms
        assert point.expected_ms[budget.regime] <= budget.ms
