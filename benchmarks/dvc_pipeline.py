"""Pipeline figures on this machine: `dvc repro` wall time, the no-op re-run, test accuracy, real
early-exit speedups (BoostNet against the baseline over seeds: `boostpipe study`).

Run from the project root with the venv's bin on PATH:
    python benchmarks/dvc_pipeline.py repro            # forced full run, then a no-op run
    python benchmarks/dvc_pipeline.py tracking         # what MLflow logging costs, on the outputs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

METRICS = Path("outputs/evaluate/metrics.json")
ANYTIME = Path("outputs/evaluate/anytime.json")


def timed(command: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return time.perf_counter() - start, result.stdout


def report_metrics(metrics: dict, anytime: list[dict]) -> None:
    """The default experiment's targets: a stronger last exit, a cheap and weaker first one, and a
    middle budget close to the last exit's accuracy at lower cost."""
    top1 = list(metrics["anytime"]["top1"].values())
    mflops = [row["mflops"] for row in anytime]
    print("test top-1 per exit: " + " ".join(f"{v:.2f}" for v in top1))
    print("MFLOPs per exit: " + " ".join(f"{v:.2f}" for v in mflops))
    print(
        f"last exit >= 91%: {top1[-1] >= 91}; exit 1 at most half the cost "
        f"({mflops[0] / mflops[-1]:.2f}): {mflops[0] <= mflops[-1] / 2}; "
        f"exit 1 >= 2 points below ({top1[-1] - top1[0]:.2f}): {top1[-1] - top1[0] >= 2}"
    )
    budgets = list(metrics["budgets"].values())
    middle = budgets[len(budgets) // 2]
    print(
        f"middle budget within 0.5 points of the last exit ({top1[-1] - middle['top1']:.2f}) at "
        f"{middle['expected_mflops']:.2f} of {mflops[-1]:.2f} MFLOPs: "
        f"{top1[-1] - middle['top1'] <= 0.5}"
    )
    for name, row in metrics["budgets"].items():
        print(
            f"{name} ({row['target_mflops']:g} MFLOPs): top-1 {row['top1']:.2f}%, "
            f"{row['images_per_second']:.0f} img/s, "
            f"speedup {row['speedup_measured']:.2f}x measured vs {row['speedup_predicted']:.2f}x "
            f"predicted (ratio {row['speedup_ratio']:.2f}, target >= 0.8)"
        )


def repro() -> None:
    seconds, _ = timed(["dvc", "repro", "--force"])
    print(f"dvc repro --force: {seconds:.1f} s (target <= 300 s)")
    report_metrics(json.loads(METRICS.read_text()), json.loads(ANYTIME.read_text()))
    seconds, output = timed(["dvc", "repro"])
    reran = [line for line in output.splitlines() if line.startswith("Running stage")]
    print(f"second dvc repro: {seconds:.1f} s, stages re-run: {reran or 'none'}")


def tracking_cost() -> None:
    """Time each tracking call the stages make, replayed on the current outputs (new run)."""
    import torch  # every stage imports it anyway: only mlflow's own import is tracking's

    start = time.perf_counter()
    import mlflow  # noqa: F401

    from pipeline import paths, tracking
    from pipeline.boosting import BoostNet
    from pipeline.config import load_params
    from pipeline.devices import describe_platform
    from pipeline.epochs import EpochRecord
    from pipeline.io import read_json

    imported = time.perf_counter() - start
    params = load_params(paths.PARAMS)
    dataset = read_json(paths.DATASET_INFO)
    marker = Path(".boostpipe/benchmark.mlflow-run")
    marker.unlink(missing_ok=True)
    start = time.perf_counter()
    run_id = tracking.start_run(params, dataset["fingerprint"], dataset["source"], marker)
    created = time.perf_counter() - start
    marker.unlink()
    net = BoostNet.from_params(params)
    net.load_state_dict(torch.load(paths.MODEL, weights_only=True)["model"])
    size = params.data.spec.image_size
    start = time.perf_counter()
    tracking.log_training(
        run_id,
        [EpochRecord.from_json(row) for row in read_json(paths.HISTORY)["epochs"]],
        describe_platform(torch.device("cpu")),
        net,
        (params.in_channels, size, size),
        [paths.MODEL, paths.PARAMS],
    )
    trained = time.perf_counter() - start
    start = time.perf_counter()
    tracking.log_evaluation(
        run_id,
        read_json(paths.METRICS),
        read_json(paths.ANYTIME),
        read_json(paths.BUDGET_CURVE),
        [paths.METRICS, paths.ACCURACY_PLOT],
    )
    evaluated = time.perf_counter() - start
    total = 3 * imported + created + trained + evaluated
    print(
        f"import mlflow {imported:.1f} s (once per stage, 3 stages), create run {created:.1f} s, "
        f"log training incl. model {trained:.1f} s, log evaluation {evaluated:.1f} s; "
        f"{total:.1f} s in all"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("repro")
    sub.add_parser("tracking")
    args = parser.parse_args()
    if args.what == "repro":
        repro()
    else:
        tracking_cost()


if __name__ == "__main__":
    main()
