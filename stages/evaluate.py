"""DVC stage `evaluate`: anytime and budgeted accuracy against FLOPs on the test split, and real
early-exit inference timed against running every exit. Without calibrated thresholds
(`data.val_size: 0`) the budgeted half is empty and the metrics say why."""

import statistics

import torch

from pipeline import paths, plots, reports, tracking
from pipeline.calibration import flat_envelope, operate
from pipeline.config import load_params
from pipeline.data import load_split
from pipeline.devices import describe, stage_device
from pipeline.entry import stage_main
from pipeline.evaluation import (
    collect_scores,
    early_exit,
    eval_source,
    exit_costs,
    load_model,
    time_all_exits,
)
from pipeline.io import check_writable, read_json, replaced_together, write_json


@stage_main
def main() -> None:
    params = load_params(paths.PARAMS).with_dataset(read_json(paths.DATASET_INFO))
    repeats = params.evaluate.timing_repeats
    check_writable([paths.EVALUATE_DIR])
    history = read_json(paths.HISTORY)
    run_id = tracking.resume_run(params, history["run"])
    device = stage_device(params.evaluate.device)
    net = load_model(params, paths.MODEL, device)
    test = eval_source(params, load_split(paths.PREPARED, "test"), params.evaluate.batch_size)
    calibration = read_json(paths.THRESHOLDS)
    flops = exit_costs(net, params)

    scores, skipped = collect_scores(net, test, device)
    top1, top5 = scores.top1(), scores.top5_accuracy()
    if skipped:
        print(f"skipped {skipped} unreadable image(s) of the test split (data.skip_bad)")
    anytime = [
        {"exit": k + 1, "mflops": flops[k] / 1e6, "top1": top1[k], "top5": top5[k]}
        for k in range(len(flops))
    ]

    curve = [
        (
            row,
            operate(scores, torch.tensor(row["thresholds"], dtype=torch.float64), flops),
        )
        for row in calibration["grid"]
    ]
    flat = flat_envelope(
        [point.expected_flops for _, point in curve],
        [row["top1"] for row, _ in curve],
        [point.top1 for _, point in curve],
    )
    budget_curve = [
        {
            "p": row["p"],
            "mflops": point.expected_flops / 1e6,
            "top1": point.top1,
            "top1_flat": level,
            "val_top1": row["top1"],
        }
        for (row, point), level in zip(curve, flat, strict=True)
    ]

    # Interleaved repeats, so drift in machine load hits every measurement alike.
    all_exit_times: list[float] = []
    runs: dict[int, list] = {i: [] for i in range(len(calibration["budgets"]))}
    for _ in range(repeats):
        all_exit_times.append(time_all_exits(net, test, device))
        for i, row in enumerate(calibration["budgets"]):
            runs[i].append(early_exit(net, test, row["thresholds"], device))
    all_exits_seconds = statistics.median(all_exit_times)
    budgets = {}
    for i, row in enumerate(calibration["budgets"]):
        thresholds = torch.tensor(row["thresholds"], dtype=torch.float64)
        expected = operate(scores, thresholds, flops)
        seconds = statistics.median(run.seconds for run in runs[i])
        measured, predicted = all_exits_seconds / seconds, flops[-1] / expected.expected_flops
        hits = runs[i][0].predictions == runs[i][0].targets
        budgets[reports.budget_key(row["budget"])] = {
            "target_mflops": row["budget"] / 1e6,
            "expected_mflops": expected.expected_flops / 1e6,
            "top1": expected.top1,
            "early_exit_top1": 100.0 * float(hits.double().mean()),
            "seconds": seconds,
            "images_per_second": len(scores.targets) / seconds,
            "speedup_measured": measured,
            "speedup_predicted": predicted,
            "speedup_ratio": measured / predicted,
        }

    metrics = {
        "anytime": {
            "top1": {f"exit_{k + 1}": v for k, v in enumerate(top1)},
            "top5": {f"exit_{k + 1}": v for k, v in enumerate(top5)},
        },
        "final_top1": top1[-1],
        "mean_top1": sum(top1) / len(top1),
        "all_exits": {
            "seconds": all_exits_seconds,
            "images_per_second": len(scores.targets) / all_exits_seconds,
        },
        "device": describe(device),  # where the scores and the early-exit timings ran
        "budgets": budgets,
        "calibrated": calibration["calibrated"],
    }
    with replaced_together():  # all five or none
        write_json(paths.ANYTIME, anytime)
        write_json(paths.BUDGET_CURVE, budget_curve)
        plots.accuracy_vs_flops(
            paths.ACCURACY_PLOT,
            [r["mflops"] for r in anytime],
            top1,
            [r["mflops"] for r in budget_curve],
            [r["top1"] for r in budget_curve],
            flat,
            title=f"{'BoostNet' if params.boost.enabled else 'baseline'} on {params.data.dataset}",
        )
        plots.effective_samples(paths.EFFECTIVE_SAMPLES_PLOT, history["epochs"])
        write_json(paths.METRICS, metrics)
    files = [
        paths.METRICS,
        paths.ANYTIME,
        paths.BUDGET_CURVE,
        paths.ACCURACY_PLOT,
        paths.EFFECTIVE_SAMPLES_PLOT,
        paths.DVC_LOCK,
    ]
    tracking.best_effort(
        lambda: tracking.log_evaluation(run_id, metrics, anytime, budget_curve, files),
        "the evaluation",
    )
    name = params.tracking.registered_model
    if name:
        tracking.best_effort(
            lambda: print(
                f"registered {name} v{tracking.register(run_id, name)} (alias evaluated)"
            ),
            "the registry entry",
        )
    print("test top-1 per exit: " + " ".join(f"{v:.2f}" for v in top1))
    if not calibration["calibrated"]:
        print(f"budgeted evaluation skipped: {calibration['reason']}")
    for name, row in budgets.items():
        print(
            f"{name}: top-1 {row['top1']:.2f}%, {row['images_per_second']:.0f} img/s, "
            f"speedup {row['speedup_measured']:.2f}x measured, "
            f"{row['speedup_predicted']:.2f}x predicted"
        )


if __name__ == "__main__":
    main()
