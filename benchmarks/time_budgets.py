"""Time-calibrated against FLOPs-calibrated thresholds, at equal measured time.

Run in a project whose pipeline has run (outputs/train/model.pt, outputs/profile/exit_costs.json,
data/prepared.npz), on the setup the profile was measured on:

    python benchmarks/time_budgets.py --regime batch-N --points 6 --repeats 3

For `points` targets spread between exit 1's and the last exit's cost, it fits thresholds on
the held-out split twice: against the profile's ms per image (a time budget) and against FLOPs
(a FLOPs budget at the same fraction of the FLOPs range). Real early exit on the test split is
timed for every set, interleaved, medians. It prints both curves (measured ms, test top-1) and,
at each time-calibrated point, the FLOPs-calibrated curve's top-1 at the same measured time
(linear between its neighbours), with the binomial standard error of a top-1 on this test
split as the noise scale; and how far each time budget's measured time is from its target.
`--json FILE` writes the figures as a results record (benchmarks/results/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
from pathlib import Path

import numpy as np
import torch

from pipeline import paths
from pipeline.calibration import operate, thresholds_for_budget
from pipeline.config import load_params
from pipeline.data import load_split
from pipeline.devices import stage_device
from pipeline.evaluation import collect_scores, early_exit, eval_source, load_model
from pipeline.io import read_json
from pipeline.latency import early_exit_one_at_a_time, sample
from pipeline.profiling import BATCH_1, REGIMES, ExitProfile, Machine, apply_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--regime", choices=REGIMES, default="batch-N")
    parser.add_argument("--points", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write a results record here")
    args = parser.parse_args()

    params = load_params(paths.PARAMS).with_dataset(read_json(paths.DATASET_INFO))
    apply_threads(params.evaluate.threads)
    device = stage_device(params.evaluate.device)
    profile = ExitProfile.from_json(read_json(paths.EXIT_COSTS))
    profile.check_serves(Machine.current(device), params.evaluate.batch_size, paths.EXIT_COSTS)
    net = load_model(params, paths.MODEL, device)
    batch = params.evaluate.batch_size
    val_source = eval_source(params, load_split(paths.PREPARED, "val"), batch)
    test_split = load_split(paths.PREPARED, "test")
    test = eval_source(params, test_split, batch)
    if args.regime == BATCH_1:
        sampled = sample(test_split, params.evaluate.batch1_images, params.seed)
        timed_source = eval_source(params, sampled, 1)
    else:
        timed_source = test
    val, _ = collect_scores(net, val_source, device)
    scores, _ = collect_scores(net, test, device)
    ms, flops = profile.ms[args.regime], profile.flops

    fractions = np.linspace(0.1, 0.9, args.points)
    sets = []  # (kind, target, thresholds)
    for f in fractions:
        target_ms = ms[0] + f * (ms[-1] - ms[0])
        target_flops = flops[0] + f * (flops[-1] - flops[0])
        sets.append(("time", target_ms, thresholds_for_budget(val, ms, target_ms)[1].thresholds))
        sets.append(
            ("flops", target_flops, thresholds_for_budget(val, flops, target_flops)[1].thresholds)
        )

    def run(thresholds: list[float]):
        if args.regime == BATCH_1:
            return early_exit_one_at_a_time(net, timed_source, thresholds, device)
        return early_exit(net, timed_source, thresholds, device)

    for _, _, thresholds in sets:  # warm-up
        run(thresholds)
    seconds: list[list[float]] = [[] for _ in sets]
    for _ in range(args.repeats):
        for (_, _, thresholds), kept in zip(sets, seconds, strict=True):
            kept.append(run(thresholds).seconds)
    images = len(timed_source.split)
    rows = []
    for (kind, target, thresholds), kept in zip(sets, seconds, strict=True):
        on_test = operate(scores, torch.tensor(thresholds, dtype=torch.float64), ms)
        rows.append(
            {
                "kind": kind,
                "target": target,
                "predicted_ms": on_test.expected_cost,
                "measured_ms": 1000 * statistics.median(kept) / images,
                "top1": on_test.top1,
            }
        )
    by_time = [r for r in rows if r["kind"] == "time"]
    by_flops = sorted((r for r in rows if r["kind"] == "flops"), key=lambda r: r["measured_ms"])
    n = len(scores.targets)
    noise = 100 * math.sqrt(0.9 * 0.1 / n)  # a top-1 near 90 % on n test images
    print(f"{args.regime}, {Machine.current(device)}, {images} images, medians of {args.repeats}")
    print(
        "time-calibrated:  target ms  measured ms  measured/target  top-1 | "
        "FLOPs-calibrated top-1 at that time  difference"
    )
    for row in by_time:
        other = float(
            np.interp(
                row["measured_ms"],
                [r["measured_ms"] for r in by_flops],
                [r["top1"] for r in by_flops],
            )
        )
        row["flops_top1_at_same_time"] = other
        ratio = row["measured_ms"] / row["target"]
        print(
            f"  {row['target']:16.4f} {row['measured_ms']:12.4f} {ratio:16.3f}"
            f" {row['top1']:6.2f} | {other:37.2f} {row['top1'] - other:+11.2f}"
        )
    print("FLOPs-calibrated: target MFLOPs  measured ms  top-1")
    for row in by_flops:
        print(f"  {row['target'] / 1e6:18.3f} {row['measured_ms']:12.4f} {row['top1']:6.2f}")
    worst = min(r["top1"] - r["flops_top1_at_same_time"] for r in by_time)
    misses = [abs(r["measured_ms"] / r["target"] - 1) for r in by_time]
    print(
        f"time-calibrated minus FLOPs-calibrated top-1 at equal measured time: worst {worst:+.2f} "
        f"points (one standard error of a top-1 here: {noise:.2f}); time budgets missed their "
        f"target by at most {100 * max(misses):.1f} %"
    )
    if args.json:
        record = {
            "title": f"Time budgets against FLOPs budgets at equal measured time ({args.regime})",
            "group": "cost and speed",
            "command": f"python benchmarks/time_budgets.py --regime {args.regime} "
            f"--points {args.points} --repeats {args.repeats}",
            "date": datetime.date.today().isoformat(),
            "machine": f"{profile.machine.cpu}, {profile.machine.threads} torch threads "
            f"({profile.machine.device})",
            "tables": [
                {
                    "columns": ["target ms", "measured ms", "measured/target", "top-1 (time)",
                                "top-1 (FLOPs, same time)", "difference"],
                    "rows": [
                        [f"{r['target']:.4f}", f"{r['measured_ms']:.4f}",
                         f"{r['measured_ms'] / r['target']:.3f}", f"{r['top1']:.2f}",
                         f"{r['flops_top1_at_same_time']:.2f}",
                         f"{r['top1'] - r['flops_top1_at_same_time']:+.2f}"]
                        for r in by_time
                    ],
                }
            ],
            "note": f"One standard error of a top-1 on {n} test images is {noise:.2f} points.",
        }  # fmt: skip
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
