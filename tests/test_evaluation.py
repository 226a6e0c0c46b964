"""Real early exit on a real (untrained, seeded) BoostNet agrees with the simulated assignment;
the evaluate stage's curves, speedups and metric layout from small synthetic scores."""

import copy
from collections.abc import Callable

import pytest
import torch
from helpers import compose
from helpers.nets import untrained_boostnet

from pipeline.boosting import BoostNet
from pipeline.budgets import Calibration, Point
from pipeline.calibration import (
    ExitScores,
    accuracy,
    assign_exits,
    exit_distribution,
    fit_thresholds,
    topk_hits,
)
from pipeline.data import Split
from pipeline.evaluation import (
    EarlyExitRun,
    ExitQueue,
    Source,
    collect_scores,
    early_exit,
    exit_costs,
    fold_batch_norm,
    network_input,
)
from pipeline.latency import early_exit_one_at_a_time
from pipeline.profiling import BATCH_1, BATCH_N, ExitProfile, Machine
from pipeline.scorecard import (
    Timed,
    anytime_rows,
    budget_curve,
    evaluate,
    flops_metrics,
    interleaved,
    time_metrics,
    timing_caveats,
)

DEVICE = torch.device("cpu")


def test_early_exit_predicts_and_exits_as_the_thresholds_say():
    params, net, split = untrained_boostnet()
    source = Source(split, params.data, batch_size=64)
    scores, skipped = collect_scores(net, source, DEVICE)
    assert scores.confidence.shape == (params.model.n_exits, 300) and skipped == 0
    thresholds = fit_thresholds(scores.confidence, exit_distribution(0.7, params.model.n_exits))
    expected_exits = assign_exits(scores.confidence, thresholds)
    assert len(expected_exits.unique()) > 1  # the thresholds really split the batch

    run = early_exit(net, source, thresholds.tolist(), DEVICE)
    agree = (run.exits == expected_exits).float().mean()
    assert agree > 0.98  # subsets may round differently right at a threshold
    same = run.exits == expected_exits
    expected_predictions = scores.prediction[expected_exits, torch.arange(300)]
    assert torch.equal(run.predictions[same], expected_predictions[same])
    assert torch.equal(run.targets, split.targets)
    assert run.seconds > 0


def test_exit_queue_runs_every_block_on_full_batches_and_returns_results_by_id():
    params, net, split = untrained_boostnet()
    source = Source(split, params.data, batch_size=64)
    scores, _ = collect_scores(net, source, DEVICE)
    thresholds = fit_thresholds(scores.confidence, exit_distribution(0.7, params.model.n_exits))
    sizes = {i: [] for i in range(net.n_exits)}

    def record(index: int, state) -> None:  # a block reads the images or a list of maps
        sizes[index].append(len(state if torch.is_tensor(state) else state[-1]))

    hooks = [
        block.register_forward_pre_hook(lambda m, args, i=i: record(i, args[0]))
        for i, block in enumerate(net.backbone.blocks)
    ]
    x = network_input(split.images, params.data.spec.mean, params.data.spec.std, DEVICE)
    ids = torch.randperm(300, generator=torch.Generator().manual_seed(2))
    queue = ExitQueue(net, thresholds.tolist(), batch_size=64)
    for start in range(0, 300, 50):  # batches of 50 in, blocks of 64 run
        part = ids[start : start + 50]
        queue.push(x[part], part)
        for waiting in queue.waiting:  # at most twice its samples' state (but the next in line)
            assert all(len(runner.ensemble) <= 2 * len(rows) for runner, rows, _ in waiting[1:])
    returned, exited = queue.finish()
    for hook in hooks:
        hook.remove()

    assert torch.equal(returned, torch.arange(300))
    reached = [300 - int((exited.exits < i).sum()) for i in range(net.n_exits)]
    for index, seen in sizes.items():
        assert sum(seen) == reached[index]  # every sample ran each block up to its exit once
        if index > 0:  # later blocks: full batches, one part batch at the end
            assert all(size == 64 for size in seen[:-1]) and 0 < seen[-1] <= 64
    agree = (exited.exits == assign_exits(scores.confidence, thresholds)).float().mean()
    assert agree > 0.98
    assert ((exited.confidence >= 0) & (exited.confidence <= 1)).all()


def test_topk_accuracy_counts_hits_per_exit():
    logits = torch.tensor([[[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]], [[1.0, 3.0, 2.0], [3.0, 2.0, 1.0]]])
    targets = torch.tensor([1, 2])
    assert accuracy(topk_hits(logits, targets, 1)) == [50.0, 50.0]
    assert accuracy(topk_hits(logits, targets, 2)) == [100.0, 50.0]
    scores = ExitScores.from_logits(logits, targets)
    assert scores.top1() == [50.0, 50.0] and scores.top5_accuracy() == [100.0, 100.0]


def test_folding_batch_norm_keeps_outputs_and_counted_flops():
    params, net, split = untrained_boostnet()
    for module in net.modules():  # trained-looking statistics, so folding has work to do
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    x = split.images[:16].float() / 255
    with torch.no_grad():
        before = torch.stack(net(x))
        flops = exit_costs(net, params)
        folded = fold_batch_norm(copy.deepcopy(net))
        after = torch.stack(folded(x))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)
    assert exit_costs(folded, params) == flops


def _scores() -> ExitScores:
    """Four samples, two exits: exit 1 gets samples 0 and 2 right, exit 2 gets all four."""
    return ExitScores(
        confidence=torch.tensor([[0.9, 0.2, 0.8, 0.1], [0.95, 0.9, 0.9, 0.9]]),
        prediction=torch.tensor([[1, 0, 2, 0], [1, 1, 2, 3]]),
        top5=torch.ones(2, 4, dtype=torch.bool),
        targets=torch.tensor([1, 1, 2, 3]),
    )


FLOPS = [1_000_000, 3_000_000]


PROFILE = ExitProfile(
    FLOPS, {BATCH_1: [0.4, 1.0], BATCH_N: [0.1, 0.3]}, 512, Machine("cpu", "x", 1)
)


def _point(p: float, thresholds: list[float], top1: float, **target) -> Point:
    return Point(p, thresholds, top1, [], 0.0, **target)


def _calibration(grid: list[Point], budgets=(), time_budgets=()) -> Calibration:
    return Calibration(True, FLOPS, PROFILE.ms, grid, list(budgets), list(time_budgets))


def test_anytime_rows_and_the_budget_curve_with_its_flat_envelope():
    assert anytime_rows(_scores(), PROFILE) == [
        {
            "exit": 1,
            "mflops": 1.0,
            "ms_batch_1": 0.4,
            "ms_batch_n": 0.1,
            "top1": 50.0,
            "top5": 100.0,
        },
        {
            "exit": 2,
            "mflops": 3.0,
            "ms_batch_1": 1.0,
            "ms_batch_n": 0.3,
            "top1": 100.0,
            "top5": 100.0,
        },
    ]
    grid = [  # all at exit 1, half at each, all at exit 2; held-out top-1 peaks in the middle
        _point(0.1, [0.0, 0.0], 60.0),
        _point(0.5, [0.5, 0.0], 70.0),
        _point(0.9, [2.0, 0.0], 65.0),
    ]
    curve = budget_curve(_scores(), _calibration(grid), PROFILE)
    assert [(r["p"], r["mflops"], r["top1"], r["val_top1"]) for r in curve] == [
        (0.1, 1.0, 50.0, 60.0),
        (0.5, 2.0, 100.0, 70.0),
        (0.9, 3.0, 100.0, 65.0),
    ]
    # every point in the profile's ms too: half the samples at each exit costs the mean
    assert [r["ms_batch_n"] for r in curve] == pytest.approx([0.1, 0.2, 0.3])
    assert [r["ms_batch_1"] for r in curve] == pytest.approx([0.4, 0.7, 1.0])
    # The costliest point's held-out top-1 is below a cheaper one's: it keeps that one's.
    assert [r["top1_flat"] for r in curve] == [50.0, 100.0, 100.0]
    assert list(curve[0]) == [
        "p",
        "mflops",
        "ms_batch_1",
        "ms_batch_n",
        "top1",
        "top1_flat",
        "val_top1",
    ]


RUN = EarlyExitRun(
    predictions=torch.tensor([1, 1, 2, 0]),
    exits=torch.tensor([0, 1, 0, 1]),
    targets=torch.tensor([1, 1, 2, 3]),
    seconds=1.5,
)


def test_flops_budget_metrics_speedups_and_time_measured_and_predicted():
    point = _point(0.5, [0.5, 0.0], 70.0, budget=2.5e6)
    every_exit = Timed(3.0, EarlyExitRun(RUN.predictions, RUN.exits, RUN.targets, 3.0))
    metrics = flops_metrics(_scores(), point, Timed(1.5, RUN), every_exit, PROFILE)
    assert metrics == {
        "target_mflops": 2.5,
        "expected_mflops": 2.0,  # half the samples leave after 1 MFLOP, half after 3
        "top1": 100.0,  # the thresholds on the test scores
        "early_exit_top1": 75.0,  # the real early-exit run's predictions
        "seconds": 1.5,
        "images_per_second": pytest.approx(4 / 1.5),
        "speedup_measured": 2.0,
        "speedup_predicted": 1.5,  # 3 MFLOPs for every exit / 2 expected
        "speedup_ratio": pytest.approx(2.0 / 1.5),
        "predicted_ms": pytest.approx(0.2),  # the profile's batch-N ms at these fractions
        "measured_ms": pytest.approx(1000 * 1.5 / 4),
    }


def test_time_budget_metrics_carry_regime_target_and_measured_ms():
    point = _point(0.5, [0.5, 0.0], 70.0, budget=0.8, currency=BATCH_1)
    metrics = time_metrics(_scores(), point, Timed(0.004, RUN), PROFILE, drift=1.25)
    assert metrics == {
        "regime": "batch-1",
        "target_ms": 0.8,
        "expected_ms": pytest.approx(0.7),  # half at 0.4 ms, half at 1.0 ms
        "measured_ms": pytest.approx(1.0),  # 4 ms for 4 images
        "measured_over_target": pytest.approx(1.0 / 0.8),
        # the machine ran 1.25x slower than when profiled: at the profile's speed, on target
        "drift": 1.25,
        "measured_over_target_at_profile_speed": pytest.approx(1.0),
        "top1": 100.0,
        "early_exit_top1": 75.0,
        "expected_mflops": 2.0,
        "images_timed": 4,
    }


def test_one_at_a_time_early_exit_agrees_with_the_batched_queue():
    params, net, split = untrained_boostnet()
    scores, _ = collect_scores(net, Source(split, params.data, 64), DEVICE)
    thresholds = fit_thresholds(scores.confidence, exit_distribution(0.7, net.n_exits)).tolist()
    batched = early_exit(net, Source(split, params.data, 64), thresholds, DEVICE)
    single = early_exit_one_at_a_time(net, Source(split, params.data, 1), thresholds, DEVICE)
    assert len(set(single.exits.tolist())) > 1
    # Batch 1 may round a sample that sits on a threshold the other way; all others agree.
    assert (single.exits != batched.exits).sum() <= 3
    assert torch.equal(single.targets, split.targets)


def test_evaluate_reports_the_stage_layout_with_and_without_calibration():
    params = compose(**{"model.n_blocks": 2, "evaluate.timing_repeats": 2})
    torch.manual_seed(0)
    net = BoostNet.from_params(params).eval()
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8, generator=generator)
    split = Split(images, torch.randint(0, 10, (32,), generator=generator))
    source, single = Source(split, params.data, batch_size=16), Source(split, params.data, 1)
    scores, _ = collect_scores(net, source, DEVICE)
    fitted = [
        fit_thresholds(scores.confidence, exit_distribution(p, params.model.n_exits)).tolist()
        for p in (0.3, 0.7)
    ]
    flops = exit_costs(net, params)
    profile = ExitProfile(
        flops, {BATCH_1: [0.5, 1.0], BATCH_N: [0.1, 0.2]}, 16, Machine.current(DEVICE)
    )
    calibration = Calibration(
        True,
        flops,
        profile.ms,
        [_point(p, t, 50.0) for p, t in zip((0.3, 0.7), fitted, strict=True)],
        [_point(0.7, fitted[1], 50.0, budget=3e6)],
        [
            _point(0.7, fitted[1], 50.0, budget=0.75, currency=BATCH_1, stated=0.75),
            _point(0.3, fitted[0], 50.0, budget=0.15, currency=BATCH_N, stated="50%"),
        ],
    )
    report = evaluate(net, source, single, DEVICE, calibration, profile, repeats=2, warmup=1)
    assert list(report.metrics) == [
        "anytime",
        "final_top1",
        "mean_top1",
        "all_exits",
        "device",
        "threads",
        "budgets",
        "time_budgets",
        "calibrated",
    ]
    assert list(report.metrics["budgets"]) == ["budget_3M"]
    assert list(report.metrics["time_budgets"]) == ["batch-1_0ms75", "batch-N_50pct"]
    for row, regime in zip(
        report.metrics["time_budgets"].values(), (BATCH_1, BATCH_N), strict=True
    ):
        assert row["regime"] == regime and row["measured_ms"] > 0
        assert row["measured_over_target"] == pytest.approx(row["measured_ms"] / row["target_ms"])
        assert row["drift"] > 0  # the profile's last exit, timed again in this run
    assert [r["regime"] for r in report.time_budgets] == [BATCH_1, BATCH_N]
    assert report.metrics["anytime"]["top1"] == {
        f"exit_{r['exit']}": r["top1"] for r in report.anytime
    }
    assert len(report.anytime) == params.model.n_exits and len(report.budget_curve) == 2
    assert report.summary()[0].startswith("test top-1 per exit: ")
    assert report.summary()[1].startswith("budget_3M: top-1 ")
    assert report.summary()[2].startswith("batch-1_0ms75: top-1 ")

    reason = "data.val_size is 0: nothing held out to calibrate on"
    empty = Calibration(False, flops, profile.ms, [], [], [], reason)
    report = evaluate(net, source, single, DEVICE, empty, profile, repeats=1, warmup=0)
    assert report.metrics["budgets"] == {} and report.budget_curve == []
    assert report.metrics["time_budgets"] == {} and report.time_budgets == []
    assert report.metrics["calibrated"] is False
    assert report.summary()[-1] == f"budgeted evaluation skipped: {reason}"


def test_timings_take_medians_after_untimed_warm_up_rounds():
    """The first run of a configuration pays one-time set-up; it is run, never timed."""
    calls: list[int] = []

    def job(index: int) -> Callable[[], EarlyExitRun]:
        def run() -> EarlyExitRun:
            calls.append(index)
            seconds = 100.0 if calls.count(index) == 1 else float(len(calls))  # a cold first run
            return EarlyExitRun(torch.zeros(1), torch.zeros(1), torch.zeros(1), seconds)

        return run

    first, second = interleaved([job(0), job(1)], repeats=3, warmup=1)
    assert calls == [0, 1] * 4  # interleaved: the warm-up round, then three timed rounds
    assert (first.seconds, second.seconds) == (5.0, 6.0)  # medians of 3,5,7 and 4,6,8


def test_timings_of_too_few_batches_or_repeats_come_with_a_line_naming_the_key():
    assert timing_caveats(300, 100, 3) == []
    (batches,) = timing_caveats(300, 512, 3)
    assert batches.startswith("evaluate.batch_size: the 300 test images make 1 batch(es)")
    (repeats,) = timing_caveats(10_000, 512, 1)
    assert repeats.startswith("evaluate.timing_repeats: 1;")
    assert len(timing_caveats(64, 64, 1)) == 2
