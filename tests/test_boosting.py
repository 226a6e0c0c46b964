"""BoostNet's ensemble and losses (Yu et al., AAAI 2023, Sec. 3) on a real MSDNet and RANet."""

import pytest
import torch
import torch.nn.functional as F
from helpers import grey_msdnet, grey_ranet

from pipeline.boosting import BoostNet
from pipeline.models.msdnet import MSDLayer, Stem, Transition

N_EXITS = 4


def make_backbone(gr_factor=(1, 2, 4), seed=0, arch="msdnet"):
    torch.manual_seed(seed)
    if arch == "ranet":
        return grey_ranet().double()
    return grey_msdnet(n_blocks=N_EXITS, gr_factor=gr_factor, bn_factor=gr_factor).double()


# The backbone-independent tests run on both architectures; gradient rescaling is MSDNet's only.
ARCHS = pytest.mark.parametrize("arch", ["msdnet", "ranet"])


def batch(side=28, n=16, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, side, side, generator=generator, dtype=torch.double)
    return x, torch.randint(0, 10, (n,), generator=generator)


@ARCHS
def test_ensemble_equals_the_closed_form(arch):
    """F_n = sum_{j<=n} (prod_{m=j+1..n} t_m) f_j, unrolled from F_n = t_n F_{n-1} + f_n."""
    backbone = make_backbone(arch=arch).eval()
    temperatures = [0.9, 0.3, 0.7, 1.4]
    boosted = BoostNet(backbone, temperatures, [1.0] * N_EXITS, grad_rescale=False)
    heads_only = BoostNet(backbone, None, [1.0] * N_EXITS, grad_rescale=False)
    x, _ = batch()
    with torch.no_grad():
        ensembles, heads = boosted(x), heads_only(x)
    for n in range(N_EXITS):
        closed = sum(
            torch.prod(torch.tensor(temperatures[j + 1 : n + 1], dtype=torch.double)) * heads[j]
            for j in range(n + 1)
        )
        assert torch.allclose(ensembles[n], closed, atol=1e-10)
    assert not torch.allclose(ensembles[-1], heads[-1])


@ARCHS
def test_baseline_is_the_plain_weighted_joint_loss(arch):
    backbone = make_backbone(arch=arch)
    weights = [0.5, 1.0, 1.5, 2.0]
    net = BoostNet(backbone, None, weights, grad_rescale=False)
    x, y = batch()
    loss = net.total_loss(net.exit_losses(net(x), y))

    state, expected = x, 0.0
    for index in range(N_EXITS):  # the joint loss written out directly on the backbone
        state = backbone.run_block(index, state)
        expected = expected + weights[index] * F.cross_entropy(backbone.run_head(index, state), y)
    assert torch.allclose(loss, expected, atol=1e-10)

    grads = torch.autograd.grad(loss, list(backbone.parameters()))
    expected_grads = torch.autograd.grad(expected, list(backbone.parameters()))
    for got, want in zip(grads, expected_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-10)


@pytest.mark.parametrize(
    "arch, grad_rescale", [("msdnet", False), ("msdnet", True), ("ranet", False)]
)
def test_boosting_gives_earlier_heads_no_gradient_from_later_losses(arch, grad_rescale):
    net = BoostNet(make_backbone(arch=arch), [0.5] * N_EXITS, [1.0] * N_EXITS, grad_rescale)
    x, y = batch()
    logits = net(x)
    later = sum(F.cross_entropy(z, y) for z in logits[1:])  # every loss but exit 1's
    head_1 = list(net.backbone.heads[0].parameters())
    grads = torch.autograd.grad(later, head_1, allow_unused=True)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)

    # Without the stop-gradient the same ensemble would push head 1 from every later loss.
    heads = BoostNet(net.backbone, None, [1.0] * N_EXITS, grad_rescale)(x)
    undetached = heads[0]
    naive = 0.0
    for z in heads[1:]:
        undetached = 0.5 * undetached + z
        naive = naive + F.cross_entropy(undetached, y)
    grads = torch.autograd.grad(naive, head_1)
    assert all(torch.count_nonzero(g) > 0 for g in grads)


def _block_grads(net, x, y, grad_rescale, params_of):
    net.grad_rescale = grad_rescale
    net.zero_grad()
    net.total_loss(net.exit_losses(net(x), y)).backward()
    return [
        torch.cat([p.grad.flatten() for p in params_of(block)]) for block in net.backbone.blocks
    ]


def _ratio(rescaled, summed):
    return float(rescaled @ summed / (summed @ summed))


def test_gradient_rescaling_gives_each_block_the_mean_of_later_exits_gradients():
    """Single-scale MSDNet: every trunk path goes through the rescaled feature, so the ratio is
    exact: block n gets 1/(N-n+1) of sum_{k>=n} dL_k/dtheta (tolerance: float64 rounding)."""
    net = BoostNet(make_backbone(gr_factor=(1,)), [0.5] * N_EXITS, [1.0] * N_EXITS, True)
    x, y = batch(side=8)
    rescaled = _block_grads(net, x, y, True, lambda b: b.parameters())
    summed = _block_grads(net, x, y, False, lambda b: b.parameters())
    for n in range(1, N_EXITS + 1):
        assert _ratio(rescaled[n - 1], summed[n - 1]) == pytest.approx(
            1 / (N_EXITS - n + 1), rel=1e-9
        )
        assert torch.allclose(rescaled[n - 1], summed[n - 1] / (N_EXITS - n + 1), atol=1e-12)


def _coarsest_scale_params(block):
    """Parameters whose only way forward is the coarsest map (no finer scale reads it)."""
    for module in block:
        part = {Stem: "scales", MSDLayer: "units", Transition: "convs"}[type(module)]
        yield from getattr(module, part)[-1].parameters()


def test_gradient_rescaling_on_multi_scale_msdnet():
    """Three scales: only the coarsest map is rescaled (as in MSDNet), so its parameters get
    exactly the mean; finer maps reach later exits unscaled, so a whole block gets *about* the
    mean: nearer the mean than the sum, and never below it."""
    net = BoostNet(make_backbone(), [0.5] * N_EXITS, [1.0] * N_EXITS, True)
    x, y = batch()
    coarse_rescaled = _block_grads(net, x, y, True, _coarsest_scale_params)
    coarse_summed = _block_grads(net, x, y, False, _coarsest_scale_params)
    whole_rescaled = _block_grads(net, x, y, True, lambda b: b.parameters())
    whole_summed = _block_grads(net, x, y, False, lambda b: b.parameters())
    for n in range(1, N_EXITS + 1):
        mean = 1 / (N_EXITS - n + 1)
        assert _ratio(coarse_rescaled[n - 1], coarse_summed[n - 1]) == pytest.approx(mean, rel=1e-9)
        whole = _ratio(whole_rescaled[n - 1], whole_summed[n - 1])
        if n < N_EXITS:
            assert mean - 1e-9 <= whole and abs(whole - mean) < abs(whole - 1)
        else:  # the last block feeds only the last exit: nothing to average
            assert whole == pytest.approx(1.0, rel=1e-9)


def test_rescaling_never_changes_the_forward_values():
    net = BoostNet(make_backbone(), [0.5] * N_EXITS, [1.0] * N_EXITS, True)
    x, _ = batch()
    with_rescale = net(x)
    net.grad_rescale = False
    for a, b in zip(with_rescale, net(x), strict=True):
        assert torch.equal(a, b)
