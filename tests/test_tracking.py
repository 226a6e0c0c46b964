import os
import socket
import time

import pytest
from helpers import ROOT, compose

from pipeline.tracking import TrackingUnavailable, connect, flatten, project_root, tracking_uri


def test_project_root_is_found_from_inside_dvc_experiment_copies(tmp_path):
    inside = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    inside.mkdir(parents=True)
    assert project_root(inside) == (tmp_path / "repo").resolve()
    assert project_root(tmp_path) == tmp_path.resolve()


def test_default_store_is_sqlite_in_the_project_and_env_wins(tmp_path, monkeypatch):
    params = compose()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(params, tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_uri(params, tmp_path) == "http://127.0.0.1:5999"


def test_connect_creates_the_experiment_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = compose(**{"tracking.experiment": "unit"})
    first = connect(params)
    assert connect(params) == first
    assert (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_register_adds_a_version_and_moves_the_evaluated_alias(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pipeline.boosting import BoostNet
    from pipeline.tracking import log_model, register, start_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = compose(**{"tracking.experiment": "unit"})
    versions = []
    for attempt in range(2):
        run_id = start_run(params, "abc", str(tmp_path), tmp_path / f"marker{attempt}", "unit")
        log_model(run_id, BoostNet.from_params(params), params.input_shape)
        versions.append(register(run_id, "boostnet-unit"))
    assert versions == ["1", "2"] or versions == [1, 2]
    alias = MlflowClient().get_model_version_by_alias("boostnet-unit", "evaluated")
    assert str(alias.version) == str(versions[-1])


LOAD_WITHOUT_THIS_CHECKOUT = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]  # no installed copy
root, venv = sys.argv[1], sys.argv[1] + "/.venv/"
sys.path[:] = [p for p in sys.path if p and (p.startswith(venv) or not p.startswith(root))]
import mlflow.pytorch, torch
model = mlflow.pytorch.load_model(sys.argv[2])
assert not any(m.__file__.startswith(root) for m in sys.modules.values()
               if getattr(m, "__file__", None) and m.__name__.startswith("pipeline"))
print(tuple(model(torch.zeros(2, *map(int, sys.argv[3:]))).shape))
"""


@pytest.mark.slow
def test_the_logged_model_loads_without_this_checkout(tmp_path, monkeypatch):
    """`mlflow.pytorch.load_model` in a process that cannot import this repository's code:
    the model brings the package it needs (`code_paths`)."""
    import subprocess
    import sys

    from mlflow import MlflowClient

    from pipeline.boosting import BoostNet
    from pipeline.tracking import log_model, start_run

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = compose(**{"tracking.experiment": "unit"})
    run_id = start_run(params, "abc", str(tmp_path), tmp_path / "marker", "unit")
    log_model(run_id, BoostNet.from_params(params), params.input_shape)
    model_id = MlflowClient().get_run(run_id).outputs.model_outputs[-1].model_id
    shape = [str(n) for n in params.input_shape]
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_WITHOUT_THIS_CHECKOUT,
            str(ROOT),
            f"models:/{model_id}",
            *shape,
        ],
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    n_exits, n_classes = params.model.n_exits, params.num_classes
    assert result.stdout.strip().splitlines()[-1] == str((n_exits, 2, n_classes))


def test_the_experiment_is_a_model_training_one_so_the_ui_opens_on_runs(tmp_path, monkeypatch):
    """New experiments carry MLflow's kind tag, and one made without it gets it."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in ("new", "older"):
        if name == "older":
            mlflow.create_experiment(name)
        experiment_id = connect(compose(**{"tracking.experiment": name}))
        tags = mlflow.MlflowClient().get_experiment(experiment_id).tags
        assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_an_unreachable_server_is_reported_before_any_work(monkeypatch):
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=f"127.0.0.1:{port} is unreachable"):
        connect(compose())
    assert time.monotonic() - start < 10


def test_flatten_gives_dotted_keys():
    assert flatten({"boost": {"temperature": [0.5], "enabled": True}, "seed": 0}) == {
        "boost.temperature": "[0.5]",
        "boost.enabled": "True",
        "seed": "0",
    }


def test_processes_creating_one_sqlite_store_at_once_all_connect(tmp_path):
    """What `dvc queue start -j 3` does in a new project: three stages create the default
    store at the same moment. One creates the tables and the experiment, the others wait and
    find them; MLflow's migrations never run twice at once."""
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    code = (
        "from pipeline.config import load_params; from pipeline.tracking import connect; "
        "print(connect(load_params('params.yaml')))"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(ROOT)
    starts = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [(p.wait(timeout=300), *p.communicate()) for p in starts]
    assert all(code == 0 for code, _, _ in results), [err[-2000:] for _, _, err in results]
    assert len({out.strip() for _, out, _ in results}) == 1  # one experiment


def test_runs_logged_under_the_old_flat_names_read_as_the_sectioned_ones(tmp_path, monkeypatch):
    """`boostpipe runs` and `compare` read a run logged before the chart sections (the flat
    names, written here as that version logged them) exactly as one logged now."""
    import mlflow
    from mlflow import MlflowClient

    from pipeline.epochs import EpochRecord, EpochStats
    from pipeline.tracking.logs import epoch_metrics, log_metrics
    from pipeline.tracking.lookup import curves, top1_at_budgets

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    connect(compose(**{"tracking.experiment": "unit"}))
    epoch = EpochRecord(1, EpochStats([2.0, 1.0], [1.0, 0.4], 0.1, 900.0), [60.0, 70.0], 3.0, [])
    logged = {
        "now": [
            *epoch_metrics(epoch),
            ("exits/test_top1", 70.0, 1),
            ("exits/test_top1", 80.0, 2),
            ("exits_cost/mflops", 1.5, 1),
            ("exits_cost/mflops", 3.0, 2),
            ("budgets/top1_flat_by_kflops", 75.0, 2000),
            ("test/budget_2M_top1", 75.0, 0),
        ],
        "before": [
            ("effective_samples_exit_1", 1.0, 1),
            ("effective_samples_exit_2", 0.4, 1),
            ("test_top1_by_exit", 70.0, 1),
            ("test_top1_by_exit", 80.0, 2),
            ("mflops_by_exit", 1.5, 1),
            ("mflops_by_exit", 3.0, 2),
            ("budget_top1_flat_by_kflops", 75.0, 2000),
            ("budget_2M_top1", 75.0, 0),
        ],
    }
    client = MlflowClient()
    read = {}
    for version, metrics in logged.items():
        run_id = mlflow.start_run(run_name=version).info.run_id
        mlflow.end_run()
        log_metrics(run_id, metrics)
        run = client.get_run(run_id)
        read[version] = curves(client, run)
        assert top1_at_budgets(run) == {2.0: 75.0}
    now, before = read["now"], read["before"]
    assert now.exit_top1 == before.exit_top1 == [70.0, 80.0]
    assert now.exit_mflops == before.exit_mflops == [1.5, 3.0]
    assert now.budget_mflops == before.budget_mflops == [2.0]
    assert now.effective_samples == before.effective_samples == [[1.0], [0.4]]
    assert now.epochs == before.epochs == [1]


def test_every_metric_a_run_logs_has_a_chart_section_and_an_old_name():
    """Each name has one of the UI's sections and maps back to what older runs logged."""
    from pipeline.epochs import EpochRecord, EpochStats
    from pipeline.tracking import names
    from pipeline.tracking.logs import epoch_metrics

    stats = EpochStats([2.0], [1.0], 0.1, 900.0, compile_seconds=5.0, skipped_images=1)
    logged = {key for key, _, _ in epoch_metrics(EpochRecord(1, stats, [60.0], 3.0, []))}
    assert {key.split("/")[0] for key in logged} == {"train", "val"}
    old = {names.legacy(key) for key in logged}
    assert old == {
        "train_loss_exit_1",
        "effective_samples_exit_1",
        "val_top1_exit_1",
        "val_mean_top1",
        "lr",
        "images_per_second",
        "epoch_seconds",
        "compile_seconds",
        "skipped_images",
    }
    assert names.legacy(names.EXIT_TOP1) == "test_top1_by_exit"
    assert names.legacy(names.flops_budget(1.5, "top1")) == "budget_1.5M_top1"
    assert names.legacy(names.time_budget("batch_n_0.3ms", "measured_ms")) == (
        "time_batch_n_0.3ms_measured_ms"
    )
