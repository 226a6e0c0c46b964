"""The paper configurations follow the reference protocol: data, selection, precision, init."""

from __future__ import annotations

import pytest
import torch
from helpers import ROOT, compose, is_imagenet, slow_cases

from pipeline.config import load_params
from pipeline.data import Split, split_holdout
from pipeline.fitting import keeps, selection_score
from pipeline.flops import count_exit_costs
from pipeline.models import build_backbone

PAPER_CONFIGS = sorted((ROOT / "configs").glob("*-msdnet-*.yaml"))


@pytest.mark.parametrize("path", slow_cases(PAPER_CONFIGS, is_imagenet))
def test_paper_configs_follow_the_reference_protocol(path):
    params = load_params(path)
    assert params.train.amp is False
    assert params.model.init == "torch-default"
    assert params.train.select_metric == "last-exit"
    if "anytime" in path.stem:  # the whole training set, the last epoch (no test-set selection)
        assert (params.data.val_size, params.train.select) == (0, "last")
    else:  # a held-out split of the reference's size, selection on it
        assert params.data.val_size == (50_000 if params.data.dataset == "imagenet" else 5_000)
        assert params.train.select == "best"


@pytest.mark.parametrize("path", slow_cases(PAPER_CONFIGS, is_imagenet))
def test_paper_budgets_lie_between_the_first_and_last_exit_cost(path):
    params = load_params(path)
    size = params.data.spec.image_size
    flops = count_exit_costs(build_backbone(params), (params.in_channels, size, size)).flops
    assert params.calibrate.budgets
    assert all(flops[0] <= budget <= flops[-1] for budget in params.calibrate.budgets)


def test_selection_keeps_the_last_epoch_or_the_best_by_the_chosen_metric():
    mean_best = compose(**{"train.select_metric": "mean"}).train
    last_exit_best = compose(**{"train.select_metric": "last-exit"}).train
    last = compose(**{"train.select": "last"}).train
    val_top1 = [50.0, 60.0, 70.0]
    assert selection_score(mean_best, val_top1) == pytest.approx(60.0)
    assert selection_score(last_exit_best, val_top1) == pytest.approx(70.0)
    # an epoch worse on held-out data replaces the kept one only under `select: last`
    assert not keeps(mean_best, 55.0, kept_score=60.0)
    assert keeps(mean_best, 60.0, kept_score=60.0)
    assert keeps(last, 10.0, kept_score=60.0)
    assert keeps(last, selection_score(last, []), kept_score=60.0)  # no held-out split


def test_torch_default_init_leaves_pytorch_defaults_and_he_rescales_convs():
    def conv_std(init: str) -> float:
        torch.manual_seed(0)
        net = build_backbone(compose(**{"model.init": init}))
        stds = [m.weight.std().item() for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
        return sum(stds) / len(stds)

    assert conv_std("he") > 2.5 * conv_std("torch-default")
    net = build_backbone(compose(**{"model.init": "torch-default"}))
    biases = [m.bias for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert all(b.abs().sum() > 0 for b in biases)  # He init zeroes them; the default does not


def test_val_size_zero_trains_on_every_image():
    params = compose(**{"data.val_size": 0, "train.select": "last"})
    images = torch.zeros(20, 1, 28, 28, dtype=torch.uint8)
    train, val, test = split_holdout(
        Split(images, torch.arange(20)), Split(images[:5], torch.arange(5)), params.data, 0
    )
    assert (len(train), len(val), len(test)) == (20, 0, 5)
    assert sorted(train.targets.tolist()) == list(range(20))
