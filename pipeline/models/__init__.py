"""Multi-exit backbones, built from a validated `Params` by architecture name."""

from __future__ import annotations

from pipeline.config import Params
from pipeline.models.base import MultiExitBackbone
from pipeline.models.msdnet import MSDNet, MSDNetSpec


def msdnet_spec(params: Params) -> MSDNetSpec:
    m = params.model
    return MSDNetSpec(
        n_blocks=m.n_blocks,
        base=m.base,
        step=m.step,
        step_mode=m.step_mode,
        n_channels=m.n_channels,
        growth_rate=m.growth_rate,
        gr_factor=tuple(m.gr_factor),
        bn_factor=tuple(m.bn_factor),
        bottleneck=m.bottleneck,
        prune=m.prune,
        reduction=m.reduction,
        in_channels=params.in_channels,
        num_classes=params.num_classes,
        stem=params.data.spec.stem,
        head_channels=m.head_channels,
        first_head_channels=m.first_head_channels,
    )


def build_backbone(params: Params) -> MultiExitBackbone:
    """A freshly initialised backbone for `params.model.arch` (RANet would register here too)."""
    if params.model.arch == "msdnet":
        return MSDNet(msdnet_spec(params))
    raise ValueError(f"model.arch: unknown architecture {params.model.arch!r}")


__all__ = ["MSDNet", "MSDNetSpec", "MultiExitBackbone", "build_backbone", "msdnet_spec"]
