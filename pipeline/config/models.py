"""The model section: MSDNet or RANet (`model.arch`), each checked against the dataset."""

from __future__ import annotations

import itertools
import math
from typing import Annotated, Any, Literal

from pydantic import Field

from pipeline.config.base import (
    Count,
    KeyProblem,
    Section,
)
from pipeline.datasets import DatasetSpec


class MSDNetConfig(Section):
    """MSDNet hyper-parameters, named after Huang et al. (2018) in snake_case."""

    arch: Literal["msdnet"] = "msdnet"
    """The backbone; each architecture takes its own keys."""
    n_blocks: Count
    """Blocks, each followed by an exit."""
    base: Count
    """Layers in the first block."""
    step: Count
    """Layers per later block (even), or the increment per block (lin_grow)."""
    step_mode: Literal["even", "lin_grow"] = "even"
    """How block depth grows: even (the same for every later block) or lin_grow (linearly)."""
    n_channels: Count
    """Stem width at the finest scale (times gr_factor at the others)."""
    growth_rate: Count
    """Channels each layer adds at the finest scale (times gr_factor at the others)."""
    gr_factor: list[Count] = Field(min_length=1)
    """Width multiplier per scale, finest first; its length is the number of scales."""
    bn_factor: list[Count] = Field(min_length=1)
    """Bottleneck width multiplier per scale (as many as gr_factor)."""
    bottleneck: bool = True
    """1x1 bottleneck convolutions before the 3x3 ones."""
    prune: Literal["max", "min"] = "max"
    """How finer scales are dropped as depth grows (max: the paper's choice)."""
    reduction: Annotated[float, Field(strict=True, ge=0, le=1)] = 0.5
    """Channel compression of the transition layers."""
    in_channels: Count | None = None
    """Input channels; null: from the dataset (must match it when given)."""
    num_classes: Count | None = None
    """Classes; null: from the dataset (imagefolder: counted by prepare)."""
    head_channels: Count | None = None
    """Width of the exit heads; null: 128, or the input width with the ImageNet stem."""
    first_head_channels: Count | None = None
    """Width of exit 1's head only; null: head_channels. A narrow one makes a cheap, weak exit 1."""
    init: Literal["he", "torch-default"] = "he"
    """he: He (fan-out) convolutions, unit batch-norm, zero biases; torch-default: PyTorch's own
    layer defaults, which is what the reference implementation effectively runs (its init loop
    reaches no convolution)."""

    @property
    def n_exits(self) -> int:
        return self.n_blocks

    @property
    def n_scales(self) -> int:
        return len(self.gr_factor)

    def check_shapes(self, spec: DatasetSpec) -> None:
        """List lengths that must agree, and scales the dataset's images can support."""
        if len(self.bn_factor) != self.n_scales:
            raise KeyProblem(
                "model.bn_factor",
                f"has {len(self.bn_factor)} values but gr_factor has "
                f"{self.n_scales} (one per scale)",
            )
        check_coarsest(spec, self.n_scales, "model.gr_factor")


class RANetConfig(Section):
    """RANet hyper-parameters (Yang et al., 2020), named after the reference's flags in snake_case.

    One entry of `scale_list`, `gr_factor` and `bn_factor` per sub-network, coarsest first;
    `n_blocks` exits per sub-network.
    """

    arch: Literal["ranet"]
    """The backbone; each architecture takes its own keys."""
    n_blocks: Count
    """Exits per sub-network."""
    step: Count
    """Layers per dense block (even), or the increment per block (lin_grow)."""
    step_mode: Literal["even", "lin_grow"] = "even"
    """How dense-block depth grows: even or lin_grow (step * b for the b-th block)."""
    n_channels: Count
    """Base width (times gr_factor per sub-network)."""
    growth_rate: Count
    """Channels each layer adds (times gr_factor per sub-network)."""
    scale_list: list[Count] = Field(min_length=1)
    """Resolution of each sub-network, coarsest (1) first; starts at 1, rises by 0 or 1."""
    gr_factor: list[Count] = Field(min_length=1)
    """Width multiplier per sub-network."""
    bn_factor: list[Count] = Field(min_length=1)
    """Bottleneck width multiplier per sub-network."""
    compress_factor: Annotated[float, Field(strict=True, ge=0, lt=1)] = 0.25
    """Share of a fused layer's new features computed from the coarser sub-network."""
    bn_after: bool = True
    """Bottleneck as conv-BN-ReLU (true, what the reference builds) or BN-ReLU-conv."""
    reduction: Annotated[float, Field(strict=True, gt=0, le=1)] = 0.5
    """Channel compression of the transition layers."""
    in_channels: Count | None = None
    """Input channels; null: from the dataset (must match it when given)."""
    num_classes: Count | None = None
    """Classes; null: from the dataset (imagefolder: counted by prepare)."""
    head_channels: Count | None = None
    """Width of the exit heads; null: 128."""

    @property
    def n_exits(self) -> int:
        return self.n_blocks * len(self.scale_list)

    def check_shapes(self, spec: DatasetSpec) -> None:
        for key in ("gr_factor", "bn_factor"):
            if len(getattr(self, key)) != len(self.scale_list):
                raise KeyProblem(
                    f"model.{key}",
                    f"has {len(getattr(self, key))} values but scale_list has "
                    f"{len(self.scale_list)} (one per sub-network)",
                )
        scales = self.scale_list
        if scales[0] != 1 or any(b - a not in (0, 1) for a, b in itertools.pairwise(scales)):
            raise KeyProblem(
                "model.scale_list",
                f"is {scales}; it must start at 1 and rise by 0 or 1 per sub-network",
            )
        if 1 in scales[1:]:
            raise KeyProblem(
                "model.scale_list", "only the first sub-network may run at scale 1 (the coarsest)"
            )
        check_coarsest(spec, max(scales), "model.scale_list")


ModelConfig = Annotated[MSDNetConfig | RANetConfig, Field(discriminator="arch")]
ARCHS = ("msdnet", "ranet")


def default_arch(raw: Any) -> Any:
    """`arch` may be left out for MSDNet, as before RANet existed."""
    return {"arch": "msdnet", **raw} if isinstance(raw, dict) else raw


def check_coarsest(spec: DatasetSpec, n_scales: int, key: str) -> None:
    coarsest = coarsest_resolution(spec, n_scales)
    if not 5 <= coarsest <= 12:  # two stride-2 convs and a 2x2 pool must leave 1x1
        raise KeyProblem(
            key,
            f"{n_scales} scales take {spec.image_size}x{spec.image_size} inputs "
            f"to {coarsest}x{coarsest}; the exit heads need 5x5 to 12x12",
        )


def coarsest_resolution(spec: DatasetSpec, n_scales: int) -> int:
    size = spec.image_size
    if spec.stem == "imagenet":  # 7x7 stride-2 conv, then 3x3 stride-2 max-pool
        size = math.ceil(math.ceil(size / 2) / 2)
    for _ in range(n_scales - 1):
        size = math.ceil(size / 2)
    return size
