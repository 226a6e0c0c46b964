"""Small networks, built straight from a spec or from the default params, and image folders of
real files, for the unit tests that need a model or a dataset but no pipeline run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from helpers.project import compose
from pipeline.boosting import BoostNet
from pipeline.config import Params
from pipeline.data import Split
from pipeline.models import MSDNet, MSDNetSpec, RANet, RANetSpec


def grey_msdnet(**overrides: Any) -> MSDNet:
    """A small MSDNet for grey images, built directly from a spec (no dataset rules)."""
    spec = dict(
        n_blocks=4,
        base=2,
        step=2,
        step_mode="even",
        n_channels=8,
        growth_rate=4,
        gr_factor=(1, 2, 4),
        bn_factor=(1, 2, 4),
        bottleneck=True,
        prune="max",
        reduction=0.5,
        in_channels=1,
        num_classes=10,
        stem="small",
    )
    return MSDNet(MSDNetSpec(**{**spec, **overrides}))


def grey_ranet(**overrides: Any) -> RANet:
    """A small RANet for grey 28x28 images with 4 exits (one per sub-network), from a spec."""
    spec = dict(
        n_blocks=1,
        step=2,
        step_mode="even",
        n_channels=4,
        growth_rate=4,
        scale_list=(1, 2, 3, 3),
        gr_factor=(4, 2, 1, 1),
        bn_factor=(4, 2, 1, 1),
        compress_factor=0.25,
        bn_after=True,
        reduction=0.5,
        in_channels=1,
        num_classes=10,
        stem="small",
    )
    return RANet(RANetSpec(**{**spec, **overrides}))


def write_image_folder(
    root: Path, classes: int = 3, per_class: int = 12, val_per_class: int = 4, seed: int = 0
) -> Path:
    """A small ImageNet-layout dataset of real JPEGs of varying sizes (root/{train,val}/<wnid>/),
    each class a different mean colour so a model can learn something; one PNG and one WebP per
    split, and a non-image file that must be ignored."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True)
            for i in range(count):
                height, width = (int(v) for v in rng.integers(40, 120, size=2))
                base = np.zeros(3)
                base[label % 3] = 200
                pixels = base + rng.normal(0, 40, size=(height, width, 3))
                image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
                suffix = {0: ".png", 1: ".webp"}.get(i, ".JPEG") if label == 0 else ".JPEG"
                image.save(folder / f"{split}_{label}_{i}{suffix}")
        (root / split / "n00000000" / "notes.txt").write_text("not an image\n")
    return root


def untrained_boostnet(n_images: int = 300, **overrides: Any) -> tuple[Params, BoostNet, Split]:
    """The default params (with dotted `overrides`), a seeded untrained BoostNet in eval mode, and
    random grey images with random labels: real tensors for inference paths whose results need
    no trained model."""
    params = compose(**overrides)
    torch.manual_seed(0)
    net = BoostNet.from_params(params).eval()
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n_images, 1, 28, 28), dtype=torch.uint8, generator=generator)
    return params, net, Split(images, torch.randint(0, 10, (n_images,), generator=generator))
