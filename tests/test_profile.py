"""The profile stage's measurement on a real (untrained, seeded) BoostNet with real timing, and
its refusal to serve another device, CPU, thread count or batch size."""

import json

import pytest
import torch
from helpers.nets import untrained_boostnet

from pipeline.evaluation import Source, early_exit, exit_costs
from pipeline.latency import early_exit_one_at_a_time
from pipeline.profiling import (
    BATCH_1,
    BATCH_N,
    REGIMES,
    ExitProfile,
    Machine,
    StaleProfile,
    forced_exit,
    measure,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def problem():
    return untrained_boostnet(128, **{"model.n_blocks": 3})


@pytest.mark.parametrize("exit_index", [0, 1, 2])
def test_forced_thresholds_send_every_image_out_at_one_exit(problem, exit_index):
    params, net, split = problem
    thresholds = forced_exit(exit_index, net.n_exits)
    batched = early_exit(net, Source(split, params.data, 64), thresholds, CPU)
    single = early_exit_one_at_a_time(
        net, Source(split.subset(torch.arange(8)), params.data, 1), thresholds, CPU
    )
    assert set(batched.exits.tolist()) == {exit_index} == set(single.exits.tolist())


def test_the_profile_times_every_exit_in_both_regimes(problem):
    params, net, split = problem
    flops = exit_costs(net, params)
    profile = measure(
        net,
        Source(split, params.data, 64),
        Source(split.subset(torch.arange(32)), params.data, 1),
        CPU,
        flops,
        repeats=7,
        warmup=1,
    )
    assert profile.flops == flops and profile.batch_size == 64
    assert profile.machine == Machine.current(CPU)
    for regime in REGIMES:
        ms = profile.ms[regime]
        assert len(ms) == net.n_exits and all(t > 0 for t in ms)
        assert ms[-1] > ms[0]  # the last exit runs every block the first one does, and more
    # One image alone pays per-call costs a batch shares.
    assert profile.ms[BATCH_1][-1] > profile.ms[BATCH_N][-1]
    written = profile.to_json()
    assert [row["exit"] for row in written["exits"]] == [1, 2, 3]
    assert set(written["exits"][0]) == {"exit", "flops", "ms_batch_1", "ms_batch_n"}
    assert {"device", "cpu", "threads", "batch_size"} <= set(written)
    assert ExitProfile.from_json(json.loads(json.dumps(written))) == profile


@pytest.mark.parametrize(
    ("measured_on", "batch_size", "named"),
    [
        (Machine("cuda (NVIDIA H200)", "any", 1), 64, "device"),
        (Machine("cpu", "another CPU", 1), 64, "cpu"),
        (Machine("cpu", "this CPU", 16), 64, "threads"),
        (Machine("cpu", "this CPU", 1), 512, "batch size"),
    ],
)
def test_a_profile_from_another_setup_is_refused_in_one_line(measured_on, batch_size, named):
    here = Machine("cpu", "this CPU", 1)
    profile = ExitProfile(
        [1, 2], {BATCH_1: [1.0, 2.0], BATCH_N: [0.1, 0.2]}, batch_size, measured_on
    )
    with pytest.raises(
        StaleProfile, match=rf"exit_costs\.json: measured on another setup \({named}"
    ) as caught:
        profile.check_serves(here, 64, "outputs/profile/exit_costs.json")
    assert "\n" not in str(caught.value) and "dvc repro -f -s profile" in str(caught.value)
    ExitProfile([1, 2], profile.ms, 64, here).check_serves(here, 64, "exit_costs.json")
