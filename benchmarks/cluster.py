"""Two Ray nodes against one, and losing a node mid-training, on this machine.

The train stage (`dvc repro --force --single-item train` in a shrunk copy of the project, MLflow in
the copy's SQLite store) joins a real cluster through RAY_ADDRESS. Both layouts offer 2 CPUs to the
same 2 one-CPU DDP workers:
    one node:  `ray start --head --num-cpus=2`
    two nodes: `ray start --head --num-cpus=1` and `ray start --address=... --num-cpus=1`
The layouts alternate (--repeats each) and every run prints the machine's mean load, since other
jobs may share the 2 cores. Then the two-node run again, with the worker node SIGKILLed (all its
processes) after the first checkpoint and a fresh node started in its place (what an autoscaler
does).

Run from the project root with the venv's bin on PATH:
    python benchmarks/cluster.py                       # 16,000 training images, 2 epochs
    python benchmarks/cluster.py --train-subset 8000 --epochs 2
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
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


class Load:
    """The machine's mean 1-minute load average while a run lasts (other jobs share 2 cores)."""

    def __enter__(self) -> Load:
        self.samples: list[float] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stopped.wait(2):
            self.samples.append(os.getloadavg()[0])

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()

    @property
    def mean(self) -> float:
        return statistics.mean(self.samples) if self.samples else os.getloadavg()[0]


def train(repo: Path, cluster: LoopbackCluster, lose_node: bool = False) -> dict:
    """The train stage (forced) on `cluster`; with `lose_node`, the worker node dies after the
    first checkpoint and a fresh one joins."""
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    start = time.monotonic()
    command = ("dvc", "repro", "--force", "--single-item", "train")
    events = {}
    with Load() as load:
        driver = Driver(repo, cluster, uri, command=command)
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
        "rate": statistics.mean(r["images_per_second"] for r in history),
        "epochs": [(r["epoch"], sorted(n[:8] for n in r["nodes"])) for r in history],
        "top1": history[-1]["val_top1"],
        "load": load.mean,
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
        f"{row['rate']:.0f} img/s, load {row['load']:.1f}, final val top-1/exit "
        + " ".join(f"{v:.2f}" for v in row["top1"])
    )
    for epoch, nodes in row["epochs"]:
        print(f"  epoch {epoch} on nodes {' '.join(nodes)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-subset", type=int, default=16000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs per layout, alternating")
    args = parser.parse_args()
    layouts = {
        "one node (2 CPUs)": [("head_node", 2)],
        "two nodes (1 CPU each)": [("head_node", 1), ("worker_node", 1)],
    }
    with tempfile.TemporaryDirectory(prefix="cluster-bench-") as folder:
        repo = copy(Path(folder) / "repo", args.train_subset, args.epochs)
        results: dict[str, list[dict]] = {name: [] for name in layouts}
        for _ in range(args.repeats):
            for name, nodes in layouts.items():
                with loopback_cluster(*nodes) as cluster:
                    results[name].append(train(repo, cluster))
                show(name, results[name][-1])
        print()
        for name, rows in results.items():
            print(
                f"{name}, median of {len(rows)}: dvc repro train "
                f"{statistics.median(r['wall'] for r in rows):.1f} s, epochs "
                f"{statistics.median(r['training'] for r in rows):.1f} s"
            )
        print()
        with loopback_cluster(*layouts["two nodes (1 CPU each)"]) as cluster:
            lost = train(repo, cluster, lose_node=True)
        show("two nodes, worker node killed after the first checkpoint", lost)
        events = lost["events"]
        print(
            f"  killed at {events['killed']:.1f} s, resumed at {events['resumed']:.1f} s, "
            f"finished at {lost['wall']:.1f} s"
        )
        for line in lost["log"]:
            print(f"  | {line[:160]}")


if __name__ == "__main__":
    main()
