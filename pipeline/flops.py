"""Per-exit cumulative cost, counted the way MSDNet and BoostNet count it in their papers.

One forward pass of a single zero image; each leaf module adds its multiply-accumulates:
conv = Cin*Cout*kh*kw*Hout*Wout/groups (bias ignored), ReLU = one per element, average/max pooling =
output elements * kernel area, adaptive average pooling = one per input element,
linear = weights + biases, batch-norm and reshapes = 0. Exit k costs blocks 1..k plus heads 1..k,
because BoostNet needs every earlier head's logits. A module with no rule raises, so a new layer
type can never be silently counted as free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.models import MultiExitBackbone

_FREE = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.Flatten, nn.Identity, nn.Dropout)


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def module_flops(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
    x = inputs[0]
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        per_output = module.in_channels * kh * kw // module.groups
        return per_output * output.numel()  # output.numel() = Cout * Hout * Wout for a batch of 1
    if isinstance(module, nn.ReLU):
        return output.numel()
    if isinstance(module, nn.AvgPool2d | nn.MaxPool2d):
        kh, kw = _pair(module.kernel_size)
        return output.numel() * kh * kw
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return x.numel()
    if isinstance(module, nn.Linear):
        rows = x.numel() // module.in_features
        bias = module.bias.numel() if module.bias is not None else 0
        return rows * (module.weight.numel() + bias)
    if isinstance(module, _FREE):
        return 0
    raise TypeError(f"no cost rule for layer type {type(module).__name__}")


@dataclass(frozen=True)
class ExitCosts:
    flops: list[int]  # cumulative multiply-accumulates to reach each exit
    params: list[int]  # cumulative parameters used by each exit

    def as_dict(self) -> dict[str, object]:
        return {"exits": len(self.flops), "flops": self.flops, "params": self.params}


def count_exit_costs(backbone: MultiExitBackbone, input_shape: tuple[int, int, int]) -> ExitCosts:
    """Cumulative FLOPs and parameters of every exit for one image of `input_shape` (C, H, W)."""
    total = 0

    def add(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        total += module_flops(module, inputs, output)

    leaves = [m for m in backbone.modules() if not any(m.children())]
    hooks = [m.register_forward_hook(add) for m in leaves]
    was_training = backbone.training
    flops, params, used = [], [], 0
    try:
        backbone.eval()
        with torch.no_grad():
            # On the net's own device: profile and calibrate count a net placed on evaluate.device.
            state = torch.zeros(1, *input_shape, device=next(backbone.parameters()).device)
            for index in range(backbone.n_exits):
                state = backbone.run_block(index, state)
                backbone.run_head(index, state)
                flops.append(total)
                for part in (backbone.blocks[index], backbone.heads[index]):
                    used += sum(p.numel() for p in part.parameters())
                params.append(used)
    finally:
        for hook in hooks:
            hook.remove()
        backbone.train(was_training)
    return ExitCosts(flops=flops, params=params)
