"""The repository under test: its params files, edits to them, shrunk copies of the project and
the commands run in them, each as a user would run it (this venv's commands, a clean env)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import Params, parse_with_overrides
from pipeline.data import DEBIAN_FASHION_MNIST

ROOT = Path(__file__).resolve().parents[2]
PARAMS_FILES = [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]

# The real pipeline trains on Debian's Fashion-MNIST; without it those tests cannot run.
needs_data = pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.exists(), reason="needs Debian's dataset-fashion-mnist (make data)"
)

# What every shrunk copy trains on: seconds per stage, yet a model that learns (15 % > chance).
SHRUNK = {
    "data.train_subset": 2000,
    "data.val_size": 200,
    "data.test_subset": 300,
    "train.epochs": 1,
    # One Ray Train worker: each worker process costs ~8 CPU-s to start on 2 cores. DDP across
    # workers is tested where it is the point (test_cluster, test_compile, test_object_storage).
    "train.scaling.workers": 1,
    "evaluate.batch_size": 100,  # 3 batches of the 300 test images: timings worth reading
    "evaluate.timing_repeats": 3,
    "evaluate.threads": 1,  # as tests/conftest.py sets every process under `make test`
    "evaluate.batch1_images": 50,
    "profile.repeats": 1,
    "profile.warmup": 0,
    "profile.images": 200,
    "profile.batch1_images": 20,
    # Time budgets must lie between the exits' measured costs, which move with the machine's
    # load (two workers' pipelines at once): the pipeline tests keep to FLOPs budgets, and
    # test_calibration, test_profile and test_predict test time budgets.
    "calibrate.budgets_ms": {"batch_1": [], "batch_n": []},
    "tune.trials": 2,
    "tune.epochs": 1,
    "tune.train_subset": 300,
    "tune.val_subset": 200,
    "tune.confirm": {"top_k": 1, "seeds": 2},  # 4 confirmation runs
}


def raw_params(path: Path = ROOT / "params.yaml") -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def compose(path: Path = ROOT / "params.yaml", **overrides: Any) -> Params:
    """The real params file with dotted-key overrides, e.g. compose(**{"model.n_blocks": 3})."""
    return parse_with_overrides(raw_params(path), overrides, str(path))


def set_params(target: Path, **dotted: Any) -> dict[str, Any]:
    """Set dotted keys (`set_params(repo, **{"train.epochs": 1})`) in a params file, or in the
    params.yaml of a project folder, keeping the key order; returns the params written. A test
    edits params only through this, so every edit is the same load-set-dump."""
    path = target / "params.yaml" if target.is_dir() else target
    params = yaml.safe_load(path.read_text())
    for key, value in dotted.items():
        *parents, last = key.split(".")
        section = params
        for name in parents:
            section = section.setdefault(name, {})
        section[last] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def command_env(**env_vars: str) -> dict[str, str]:
    """This venv's commands first, and no cluster or MLflow store from the caller's environment:
    what a user's shell in the project gives a command, plus `env_vars`."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    return {**env, **env_vars}


def run(args: list[str], cwd: Path, **env_vars: str) -> subprocess.CompletedProcess:
    """A command in `cwd` as a user would type it (command_env), its output captured."""
    return subprocess.run(
        args, cwd=cwd, env=command_env(**env_vars), capture_output=True, text=True, timeout=900
    )


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shrunk_copy(repo: Path, source: str = "params.yaml") -> Path:
    """A git + DVC copy of this repository (what git would check out, uncommitted edits
    included) with params shrunk to SHRUNK; they come from `source` (a file of the repository),
    written as the copy's params.yaml."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    if source != "params.yaml":
        shutil.copy2(repo / source, repo / "params.yaml")
    set_params(repo, **SHRUNK)
    for command in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "t"],
    ):
        subprocess.run(command, cwd=repo, check=True)
    return repo


def trained_run(uri: str, repo: Path) -> Any:
    """The MLflow run (in the store at `uri`) that trained the outputs in `repo`: the stages
    link them by history.json's `run`, never by a run id in the outputs."""
    from mlflow import MlflowClient

    from pipeline.tracking import find_training_run

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("boostpipe")
    key = json.loads((repo / "outputs/train/history.json").read_text())["run"]
    run = find_training_run(client, [experiment.experiment_id], key)
    assert run is not None, f"{uri} has no run of {key}"
    return run


def queue_statuses(repo: Path) -> dict[str, str]:
    """`dvc queue status` as {experiment name: status} (rows: task, name, created, status)."""
    shown = run(["dvc", "queue", "status"], repo)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    rows = (line.split() for line in shown.stdout.splitlines()[1:])
    return {row[1]: row[-1] for row in rows if len(row) >= 4 and row[0] != "Worker"}


def processes_in(repo: Path) -> list[str]:
    """Processes (by PID and command) whose working directory is inside `repo`."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if Path(process.cwd()).is_relative_to(repo):
                found.append(f"{process.pid} {' '.join(process.info['cmdline'] or [])[:100]}")
    return found
