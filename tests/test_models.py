import pytest
import torch
from helpers import ROOT, compose

from pipeline.boosting import BoostNet, ExitRunner
from pipeline.config import load_params
from pipeline.evaluation import exit_costs
from pipeline.models import msdnet_spec, ranet_spec
from pipeline.models.base import gather_rows
from pipeline.models.msdnet import block_lengths, plan_blocks
from pipeline.models.ranet import RANetState, plan_flows


def test_every_preset_gives_one_logit_tensor_per_exit(params_file):
    params = load_params(params_file)
    spec = params.data.spec
    torch.manual_seed(0)
    net = BoostNet.from_params(params).eval()
    x = torch.randn(2, params.in_channels, spec.image_size, spec.image_size)
    with torch.no_grad():
        logits = net(x)
    assert len(logits) == params.model.n_exits
    for z in logits:
        assert z.shape == (2, params.num_classes)
        assert torch.isfinite(z).all()


def test_block_lengths_follow_step_mode():
    even = compose(**{"model.n_blocks": 4, "model.base": 3, "model.step": 2})
    grow = compose(
        **{"model.n_blocks": 4, "model.base": 3, "model.step": 2, "model.step_mode": "lin_grow"}
    )
    assert block_lengths(msdnet_spec(even)) == [3, 2, 2, 2]
    assert block_lengths(msdnet_spec(grow)) == [3, 3, 5, 7]


@pytest.mark.parametrize("prune", ["max", "min"])
def test_pruning_only_ever_drops_scales_one_at_a_time(prune):
    anytime = ROOT / "configs" / "cifar100-msdnet-anytime.yaml"
    spec = msdnet_spec(compose(anytime, **{"model.prune": prune}))
    layers = [plan for block in plan_blocks(spec) for plan in block]
    assert layers[0].in_scales == spec.n_scales
    previous_out = spec.n_scales
    for plan in layers:
        assert plan.in_scales == previous_out
        assert plan.out_scales in (plan.in_scales, plan.in_scales - 1)
        previous_out = plan.out_scales
    assert layers[-1].out_scales == 1  # both modes end on the coarsest scale alone


def _trunk_kernel_sizes(**overrides):
    net = BoostNet.from_params(compose(**overrides))
    return {m.kernel_size for m in net.backbone.blocks.modules() if isinstance(m, torch.nn.Conv2d)}


def test_1x1_convs_come_only_from_bottlenecks_and_transitions():
    assert (1, 1) not in _trunk_kernel_sizes(**{"model.bottleneck": False, "model.reduction": 0.0})
    assert (1, 1) in _trunk_kernel_sizes(**{"model.bottleneck": True, "model.reduction": 0.0})
    assert (1, 1) in _trunk_kernel_sizes(**{"model.bottleneck": False, "model.reduction": 0.5})


RANET = ROOT / "configs" / "fashion-mnist-ranet.yaml"


@pytest.mark.parametrize("path", [ROOT / "params.yaml", RANET], ids=["msdnet", "ranet"])
def test_incremental_runner_on_a_shrinking_batch_matches_the_full_forward(path):
    torch.manual_seed(0)
    net = BoostNet.from_params(compose(path)).eval()
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        full = net(x)
        runner = net.start(x)
        keep = torch.ones(6, dtype=torch.bool)
        for index in range(net.n_exits):
            logits = runner.step()
            assert torch.allclose(logits, full[index][keep], atol=1e-5)
            leaving = torch.zeros(int(keep.sum()), dtype=torch.bool)
            leaving[0] = True  # one sample exits after every block
            runner.keep(~leaving)
            keep[keep.nonzero()[0]] = False
        with pytest.raises(IndexError):
            runner.step()


@pytest.mark.parametrize("path", [ROOT / "params.yaml", RANET], ids=["msdnet", "ranet"])
def test_runner_gathered_from_two_batches_continues_like_the_full_forward(path):
    """Early exit's re-batching: samples of two batches that stopped at one exit, gathered into
    one runner, get the logits the whole network gives them."""
    torch.manual_seed(0)
    net = BoostNet.from_params(compose(path)).eval()
    x = torch.randn(10, 1, 28, 28)
    with torch.no_grad():
        full = net(x)
        first, second = net.start(x[:6]), net.start(x[6:])
        first.step(), second.step()
        parts = [(first, torch.tensor([1, 4, 5])), (second, torch.tensor([0, 3]))]
        runner = ExitRunner.gather(parts)
        rows = torch.tensor([1, 4, 5, 6, 9])
        for index in range(1, net.n_exits):
            assert torch.allclose(runner.step(), full[index][rows], atol=1e-5)


def test_gathered_rows_keep_the_channels_last_layout():
    a = torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    b = torch.randn(3, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    out = gather_rows([a, b], [torch.tensor([3, 0]), torch.tensor([2])])
    assert torch.equal(out, torch.stack([a[3], a[0], b[2]]))
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    flat = gather_rows([torch.arange(6).view(3, 2)], [torch.tensor([2, 1])])
    assert flat.tolist() == [[4, 5], [2, 3]]


def _state_tensors(state):
    tensors = []
    state.map(lambda t: tensors.append(t) or t)  # map visits every tensor the state holds
    return tensors


def test_ranet_early_exit_drops_exited_samples_from_everything_later_blocks_read():
    torch.manual_seed(0)
    net = BoostNet.from_params(compose(RANET)).eval()
    seen = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
        for m in net.backbone.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    runner = net.start(torch.randn(8, 1, 28, 28))
    with torch.no_grad():
        for index in range(net.n_exits):
            seen.clear()
            runner.step()
            assert set(seen) == {8 - index}  # every conv of this block ran on the kept batch only
            runner.keep(torch.arange(8 - index) > 0)  # one sample exits after every block
            assert isinstance(runner.state, RANetState)
            assert {t.shape[0] for t in _state_tensors(runner.state)} <= {7 - index}
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("name", ["cifar100-ranet-anytime", "cifar100-ranet-budgeted-2"])
def test_ranet_flows_follow_the_reference_layout(name):
    params = compose(ROOT / "configs" / f"{name}.yaml")
    spec = ranet_spec(params)
    flows = plan_flows(spec)
    n = spec.n_blocks
    assert [len(blocks) for blocks in flows] == [n * (f + 1) for f in range(spec.n_flows)]
    assert sum(b.exit for blocks in flows for b in blocks) == params.model.n_exits
    for flow, blocks in enumerate(flows):
        assert [b.fused for b in blocks] == [True] * (n * flow) + [False] * n
        # a flow at scale s halves its resolution s - 1 times, ending at the coarsest
        assert sum(b.down for b in blocks) == spec.scale_list[flow] - 1
    net = BoostNet.from_params(params).backbone
    runner_sizes = []
    state = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        for index in range(net.n_exits):
            state = net.run_block(index, state)
            runner_sizes.append(tuple(state.x.shape[-2:]))
    assert set(runner_sizes) == {(8, 8)}  # every exit reads the coarsest (32 / 4) resolution


def test_ranet_bottlenecks_after_or_before_batch_norm():
    def first_layer_types(bn_after):
        net = BoostNet.from_params(compose(RANET, **{"model.bn_after": bn_after})).backbone
        conv = net.blocks[0].flow_blocks[0].layers[0].conv
        return [type(m).__name__ for m in conv.modules() if not list(m.children())]

    assert first_layer_types(True)[:3] == ["Conv2d", "BatchNorm2d", "ReLU"]
    assert first_layer_types(False)[:3] == ["BatchNorm2d", "ReLU", "Conv2d"]
    torch.manual_seed(0)
    net = BoostNet.from_params(compose(RANET, **{"model.bn_after": False})).eval()
    with torch.no_grad():
        assert all(torch.isfinite(z).all() for z in net(torch.randn(2, 1, 28, 28)))


def test_a_narrow_first_head_makes_exit_1_cheaper_and_leaves_the_others_alone():
    wide = compose(**{"model.head_channels": 32, "model.first_head_channels": None})
    narrow = compose(**{"model.head_channels": 32, "model.first_head_channels": 8})
    heads = [BoostNet.from_params(p).backbone.heads for p in (wide, narrow)]
    assert [h[0][0].out_channels for h in heads[1]] == [8] + [32] * (len(heads[1]) - 1)
    assert [h[0][0].out_channels for h in heads[0]] == [32] * len(heads[0])
    costs = [exit_costs(BoostNet.from_params(p), p) for p in (wide, narrow)]
    saved = [w - n for w, n in zip(*costs, strict=True)]  # an exit's cost includes earlier heads
    assert saved[0] > 0 and saved == [saved[0]] * len(saved)
