import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, compose, grey_msdnet, is_imagenet, set_params, slow_cases
from torch import nn

from pipeline.flops import count_exit_costs, module_flops


def flops_of(module, x):
    output = module(x)
    return module_flops(module, (x,), output)


def test_layer_rules_of_spec_section_4():
    x = torch.zeros(1, 4, 8, 8)
    assert flops_of(nn.Conv2d(4, 6, 3, padding=1, bias=True), x) == 4 * 6 * 9 * 8 * 8
    assert flops_of(nn.Conv2d(4, 6, 3, stride=2, padding=1), x) == 4 * 6 * 9 * 4 * 4
    assert flops_of(nn.Conv2d(4, 8, 3, padding=1, groups=2), x) == 4 * 8 * 9 * 8 * 8 // 2
    assert flops_of(nn.ReLU(), x) == 4 * 8 * 8
    assert flops_of(nn.AvgPool2d(2), x) == 4 * 4 * 4 * 4
    assert flops_of(nn.MaxPool2d(3, 2, padding=1), x) == 4 * 4 * 4 * 9
    assert flops_of(nn.AdaptiveAvgPool2d(1), x) == 4 * 8 * 8
    assert flops_of(nn.Linear(10, 3), torch.zeros(1, 10)) == 10 * 3 + 3
    assert flops_of(nn.BatchNorm2d(4).eval(), x) == 0
    with pytest.raises(TypeError, match="GELU"):
        flops_of(nn.GELU(), x)


def tiny_msdnet(n_blocks):
    return grey_msdnet(
        n_blocks=n_blocks,
        base=1,
        step=1,
        n_channels=2,
        growth_rate=2,
        gr_factor=(1,),
        bn_factor=(1,),
        bottleneck=False,
        num_classes=3,
    )


def test_costs_are_cumulative_over_blocks_and_every_earlier_head():
    # Counted by hand for one 8x8 grey image, one scale, width 2, growth 2, no bottleneck.
    stem = 1 * 2 * 9 * 64 + 2 * 64  # 3x3 conv 1->2, ReLU
    layer1 = 2 * 2 * 9 * 64 + 2 * 64  # 3x3 conv 2->2, ReLU; the map is now 4 wide
    layer2 = 4 * 2 * 9 * 64 + 2 * 64  # 3x3 conv 4->2, ReLU; now 6 wide

    def head(width):  # conv/2 to 128 on 4x4, conv/2 on 2x2, 2x2 avg-pool, linear 128->3
        return (width * 128 * 9 * 16 + 128 * 16) + (128 * 128 * 9 * 4 + 128 * 4) + 128 * 4 + 387

    costs = count_exit_costs(tiny_msdnet(2), (1, 8, 8))
    assert costs.flops == [stem + layer1 + head(4), stem + layer1 + head(4) + layer2 + head(6)]

    net = tiny_msdnet(2)
    block_and_head = [
        sum(p.numel() for p in (*net.blocks[i].parameters(), *net.heads[i].parameters()))
        for i in range(2)
    ]
    assert costs.params == [block_and_head[0], sum(block_and_head)]


def test_counting_leaves_the_model_as_it_was():
    net = tiny_msdnet(2).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    count_exit_costs(net, (1, 8, 8))
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(m._forward_hooks for m in net.modules())


def test_a_net_on_another_device_is_counted_there():
    """Profile and calibrate count the net on evaluate.device (a GPU failed here: the counting
    image was made on the CPU). The meta device stands in for a GPU: shapes only, no data."""
    on_cpu = count_exit_costs(tiny_msdnet(2), (1, 8, 8))
    assert count_exit_costs(tiny_msdnet(2).to("meta"), (1, 8, 8)) == on_cpu


def test_cli_json_is_one_object_of_raw_counts():
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "flops", "--params", "params.yaml", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    report = json.loads(result.stdout)
    assert set(report) == {"exits", "flops", "params"}
    assert len(report["flops"]) == len(report["params"]) == report["exits"]
    assert all(isinstance(v, int) for v in report["flops"] + report["params"])
    assert report["flops"] == sorted(report["flops"]) and report["flops"][0] > 0


REFERENCE = json.loads((ROOT / "tests" / "data" / "reference_costs.json").read_text())["configs"]


@pytest.mark.parametrize("name", slow_cases(sorted(REFERENCE), is_imagenet))
def test_paper_configs_agree_with_the_reference_counter(name):
    """Within 0.5% per exit of the reference implementation's own counter;
    exactly for RANet, whose layers the reference counts with the same rules as ours."""
    from pipeline.boosting import BoostNet
    from pipeline.config import load_params

    params = load_params(ROOT / "configs" / f"{name}.yaml")
    size = params.data.spec.image_size
    costs = count_exit_costs(BoostNet.from_params(params).backbone, (3, size, size))
    expected = REFERENCE[name]
    rel = 0 if params.model.arch == "ranet" else 0.005
    assert costs.flops == pytest.approx(expected["flops"], rel=rel)
    assert costs.params == pytest.approx(expected["params"], rel=rel)


def test_flops_of_a_folder_dataset_takes_the_class_count_prepare_found(tmp_path):
    """imagefolder params name no class count: after `dvc repro prepare` wrote it to
    data/dataset.json, `boostpipe flops` uses it; before, one line says what is missing."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    set_params(
        tmp_path,
        **{"data.dataset": "imagefolder", "data.root": "images", "data.image_size": 32},
    )

    def flops() -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "pipeline", "flops", "--json"]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=_env())

    before = flops()
    assert before.returncode == 2 and "model.num_classes" in before.stderr, before.stderr
    (tmp_path / "data").mkdir()
    (tmp_path / "data/dataset.json").write_text(json.dumps({"num_classes": 7}))
    after = flops()
    assert after.returncode == 0, after.stderr
    assert len(json.loads(after.stdout)["flops"]) == compose().model.n_exits


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}
