"""DVC stage `calibrate`: exit thresholds fitted on the held-out split (no augmentation).

Writes, for every p of the 39-point grid and every target budget in params, the thresholds and
what they do on validation; evaluate applies them to the test split.
"""

import torch

from pipeline import paths, tracking
from pipeline.calibration import sweep, thresholds_for_budget
from pipeline.cli import stage_main
from pipeline.config import load_params
from pipeline.data import load_split
from pipeline.evaluation import collect_scores, eval_source, exit_costs, load_model
from pipeline.io import read_json, write_json


@stage_main
def main() -> None:
    params = load_params(paths.PARAMS).with_dataset(read_json(paths.DATASET_INFO))
    device = torch.device("cpu")
    net = load_model(params, paths.MODEL, device)
    val = load_split(paths.PREPARED, "val")
    source = eval_source(params, val, params.evaluate.batch_size)
    scores, skipped = collect_scores(net, source, device)
    if skipped:
        print(f"skipped {skipped} unreadable image(s) of the held-out split (data.skip_bad)")
    flops = exit_costs(net, params)
    grid = [{"p": p, **vars(point)} for p, point in sweep(scores, flops)]
    budgets = []
    for budget in params.calibrate.budgets:
        p, point = thresholds_for_budget(scores, flops, budget)
        budgets.append({"budget": budget, "p": p, **vars(point)})
    write_json(paths.THRESHOLDS, {"exit_flops": flops, "grid": grid, "budgets": budgets})
    run_id = tracking.resume_run(paths.MLFLOW_RUN)
    tracking.best_effort(
        lambda: tracking.log_artifacts(run_id, [paths.THRESHOLDS]), "the thresholds"
    )
    for row in budgets:
        print(
            f"budget {row['budget']:.3g} FLOPs: validation {row['expected_flops']:.3g} FLOPs, "
            f"top-1 {row['top1']:.2f}%"
        )


if __name__ == "__main__":
    main()
