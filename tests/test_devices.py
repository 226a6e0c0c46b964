"""Where computation runs: Tune trials on the GPU their `gpus_per_trial` reserved (checked on a
real local Ray cluster with one logical GPU, so no CUDA is needed), and `evaluate.device`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import compose
from helpers.cluster import one_gpu_cluster

from pipeline.config import ConfigError
from pipeline.devices import describe_platform, stage_device, trial_device
from pipeline.storage import open_storage
from pipeline.tuning import SearchSetup, TrialInputs, make_tuner


def _device_probe(sampled, base, prepared) -> None:
    """A trainable that reports the device a real trial would train on, and the GPU Ray set."""
    import ray
    import ray.tune

    device = trial_device(ray.get_gpu_ids())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ray.tune.report({"val_budget_auc": 0.0, "device": str(device), "visible": visible})


@pytest.fixture(scope="module")
def gpu_cluster():
    with one_gpu_cluster():
        yield


@pytest.mark.slow
@pytest.mark.parametrize(("gpus", "expected"), [(1, "cuda:0"), (0.5, "cuda:0"), (0, "cpu")])
def test_a_trial_trains_on_the_gpu_its_gpus_per_trial_reserved(
    gpu_cluster, tmp_path: Path, gpus: float, expected: str
):
    params = compose(**{"tune.trials": 1, "tune.scheduler": "fifo", "tune.gpus_per_trial": gpus})
    storage = open_storage(params.ray, tmp_path)
    inputs = TrialInputs(None, storage)  # the probe reads no data
    setup = SearchSetup(params, inputs, tmp_path, storage, f"probe-{gpus}", [])
    (result,) = make_tuner(setup, resume=False, trainable=_device_probe).fit()
    assert result.error is None, result.error
    assert result.metrics["device"] == expected
    assert (result.metrics["visible"] == "0") == (gpus > 0)  # Ray handed the trial GPU 0


def test_evaluate_device_cpu_and_auto():
    assert stage_device("cpu") == torch.device("cpu")
    assert stage_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_evaluate_device_cuda_without_cuda_fails_on_the_key():
    with pytest.raises(ConfigError, match=r"^evaluate\.device: is cuda, but torch sees no CUDA"):
        stage_device("cuda")


def test_evaluate_device_is_validated():
    with pytest.raises(ConfigError, match=r"evaluate\.device:"):
        compose(**{"evaluate.device": "tpu"})


def test_the_platform_a_run_records_travels_in_a_weights_only_checkpoint(tmp_path):
    """describe_platform goes into every checkpoint, which loads with weights_only=True."""
    platform = describe_platform(torch.device("cpu"))
    torch.save({"platform": platform}, tmp_path / "state.pt")
    assert torch.load(tmp_path / "state.pt", weights_only=True)["platform"] == platform
    assert platform["cpu_isa"] == torch.backends.cpu.get_cpu_capability()
    assert platform["torch"] == torch.__version__ and platform["device"] == "cpu"
