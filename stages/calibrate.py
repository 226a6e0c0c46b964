"""DVC stage `calibrate`: exit thresholds fitted on the held-out split.

Writes, for every p of the 39-point grid and every target budget in params (FLOPs, and ms per
image at batch 1 or batch N against the profile stage's measured exit costs), the thresholds
and what they do on validation, in every currency; evaluate applies them to the test split.
The held-out images are clean unless `calibrate.augment` asks for the training augmentation
(the reference's behaviour). With `data.val_size: 0` there is nothing to calibrate on: the
output records that instead.
"""

from pipeline import paths, tracking
from pipeline.budgets import FLOPS, UNITS, calibrate, time_budgets, uncalibrated
from pipeline.data import load_split
from pipeline.devices import stage_device
from pipeline.entry import stage_main
from pipeline.evaluation import collect_scores, eval_source, exit_costs, load_model
from pipeline.io import check_writable, read_json, write_json
from pipeline.profiling import ExitProfile, Machine, apply_threads
from pipeline.stage_input import stage_input

NOT_CALIBRATED = "data.val_size is 0: no held-out split, so no thresholds (anytime setting)"


@stage_main
def main() -> None:
    params = stage_input().params
    check_writable([paths.CALIBRATE_DIR])
    apply_threads(params.evaluate.threads)
    device = stage_device(params.evaluate.device)
    profile = ExitProfile.from_json(read_json(paths.EXIT_COSTS))
    profile.check_serves(Machine.current(device), params.evaluate.batch_size, paths.EXIT_COSTS)
    time_budgets(params.calibrate, profile)  # out-of-range budgets stop here, before the work
    key = read_json(paths.HISTORY)["run"]  # the model's training run: this stage logs into it
    run_id = tracking.resume_run(params, key)
    net = load_model(params, paths.MODEL, device)
    val = load_split(paths.PREPARED, "val")
    flops = exit_costs(net, params)
    if len(val):
        source = eval_source(params, val, params.evaluate.batch_size, params.calibrate.augment)
        scores, skipped = collect_scores(net, source, device)
        if skipped:
            print(f"skipped {skipped} unreadable image(s) of the held-out split (data.skip_bad)")
        result = calibrate(scores, flops, profile, params.calibrate)
        for point in (*result.budgets, *result.time_budgets):
            unit = UNITS[point.currency] + ("" if point.currency == FLOPS else f" {point.currency}")
            share = f" ({point.stated})" if isinstance(point.stated, str) else ""
            print(
                f"budget {point.budget:.3g} {unit}{share}: validation "
                f"{point.expected(point.currency):.3g}, top-1 {point.top1:.2f}%"
            )
    else:
        print(NOT_CALIBRATED)
        result = uncalibrated(NOT_CALIBRATED, flops, profile)
    write_json(paths.THRESHOLDS, result.to_json())
    tracking.deliver(tracking.record(params, key, run_id, "artifacts", files=[paths.THRESHOLDS]))


if __name__ == "__main__":
    main()
