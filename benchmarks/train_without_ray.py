"""Train the train stage's model in this one process, without Ray, MLflow or DVC, and write
outputs/train/model.pt as the stage does (weights `train.select` keeps, the data fingerprint).

For a machine that has torch and an accelerator but not the rest of the stack (a borrowed GPU
box), so that the profile stage and `benchmarks/time_budgets.py` can run there on a model
trained there. The loop is the Ray workers' own (`pipeline.fitting`: the boosted loss, the
schedule, `train.compile` and `train.amp` resolved for the device), with one worker:

    python -m stages.prepare && python -m benchmarks.train_without_ray --device cuda

It prints each epoch's training images/s (compilation apart) and held-out top-1 per exit.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from pipeline import paths
from pipeline.boosting import BoostNet
from pipeline.data import load_split
from pipeline.devices import stage_device
from pipeline.fitting import exit_correct, keeps, make_fit, selection_score, train_epoch, unwrap
from pipeline.io import atomic_path
from pipeline.stage_input import stage_input


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--epochs", type=int, help="instead of train.epochs")
    args = parser.parse_args()

    given = stage_input()
    params, dataset = given.params, given.dataset
    device = stage_device(args.device, "--device")
    epochs = args.epochs or params.train.epochs
    torch.manual_seed(params.seed)
    train_split, val_split = load_split(paths.PREPARED, "train"), load_split(paths.PREPARED, "val")
    net = BoostNet.from_params(params)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    fit = make_fit(params, net.to(device), train_split, device, 0, 1, epochs)
    print(f"{len(train_split)} training images on {device}, compiled: {fit.compile} ({fit.mode})")

    best_score, best_epoch, best_state = -math.inf, 0, None
    for epoch in range(epochs):
        start = time.perf_counter()
        stats = train_epoch(fit, epoch)
        val_top1 = []  # data.val_size 0: nothing held out to score
        if len(val_split):
            correct = exit_correct(fit.net, val_split, params, device)
            val_top1 = (100.0 * correct.float() / len(val_split)).tolist()
        score = selection_score(params.train, val_top1)
        if math.isnan(score) or keeps(params.train, score, best_score):
            state = unwrap(fit.net).state_dict()
            best_score, best_epoch = score, epoch + 1
            best_state = {k: v.detach().cpu().clone() for k, v in state.items()}
        compiled = f", compiled in {stats.compile_seconds:.1f} s" if stats.compile_seconds else ""
        print(
            f"epoch {epoch + 1}/{epochs}: {stats.images_per_second:,.0f} images/s{compiled}, "
            f"{time.perf_counter() - start:.1f} s; held-out top-1 "
            + " ".join(f"{t:.2f}" for t in val_top1)
        )
    paths.TRAIN_DIR.mkdir(parents=True, exist_ok=True)
    with atomic_path(paths.MODEL) as tmp:
        torch.save(
            {
                "model": best_state,
                "epoch": best_epoch,
                "run": "train_without_ray",
                "data_fingerprint": dataset["fingerprint"],
            },
            tmp,
        )
    print(f"kept epoch {best_epoch}: {paths.MODEL}")


if __name__ == "__main__":
    main()
