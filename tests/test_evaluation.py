"""Real early exit on a real (untrained, seeded) BoostNet agrees with the simulated assignment."""

import copy

import torch
from conftest import compose

from pipeline.boosting import BoostNet
from pipeline.calibration import (
    ExitScores,
    accuracy,
    assign_exits,
    exit_distribution,
    fit_thresholds,
    topk_hits,
)
from pipeline.data import Split
from pipeline.evaluation import Source, collect_scores, early_exit, exit_costs, fold_batch_norm

DEVICE = torch.device("cpu")


def _problem():
    params = compose()
    torch.manual_seed(0)
    net = BoostNet.from_params(params).eval()
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8, generator=generator)
    split = Split(images, torch.randint(0, 10, (300,), generator=generator))
    return params, net, split


def test_early_exit_predicts_and_exits_as_the_thresholds_say():
    params, net, split = _problem()
    source = Source(split, params.data, batch_size=64)
    scores, skipped = collect_scores(net, source, DEVICE)
    assert scores.confidence.shape == (params.model.n_exits, 300) and skipped == 0
    thresholds = fit_thresholds(scores.confidence, exit_distribution(0.7, params.model.n_exits))
    expected_exits = assign_exits(scores.confidence, thresholds)
    assert len(expected_exits.unique()) > 1  # the thresholds really split the batch

    run = early_exit(net, source, thresholds.tolist(), DEVICE)
    agree = (run.exits == expected_exits).float().mean()
    assert agree > 0.98  # subsets may round differently right at a threshold
    same = run.exits == expected_exits
    expected_predictions = scores.prediction[expected_exits, torch.arange(300)]
    assert torch.equal(run.predictions[same], expected_predictions[same])
    assert torch.equal(run.targets, split.targets)
    assert run.seconds > 0


def test_topk_accuracy_counts_hits_per_exit():
    logits = torch.tensor([[[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]], [[1.0, 3.0, 2.0], [3.0, 2.0, 1.0]]])
    targets = torch.tensor([1, 2])
    assert accuracy(topk_hits(logits, targets, 1)) == [50.0, 50.0]
    assert accuracy(topk_hits(logits, targets, 2)) == [100.0, 50.0]
    scores = ExitScores.from_logits(logits, targets)
    assert scores.top1() == [50.0, 50.0] and scores.top5_accuracy() == [100.0, 100.0]


def test_folding_batch_norm_keeps_outputs_and_counted_flops():
    params, net, split = _problem()
    for module in net.modules():  # trained-looking statistics, so folding has work to do
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    x = split.images[:16].float() / 255
    with torch.no_grad():
        before = torch.stack(net(x))
        flops = exit_costs(net, params)
        folded = fold_batch_norm(copy.deepcopy(net))
        after = torch.stack(folded(x))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)
    assert exit_costs(folded, params) == flops
