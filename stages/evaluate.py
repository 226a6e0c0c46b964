"""DVC stage `evaluate`: anytime and budgeted accuracy against FLOPs and measured time on the
test split, and real early-exit inference timed against running every exit and against every
time budget's target. Without calibrated thresholds (`data.val_size: 0`) the budgeted half is
empty and the metrics say why."""

import sys

from pipeline import paths, plots, tracking
from pipeline.budgets import Calibration
from pipeline.data import load_split
from pipeline.devices import stage_device
from pipeline.entry import stage_main
from pipeline.evaluation import eval_source, load_model
from pipeline.io import check_writable, read_json, replaced_together, write_json
from pipeline.latency import sample
from pipeline.profiling import COLUMNS, REGIMES, ExitProfile, Machine, apply_threads
from pipeline.scorecard import evaluate, timing_caveats
from pipeline.stage_input import stage_input


@stage_main
def main() -> None:
    params = stage_input().params
    check_writable([paths.EVALUATE_DIR])
    apply_threads(params.evaluate.threads)
    device = stage_device(params.evaluate.device)
    profile = ExitProfile.from_json(read_json(paths.EXIT_COSTS))
    profile.check_serves(Machine.current(device), params.evaluate.batch_size, paths.EXIT_COSTS)
    calibration = Calibration.from_json(read_json(paths.THRESHOLDS))
    history = read_json(paths.HISTORY)
    run_id = tracking.resume_run(params, history["run"])
    net = load_model(params, paths.MODEL, device)
    split = load_split(paths.PREPARED, "test")
    timing = params.evaluate
    for caveat in timing_caveats(len(split), timing.batch_size, timing.timing_repeats):
        print(f"warning: {caveat}", file=sys.stderr)
    test = eval_source(params, split, params.evaluate.batch_size)
    single = eval_source(params, sample(split, params.evaluate.batch1_images, params.seed), 1)
    report = evaluate(
        net, test, single, device, calibration, profile, timing.timing_repeats, timing.timing_warmup
    )

    anytime, curve = report.anytime, report.budget_curve
    title = f"{'BoostNet' if params.boost.enabled else 'baseline'} on {params.data.dataset}"
    with replaced_together():  # all seven or none
        write_json(paths.ANYTIME, anytime)
        write_json(paths.BUDGET_CURVE, curve)
        write_json(paths.TIME_BUDGETS, report.time_budgets)
        plots.accuracy_vs_flops(
            paths.ACCURACY_PLOT,
            [r["mflops"] for r in anytime],
            [r["top1"] for r in anytime],
            [r["mflops"] for r in curve],
            [r["top1"] for r in curve],
            [r["top1_flat"] for r in curve],
            title=title,
        )
        plots.accuracy_vs_time(
            paths.TIME_PLOT,
            [
                (regime, profile.ms[regime], [r[COLUMNS[regime]] for r in curve])
                for regime in REGIMES
            ],
            [r["top1"] for r in anytime],
            [r["top1_flat"] for r in curve],
            [(r["regime"], r["measured_ms"], r["early_exit_top1"]) for r in report.time_budgets],
            title=title,
        )
        plots.effective_samples(paths.EFFECTIVE_SAMPLES_PLOT, history["epochs"])
        write_json(paths.METRICS, report.metrics)
    files = [
        paths.METRICS,
        paths.ANYTIME,
        paths.BUDGET_CURVE,
        paths.TIME_BUDGETS,
        paths.ACCURACY_PLOT,
        paths.TIME_PLOT,
        paths.EFFECTIVE_SAMPLES_PLOT,
        paths.EXIT_COSTS,
        paths.DVC_LOCK,
    ]
    details = {"metrics": report.metrics, "anytime": anytime, "curve": curve}
    key = history["run"]
    tracking.deliver(tracking.record(params, key, run_id, "evaluation", details, files))
    name = params.tracking.registered_model
    if name:
        tracking.deliver(tracking.record(params, key, run_id, "registry", {"name": name}))
    tracking.settle(params.tracking.catch_up_s)  # the last stage: what is kept, sent now
    print("\n".join(report.summary()))


if __name__ == "__main__":
    main()
