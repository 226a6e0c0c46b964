"""MSDNet: Multi-Scale Dense Networks (Huang et al., ICLR 2018), as BoostNet's experiments use it.

S scales run side by side, finest first. Each layer appends new feature maps at every active scale,
computed from the same scale and (strided) from the next finer one, DenseNet-style. As depth grows
the finest scales are pruned and transition layers halve the width. A classifier head reads the
coarsest scale after every block.

Layer counts and pruning are worked out up front by `plan_blocks` so the module code below only
builds what the plan says.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.models.base import BlockState, MultiExitBackbone, gather_rows, scale_gradient


@dataclass(frozen=True)
class MSDNetSpec:
    n_blocks: int
    base: int
    step: int
    step_mode: str  # "even" | "lin_grow"
    n_channels: int
    growth_rate: int
    gr_factor: tuple[int, ...]
    bn_factor: tuple[int, ...]
    bottleneck: bool
    prune: str  # "max" | "min"
    reduction: float
    in_channels: int
    num_classes: int
    stem: str  # "small" | "imagenet"
    head_channels: int | None = None  # None: 128 (small stem) or the head's input width (ImageNet)
    first_head_channels: int | None = None  # None: as head_channels
    init: str = "he"  # "he" | "torch-default" (see init_weights)

    @property
    def n_scales(self) -> int:
        return len(self.gr_factor)


@dataclass(frozen=True)
class LayerPlan:
    in_scales: int  # how many of the coarsest scales the layer reads
    out_scales: int  # ... and writes
    transition: bool  # followed by a 1x1 width-reducing transition


def block_lengths(spec: MSDNetSpec) -> list[int]:
    """Layers per block: `base` first, then `step` (even) or step*i+1 (lin_grow)."""
    grow = (lambda i: spec.step) if spec.step_mode == "even" else (lambda i: spec.step * i + 1)
    return [spec.base] + [grow(i) for i in range(1, spec.n_blocks)]


def plan_blocks(spec: MSDNetSpec) -> list[list[LayerPlan]]:
    """Scales in and out of every layer, and where transitions go, block by block."""
    lengths = block_lengths(spec)
    total, n_scales = sum(lengths), spec.n_scales
    interval = math.ceil(total / n_scales)
    plans, depth = [], 0
    for length in lengths:
        block = []
        for _ in range(length):
            depth += 1
            if spec.prune == "max":  # drop the finest scale every `interval` layers
                in_scales = n_scales - max(0, depth - 2) // interval
                out_scales = n_scales - (depth - 1) // interval
                transition = in_scales > out_scales and spec.reduction > 0
            else:  # "min": keep every scale until the last layers need fewer
                in_scales = min(n_scales, total - depth + 2)
                out_scales = min(n_scales, total - depth + 1)
                transition = spec.reduction > 0 and depth in (total // 3, 2 * total // 3)
            block.append(LayerPlan(in_scales, out_scales, transition))
        plans.append(block)
    return plans


def conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def dense_conv(c_in: int, c_out: int, stride: int, bottleneck_factor: int | None) -> nn.Sequential:
    """New features: an optional 1x1 bottleneck, then a 3x3 conv (stride 2 from a finer scale)."""
    layers = []
    if bottleneck_factor is not None:
        inner = min(c_in, bottleneck_factor * c_out)
        layers.append(conv_bn_relu(c_in, inner, 1, 1))
        c_in = inner
    layers.append(conv_bn_relu(c_in, c_out, 3, stride))
    return nn.Sequential(*layers)


class Stem(nn.Module):
    """Turns the image into the initial maps at every scale."""

    def __init__(self, spec: MSDNetSpec) -> None:
        super().__init__()
        widths = [spec.n_channels * g for g in spec.gr_factor]
        if spec.stem == "imagenet":
            first = nn.Sequential(
                *conv_bn_relu(spec.in_channels, widths[0], 7, 2), nn.MaxPool2d(3, 2, padding=1)
            )
        else:
            first = conv_bn_relu(spec.in_channels, widths[0], 3, 1)
        coarser = [conv_bn_relu(widths[s - 1], widths[s], 3, 2) for s in range(1, len(widths))]
        self.scales = nn.ModuleList([first, *coarser])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for conv in self.scales:
            x = conv(x)
            maps.append(x)
        return maps


class ScaleUnit(nn.Module):
    """One scale's output of a layer: [input at this scale, new from finer, new from same]."""

    def __init__(
        self,
        c_same: int,
        c_finer: int | None,
        c_new: int,
        bn_same: int | None,
        bn_finer: int | None,
    ) -> None:
        super().__init__()
        if c_finer is None:
            self.from_finer = None
            self.from_same = dense_conv(c_same, c_new, 1, bn_same)
        else:
            self.from_finer = dense_conv(c_finer, c_new // 2, 2, bn_finer)
            self.from_same = dense_conv(c_same, c_new // 2, 1, bn_same)

    def forward(self, same: torch.Tensor, finer: torch.Tensor | None) -> torch.Tensor:
        if self.from_finer is None:
            return torch.cat([same, self.from_same(same)], dim=1)
        return torch.cat([same, self.from_finer(finer), self.from_same(same)], dim=1)


class MSDLayer(nn.Module):
    def __init__(self, spec: MSDNetSpec, width: int, plan: LayerPlan) -> None:
        super().__init__()
        n_scales, first_in = spec.n_scales, spec.n_scales - plan.in_scales
        self.first_out = n_scales - plan.out_scales
        self.first_in = first_in
        bn = spec.bn_factor if spec.bottleneck else (None,) * n_scales
        units = []
        for s in range(self.first_out, n_scales):
            has_finer = s - 1 >= first_in
            units.append(
                ScaleUnit(
                    c_same=width * spec.gr_factor[s],
                    c_finer=width * spec.gr_factor[s - 1] if has_finer else None,
                    c_new=spec.growth_rate * spec.gr_factor[s],
                    bn_same=bn[s],
                    bn_finer=bn[s - 1] if has_finer else None,
                )
            )
        self.units = nn.ModuleList(units)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        by_scale = dict(enumerate(maps, start=self.first_in))
        return [
            unit(by_scale[s], by_scale.get(s - 1))
            for s, unit in enumerate(self.units, start=self.first_out)
        ]


class Transition(nn.Module):
    """1x1 conv-BN-ReLU per active scale that shrinks the width (DenseNet-BC compression)."""

    def __init__(self, spec: MSDNetSpec, width: int, new_width: int, out_scales: int) -> None:
        super().__init__()
        first = spec.n_scales - out_scales
        self.convs = nn.ModuleList(
            conv_bn_relu(width * g, new_width * g, 1, 1) for g in spec.gr_factor[first:]
        )

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(x) for conv, x in zip(self.convs, maps, strict=True)]


def build_head(c_in: int, num_classes: int, stem: str, head_channels: int | None) -> nn.Sequential:
    """Two stride-2 3x3 convs, 2x2 average pooling, linear; `head_channels` None: 128 wide, or
    as wide as the input with the ImageNet stem (the widths both reference backbones use)."""
    width = head_channels or (c_in if stem == "imagenet" else 128)
    return nn.Sequential(
        conv_bn_relu(c_in, width, 3, 2),
        conv_bn_relu(width, width, 3, 2),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )


class MSDNet(MultiExitBackbone):
    def __init__(self, spec: MSDNetSpec) -> None:
        super().__init__()
        self.spec = spec
        blocks, heads = [], []
        width = spec.n_channels
        for index, plans in enumerate(plan_blocks(spec)):
            layers: list[nn.Module] = [Stem(spec)] if index == 0 else []
            for plan in plans:
                layers.append(MSDLayer(spec, width, plan))
                width += spec.growth_rate
                if plan.transition:
                    new_width = math.floor(spec.reduction * width)
                    layers.append(Transition(spec, width, new_width, plan.out_scales))
                    width = new_width
            blocks.append(nn.Sequential(*layers))
            c_head = width * spec.gr_factor[-1]
            head_width = (index == 0 and spec.first_head_channels) or spec.head_channels
            heads.append(build_head(c_head, spec.num_classes, spec.stem, head_width))
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)
        if spec.init == "he":
            self.apply(init_weights)

    def run_head(self, index: int, state: BlockState) -> torch.Tensor:
        return self.heads[index](state[-1])

    def rescale_head_input(self, state: BlockState, factor: float) -> BlockState:
        return [*state[:-1], scale_gradient(state[-1], factor)]

    def select(self, state: BlockState, keep: torch.Tensor) -> BlockState:
        return [x[keep] for x in state]

    def gather(self, states: Sequence[BlockState], indices: Sequence[torch.Tensor]) -> BlockState:
        return [gather_rows(maps, indices) for maps in zip(*states, strict=True)]


def init_weights(module: nn.Module) -> None:
    """He (fan_out) init on convs, unit BN, zero linear biases: what MSDNet's published code
    intends. That code (and BoostNet's reference, which inherits it) applies it only to the direct
    children of each block and head, none of which is a conv or linear layer, so the published
    models effectively train from PyTorch's default init; `model.init: torch-default` runs that
    (conv weights about a quarter of He's scale)."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.zeros_(module.bias)
