"""Two Ray nodes against one, and losing a node mid-training, on this machine.

The train stage (`dvc repro --single-item train` in a shrunk copy of the project, MLflow in the
copy's SQLite store) joins a real cluster through RAY_ADDRESS. Both layouts offer 2 CPUs to the
same 2 one-CPU DDP workers:
    one node:  `ray start --head --num-cpus=2`
    two nodes: `ray start --head --num-cpus=1` and `ray start --address=... --num-cpus=1`
Then the two-node run again, with the worker node SIGKILLed after the first checkpoint and a fresh
node started in its place (what an autoscaler does).

Run from the project root with the venv's bin on PATH:
    python benchmarks/cluster.py                       # 16,000 training images, 2 epochs
    python benchmarks/cluster.py --train-subset 8000 --epochs 2
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_cluster import Driver, LoopbackCluster, loopback_cluster, project

from pipeline.io import read_json

EVENTS = r"resuming after|FailurePolicy|Error count|by peer|marked dead"  # log lines shown


def copy(root: Path, train_subset: int, epochs: int) -> Path:
    """A project copy with the default params but `train_subset` images, prepared once."""
    repo = project(root, train_subset=train_subset, epochs=epochs)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["val_size"] = 5000  # the default's held-out split
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    subprocess.run(["dvc", "repro", "prepare"], cwd=repo, env=env, check=True, capture_output=True)
    return repo


def train(repo: Path, cluster: LoopbackCluster, lose_node: bool = False) -> dict:
    """The train stage on `cluster`; with `lose_node`, the worker node dies after the first
    checkpoint and a fresh one joins."""
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    start = time.monotonic()
    driver = Driver(repo, cluster, uri, command=("dvc", "repro", "--single-item", "train"))
    events = {}
    try:
        if lose_node:
            driver.wait_for_checkpoint()
            cluster.kill("worker_node")
            events["killed"] = time.monotonic() - start
            cluster.start_node("worker_node", 1)
            while "resuming after epoch" not in driver.text():
                assert driver.poll() is None, driver.text()[-4000:]
                time.sleep(0.2)
            events["resumed"] = time.monotonic() - start
        output = driver.wait()
    finally:
        driver.stop()
    history = read_json(repo / "outputs/train/history.json")["epochs"]
    return {
        "wall": time.monotonic() - start,
        "training": sum(r["epoch_seconds"] for r in history),
        "rate": sum(r["images_per_second"] for r in history) / len(history),
        "epochs": [(r["epoch"], sorted(n[:8] for n in r["nodes"])) for r in history],
        "top1": history[-1]["val_top1"],
        "events": events,
        "log": [
            re.sub(r"\x1b\[[0-9;]*m", "", line)
            for line in output.splitlines()
            if re.search(EVENTS, line)
        ],
    }


def show(name: str, row: dict) -> None:
    print(
        f"{name}: dvc repro train {row['wall']:.1f} s, epochs {row['training']:.1f} s, "
        f"{row['rate']:.0f} img/s, final val top-1/exit "
        + " ".join(f"{v:.2f}" for v in row["top1"])
    )
    for epoch, nodes in row["epochs"]:
        print(f"  epoch {epoch} on nodes {' '.join(nodes)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-subset", type=int, default=16000)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cluster-bench-") as folder:
        results = {}
        layouts = {
            "one node (2 CPUs)": [("head_node", 2)],
            "two nodes (1 CPU each)": [("head_node", 1), ("worker_node", 1)],
        }
        for index, (name, nodes) in enumerate(layouts.items()):
            repo = copy(Path(folder) / f"repo{index}", args.train_subset, args.epochs)
            with loopback_cluster(*nodes) as cluster:
                results[name] = train(repo, cluster)
            show(name, results[name])
        repo = copy(Path(folder) / "repo-loss", args.train_subset, args.epochs)
        with loopback_cluster(*layouts["two nodes (1 CPU each)"]) as cluster:
            lost = train(repo, cluster, lose_node=True)
        show("two nodes, worker node killed after the first checkpoint", lost)
        events = lost["events"]
        print(
            f"  killed at {events['killed']:.1f} s, resumed at {events['resumed']:.1f} s, "
            f"finished at {lost['wall']:.1f} s "
            f"(+{lost['wall'] - results['two nodes (1 CPU each)']['wall']:.1f} s over no loss)"
        )
        for line in lost["log"]:
            print(f"  | {line[:160]}")


if __name__ == "__main__":
    main()
