"""RANet: Resolution Adaptive Networks (Yang et al., CVPR 2020, Sec. 3).

A stem turns the image into one feature map per sub-network ("flow"), the first flow at the lowest
resolution. Flows run one after another, coarse to fine. Each flow is a chain of dense blocks. A
finer flow's first blocks are *fused*: every layer also reads the matching layer of the coarser
flow's block (upsampled), and the block's output gets a 1x1-compressed copy of the coarser
block's output; some fused blocks halve the resolution, so every flow ends at the coarsest
resolution. Its remaining blocks are plain dense blocks, each followed by an exit. With
`n_blocks` exits per flow, flow f has n_blocks * (f + 1) blocks of which the first n_blocks * f are
fused, and the network has n_blocks * len(scale_list) exits, ordered flow by flow.

For BoostNet, "block" k of the `MultiExitBackbone` is everything computed between exit k-1 and
exit k, in the order the paper's code evaluates it, so per-exit costs match its counter and early
exit skips exactly the work of the flows a sample never reaches.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.base import BlockState, MultiExitBackbone, gather_rows
from pipeline.models.msdnet import build_head, conv_bn_relu, init_weights


@dataclass(frozen=True)
class RANetSpec:
    n_blocks: int  # exits per flow
    step: int
    step_mode: str  # "even" | "lin_grow"
    n_channels: int
    growth_rate: int
    scale_list: tuple[int, ...]  # per flow, coarse to fine: 1 is the lowest resolution
    gr_factor: tuple[int, ...]  # per flow: width and growth multipliers
    bn_factor: tuple[int, ...]  # per flow: bottleneck width multipliers
    compress_factor: float  # share of a fused layer's new features taken from the coarser flow
    bn_after: bool  # bottleneck convs as conv-BN-ReLU (true) or pre-activation BN-ReLU-conv
    reduction: float
    in_channels: int
    num_classes: int
    stem: str  # "small" | "imagenet"
    head_channels: int | None = None

    @property
    def n_flows(self) -> int:
        return len(self.scale_list)


@dataclass(frozen=True)
class BlockPlan:
    flow: int
    index: int  # position in the flow, from 0
    layers: int
    fused: bool  # reads the coarser flow's block `index`
    down: bool  # its last layer halves the resolution
    transition: bool
    exit: bool  # an exit follows it


def plan_flows(spec: RANetSpec) -> list[list[BlockPlan]]:
    """Every flow's blocks, with the reference's layer counts, down-sampling and transitions."""
    flows = []
    for flow, scale in enumerate(spec.scale_list):
        n_fused, n_total = spec.n_blocks * flow, spec.n_blocks * (flow + 1)
        # The fused blocks ending the last (scale - 1) sub-network spans halve the resolution.
        down = {spec.n_blocks * k for k in range(flow - scale + 2, flow + 1)}
        transitions = {math.floor(i * n_total / scale) for i in range(1, scale)}
        blocks = []
        for index in range(n_total):
            number = index + 1  # the reference counts blocks from 1
            blocks.append(
                BlockPlan(
                    flow=flow,
                    index=index,
                    layers=spec.step if spec.step_mode == "even" else spec.step * number,
                    fused=index < n_fused,
                    down=number in down and index < n_fused,
                    transition=number in transitions,
                    exit=index >= n_fused,
                )
            )
        flows.append(blocks)
    return flows


def bottleneck_conv(
    c_in: int, c_out: int, stride: int, bn_width: int, bn_after: bool
) -> nn.Sequential:
    """1x1 to min(c_in, bn_width * c_out) channels, then 3x3 (stride 2 when down-sampling)."""
    inner = min(c_in, bn_width * c_out)
    if bn_after:
        return nn.Sequential(conv_bn_relu(c_in, inner, 1, 1), conv_bn_relu(inner, c_out, 3, stride))
    return nn.Sequential(
        nn.BatchNorm2d(c_in),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_in, inner, 1, bias=False),
        nn.BatchNorm2d(inner),
        nn.ReLU(inplace=True),
        nn.Conv2d(inner, c_out, 3, stride, padding=1, bias=False),
    )


def resize(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Bilinear (corner-aligned) resampling, skipped when the size already matches."""
    if x.shape[-2:] == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int, bn_width: int, bn_after: bool) -> None:
        super().__init__()
        self.conv = bottleneck_conv(c_in, growth, 1, bn_width, bn_after)

    def forward(self, x: torch.Tensor, coarser: torch.Tensor | None = None) -> torch.Tensor:
        return torch.cat([x, self.conv(x)], dim=1)


class FusedLayer(nn.Module):
    """New features from this flow and from the coarser flow's matching layer, concatenated."""

    def __init__(
        self,
        c_in: int,
        c_coarser: int,
        growth: int,
        compress_factor: float,
        bn_widths: tuple[int, int],  # (this flow, coarser flow)
        bn_after: bool,
        down: bool,
    ) -> None:
        super().__init__()
        from_coarser = math.floor(growth * compress_factor)
        stride = 2 if down else 1
        self.same = bottleneck_conv(c_in, growth - from_coarser, stride, bn_widths[0], bn_after)
        self.coarser = bottleneck_conv(c_coarser, from_coarser, 1, bn_widths[1], bn_after)

    def forward(self, x: torch.Tensor, coarser: torch.Tensor | None = None) -> torch.Tensor:
        new = self.same(x)
        size = new.shape[-2:]
        return torch.cat([resize(x, size), resize(self.coarser(coarser), size), new], dim=1)


class FlowBlock(nn.Module):
    """A dense block; fused blocks also read every layer of the coarser flow's block."""

    def __init__(
        self, spec: RANetSpec, plan: BlockPlan, c_in: int, coarser_widths: list[int] | None
    ) -> None:
        super().__init__()
        growth = spec.growth_rate * spec.gr_factor[plan.flow]
        bn_width = spec.bn_factor[plan.flow]
        layers: list[nn.Module] = []
        for i in range(plan.layers):
            width = c_in + i * growth
            if coarser_widths is None:
                layers.append(DenseLayer(width, growth, bn_width, spec.bn_after))
            else:
                layers.append(
                    FusedLayer(
                        width,
                        coarser_widths[i],
                        growth,
                        spec.compress_factor,
                        (bn_width, spec.bn_factor[plan.flow - 1]),
                        spec.bn_after,
                        down=plan.down and i == plan.layers - 1,
                    )
                )
        self.layers = nn.ModuleList(layers)
        self.widths = [c_in + i * growth for i in range(plan.layers + 1)]  # what it hands on
        width = self.widths[-1]
        self.merge = None
        if coarser_widths is not None:
            merged = math.floor(width * spec.compress_factor)
            self.merge = conv_bn_relu(coarser_widths[-1], merged, 1, 1)
            width += merged
        self.transition = None
        if plan.transition:
            reduced = math.floor(spec.reduction * width)
            self.transition = conv_bn_relu(width, reduced, 1, 1)
            width = reduced
        self.out_width = width

    def forward(
        self, x: torch.Tensor, coarser: list[torch.Tensor] | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The block's output and its input plus every layer's output (what a finer flow reads)."""
        features = [x]
        for i, layer in enumerate(self.layers):
            x = layer(x, None if coarser is None else coarser[i])
            features.append(x)
        if self.merge is not None:
            x = torch.cat([x, resize(self.merge(coarser[-1]), x.shape[-2:])], dim=1)
        if self.transition is not None:
            x = self.transition(x)
        return x, features


class Stem(nn.Module):
    """One map per flow, computed finest first; a new scale halves the resolution."""

    def __init__(self, spec: RANetSpec) -> None:
        super().__init__()
        widths = [spec.n_channels * g for g in reversed(spec.gr_factor)]
        scales = list(reversed(spec.scale_list))
        if spec.stem == "imagenet":
            first = nn.Sequential(
                nn.Conv2d(spec.in_channels, widths[0], 7, 2, padding=3),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, padding=1),
            )
        else:
            first = conv_bn_relu(spec.in_channels, widths[0], 3, 1)
        convs = [first]
        for i in range(1, len(widths)):
            stride = 1 if scales[i] == scales[i - 1] else 2
            convs.append(conv_bn_relu(widths[i - 1], widths[i], 3, stride))
        self.convs = nn.ModuleList(convs)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for conv in self.convs:
            x = conv(x)
            maps.append(x)
        return maps[::-1]  # coarsest (flow 0) first


@dataclass
class RANetState:
    """What the blocks between two exits hand on: everything later flows will still read."""

    stem_maps: list[torch.Tensor | None]  # per flow, None once the flow has started
    x: torch.Tensor | None = None  # the running flow's output so far
    coarser: list[list[torch.Tensor]] = field(default_factory=list)  # previous flow, per block
    current: list[list[torch.Tensor]] = field(default_factory=list)  # running flow, per block

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> RANetState:
        return RANetState.zip_map([self], lambda tensors: fn(tensors[0]))

    @staticmethod
    def zip_map(
        states: Sequence[RANetState], fn: Callable[[list[torch.Tensor]], torch.Tensor]
    ) -> RANetState:
        """A state whose every tensor is `fn` of the matching tensors of `states` (which share
        one layout: the same exit of the same network)."""
        first = states[0]

        Nested = list[list[torch.Tensor]]

        def nested(get: Callable[[RANetState], Nested]) -> Nested:
            return [
                [fn([get(s)[b][i] for s in states]) for i in range(len(block))]
                for b, block in enumerate(get(first))
            ]

        return RANetState(
            stem_maps=[
                None if m is None else fn([s.stem_maps[i] for s in states])
                for i, m in enumerate(first.stem_maps)
            ],
            x=None if first.x is None else fn([s.x for s in states]),
            coarser=nested(lambda s: s.coarser),
            current=nested(lambda s: s.current),
        )


class Stage(nn.Module):
    """The blocks between one exit and the next (after the stem, for the first)."""

    def __init__(
        self, stem: Stem | None, blocks: list[FlowBlock], plans: list[BlockPlan], n_flows: int
    ) -> None:
        super().__init__()
        self.stem = stem
        self.flow_blocks = nn.ModuleList(blocks)
        self.plans = plans
        self.n_flows = n_flows

    def forward(self, state: torch.Tensor | RANetState) -> RANetState:
        if self.stem is not None:
            state = RANetState(stem_maps=list(self.stem(state)))
        state = dataclasses.replace(
            state, stem_maps=list(state.stem_maps), current=list(state.current)
        )
        for plan, block in zip(self.plans, self.flow_blocks, strict=True):
            if plan.index == 0:  # a new flow starts from its stem map and reads the last one
                state.x, state.stem_maps[plan.flow] = state.stem_maps[plan.flow], None
                state.coarser, state.current = state.current, []
            state.x, features = block(state.x, state.coarser[plan.index] if plan.fused else None)
            if plan.flow + 1 < self.n_flows:  # only a finer flow reads the features
                state.current.append(features)
            if not plan.fused and state.coarser:  # the coarser flow is no longer read
                state.coarser = []
        return state


class RANet(MultiExitBackbone):
    def __init__(self, spec: RANetSpec) -> None:
        super().__init__()
        self.spec = spec
        stages: list[Stage] = []
        heads: list[nn.Module] = []
        pending_blocks: list[FlowBlock] = []
        pending_plans: list[BlockPlan] = []
        coarser_widths: list[list[int]] = []
        for flow, plans in enumerate(plan_flows(spec)):
            width = spec.n_channels * spec.gr_factor[flow]
            widths = []
            for plan in plans:
                block = FlowBlock(
                    spec, plan, width, coarser_widths[plan.index] if plan.fused else None
                )
                widths.append(block.widths)
                width = block.out_width
                pending_blocks.append(block)
                pending_plans.append(plan)
                if plan.exit:
                    stem = Stem(spec) if not stages else None
                    stages.append(Stage(stem, pending_blocks, pending_plans, spec.n_flows))
                    heads.append(build_head(width, spec.num_classes, spec.stem, spec.head_channels))
                    pending_blocks, pending_plans = [], []
            coarser_widths = widths
        self.blocks = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        for stage in stages:  # the reference leaves the stem at PyTorch's default initialisation
            stage.flow_blocks.apply(init_weights)
        self.heads.apply(init_weights)

    def run_head(self, index: int, state: BlockState) -> torch.Tensor:
        return self.heads[index](state.x)

    def rescale_head_input(self, state: BlockState, factor: float) -> BlockState:
        raise NotImplementedError(
            "gradient rescaling is not defined for RANet (set boost.grad_rescale: false)"
        )

    def select(self, state: BlockState, keep: torch.Tensor) -> BlockState:
        return state.map(lambda t: t[keep])

    def gather(self, states: Sequence[BlockState], indices: Sequence[torch.Tensor]) -> BlockState:
        return RANetState.zip_map(states, lambda tensors: gather_rows(tensors, indices))
