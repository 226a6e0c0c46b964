"""Early exit's real speed on the workspace's trained model, and `boostpipe predict` on files.

Run in a project whose pipeline has run (outputs/train/model.pt, outputs/calibrate/thresholds.json,
data/prepared.npz). Writes the test split (10,000 Fashion-MNIST images) as PNG files once, then,
in interleaved repeats (medians reported):

- evaluate's timing: every exit on every in-memory test image, and real early exit at each
  calibrated budget, so the measured speedup sits beside the one FLOPs predict;
- `predict` (pipeline.predict, decoding the PNGs in loader processes) at each budget, against the
  same files with every image sent to the last exit and against evaluate's all-exits run;

and checks that predict's classes and exits equal evaluate's early exit for the same thresholds.

    python benchmarks/predict.py [--repeats 3] [--threads N] [--workers N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from torchcodec.encoders import PngEncoder

from pipeline import paths
from pipeline.calibration import operate
from pipeline.config import load_params
from pipeline.data import load_split
from pipeline.evaluation import (
    collect_scores,
    early_exit,
    eval_source,
    exit_costs,
    load_model,
    time_all_exits,
)
from pipeline.inputs import default_loader_workers
from pipeline.io import read_json
from pipeline.predict import predict


def write_pngs(images: torch.Tensor, folder: Path) -> list[Path]:
    files = [folder / f"{i:05d}.png" for i in range(len(images))]
    for image, file in zip(images, files, strict=True):
        PngEncoder(image).to_file(file)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--workers", type=int, help="predict's decoding processes (CPUs - 1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    params = load_params(paths.PARAMS).with_dataset(read_json(paths.DATASET_INFO))
    net = load_model(params, paths.MODEL, cpu)
    flops = exit_costs(net, params)
    rows = read_json(paths.THRESHOLDS)["budgets"]
    test = load_split(paths.PREPARED, "test")
    batch = params.evaluate.batch_size
    source = eval_source(params, test, batch)
    workers = args.workers if args.workers is not None else default_loader_workers(2, None)
    scores, _ = collect_scores(net, source, cpu)
    last_only = [float("inf")] * (len(flops) - 1) + [float("-inf")]
    print(f"{len(test)} test images, batch {batch}, {torch.get_num_threads()} torch threads")

    with tempfile.TemporaryDirectory() as tmp:
        files = write_pngs(test.images, Path(tmp))

        def run_predict(thresholds: list[float]):
            return predict(net, params, files, thresholds, flops, batch_size=batch, workers=workers)

        all_exits, files_last, evaluated, predicted = [], [], {}, {}
        for _ in range(args.repeats):
            all_exits.append(time_all_exits(net, source, cpu))
            files_last.append(run_predict(last_only).seconds)
            for row in rows:
                key, thresholds = row["budget"], row["thresholds"]
                evaluated.setdefault(key, []).append(early_exit(net, source, thresholds, cpu))
                predicted.setdefault(key, []).append(run_predict(thresholds))

    every = statistics.median(all_exits)
    print(f"every exit, in-memory tensors (evaluate): {every:.3f} s, {len(test) / every:.0f} img/s")
    last = statistics.median(files_last)
    print(f"every exit, predict on PNG files:         {last:.3f} s, {len(test) / last:.0f} img/s")
    for row in rows:
        key = row["budget"]
        expected = operate(scores, torch.tensor(row["thresholds"], dtype=torch.float64), flops)
        seconds = statistics.median(run.seconds for run in evaluated[key])
        measured, ideal = every / seconds, flops[-1] / expected.expected_flops
        files_seconds = statistics.median(out.seconds for out in predicted[key])
        run, out = evaluated[key][0], predicted[key][0]
        same = [p.label for p in out.predictions] == run.predictions.tolist() and [
            p.exit - 1 for p in out.predictions
        ] == run.exits.tolist()
        print(
            f"budget {key / 1e6:.2f} MFLOPs: early exit {seconds:.3f} s, speedup {measured:.2f}x "
            f"measured vs {ideal:.2f}x predicted (ratio {measured / ideal:.2f}); predict on "
            f"files {files_seconds:.3f} s ({len(test) / files_seconds:.0f} img/s, "
            f"{every / files_seconds:.2f}x evaluate's every exit); "
            f"predictions {'identical' if same else 'DIFFERENT'} to evaluate's"
        )


if __name__ == "__main__":
    main()
