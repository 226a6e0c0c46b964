"""The interface every multi-exit backbone offers to BoostNet, cost counting and early exit."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
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


def gather_rows(tensors: Sequence[torch.Tensor], indices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rows `indices[i]` of `tensors[i]`, one part after another, in a new tensor with the first's
    memory format. `index_select` writes each part straight into its slice of the output (a
    batch slice of a channels-last tensor is still channels-last): one copy, where indexing and
    then concatenating copies every row twice."""
    first = tensors[0]
    channels_last = first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    shape = (sum(len(index) for index in indices), *first.shape[1:])
    out = torch.empty(shape, dtype=first.dtype, device=first.device, memory_format=layout)
    start = 0
    for tensor, index in zip(tensors, indices, strict=True):
        torch.index_select(tensor, 0, index, out=out[start : start + len(index)])
        start += len(index)
    return out


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

    @abstractmethod
    def gather(self, states: Sequence[BlockState], indices: Sequence[torch.Tensor]) -> BlockState:
        """One state holding samples `indices[i]` of `states[i]`, one part after another."""
