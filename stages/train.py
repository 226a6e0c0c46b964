"""DVC stage `train`: BoostNet on Ray Train workers; keeps the weights `train.select` picks (the
last epoch's, or the best on held-out data)."""

from pathlib import Path

import torch

from pipeline import paths, reports, tracking
from pipeline.entry import stage_main
from pipeline.io import atomic_path, check_writable, replaced_together, write_json
from pipeline.rayenv import prepare_ray
from pipeline.stage_input import stage_input
from pipeline.storage import open_storage


@stage_main
def main() -> None:
    prepare_ray()  # Ray reads it on import: before pipeline.training imports ray
    from pipeline.cluster import ray_session
    from pipeline.training import run_name, train

    given = stage_input()
    params, dataset = given.params, given.dataset
    name = run_name(params, dataset["fingerprint"])
    check_writable([paths.TRAIN_DIR])
    storage = open_storage(params.ray, paths.RAY_STORAGE)  # checkpoints: a real write, up front
    # Created (or, after an interruption, reopened) with a real write before training: a store
    # that cannot be written fails here, not after an hour of training.
    run_file = paths.RAY_STORAGE / f"{name}.mlflow-run"
    run_id = tracking.start_run(params, dataset["fingerprint"], dataset["source"], run_file)
    tracking.link_run(run_id, name)  # calibrate and evaluate find the run by this name
    with ray_session():
        root = Path(params.data.root) if params.data.is_folder else None
        log_epoch = tracking.EpochLogger(tracking.current_uri(), run_id, tracking.outbox_folder())
        outcome = train(params, paths.PREPARED, storage, name, root, log_epoch)
    epochs = [record.as_json() for record in outcome.history]  # history.json's rows
    with replaced_together():  # the model, its history and curves, or none
        with atomic_path(paths.MODEL) as tmp:
            torch.save(
                {
                    "model": outcome.model_state,
                    "epoch": outcome.best_epoch,
                    "run": name,
                    "data_fingerprint": dataset["fingerprint"],
                },
                tmp,
            )
        write_json(
            paths.HISTORY,
            {
                "run": name,
                "device": outcome.device,
                "platform": outcome.platform,  # what the numbers repeat on exactly
                "best_epoch": outcome.best_epoch,  # the epoch whose weights model.pt holds
                "select": params.train.select,
                "train_seconds": reports.training_seconds(epochs),
                "epochs": epochs,
            },
        )
        write_json(paths.CURVES, reports.epoch_curves(epochs))
    skipped = outcome.history[-1].stats.skipped_images
    if skipped:
        print(f"skipped {skipped} unreadable image(s) per epoch (data.skip_bad: true)")
    run_file.unlink(missing_ok=True)
    details = {"platform": outcome.platform, "dataset": dataset, "epochs": epochs}
    files = [paths.MODEL, paths.PARAMS]
    tracking.deliver(tracking.record(params, name, run_id, "training", details, files))


if __name__ == "__main__":
    main()
