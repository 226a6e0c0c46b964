"""BoostNet against the joint-training baseline (boost.enabled false) over seeds, on params.yaml
(or params.yaml with `--set key=value` overrides): per exit and per calibrated budget, the mean
+- std test top-1 of each and the paired difference (BoostNet - baseline, same seed) with a 95 %
t confidence interval.

    python benchmarks/boost_vs_baseline.py --seeds 0 1 2 3 4 [--set model.n_blocks=6 ...]
    python benchmarks/boost_vs_baseline.py --table benchmarks/results/boost_vs_baseline.json

Every run is the pipeline's own code in-process (benchmarks/inprocess.py: `pipeline.training.train`
on Ray Train with params.yaml's DDP workers, then the calibrate and evaluate stages' functions),
without DVC and MLflow. The seed sets initialisation, data order and augmentation; the held-out
split is the prepared one (data/prepared.npz from `dvc repro prepare`) for every run, so each pair
differs only in the loss; a study on other data (`data.train_subset`) runs in a copy of the
project whose params.yaml sets it, after `dvc repro prepare` there. Results are appended to the
JSON file after every run (a killed study keeps what it finished; re-running skips runs already
there).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import yaml
from inprocess import compose, train_and_score

from pipeline import paths
from pipeline.io import read_json, write_json
from pipeline.stats import paired_interval, std

RESULTS = Path("benchmarks/results/boost_vs_baseline.json")
VARIANTS = {"boostnet": True, "baseline": False}


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):6.2f}+-{std(values):4.2f}"


def paired(boost: list[float], base: list[float]) -> str:
    interval = paired_interval(boost, base)
    if interval is None:
        return f"{boost[0] - base[0]:+6.2f}"
    return f"{interval.mean:+6.2f} [{interval.low:+.2f}, {interval.high:+.2f}]"


def table(results: dict[str, Any]) -> str:
    runs = results["runs"]
    seeds = sorted({r["seed"] for r in runs if r["variant"] == "boostnet"} & {
        r["seed"] for r in runs if r["variant"] == "baseline"})  # fmt: skip
    by = {(r["variant"], r["seed"]): r for r in runs}
    first = by["boostnet", seeds[0]]
    lines = [
        f"{len(seeds)} paired seeds {seeds}; overrides {results['overrides'] or 'none'}"
        + "".join(f"; {n} {split}" for split, n in results.get("splits", {}).items()),
        f"{'':22s} {'BoostNet':>12s} {'baseline':>12s}   BoostNet - baseline [95% CI]",
    ]
    rows = [(f"exit {k + 1} ({m:.2f} MFLOPs)", "exit_top1", k) for k, m in
            enumerate(first["exit_mflops"])]  # fmt: skip
    rows += [(f"budget {b / 1e6:.2f} MFLOPs", "budget_top1", k) for k, b in
             enumerate(results["budgets"])]  # fmt: skip
    for label, key, k in rows:
        boost = [by["boostnet", s][key][k] for s in seeds]
        base = [by["baseline", s][key][k] for s in seeds]
        lines.append(f"{label:22s} {mean_std(boost)} {mean_std(base)}   {paired(boost, base)}")
    for variant in VARIANTS:
        spent = [by[variant, s]["budget_mflops"] for s in seeds]
        cost = " / ".join(f"{statistics.mean(c):.2f}" for c in zip(*spent, strict=True))
        seconds = statistics.mean(by[variant, s]["train_seconds"] for s in seeds)
        lines.append(f"{variant}: test MFLOPs at the budgets {cost}; train {seconds:.0f} s/run")
    return "\n".join(lines)


def study(seeds: list[int], overrides: dict[str, Any], path: Path) -> None:
    from pipeline.rayenv import prepare_ray

    prepare_ray()  # before `import ray`
    import ray

    from pipeline.cluster import ray_init_kwargs

    results = json.loads(path.read_text()) if path.exists() else {"runs": []}
    if results["runs"] and results.get("overrides") != overrides:
        raise SystemExit(f"{path} holds a study with overrides {results['overrides']}; use --out")
    done = {(r["variant"], r["seed"]) for r in results["runs"]}
    info = read_json(paths.DATASET_INFO)  # what `dvc repro prepare` made of params.yaml's data
    splits = {split: info[split] for split in ("train", "val", "test")}
    ray.init(**ray_init_kwargs())
    try:
        for seed in seeds:
            for variant, enabled in VARIANTS.items():
                if (variant, seed) in done:
                    continue
                params = compose({**overrides, "seed": seed, "boost.enabled": enabled})
                scored = train_and_score(params)
                results.update(overrides=overrides, budgets=params.calibrate.budgets, splits=splits)
                results["runs"].append({"variant": variant, "seed": seed, **{
                    k: v for k, v in vars(scored).items() if k != "history"}})  # fmt: skip
                write_json(path, results)
                print(
                    f"{variant} seed {seed}: {scored.train_seconds:.0f} s, top-1 per exit "
                    + " ".join(f"{v:.2f}" for v in scored.exit_top1)
                    + ", per budget "
                    + " ".join(f"{v:.2f}" for v in scored.budget_top1),
                    flush=True,
                )
    finally:
        ray.shutdown()
    print(table(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, values in YAML"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--table", type=Path, help="only print the table of a results file")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    study(args.seeds, overrides, args.out)


if __name__ == "__main__":
    main()
