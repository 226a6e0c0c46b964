"""DVC stage `calibrate`: exit thresholds fitted on the held-out split.

Writes, for every p of the 39-point grid and every target budget in params, the thresholds and
what they do on validation; evaluate applies them to the test split. The held-out images are
clean unless `calibrate.augment` asks for the training augmentation (the reference's behaviour).
With `data.val_size: 0` there is nothing to calibrate on: the output records that instead.
"""

import torch

from pipeline import paths, tracking
from pipeline.boosting import BoostNet
from pipeline.calibration import sweep, thresholds_for_budget
from pipeline.cli import stage_main
from pipeline.config import Params, load_params
from pipeline.data import Split, load_split
from pipeline.evaluation import collect_logits, exit_costs, load_model
from pipeline.io import write_json

NOT_CALIBRATED = "data.val_size is 0: no held-out split, so no thresholds (anytime setting)"


def _calibration_images(val: Split, params: Params) -> Split:
    """The held-out split as calibration sees it: clean, or with the training augmentation."""
    if not params.calibrate.augment:
        return val
    from pipeline.training import augment

    generator = torch.Generator().manual_seed(params.seed)
    return Split(augment(val.images, params.train, generator), val.targets)


def _calibrate(params: Params, net: BoostNet, flops: list[int], val: Split) -> dict:
    logits = collect_logits(
        net, val, params.data.spec, params.evaluate.batch_size, torch.device("cpu")
    )
    grid = [{"p": p, **vars(point)} for p, point in sweep(logits, val.targets, flops)]
    budgets = []
    for budget in params.calibrate.budgets:
        p, point = thresholds_for_budget(logits, val.targets, flops, budget)
        budgets.append({"budget": budget, "p": p, **vars(point)})
    for row in budgets:
        print(
            f"budget {row['budget']:.3g} FLOPs: validation {row['expected_flops']:.3g} FLOPs, "
            f"top-1 {row['top1']:.2f}%"
        )
    return {"calibrated": True, "grid": grid, "budgets": budgets}


@stage_main
def main() -> None:
    params = load_params(paths.PARAMS)
    val = load_split(paths.PREPARED, "val")
    net = load_model(params, paths.MODEL, torch.device("cpu"))
    flops = exit_costs(net, params)
    if len(val):
        result = _calibrate(params, net, flops, _calibration_images(val, params))
    else:
        print(NOT_CALIBRATED)
        result = {"calibrated": False, "reason": NOT_CALIBRATED, "grid": [], "budgets": []}
    write_json(paths.THRESHOLDS, {"exit_flops": flops, **result})
    run_id = tracking.resume_run(paths.MLFLOW_RUN)
    tracking.best_effort(
        lambda: tracking.log_artifacts(run_id, [paths.THRESHOLDS]), "the thresholds"
    )


if __name__ == "__main__":
    main()
