"""The interface every multi-exit backbone offers to BoostNet, cost counting and early exit."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

# What flows from one block to the next; backbone-specific (MSDNet: a list of per-scale maps).
BlockState = Any


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by `factor` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Gradient rescaling of IMTA (Li et al., ICCV 2019), used by BoostNet's training."""
    return _ScaleGradient.apply(x, factor)


class MultiExitBackbone(nn.Module, ABC):
    """N blocks with a classifier head after each; block i+1 continues from block i's state.

    Subclasses fill `blocks` and `heads` (one module each per exit) so that cost counting can
    attribute parameters to exits, and say what a head reads and how a batch is subset.
    """

    blocks: nn.ModuleList
    heads: nn.ModuleList

    @property
    def n_exits(self) -> int:
        return len(self.blocks)

    def run_block(self, index: int, state: BlockState) -> BlockState:
        """Block `index`; block 0 takes the image batch."""
        return self.blocks[index](state)

    @abstractmethod
    def run_head(self, index: int, state: BlockState) -> torch.Tensor:
        """Logits of exit `index` from the state after block `index`."""

    @abstractmethod
    def rescale_head_input(self, state: BlockState, factor: float) -> BlockState:
        """The same state with the gradient into what the heads read multiplied by `factor`."""

    @abstractmethod
    def select(self, state: BlockState, keep: torch.Tensor) -> BlockState:
        """The state of the samples `keep` names (indices into the batch, in order)."""
