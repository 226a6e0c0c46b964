"""DVC stage `train`: BoostNet on Ray Train workers; keeps the weights best on held-out data."""

import ray
import torch

from pipeline import paths
from pipeline.cli import stage_main
from pipeline.config import load_params
from pipeline.io import atomic_path, read_json, write_json
from pipeline.training import ray_init_kwargs, run_name, train


@stage_main
def main() -> None:
    params = load_params(paths.PARAMS)
    fingerprint = read_json(paths.DATASET_INFO)["fingerprint"]
    name = run_name(params, fingerprint)
    ray.init(**ray_init_kwargs())
    try:
        outcome = train(params, paths.PREPARED, paths.RAY_STORAGE, name)
    finally:
        ray.shutdown()
    with atomic_path(paths.MODEL) as tmp:
        torch.save(
            {
                "model": outcome.model_state,
                "epoch": outcome.best_epoch,
                "run": name,
                "data_fingerprint": fingerprint,
            },
            tmp,
        )
    write_json(
        paths.HISTORY,
        {
            "run": name,
            "device": outcome.device,
            "best_epoch": outcome.best_epoch,
            "epochs": outcome.history,
        },
    )


if __name__ == "__main__":
    main()
