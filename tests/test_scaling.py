"""Ray Train worker layouts: `auto` follows the cluster, impossible layouts fail at once."""

import re
import time

import pytest
import ray
from helpers import compose
from helpers.cluster import one_gpu_cluster

from pipeline.cluster import Layout, worker_layout
from pipeline.config import ConfigError


@pytest.fixture(scope="module")
def gpu_cluster():
    with one_gpu_cluster() as resources:
        yield resources


@pytest.mark.slow
def test_auto_takes_one_worker_per_gpu(gpu_cluster):
    assert worker_layout(compose(), gpu_cluster) == Layout(workers=1, use_gpu=True)


def test_auto_without_gpus_keeps_the_two_worker_cpu_layout():
    assert worker_layout(compose(), {"CPU": 2.0}) == Layout(workers=2, use_gpu=False)
    assert worker_layout(compose(), {"CPU": 1.0}) == Layout(workers=1, use_gpu=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"train.scaling.workers": 2, "train.scaling.use_gpu": True},
            "train.scaling.workers: training needs 2 GPUs (2 worker(s) x 1) "
            "but the Ray cluster has 1",
        ),
        ({"train.scaling.workers": 3}, "train.scaling.workers: training needs 3 GPUs"),
        (
            {"train.scaling.workers": 3, "train.scaling.use_gpu": False},
            "train.scaling.workers: training needs 3 CPUs (3 worker(s) x 1) "
            "but the Ray cluster has 2",
        ),
    ],
)
def test_a_layout_the_cluster_cannot_hold_fails_in_seconds(gpu_cluster, overrides, message):
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=re.escape(message)):
        worker_layout(compose(**overrides), ray.cluster_resources())
    assert time.perf_counter() - started < 5


def test_use_gpu_true_on_a_cpu_cluster_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.scaling\.use_gpu: training needs 1 GPUs"):
        worker_layout(compose(**{"train.scaling.use_gpu": True}), {"CPU": 2.0})
