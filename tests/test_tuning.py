"""`boostpipe tune`: the search space and its validation, the objective, and real small searches
(real Ray Tune, real MLflow store, real Fashion-MNIST) including a failing trial, Ctrl-C and
kill -9 followed by `--resume`."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import ROOT, command_env, compose, needs_data, run, set_params
from helpers.shared import once_per_session

from pipeline.calibration import ExitScores, budget_auc
from pipeline.config import ConfigError, load_params, write_overrides
from pipeline.confirmation import apply_confirmed
from pipeline.io import read_json
from pipeline.outcome import PARAMS_FILE, Candidate, Confirmation, SearchOutcome
from pipeline.search import run_search
from pipeline.stats import paired_interval, t_quantile
from pipeline.tuning import (
    apply_overrides,
    default_point,
    overrides,
    run_trial,
    search_space,
)


@pytest.mark.parametrize(
    ("per", "keys"),
    [("shared", ["t"]), ("pair", ["t_first", "t_last"]), ("exit", ["t_1", "t_2", "t_3", "t_4"])],
)
def test_the_space_samples_temperatures_as_asked_and_becomes_valid_params(per, keys):
    params = compose(
        **{
            "model.n_blocks": 4,
            "tune.space.temperature.per": per,
            "tune.space.lr": {"low": 0.01, "high": 0.3, "log": True},
        }
    )
    space = search_space(params.tune, params.model.n_exits)
    assert [k for k in space if k.startswith("t")] == keys
    sampled = {key: domain.sample() for key, domain in space.items()}
    dotted = overrides(sampled, params.model.n_exits)
    assert len(dotted["boost.temperature"]) == len(keys)
    assert len(dotted["boost.loss_weights"]) == 4
    trial = apply_overrides(params, dotted)
    assert 0.01 <= trial.train.lr <= 0.3
    assert all(0.5 <= w <= 2.0 for w in trial.boost.loss_weights)


def test_the_first_trial_is_the_params_file(tmp_path):
    params = compose(**{"boost.temperature": [0.2, 0.8], "tune.space.temperature.per": "pair"})
    n = params.model.n_exits
    point = default_point(params, search_space(params.tune, n))
    assert point == {"t_first": 0.2, "t_last": 0.8, **{f"w_{k}": 1.0 for k in range(1, n + 1)}}


def test_budget_auc_is_the_mean_accuracy_over_the_cost_range():
    targets = torch.arange(200) % 10
    # A distinct confidence per sample: with exact ties, which samples a threshold sends on
    # would turn on the last bit of softmax, which differs between CPUs' vector code paths.
    margin = torch.linspace(3, 9, 200)[None, :, None]
    perfect = torch.nn.functional.one_hot(targets, 10).float()[None].repeat(3, 1, 1) * margin
    assert budget_auc(ExitScores.from_logits(perfect, targets), [1, 2, 3]) == pytest.approx(100.0)
    # Exit 1 always wrong, exits 2-3 always right and the last exit costs 3. Over [2, 3] the
    # best top-1 is 100; below exit 2's cost it is at most the share sent past exit 1, B - 1,
    # whose mean over [1, 2] is 50 on a continuous grid: the mean lies in (50, 62.5].
    wrong_first = perfect.clone()
    wrong_first[0] = torch.roll(perfect[0], 1, dims=-1)
    score = budget_auc(ExitScores.from_logits(wrong_first, targets), [1, 2, 3])
    assert 50 < score <= 62.5


def test_write_overrides_keeps_comments_and_validates(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    weights = [1, 2, 1, 0.5, 1.5, 0.7][: load_params(path).model.n_exits]
    write_overrides(path, {"boost.temperature": [0.3], "boost.loss_weights": weights})
    text = path.read_text()
    assert "# t_n: one value" in text
    params = load_params(path)
    assert params.boost.temperature == [0.3] and params.boost.loss_weights == weights
    with pytest.raises(ConfigError):
        write_overrides(path, {"boost.temperature": [-1.0]})
    assert load_params(path).boost.temperature == [0.3]  # the bad write never landed


def test_the_paired_t_interval_on_known_numbers():
    # Differences 2, 3, 4: mean 3, sd 1, df 2 (t = 4.303): 3 +- 4.303 / sqrt(3).
    interval = paired_interval([3.0, 5.0, 7.0], [1.0, 2.0, 3.0])
    half = 4.303 / 3**0.5
    assert interval.mean == pytest.approx(3.0) and interval.n == 3
    assert (interval.low, interval.high) == pytest.approx((3 - half, 3 + half), abs=1e-3)
    assert paired_interval([1.0], [0.0]) is None  # one pair: no interval
    # Known quantiles (any statistics table): no step at df 30, no normal's 1.96 above it.
    for df, quantile in ((1, 12.706), (4, 2.776), (27, 2.052), (31, 2.040), (120, 1.980)):
        assert t_quantile(df) == pytest.approx(quantile, abs=5e-4), df
    assert t_quantile(4, confidence=0.90) == pytest.approx(2.132, abs=5e-4)


def _confirmed(challenger: list[float], default: list[float]) -> SearchOutcome:
    new = Candidate("abc_00001", {"t": 0.3}, {"boost.temperature": [0.3]}, 70.0)
    new.scores = dict(enumerate(challenger, start=1))
    old = Candidate(PARAMS_FILE, {"t": 0.5}, {"boost.temperature": [0.5]}, 69.0)
    old.scores = dict(enumerate(default, start=1))
    ranked = sorted([new, old], key=lambda c: -c.mean)
    return SearchOutcome(
        "tune-x", "run", "val_budget_auc", [], None, Confirmation([1, 2, 3], ranked)
    )


@pytest.mark.parametrize(
    ("challenger", "force", "written"),
    [
        ([71.0, 69.0, 72.0], False, False),  # gain +0.67, interval [-3.37, +4.71]: kept
        ([71.0, 69.0, 72.0], True, True),  # --force writes it anyway
        ([71.0, 71.2, 70.9], False, True),  # gain +1.03, interval [+0.89, +1.18]
        ([69.0, 69.1, 68.8], True, False),  # the params file's values are the best
    ],
)
def test_apply_writes_only_a_confirmed_gain_unless_forced(tmp_path, challenger, force, written):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    before = path.read_bytes()
    line = apply_confirmed(path, _confirmed(challenger, [70.0, 70.1, 69.9]), force)
    if written:
        assert load_params(path).boost.temperature == [0.3] and line.startswith("wrote")
    else:
        assert path.read_bytes() == before and "left unchanged" in line


def _tune(args: list[str], cwd: Path, **env_vars: str) -> subprocess.CompletedProcess:
    return run(["boostpipe", "tune", *args], cwd, **env_vars)


def _search_params(workdir: Path, experiment: str, **dotted: object) -> Path:
    """A params file of its own for one search (its own MLflow experiment), beside params.yaml."""
    params_file = workdir / f"{experiment}.yaml"
    shutil.copy(workdir / "params.yaml", params_file)
    set_params(params_file, **{"tracking.experiment": experiment}, **dotted)
    return params_file


def _search_in_background(
    params_file: Path | None, workdir: Path, *args: str
) -> tuple[subprocess.Popen, Any]:
    """`boostpipe tune` (on `params_file`, else params.yaml) in a session of its own (the test
    signals it), its console appended to background.log, and a client of the project's store,
    created first."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    client.search_experiments()
    log = (workdir / "background.log").open("a")
    driver = subprocess.Popen(
        ["boostpipe", "tune", *(["--params", params_file.name] if params_file else []), *args],
        cwd=workdir,
        env=command_env(),
        start_new_session=True,
        stdout=log,
        stderr=log,
    )
    log.close()  # the driver holds its own copy
    return driver, client


@pytest.mark.parametrize(
    ("args", "edit", "message"),
    [
        (["--trials", "0"], None, "--trials: Input should be greater than or equal to 1"),
        (["--metric", "accuracy"], None, "--metric: Input should be 'val_budget_auc'"),
        (["--search", "grid"], None, "--search:"),
        ([], {"low": 0.9, "high": 0.1}, "tune.space.temperature: low (0.9) must be below high"),
        ([], {"low": 0.5, "high": 0.5}, "tune.space.temperature: low (0.5) must be below high"),
    ],
)
def test_bad_options_and_ranges_fail_in_one_line_with_exit_2(tmp_path, args, edit, message):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    set_params(tmp_path, **{f"tune.space.temperature.{k}": v for k, v in (edit or {}).items()})
    result = _tune(args, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


# --- real searches --------------------------------------------------------------------------


def _prepare(folder: Path) -> str:
    shutil.copy(ROOT / "params.yaml", folder / "params.yaml")
    set_params(
        folder,
        **{"data.train_subset": 1200, "data.val_size": 300, "data.test_subset": 100},
        **{"tune.trials": 4, "tune.epochs": 2, "tune.train_subset": 600, "tune.val_subset": 300},
        **{"tune.confirm": {"top_k": 0, "seeds": 2}},  # tests that confirm ask with --confirm
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "stages.prepare"],
        cwd=folder,
        env=env,
        check=True,
        timeout=300,
        capture_output=True,
        text=True,
    ).stdout


@pytest.fixture
def workdir(tmp_path_factory, tmp_path) -> Path:
    """A folder of the test's own with the real params shrunk to a tiny search and the real
    prepared data (prepared once per session)."""
    prepared = once_per_session(tmp_path_factory, "tune-workdir", _prepare)
    return Path(shutil.copytree(prepared, tmp_path / "tune"))


def _children(
    folder: Path, parent: str | None = None, phase: str = "search"
) -> tuple[object, list]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("boostpipe")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if parent is None:
        (only,) = parents
        parent = only.info.run_id
    children = [
        r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent
        and r.data.tags.get("boostpipe.phase") == phase
    ]
    return client.get_run(parent), children


@pytest.mark.slow
@needs_data
def test_a_small_search_records_every_trial_in_mlflow_and_confirms_the_best(workdir):
    """4 trials, then the best one and the params file's values over 2 fresh seeds each;
    `--apply` writes only a confirmed gain. A second identical `boostpipe tune` started while
    the search runs names it in one line and exits non-zero, touching nothing of it."""
    params_before = (workdir / "params.yaml").read_bytes()
    args = ["--trials", "4", "--confirm", "1", "--apply"]
    first = subprocess.Popen(
        ["boostpipe", "tune", *args],
        cwd=workdir,
        env=command_env(),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        storage = workdir / ".boostpipe/tune"
        while not list(storage.glob("tune-*/tuner.pkl")) or not list(storage.glob("*.mlflow-run")):
            assert first.poll() is None and time.monotonic() < deadline, "the search never began"
            time.sleep(0.2)
        second = _tune(args, workdir)
        assert second.returncode == 1, second.stdout + second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"PID {first.pid}, started " in lines[0], second.stderr
        assert "is already running" in lines[0]
        stdout, stderr = first.communicate(timeout=900)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 0, stdout + stderr
    assert "4 trials:" in stdout and "confirmed best" in stdout
    assert "95% CI [" in stdout and "(2 paired seeds)" in stdout
    console = (stdout + stderr).lower()  # Ray's chatter stays off the console
    for chatter in ("warning", "snapshotting", "checkpoint successfully created"):
        assert chatter not in console, chatter
    (log_line,) = [line for line in stderr.splitlines() if "Ray Tune's log:" in line]
    assert "Trial status:" in (workdir / log_line.split()[3]).read_text()  # Tune's reporter
    parent, children = _children(workdir)
    _, confirming = _children(workdir, parent.info.run_id, phase="confirm")
    assert len(confirming) == (1 + 1) * 2
    assert all(c.data.tags["tune.outcome"] == "finished" for c in confirming)
    assert sorted(c.data.params["seed"] for c in confirming) == ["1", "1", "2", "2"]
    best = parent.data.tags["tune.confirmed_best"]
    assert best in {c.data.params["candidate"] for c in confirming}
    low = parent.data.metrics["gain_ci_low"]
    assert low <= parent.data.metrics["confirmed_gain"] <= parent.data.metrics["gain_ci_high"]
    if best == "params-file" or low <= 0:  # nothing confirmed: params.yaml untouched
        assert (workdir / "params.yaml").read_bytes() == params_before
        assert "left unchanged" in stdout
    else:
        assert "wrote the confirmed best values" in stdout
    assert parent.info.status == "FINISHED" and len(children) == 4
    outcomes = [c.data.tags["tune.outcome"] for c in children]
    assert set(outcomes) <= {"finished", "stopped_early"} and "finished" in outcomes
    status = {"finished": "FINISHED", "stopped_early": "KILLED"}
    for child in children:
        assert child.info.status == status[child.data.tags["tune.outcome"]]
        assert {"t", "w_1", "w_4", "boost.temperature", "boost.loss_weights"} <= set(
            child.data.params
        )
        assert 0 <= child.data.metrics["val_budget_auc"] <= 100
    finished = [c for c in children if c.data.tags["tune.outcome"] == "finished"]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    history = client.get_metric_history(finished[0].info.run_id, "val_budget_auc")
    assert sorted(m.step for m in history) == [1, 2]  # one point per epoch
    metrics = parent.data.metrics
    assert metrics["best_val_budget_auc"] >= metrics["default_val_budget_auc"]
    assert metrics["best_val_budget_auc"] == max(c.data.metrics["val_budget_auc"] for c in finished)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"search_summary.png", "best_trial_exits.png", "best_params.json"} <= artifacts
    by_exit = client.get_metric_history(parent.info.run_id, "best_val_top1_by_exit")
    n_exits = load_params(workdir / "params.yaml").model.n_exits
    assert sorted(m.step for m in by_exit) == list(range(1, n_exits + 1))


def _failing_on_trial_one(sampled, base, prepared):
    """The real trial, except that trial 00001 raises, as a buggy or diverging trial would."""
    import ray.tune

    if ray.tune.get_context().get_trial_id().endswith("_00001"):
        raise RuntimeError("injected failure")
    run_trial(sampled, base, prepared)


@pytest.mark.slow
@needs_data
def test_a_failing_trial_is_recorded_as_failed_and_the_others_finish(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # The local Ray cluster run_search starts passes this on to its workers, which then
    # import the trainable above from this file.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    params = load_params("params.yaml").model_copy(deep=True)
    params = apply_overrides(params, {"tune.trials": 3, "tracking.experiment": "failing"})
    outcome = run_search(
        params,
        Path("data/prepared.npz"),
        read_json("data/dataset.json"),
        workdir / ".boostpipe/tune",
        trainable=_failing_on_trial_one,
    )
    assert outcome.count("failed") == 1 and len(outcome.trials) == 3
    assert outcome.best is not None and outcome.trials[-1].outcome == "failed"
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    children = client.search_runs(
        [client.get_experiment_by_name("failing").experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'",
    )
    failed = [c for c in children if c.data.tags["tune.outcome"] == "failed"]
    assert len(children) == 3 and len(failed) == 1
    assert (
        failed[0].info.status == "FAILED"
        and "injected failure" in failed[0].data.tags["tune.error"]
    )


def _stop_once_ended(
    driver: subprocess.Popen, client: Any, experiment: str, count: int, stop: int
) -> list:
    """Wait until `count` trials of the search have ended, then stop its driver with `stop`
    (Ctrl-C, or kill -9 of the driver and the Ray it started); returns the ended trials' runs."""
    try:
        deadline = time.monotonic() + 300
        ended: list = []
        while len(ended) < count:
            assert driver.poll() is None and time.monotonic() < deadline, "no trial ended"
            time.sleep(1)
            found = client.get_experiment_by_name(experiment)
            if found is not None:
                runs = client.search_runs([found.experiment_id])
                ended = [r for r in runs if "tune.outcome" in r.data.tags]
        if stop == signal.SIGINT:
            os.kill(driver.pid, signal.SIGINT)  # Ctrl-C: Tune saves its state and returns
            assert driver.wait(timeout=120) == 130
        else:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    return ended


@pytest.mark.slow
@needs_data
def test_ctrl_c_and_kill_9_then_resume_run_only_unfinished_trials_and_confirmation_runs(workdir):
    """A 4-trial search stopped by Ctrl-C once a trial has ended, resumed, killed -9 (driver
    and Ray) once another has ended, resumed again, and stopped by Ctrl-C once one of its 4
    confirmation runs (one at a time) has ended; `--resume --apply --force` then runs the
    other 3 and writes the confirmed best. No finished trial or confirmation run runs again,
    and the parent ends with exactly 4 trials. (After kill -9 a trial that ended after Tune's
    last state snapshot is reopened from its final checkpoint and closed again, training
    nothing.)"""
    experiment = "interrupted"
    params_file = _search_params(
        workdir,
        experiment,
        **{"tune.trials": 4, "tune.max_concurrent": 1, "tune.scheduler": "fifo"},
        **{"tune.confirm": {"top_k": 1, "seeds": 2}},
    )
    before_apply = load_params(params_file).boost.temperature
    driver, client = _search_in_background(params_file, workdir)
    first = _stop_once_ended(driver, client, experiment, 1, signal.SIGINT)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    (parent,) = [
        r for r in client.search_runs([experiment_id]) if "mlflow.parentRunId" not in r.data.tags
    ]
    assert parent.info.status == "KILLED"  # interrupted; --resume reopens it

    def epochs(run_id: str) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run_id, "val_budget_auc"))

    def runs(phase: str) -> list:
        found = client.search_runs([experiment_id], max_results=100)
        return [r for r in found if r.data.tags.get("boostpipe.phase") == phase]

    saved = {r.info.run_id: (r.info.end_time, epochs(r.info.run_id)) for r in first}
    # After Ctrl-C `--resume` alone finds it (the workdir's params.yaml names another search).
    driver, _ = _search_in_background(None, workdir, "--resume")
    second = _stop_once_ended(driver, client, experiment, len(first) + 1, signal.SIGKILL)
    killed = {r.info.run_id: epochs(r.info.run_id) for r in second}
    console = (workdir / "background.log").read_text()
    assert "resuming tune-" in console and "latest interrupted search" in console

    driver, _ = _search_in_background(params_file, workdir, "--resume")
    try:
        deadline = time.monotonic() + 300
        while not (
            ended := [
                r for r in runs("confirm") if "tune.outcome" in r.data.tags and r.info.end_time
            ]
        ):
            assert driver.poll() is None and time.monotonic() < deadline, "no run ended"
            time.sleep(0.5)
        os.kill(driver.pid, signal.SIGINT)
        assert driver.wait(timeout=120) == 130
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    before = {r.info.run_id: r.info.end_time for r in ended + runs("search")}

    result = _tune(["--params", params_file.name, "--resume", "--apply", "--force"], workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    (parent,) = [
        r for r in client.search_runs([experiment_id]) if "mlflow.parentRunId" not in r.data.tags
    ]
    children = runs("search")
    assert parent.info.status == "FINISHED" and len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert len({c.data.tags["ray.trial_id"] for c in children}) == 4
    assert all(c.data.tags.get("tune.outcome") == "finished" for c in children)
    for run_id, trained in killed.items():  # ended trials were not run again
        assert epochs(run_id) == trained == [1, 2]  # no epoch trained twice
    for run_id, (end_time, trained) in saved.items():  # Tune saved their state: not reopened
        assert client.get_run(run_id).info.end_time == end_time and epochs(run_id) == trained
    confirming = runs("confirm")
    assert len(confirming) == 4 and len({c.data.tags["ray.trial_id"] for c in confirming}) == 4
    assert all(c.data.tags["tune.outcome"] == "finished" for c in confirming)
    for run_id, end_time in before.items():  # ended runs were not run again
        assert client.get_run(run_id).info.end_time == end_time
    assert all(epochs(c.info.run_id) == [1, 2] for c in confirming)  # none trained twice
    if parent.data.tags["tune.confirmed_best"] == "params-file":
        assert "the params file's values are the best" in result.stdout
    else:  # --force: written whatever the interval
        assert "wrote the confirmed best values" in result.stdout
        assert load_params(params_file).boost.temperature != before_apply

    # Resuming the finished search says so, exits 0 and changes nothing.
    storage = workdir / ".boostpipe/tune"
    state = {path: path.stat().st_mtime_ns for path in storage.rglob("*") if path.is_file()}
    count = len(client.search_runs([experiment_id], max_results=100))
    again = _tune(["--params", params_file.name, "--resume"], workdir)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "has finished: nothing to resume" in again.stdout
    assert len(client.search_runs([experiment_id], max_results=100)) == count
    assert {p: p.stat().st_mtime_ns for p in storage.rglob("*") if p.is_file()} == state


@pytest.mark.slow
@needs_data
def test_trials_can_be_ray_train_ddp_jobs(workdir):
    _search_params(
        workdir,
        "ddp",
        **{"tune.trials": 1, "tune.epochs": 1, "tune.workers_per_trial": 2},
        **{"tune.cpus_per_trial": 0.5},
    )
    result = _tune(["--params", "ddp.yaml"], workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert child.data.tags["tune.outcome"] == "finished"
    assert 0 < child.data.metrics["val_budget_auc"] <= 100


@pytest.mark.slow
def test_a_trial_larger_than_the_cluster_is_refused_not_left_pending(workdir):
    cpus = os.cpu_count()  # the local cluster has this many: two workers need twice as many
    result = _tune(["--workers-per-trial", "2", "--cpus-per-trial", str(cpus)], workdir)
    assert result.returncode == 2
    assert f"tune.cpus_per_trial: a trial needs {2 * cpus + 0.01:g} CPUs" in result.stderr
