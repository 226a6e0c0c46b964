"""BoostNet: exits as an additive ensemble trained like gradient boosting.

Yu, Li, Hua, Huang, Shi, "Boosted Dynamic Neural Networks", AAAI 2023 (arXiv 2211.16726), Sec. 3:

    F_0 = 0,  F_n = t_n * F_{n-1} + f_n                (f_n: head n's own logits)
    L   = sum_n w_n * CE(f_n + stop_grad(t_n * F_{n-1}), y)

Every exit is trained and evaluated on its ensemble F_n; head n only learns the residual on top of
the frozen earlier ensemble. With `temperatures=None` the same code is the conventional
joint-training baseline: each exit predicts with f_n alone and L = sum_n w_n * CE(f_n, y).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Params
from pipeline.models import MultiExitBackbone, build_backbone
from pipeline.models.base import BlockState, gather_rows


class BoostNet(nn.Module):
    def __init__(
        self,
        backbone: MultiExitBackbone,
        temperatures: Sequence[float] | None,
        loss_weights: Sequence[float],
        grad_rescale: bool,
    ) -> None:
        super().__init__()
        n = backbone.n_exits
        if temperatures is not None and len(temperatures) != n:
            raise ValueError(f"need {n} temperatures, got {len(temperatures)}")
        if len(loss_weights) != n:
            raise ValueError(f"need {n} loss weights, got {len(loss_weights)}")
        self.backbone = backbone
        self.temperatures = None if temperatures is None else [float(t) for t in temperatures]
        self.grad_rescale = grad_rescale
        self.register_buffer("loss_weights", torch.tensor(loss_weights, dtype=torch.float32))

    @classmethod
    def from_params(cls, params: Params) -> BoostNet:
        n = params.model.n_exits
        boost = params.boost
        return cls(
            build_backbone(params),
            temperatures=boost.temperatures(n) if boost.enabled else None,
            loss_weights=boost.weights(n),
            grad_rescale=boost.grad_rescale,
        )

    @property
    def n_exits(self) -> int:
        return self.backbone.n_exits

    @property
    def boosting(self) -> bool:
        return self.temperatures is not None

    def start(self, x: torch.Tensor) -> ExitRunner:
        """Incremental inference: run the exits one at a time on a batch that may shrink."""
        return ExitRunner(self, x)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits: F_n for BoostNet (earlier ensemble detached), f_n for the baseline.

        The values are what each exit predicts at test time, and their gradients are exactly the
        boosted (or joint) training loss's, so training and evaluation share this one path.
        """
        runner = self.start(x)
        return [runner.step() for _ in range(self.n_exits)]

    def exit_losses(self, logits: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """Per-sample cross-entropy of every exit, shape [n_exits, batch]."""
        return torch.stack([F.cross_entropy(z, targets, reduction="none") for z in logits])

    def total_loss(self, exit_losses: torch.Tensor) -> torch.Tensor:
        """sum_n w_n * mean-over-batch loss of exit n."""
        return (self.loss_weights * exit_losses.mean(dim=1)).sum()


class ExitRunner:
    """Runs a BoostNet block by block; `keep` drops exited samples so later blocks compute less.

    Gradient rescaling (IMTA's gradient equilibrium, as BoostNet trains): with exit i counted from
    0, the feature head i reads gets its gradient scaled by 1/(N-i) and, as it continues into
    block i+1, by (N-i-1). The trunk of block n then receives the mean, not the sum, of the
    gradients of exits n..N.
    """

    def __init__(
        self,
        net: BoostNet,
        state: BlockState,
        ensemble: torch.Tensor | None = None,
        next_exit: int = 0,
    ) -> None:
        self.net = net
        self.state = state  # the image batch before block 0, then what the last block left
        self.ensemble = ensemble
        self.next_exit = next_exit

    def step(self) -> torch.Tensor:
        """Run the next block and its head; return that exit's logits for the remaining batch."""
        backbone, index = self.net.backbone, self.next_exit
        n = backbone.n_exits
        if index >= n:
            raise IndexError(f"all {n} exits have already run")
        rescale = self.net.grad_rescale and torch.is_grad_enabled()
        state = backbone.run_block(index, self.state)
        if rescale:
            state = backbone.rescale_head_input(state, 1.0 / (n - index))
        head = backbone.run_head(index, state)
        if rescale:
            state = backbone.rescale_head_input(state, float(n - index - 1))
        self.state = state
        self.next_exit += 1
        temperatures = self.net.temperatures
        if temperatures is None or self.ensemble is None:
            self.ensemble = head
        else:
            self.ensemble = head + temperatures[index] * self.ensemble.detach()
        return self.ensemble

    def keep(self, mask: torch.Tensor) -> None:
        """Continue with only the samples where `mask` is true. The mask becomes indices once:
        indexing every tensor of the state by a boolean mask would repeat the nonzero search per
        tensor, and indices keep the channels-last layout."""
        index = mask.nonzero().squeeze(1)
        self.state = self.net.backbone.select(self.state, index)
        if self.ensemble is not None:
            self.ensemble = self.ensemble[index]

    @staticmethod
    def gather(parts: Sequence[tuple[ExitRunner, torch.Tensor]]) -> ExitRunner:
        """One runner for the samples `parts` name (a runner, indices into its batch), one part
        after another. All runners have run the same blocks, at least one."""
        runners, indices = [r for r, _ in parts], [i for _, i in parts]
        first = runners[0]
        if any(r.next_exit != first.next_exit for r in runners):
            raise ValueError("runners at different exits cannot be gathered")
        state = first.net.backbone.gather([r.state for r in runners], indices)
        ensemble = None
        if first.ensemble is not None:
            ensemble = gather_rows([r.ensemble for r in runners], indices)
        return ExitRunner(first.net, state, ensemble, first.next_exit)


def batch_effective_samples(exit_losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's Fig. 3 diagnostic for one batch: v = 10th percentile of exit 1's per-sample
    losses; per exit, the fraction of samples whose loss exceeds v, and the batch-mean loss."""
    threshold = torch.quantile(exit_losses[0].detach().float(), 0.1)
    losses = exit_losses.detach()
    return (losses > threshold).float().mean(dim=1), losses.mean(dim=1)
