"""DVC stage `evaluate`: anytime and budgeted accuracy against FLOPs on the test split, and real
early-exit inference timed against running every exit. Without calibrated thresholds
(`data.val_size: 0`) the budgeted half is empty and the metrics say why."""

from pipeline import paths, plots, tracking
from pipeline.config import load_params
from pipeline.data import load_split
from pipeline.devices import stage_device
from pipeline.entry import stage_main
from pipeline.evaluation import eval_source, evaluate, load_model
from pipeline.io import check_writable, read_json, replaced_together, write_json


@stage_main
def main() -> None:
    params = load_params(paths.PARAMS).with_dataset(read_json(paths.DATASET_INFO))
    check_writable([paths.EVALUATE_DIR])
    history = read_json(paths.HISTORY)
    run_id = tracking.resume_run(params, history["run"])
    device = stage_device(params.evaluate.device)
    net = load_model(params, paths.MODEL, device)
    test = eval_source(params, load_split(paths.PREPARED, "test"), params.evaluate.batch_size)
    report = evaluate(net, test, device, read_json(paths.THRESHOLDS), params)

    anytime, curve = report.anytime, report.budget_curve
    with replaced_together():  # all five or none
        write_json(paths.ANYTIME, anytime)
        write_json(paths.BUDGET_CURVE, curve)
        plots.accuracy_vs_flops(
            paths.ACCURACY_PLOT,
            [r["mflops"] for r in anytime],
            [r["top1"] for r in anytime],
            [r["mflops"] for r in curve],
            [r["top1"] for r in curve],
            [r["top1_flat"] for r in curve],
            title=f"{'BoostNet' if params.boost.enabled else 'baseline'} on {params.data.dataset}",
        )
        plots.effective_samples(paths.EFFECTIVE_SAMPLES_PLOT, history["epochs"])
        write_json(paths.METRICS, report.metrics)
    files = [
        paths.METRICS,
        paths.ANYTIME,
        paths.BUDGET_CURVE,
        paths.ACCURACY_PLOT,
        paths.EFFECTIVE_SAMPLES_PLOT,
        paths.DVC_LOCK,
    ]
    tracking.best_effort(
        lambda: tracking.log_evaluation(run_id, report.metrics, anytime, curve, files),
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
    print("\n".join(report.summary()))


if __name__ == "__main__":
    main()
