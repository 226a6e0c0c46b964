"""DVC stage `calibrate`: exit thresholds fitted on the held-out split.

Writes, for every p of the 39-point grid and every target budget in params, the thresholds and
what they do on validation; evaluate applies them to the test split. The held-out images are
clean unless `calibrate.augment` asks for the training augmentation (the reference's behaviour).
With `data.val_size: 0` there is nothing to calibrate on: the output records that instead.
"""

from pipeline import paths, tracking
from pipeline.calibration import ExitScores, sweep, thresholds_for_budget
from pipeline.config import load_params
from pipeline.data import load_split
from pipeline.devices import stage_device
from pipeline.entry import stage_main
from pipeline.evaluation import collect_scores, eval_source, exit_costs, load_model
from pipeline.io import check_writable, read_json, write_json

NOT_CALIBRATED = "data.val_size is 0: no held-out split, so no thresholds (anytime setting)"


def _calibrate(scores: ExitScores, flops: list[int], budgets: list[float]) -> dict:
    grid = [{"p": p, **vars(point)} for p, point in sweep(scores, flops)]
    rows = []
    for budget in budgets:
        p, point = thresholds_for_budget(scores, flops, budget)
        rows.append({"budget": budget, "p": p, **vars(point)})
        print(
            f"budget {budget:.3g} FLOPs: validation {point.expected_flops:.3g} FLOPs, "
            f"top-1 {point.top1:.2f}%"
        )
    return {"calibrated": True, "grid": grid, "budgets": rows}


@stage_main
def main() -> None:
    params = load_params(paths.PARAMS).with_dataset(read_json(paths.DATASET_INFO))
    check_writable([paths.CALIBRATE_DIR])
    run_id = tracking.resume_run(params, read_json(paths.HISTORY)["run"])
    device = stage_device(params.evaluate.device)
    net = load_model(params, paths.MODEL, device)
    val = load_split(paths.PREPARED, "val")
    flops = exit_costs(net, params)
    if len(val):
        source = eval_source(params, val, params.evaluate.batch_size, params.calibrate.augment)
        scores, skipped = collect_scores(net, source, device)
        if skipped:
            print(f"skipped {skipped} unreadable image(s) of the held-out split (data.skip_bad)")
        result = _calibrate(scores, flops, params.calibrate.budgets)
    else:
        print(NOT_CALIBRATED)
        result = {"calibrated": False, "reason": NOT_CALIBRATED, "grid": [], "budgets": []}
    write_json(paths.THRESHOLDS, {"exit_flops": flops, **result})
    tracking.best_effort(
        lambda: tracking.log_artifacts(run_id, [paths.THRESHOLDS]),
        "the thresholds",
    )


if __name__ == "__main__":
    main()
