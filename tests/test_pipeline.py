"""The real pipeline end to end: real DVC, real Ray, real Fashion-MNIST, shrunk params.

Runs `dvc repro` in a temporary copy of the repository, checks every output's content, that a
second `dvc repro` re-runs nothing, that params changed and changed back (or bad params fixed)
restore every stage from DVC's run-cache, and what `dvc metrics show` and `dvc plots` read.
"""

from __future__ import annotations

import json
import math
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    mlflow_server,
    needs_data,
    run,
    serving,
    set_params,
    sha,
    shrunk_copy,
    trained_run,
)
from helpers.shared import SharedRun, copy_project

from pipeline.boosting import BoostNet
from pipeline.cluster import free_port
from pipeline.config import load_params
from pipeline.data import DEBIAN_FASHION_MNIST, load_split
from pipeline.io import read_json
from pipeline.paths import UI_LOG
from pipeline.reports import budget_key
from pipeline.tracking import names

pytestmark = needs_data  # every test trains on Fashion-MNIST


@pytest.fixture(scope="module")
def baseline_run(project) -> str:
    """A second run, the joint-training baseline, made by `dvc exp run --temp` in DVC's
    temporary copy under .dvc/tmp/exps; returns its MLflow run id."""
    from mlflow import MlflowClient

    result = run(
        ["dvc", "exp", "run", "--temp", "-n", "baseline", "-S", "boost.enabled=false"], project
    )
    assert result.returncode == 0, result.stdout + result.stderr
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (baseline,) = client.search_runs(
        [client.get_experiment_by_name("boostpipe").experiment_id],
        filter_string="tags.`dvc.experiment` = 'baseline'",
    )
    return baseline.info.run_id


CHROMIUM_FLAGS = [  # as root, offline: no sandbox, no background traffic to Google
    *("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync"),
    *("--disable-background-networking", "--disable-component-update"),
]


@pytest.fixture(scope="module")
def project(shared_run: SharedRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's finished local run for this module's tests, which change it."""
    return copy_project(shared_run.local, tmp_path_factory.mktemp("project") / "repo")


@pytest.fixture
def trained(shared_run: SharedRun) -> Path:
    """The session's finished local run itself, for the tests that only read its outputs."""
    return shared_run.local


@pytest.mark.slow
def test_two_pipelines_at_once_keep_to_their_own_ray_clusters(shared_run):
    """Each run's Ray Train asks the state API of its own cluster, never "the" cluster on the
    machine (which fails with a traceback while another local cluster runs)."""
    for name, console in shared_run.consoles.items():
        assert "multiple active Ray instances" not in console, (name, console)
        assert "Traceback" not in console, (name, console)
        assert "core_worker.cc" not in console, (name, console)  # Ray's C++ log lines


@pytest.mark.slow
def test_prepare_holds_out_a_seeded_validation_split(trained):
    info = read_json(trained / "data/dataset.json")
    assert (info["train"], info["val"], info["test"]) == (2000, 200, 300)
    assert info["source"] == str(DEBIAN_FASHION_MNIST) and len(info["fingerprint"]) == 16
    prepared = trained / "data/prepared.npz"
    train = load_split(prepared, "train")
    assert train.images.shape == (2000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert set(load_split(prepared, "val").targets.tolist()) <= set(range(10))


@pytest.mark.slow
def test_the_same_seed_on_the_same_machine_gives_identical_results(shared_run: SharedRun):
    """The session's two pipelines ran the same params at once on this machine (one logging to
    SQLite, one to a server): weights, held-out and test accuracies and thresholds are equal
    to the last bit. Only the timings differ."""
    local, served = shared_run.local, shared_run.served

    def weights(repo: Path) -> dict[str, torch.Tensor]:
        return torch.load(repo / "outputs/train/model.pt", weights_only=True)["model"]

    assert weights(local).keys() == weights(served).keys()
    assert all(torch.equal(w, weights(served)[k]) for k, w in weights(local).items())
    curves = "outputs/train/curves.json"  # per epoch and exit: held-out top-1, training loss
    assert (local / curves).read_bytes() == (served / curves).read_bytes()
    grids = [
        read_json(repo / "outputs/calibrate/thresholds.json")["grid"] for repo in (local, served)
    ]
    for ours, theirs in zip(*grids, strict=True):  # expected_ms: from each run's own profile
        assert [ours[k] for k in ("thresholds", "top1", "exit_fractions", "expected_flops")] == [
            theirs[k] for k in ("thresholds", "top1", "exit_fractions", "expected_flops")
        ]
    for repo in (local, served):
        assert read_json(repo / "outputs/train/history.json")["platform"]
    metrics = [read_json(repo / "outputs/evaluate/metrics.json") for repo in (local, served)]
    assert metrics[0]["anytime"] == metrics[1]["anytime"]
    for budget, row in metrics[0]["budgets"].items():
        assert row["top1"] == metrics[1]["budgets"][budget]["top1"]


@pytest.mark.slow
def test_train_writes_selected_weights_and_history(trained):
    params = load_params(trained / "params.yaml")
    net = BoostNet.from_params(params)
    saved = torch.load(trained / "outputs/train/model.pt", weights_only=True)
    net.load_state_dict(saved["model"])
    history = read_json(trained / "outputs/train/history.json")
    assert history["best_epoch"] == saved["epoch"] == 1 and history["device"] == "cpu"
    platform = history["platform"]  # what the numbers repeat on exactly
    assert platform["device"] == "cpu" and platform["torch"] == torch.__version__
    assert platform["cpu_isa"] == torch.backends.cpu.get_cpu_capability()
    (epoch,) = history["epochs"]
    assert len(epoch["val_top1"]) == len(epoch["train_loss"]) == params.model.n_exits
    assert all(0 < f <= 1 for f in epoch["effective_samples"])
    assert epoch["images_per_second"] > 0
    assert not any((trained / ".boostpipe/ray").glob("train-*"))  # finished runs are cleaned


@pytest.mark.slow
def test_calibrate_fits_the_grid_and_the_budgets_on_validation(trained):
    calibration = read_json(trained / "outputs/calibrate/thresholds.json")
    assert len(calibration["grid"]) == 39
    flops = calibration["exit_flops"]
    assert flops == sorted(flops)
    for row in calibration["grid"]:
        assert len(row["thresholds"]) == len(flops) and row["thresholds"][-1] == -math.inf
    budgets = load_params(trained / "params.yaml").calibrate.budgets
    assert [row["budget"] for row in calibration["budgets"]] == budgets
    for row in calibration["budgets"]:
        assert row["expected_flops"] <= row["budget"]


@pytest.mark.slow
def test_evaluate_reports_anytime_budgets_and_real_early_exit(trained):
    metrics = read_json(trained / "outputs/evaluate/metrics.json")
    top1 = list(metrics["anytime"]["top1"].values())
    n_exits = load_params(trained / "params.yaml").model.n_exits
    assert len(top1) == n_exits and all(15 < v <= 100 for v in top1)  # chance is 10%
    assert all(a <= b for a, b in zip(top1, metrics["anytime"]["top5"].values(), strict=True))
    assert metrics["final_top1"] == top1[-1]
    budgets = load_params(trained / "params.yaml").calibrate.budgets
    assert list(metrics["budgets"]) == [budget_key(b) for b in budgets]
    for row in metrics["budgets"].values():
        assert row["expected_mflops"] <= row["target_mflops"] * 1.2
        assert row["speedup_predicted"] >= 1 and row["speedup_measured"] > 0
        # warmed-up medians: a cold first pass once made this 4.8 (7.53x measured, 1.56x)
        assert 0.25 <= row["speedup_measured"] / row["speedup_predicted"] <= 2.0, row
        assert abs(row["early_exit_top1"] - row["top1"]) < 2
    anytime = read_json(trained / "outputs/evaluate/anytime.json")
    assert [row["exit"] for row in anytime] == list(range(1, n_exits + 1))
    curve = read_json(trained / "outputs/evaluate/budget_curve.json")
    assert len(curve) == 39
    for name in ("accuracy_vs_flops.png", "effective_samples.png"):
        assert (trained / "outputs/evaluate" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _check_logged_run(project: Path, uri: str):
    """Everything the pipeline promises to log, compared with the stage outputs; returns the run."""
    from mlflow import MlflowClient

    from pipeline.tracking import RUN_TAG, flatten

    client = MlflowClient(uri)
    run = trained_run(uri, project)
    assert run.info.status == "FINISHED"
    assert run.data.tags[RUN_TAG] == read_json(project / "outputs/train/history.json")["run"]
    assert run.info.run_name == "boostnet-fashion-mnist-seed0"

    params = load_params(project / "params.yaml")
    assert run.data.params == flatten(params.model_dump(mode="json"))
    assert run.data.params["data.train_subset"] == "2000"

    dataset = read_json(project / "data/dataset.json")
    tags = run.data.tags
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["git.dirty"] in ("true", "false")
    assert tags["mlflow.source.git.branch"] and tags["mlflow.source.type"] == "LOCAL"
    assert tags["data.fingerprint"] == dataset["fingerprint"]
    assert tags["device"] == "cpu" and tags["host"]
    assert tags["platform.cpu_isa"] == torch.backends.cpu.get_cpu_capability()
    assert tags["platform.torch"] == torch.__version__
    contexts = {
        tag.value: item.dataset
        for item in run.inputs.dataset_inputs
        for tag in item.tags
        if tag.key == "mlflow.data.context"
    }
    assert set(contexts) == {"training", "validation", "testing"}
    assert contexts["validation"].name == "fashion-mnist/val"
    assert all(d.digest == dataset["fingerprint"] for d in contexts.values())

    history = read_json(project / "outputs/train/history.json")["epochs"]
    for key in ("val/top1_exit_1", "train/loss_exit_4", "train/effective_samples_exit_2"):
        logged = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in logged] == [1]
    logged = client.get_metric_history(run.info.run_id, "val/top1_exit_4")
    assert logged[0].value == pytest.approx(history[0]["val_top1"][3])

    metrics = read_json(project / "outputs/evaluate/metrics.json")
    by_exit = client.get_metric_history(run.info.run_id, "exits/test_top1")
    assert sorted((m.step, round(m.value, 4)) for m in by_exit) == [
        (k + 1, round(v, 4)) for k, v in enumerate(metrics["anytime"]["top1"].values())
    ]
    curve = client.get_metric_history(run.info.run_id, "budgets/top1_by_kflops")
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
        k for k in run.data.metrics if k.startswith("test/budget_") and k.endswith("_top1")
    ]
    assert len(budget_metrics) == len(params.calibrate.budgets)
    flops = client.get_metric_history(run.info.run_id, "exits_cost/mflops")
    exits = list(range(1, params.model.n_exits + 1))
    assert [m.step for m in sorted(flops, key=lambda m: m.step)] == exits
    fractions = client.get_metric_history(run.info.run_id, "train/effective_samples_exit_4")
    assert 0 < fractions[0].value <= 1
    return run


@pytest.mark.slow
def test_mlflow_run_holds_params_tags_metrics_and_artifacts(trained):
    run = _check_logged_run(trained, f"sqlite:///{trained / 'mlflow.db'}")
    assert run.info.artifact_uri.startswith((trained / "mlruns").as_uri())


@pytest.mark.slow
def test_a_real_mlflow_server_receives_the_same_run(shared_run):
    repo = shared_run.served
    with mlflow_server(shared_run.store) as (uri, _):  # a server again on the run's store
        run = _check_logged_run(repo, uri)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert not (repo / "mlflow.db").exists() and not (repo / "mlruns").exists()


@pytest.mark.slow
def test_dvc_temp_experiments_log_to_the_project_store(project, baseline_run):
    from mlflow import MlflowClient

    run = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(baseline_run)
    assert run.info.status == "FINISHED" and run.info.run_name == "baseline"
    assert run.data.params["boost.enabled"] == "False"
    assert run.info.artifact_uri.startswith((project / "mlruns").as_uri())
    assert not list((project / ".dvc/tmp/exps").glob("*/mlflow.db"))


@pytest.mark.slow
def test_compare_draws_the_runs_in_one_png(project, baseline_run):
    result = run(
        ["boostpipe", "compare", "workspace", baseline_run[:8], "--output", "cmp.png"], project
    )
    assert result.returncode == 0, result.stderr
    assert "boostnet-fashion-mnist-seed0" in result.stdout and "baseline" in result.stdout
    params = yaml.safe_load((project / "params.yaml").read_text())
    last_exit = f"exit {params['model']['n_blocks']}"
    first_budget = f"budget {params['calibrate']['budgets'][0] / 1e6:g} MFLOPs"
    assert last_exit in result.stdout and first_budget in result.stdout
    for name in ("cmp.png", "cmp-effective-samples.png"):
        assert (project / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = run(["boostpipe", "compare", "no-such-run"], project)
    assert missing.returncode != 0 and "no-such-run" in missing.stderr


@pytest.mark.slow
def test_a_second_repro_runs_nothing(project):
    before = sha(project / "outputs/train/model.pt")
    result = run(["dvc", "repro"], project)
    assert result.returncode == 0
    assert "Running stage" not in result.stdout, result.stdout
    assert sha(project / "outputs/train/model.pt") == before


@pytest.mark.slow
def test_the_tune_stage_runs_only_when_asked_and_writes_the_best_values(project):
    assert "tune" not in run(["dvc", "repro", "--dry"], project).stdout
    result = run(["dvc", "repro", "tune/dvc.yaml"], project)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = read_json(project / "outputs/tune/summary.json")
    assert summary["trials_finished"] == 2 and summary["trials_failed"] == 0
    assert summary["best_val_budget_auc"] >= summary["default_val_budget_auc"]
    assert summary["confirm_seeds"] == 2 and "gain_ci_low" in summary
    # The confirmed best's values, or nothing to adopt when the params file's own stay best.
    adopted = summary["confirmed_best"] != "params-file"
    best = read_json(project / "outputs/tune/best_params.json")
    assert set(best) == ({"boost.temperature", "boost.loss_weights"} if adopted else set())


def _outputs(project: Path) -> dict[Path, str]:
    return {p: sha(p) for p in sorted((project / "outputs").rglob("*")) if p.is_file()}


def _cached(result: subprocess.CompletedProcess, *stages: str) -> bool:
    """DVC restored these stages from its run-cache and ran no stage."""
    output = result.stdout + result.stderr
    restored = all(
        f"Stage '{s}' is cached - skipping run, checking out outputs" in output for s in stages
    )
    return restored and "Running stage" not in output


@pytest.mark.slow
def test_bad_params_fail_on_the_key_and_dvc_repro_restores_the_last_results(project):
    before = _outputs(project)
    params_path = project / "params.yaml"
    good = params_path.read_text()
    set_params(project, **{"boost.temperature": -0.5})
    try:
        result = run(["dvc", "repro"], project)
    finally:
        params_path.write_text(good)
    assert result.returncode != 0
    assert "boost.temperature[0]" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    # DVC removed the failed stage's outputs before running it; the later stages never ran.
    assert not (project / "outputs/train/model.pt").exists()
    train = project / "outputs/train"
    later = {p: h for p, h in _outputs(project).items() if p.parent != train}
    assert later == {p: h for p, h in before.items() if p.parent != train}
    restored = run(["dvc", "repro"], project)
    assert restored.returncode == 0 and _cached(restored, "train"), restored.stdout
    assert _outputs(project) == before


@pytest.mark.slow
def test_params_changed_and_back_restore_every_stage_from_the_run_cache(project):
    """Going back to params that ran before trains nothing: DVC's run-cache restores train,
    calibrate and evaluate, and no MLflow run or Ray checkpoint folder is made."""
    from mlflow import MlflowClient

    before = _outputs(project)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("boostpipe").experiment_id
    params_path = project / "params.yaml"
    good = params_path.read_text()
    set_params(project, **{"train.lr": 0.05})
    try:
        changed = run(["dvc", "repro"], project)
        assert changed.returncode == 0, changed.stdout + changed.stderr
        assert "Running stage 'train'" in changed.stdout
    finally:
        params_path.write_text(good)
    runs = len(client.search_runs([experiment], max_results=1000))
    began = time.monotonic()
    back = run(["dvc", "repro"], project)
    seconds = time.monotonic() - began
    assert back.returncode == 0, back.stdout + back.stderr
    assert _cached(back, "train", "calibrate", "evaluate"), back.stdout
    assert "epoch" not in back.stdout.lower()
    assert _outputs(project) == before  # metrics, plots and weights of the first run
    assert len(client.search_runs([experiment], max_results=1000)) == runs
    assert not any((project / ".boostpipe/ray").glob("train-*"))
    print(f"restored from the run-cache in {seconds:.1f} s")


@pytest.mark.slow
def test_dvc_shows_clean_metric_names_and_the_curves_as_plots(project):
    from pipeline.tracking import flatten

    params = load_params(project / "params.yaml")
    shown = run(["dvc", "metrics", "show", "--json"], project)
    assert shown.returncode == 0, shown.stderr
    (workspace,) = json.loads(shown.stdout).values()  # DVC 3.67 keys the workspace ""
    files = workspace["data"]
    evaluate = flatten(files["outputs/evaluate/metrics.json"]["data"])
    train = files["outputs/train/history.json"]["data"]
    exits = range(1, params.model.n_exits + 1)
    expected = [f"anytime.{kind}.exit_{k}" for kind in ("top1", "top5") for k in exits]
    expected += [f"budgets.{budget_key(b)}.top1" for b in params.calibrate.budgets]
    assert set(expected) <= set(evaluate), sorted(evaluate)
    assert all(len(name.split(".")) <= 3 for name in evaluate)  # no dots inside a key
    assert evaluate["device"] == "cpu"
    assert train["best_epoch"] == 1 and train["train_seconds"] > 0

    plotted = run(["dvc", "plots", "show", "--json"], project)
    assert plotted.returncode == 0, plotted.stderr
    plots = json.loads(plotted.stdout)
    assert not plots.get("errors"), plots["errors"]
    curves = "outputs/train/curves.json"  # its stage plot: held-out top-1 per exit
    values = {
        name: plots["data"][name][0]["content"]["data"]["values"]
        for name in ("accuracy_vs_flops", curves, "train_loss_per_exit")
    }
    series = {row["filename::field"] for row in values["accuracy_vs_flops"]}  # one dash each
    assert series == {
        "anytime.json::top1",
        "budget_curve.json::top1",
        "budget_curve.json::top1_flat",
    }
    for name in (curves, "train_loss_per_exit"):
        assert {(row["epoch"], row["exit"]) for row in values[name]} == {(1, k) for k in exits}


@pytest.mark.slow
def test_dvc_plots_diff_draws_boostnet_and_the_baseline_on_one_chart(project, baseline_run):
    result = run(["dvc", "plots", "diff", "baseline", "--json"], project)
    assert result.returncode == 0, result.stderr
    plots = json.loads(result.stdout)["data"]
    for name in ("accuracy_vs_flops", "outputs/train/curves.json"):
        (chart,) = plots[name]
        assert set(chart["revisions"]) == {"baseline", "workspace"}
        assert {row["rev"] for row in chart["content"]["data"]["values"]} == {
            "baseline",
            "workspace",
        }


@pytest.mark.slow
def test_a_store_without_the_run_is_one_warning_and_the_outputs_stay(project, tmp_path):
    """Outputs restored on another machine (or against another store) find no MLflow run: the
    stage says so in one line and still writes its outputs; compare names the problem."""
    before = _outputs(project)
    other = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'other.db'}"}
    result = run([sys.executable, "-m", "stages.calibrate"], project, **other)
    assert result.returncode == 0, result.stdout + result.stderr
    (warning,) = [line for line in result.stderr.splitlines() if line.startswith("warning")]
    history = read_json(project / "outputs/train/history.json")
    assert f"has no run that trained {history['run']}" in warning
    assert "Traceback" not in result.stdout + result.stderr
    assert _outputs(project) == before
    compare = run(["boostpipe", "compare", "workspace"], project, **other)
    assert compare.returncode != 0 and "Traceback" not in compare.stderr
    assert "this MLflow store has no run" in compare.stderr


@pytest.mark.slow
def test_rerunning_prepare_on_the_same_data_keeps_later_stages_valid(project):
    result = run(["dvc", "repro", "--force", "--single-item", "prepare"], project)
    assert result.returncode == 0, result.stderr
    status = run(["dvc", "status"], project)
    assert "up to date" in status.stdout, status.stdout


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make data)")
def test_mlflow_ui_opens_on_the_training_charts_with_a_section_per_prefix(
    project, baseline_run, tmp_path
):
    """`boostpipe ui`, then headless Chromium on the address it prints, as a newcomer follows
    it: MLflow's model-training view (not GenAI) with the runs' charts in sections in the order
    of names.py, and in `exits` the per-exit accuracy chart, reached by scrolling, not searching,
    with a line per run. Ctrl-C (SIGINT) then stops the UI and its server cleanly."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    command = [sys.executable, "-m", "pipeline", "ui", "--port", str(port)]
    console = tmp_path / "ui.log"
    n_exits = load_params(project / "params.yaml").model.n_exits
    with (
        serving(command, f"http://127.0.0.1:{port}/health", project, signal.SIGINT, console) as ui,
        sync_playwright() as playwright,
    ):
        address = re.search(r"http://127\.0\.0\.1:\d+/\S+", console.read_text()).group()
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})  # a fresh profile
        page.goto(address)
        headers = page.get_by_test_id("experiment-view-compare-runs-section-header")
        page.get_by_text("budgets/top1_flat_by_kflops", exact=True).wait_for(timeout=60_000)
        sections = [text.split("\n")[0] for text in headers.all_inner_texts()]
        assert sections[:6] == ["budgets", "exits", "exits_cost", "test", "train", "val"]
        assert page.get_by_text("Model registry").is_visible()  # the model-training sidebar
        assert page.get_by_text("Judges").count() == 0  # GenAI's is not shown
        page.screenshot(path=tmp_path / "mlflow-ui-charts.png")

        headers.nth(sections.index("exits")).scroll_into_view_if_needed()
        title = page.get_by_text(names.EXIT_TOP1, exact=True)
        title.wait_for(timeout=60_000)  # charts render as they scroll into view
        card = title.locator("xpath=ancestor::div[.//div[contains(@class,'js-plotly-plot')]][1]")
        for name in ("boostnet-fashion-mnist-seed0", "baseline"):
            legend = card.get_by_text(f"{name} ({names.EXIT_TOP1})")
            legend.filter(visible=True).first.wait_for(timeout=60_000)  # may be drawn twice
        points = card.locator(".js-plotly-plot .scatterlayer .point")
        points.nth(2 * n_exits - 1).wait_for(timeout=60_000)  # drawn after the legend
        assert points.count() % n_exits == 0 and points.count() >= 2 * n_exits  # every exit
        page.screenshot(path=tmp_path / "mlflow-ui-exits.png")
        browser.close()
        print(f"screenshots: {tmp_path}")
    assert ui.returncode == 0
    for log in (console, project / UI_LOG):  # ours, and the server's
        assert "Traceback" not in log.read_text(), log.read_text()
    with socket.socket() as probe:  # nothing listens there any more: mlflow's workers are gone
        # SO_REUSEADDR: the browser's closed connections may leave TIME_WAIT entries on the port.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


@pytest.mark.slow
def test_ranet_runs_through_the_pipeline_and_the_search(tmp_path):
    """The second backbone end to end: `dvc repro` with a RANet params file, then the tune stage
    (2 trials), both on shrunk Fashion-MNIST."""
    repo = shrunk_copy(tmp_path, source="configs/fashion-mnist-ranet.yaml")
    result = run(["dvc", "repro"], repo)
    assert result.returncode == 0, result.stdout + result.stderr
    params = load_params(repo / "params.yaml")
    assert params.model.arch == "ranet" and params.model.n_exits == 6
    saved = torch.load(repo / "outputs/train/model.pt", weights_only=True)
    BoostNet.from_params(params).load_state_dict(saved["model"])
    metrics = read_json(repo / "outputs/evaluate/metrics.json")
    top1 = list(metrics["anytime"]["top1"].values())
    assert len(top1) == 6 and all(15 < v <= 100 for v in top1)  # chance is 10%
    for row in metrics["budgets"].values():
        assert row["speedup_predicted"] >= 1 and row["speedup_measured"] > 0
        assert abs(row["early_exit_top1"] - row["top1"]) < 2  # early exit really ran on RANet

    set_params(repo, **{"tune.confirm.top_k": 0})  # the search on RANet; confirming is blind to it
    result = run(["dvc", "repro", "tune/dvc.yaml"], repo)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = read_json(repo / "outputs/tune/summary.json")
    assert summary["trials_finished"] == 2 and summary["trials_failed"] == 0
