"""Batched augmentation on uint8 image tensors.

Done on whole batches in the training process (CPU or GPU) instead of per-image PIL transforms in
loader workers: on a 2-core machine, worker processes compete with the training step itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def random_crop_flip(
    images: torch.Tensor, padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero-pad by `padding`, crop back to the original size at a random offset, flip half."""
    batch, channels, height, width = images.shape
    device = images.device
    padded = F.pad(images, (padding,) * 4)
    offset_y = torch.randint(0, 2 * padding + 1, (batch, 1), generator=generator).to(device)
    offset_x = torch.randint(0, 2 * padding + 1, (batch, 1), generator=generator).to(device)
    rows = offset_y + torch.arange(height, device=device)
    cols = offset_x + torch.arange(width, device=device)
    flip = torch.rand(batch, generator=generator).to(device) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    return padded[
        torch.arange(batch, device=device)[:, None, None, None],
        torch.arange(channels, device=device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def batch_augment(
    images: torch.Tensor, kind: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`train.augment` on a uint8 batch: crop-flip here; random-resized-crop happens per image
    in the loader processes (folder datasets), so it and `none` leave the batch as it is."""
    if kind == "crop-flip":
        return random_crop_flip(images, padding=4, generator=generator)
    return images


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32, scaled to [0, 1] and standardised per channel."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t
