"""Multi-exit backbones, built from a validated `Params` by architecture name."""

from __future__ import annotations

from pipeline.config import Params
from pipeline.models.base import MultiExitBackbone
from pipeline.models.msdnet import MSDNet, MSDNetSpec
from pipeline.models.ranet import RANet, RANetSpec


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
        init=m.init,
    )


def ranet_spec(params: Params) -> RANetSpec:
    m = params.model
    return RANetSpec(
        n_blocks=m.n_blocks,
        step=m.step,
        step_mode=m.step_mode,
        n_channels=m.n_channels,
        growth_rate=m.growth_rate,
        scale_list=tuple(m.scale_list),
        gr_factor=tuple(m.gr_factor),
        bn_factor=tuple(m.bn_factor),
        compress_factor=m.compress_factor,
        bn_after=m.bn_after,
        reduction=m.reduction,
        in_channels=params.in_channels,
        num_classes=params.num_classes,
        stem=params.data.spec.stem,
        head_channels=m.head_channels,
    )


def build_backbone(params: Params) -> MultiExitBackbone:
    """A freshly initialised backbone for `params.model.arch`."""
    if params.model.arch == "msdnet":
        return MSDNet(msdnet_spec(params))
    if params.model.arch == "ranet":
        return RANet(ranet_spec(params))
    raise ValueError(f"model.arch: unknown architecture {params.model.arch!r}")


__all__ = [
    "MSDNet",
    "MSDNetSpec",
    "MultiExitBackbone",
    "RANet",
    "RANetSpec",
    "build_backbone",
    "msdnet_spec",
    "ranet_spec",
]
