"""The real pipeline end to end: real DVC, real Ray, real Fashion-MNIST, shrunk params.

Runs `dvc repro` in a temporary copy of the repository, checks every output's content, that a
second `dvc repro` re-runs nothing, and that bad params fail on the key without touching results.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT

from pipeline.boosting import BoostNet
from pipeline.config import load_params
from pipeline.data import DEBIAN_FASHION_MNIST, load_split
from pipeline.io import read_json

pytestmark = pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.exists(), reason="needs Debian's dataset-fashion-mnist (make data)"
)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git + DVC copy of this repository with params shrunk to 2,000 training images."""
    repo = tmp_path_factory.mktemp("project")
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
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(train_subset=2000, val_size=200, test_subset=300)
    params["train"]["epochs"] = 1
    params["evaluate"]["timing_repeats"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "t"],
    ):
        subprocess.run(command, cwd=repo, check=True)
    result = _run(["dvc", "repro"], repo)
    assert result.returncode == 0, result.stdout + result.stderr
    return repo


def test_prepare_holds_out_a_seeded_validation_split(project):
    info = read_json(project / "data/dataset.json")
    assert (info["train"], info["val"], info["test"]) == (2000, 200, 300)
    assert info["source"] == str(DEBIAN_FASHION_MNIST) and len(info["fingerprint"]) == 16
    prepared = project / "data/prepared.npz"
    train = load_split(prepared, "train")
    assert train.images.shape == (2000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert set(load_split(prepared, "val").targets.tolist()) <= set(range(10))


def test_train_writes_selected_weights_and_history(project):
    params = load_params(project / "params.yaml")
    net = BoostNet.from_params(params)
    saved = torch.load(project / "outputs/train/model.pt", weights_only=True)
    net.load_state_dict(saved["model"])
    history = read_json(project / "outputs/train/history.json")
    assert history["best_epoch"] == saved["epoch"] == 1 and history["device"] == "cpu"
    (epoch,) = history["epochs"]
    assert len(epoch["val_top1"]) == len(epoch["train_loss"]) == params.model.n_exits
    assert all(0 < f <= 1 for f in epoch["effective_samples"])
    assert epoch["images_per_second"] > 0
    assert not any((project / ".boostpipe/ray").glob("train-*"))  # finished runs are cleaned


def test_calibrate_fits_the_grid_and_the_budgets_on_validation(project):
    calibration = read_json(project / "outputs/calibrate/thresholds.json")
    assert len(calibration["grid"]) == 39
    flops = calibration["exit_flops"]
    assert flops == sorted(flops)
    for row in calibration["grid"]:
        assert len(row["thresholds"]) == len(flops) and row["thresholds"][-1] == -math.inf
    budgets = load_params(project / "params.yaml").calibrate.budgets
    assert [row["budget"] for row in calibration["budgets"]] == budgets
    for row in calibration["budgets"]:
        assert row["expected_flops"] <= row["budget"]


def test_evaluate_reports_anytime_budgets_and_real_early_exit(project):
    metrics = read_json(project / "outputs/evaluate/metrics.json")
    top1 = list(metrics["anytime"]["top1"].values())
    assert len(top1) == 4 and all(15 < v <= 100 for v in top1)  # chance is 10%
    assert all(a <= b for a, b in zip(top1, metrics["anytime"]["top5"].values(), strict=True))
    assert metrics["final_top1"] == top1[-1]
    for row in metrics["budgets"].values():
        assert row["expected_mflops"] <= row["target_mflops"] * 1.2
        assert row["speedup_predicted"] >= 1 and row["speedup_measured"] > 0
        assert abs(row["early_exit_top1"] - row["top1"]) < 2
    anytime = read_json(project / "outputs/evaluate/anytime.json")
    assert [row["exit"] for row in anytime] == [1, 2, 3, 4]
    curve = read_json(project / "outputs/evaluate/budget_curve.json")
    assert len(curve) == 39
    for name in ("accuracy_vs_flops.png", "effective_samples.png"):
        assert (project / "outputs/evaluate" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mlflow_run_holds_params_tags_metrics_and_artifacts(project):
    from mlflow import MlflowClient

    from pipeline.tracking import flatten

    record = read_json(project / "outputs/train/mlflow_run.json")
    assert record["tracking_uri"] == f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(record["tracking_uri"])
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((project / "mlruns").as_uri())

    params = load_params(project / "params.yaml")
    assert run.data.params == flatten(params.model_dump(mode="json"))
    assert run.data.params["data.train_subset"] == "2000"

    dataset = read_json(project / "data/dataset.json")
    tags = run.data.tags
    assert len(tags["git.commit"]) == 40 and tags["git.dirty"] in ("true", "false")
    assert tags["data.fingerprint"] == dataset["fingerprint"]
    assert tags["device"] == "cpu" and tags["host"]
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == dataset["fingerprint"]

    history = read_json(project / "outputs/train/history.json")["epochs"]
    for key in ("val_top1_exit_1", "train_loss_exit_4", "effective_samples_exit_2"):
        logged = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in logged] == [1]
    logged = client.get_metric_history(run.info.run_id, "val_top1_exit_4")
    assert logged[0].value == pytest.approx(history[0]["val_top1"][3])

    metrics = read_json(project / "outputs/evaluate/metrics.json")
    by_exit = client.get_metric_history(run.info.run_id, "test_top1_by_exit")
    assert sorted((m.step, round(m.value, 4)) for m in by_exit) == [
        (k + 1, round(v, 4)) for k, v in enumerate(metrics["anytime"]["top1"].values())
    ]
    curve = client.get_metric_history(run.info.run_id, "budget_top1_by_kflops")
    points = read_json(project / "outputs/evaluate/budget_curve.json")
    assert {m.step for m in curve} == {round(p["mflops"] * 1000) for p in points}

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "model.pt",
        "params.yaml",
        "thresholds.json",
        "metrics.json",
        "anytime.json",
        "budget_curve.json",
        "accuracy_vs_flops.png",
        "effective_samples.png",
        "dvc.lock",
    } <= artifacts
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert any(m.source_run_id == run.info.run_id for m in models)
    budget_metrics = [
        k for k in run.data.metrics if k.startswith("budget_") and k.endswith("_top1")
    ]
    assert len(budget_metrics) == len(params.calibrate.budgets)


def test_a_second_repro_runs_nothing(project):
    before = _sha(project / "outputs/train/model.pt")
    result = _run(["dvc", "repro"], project)
    assert result.returncode == 0
    assert "Running stage" not in result.stdout, result.stdout
    assert _sha(project / "outputs/train/model.pt") == before


def test_bad_params_fail_on_the_key_and_keep_every_result(project):
    outputs = sorted(p for p in (project / "outputs").rglob("*") if p.is_file())
    before = {p: _sha(p) for p in outputs}
    params_path = project / "params.yaml"
    good = params_path.read_text()
    params = yaml.safe_load(good)
    params["boost"]["temperature"] = -0.5
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        result = _run(["dvc", "repro"], project)
    finally:
        params_path.write_text(good)
    assert result.returncode != 0
    assert "boost.temperature[0]" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    assert {p: _sha(p) for p in outputs} == before


def test_rerunning_prepare_on_the_same_data_keeps_later_stages_valid(project):
    result = _run(["dvc", "repro", "--force", "--single-item", "prepare"], project)
    assert result.returncode == 0, result.stderr
    status = _run(["dvc", "status"], project)
    assert "up to date" in status.stdout, status.stdout


# Last: it trains again with other params, so the outputs above no longer match params.yaml.
def test_training_killed_mid_epoch_resumes_from_its_last_checkpoint(project):
    params_path = project / "params.yaml"
    good = params_path.read_text()
    params = yaml.safe_load(good)
    params["data"]["train_subset"] = 4000
    params["train"]["epochs"] = 3
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    try:
        first = subprocess.Popen(
            ["dvc", "repro"],
            cwd=project,
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 600
        while not list((project / ".boostpipe/ray").glob("train-*/checkpoint_*")):
            assert first.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)  # kill -9 the whole run, Ray included
        first.wait()
        time.sleep(2)
        for _ in range(3):  # Ray processes the run started and that outlived the kill
            with contextlib.suppress(ProcessLookupError):
                os.killpg(first.pid, signal.SIGKILL)
        assert not (project / "outputs/train/history.json").read_text().count('"epoch": 3')

        second = _run(["dvc", "repro"], project)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "resuming after epoch" in second.stdout + second.stderr
        history = read_json(project / "outputs/train/history.json")
        assert [record["epoch"] for record in history["epochs"]] == [1, 2, 3]
    finally:
        params_path.write_text(good)
