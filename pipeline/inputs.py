"""Batches of uint8 images from either kind of split: slices of in-memory tensors, or image files
decoded by torch DataLoader processes (folder datasets).

Files are decoded with TorchCodec (libjpeg-turbo, libpng, libwebp, GIF; torchvision's own decoders
are deprecated since 0.29 in its favour), Pillow only for the formats it lacks (BMP, TIFF, ...),
and stay uint8 until the training process normalises them (on the GPU when
there is one): a quarter of the bytes of float32 crosses the loader's shared memory and the
host-to-device copy. Training crops follow the ImageNet reference recipe (RandomResizedCrop to
data.image_size, horizontal flip); evaluation resizes the shorter side to data.resize and
centre-crops data.image_size. An unreadable file travels to the consuming process as its path, so
the error there is one line naming it (or, with data.skip_bad, a count).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.augment import batch_augment
from pipeline.config import DataConfig
from pipeline.data import AnySplit, FileSplit
from pipeline.folders import DatasetError


class BadImage(DatasetError):
    """An image file that cannot be decoded; the message names it relative to data.root."""


Batch = tuple[torch.Tensor, torch.Tensor, list[str]]  # uint8 images, targets, unreadable files


def decode(path: Path, grey: bool = False) -> torch.Tensor:
    """uint8 [3, H, W] RGB ([1, H, W] when `grey`; an animation's first frame). TorchCodec
    first (faster than Pillow for JPEG), Pillow for the formats it does not know."""
    from torchcodec.decoders import decode_image

    try:
        image = decode_image(path.read_bytes(), mode="GRAY" if grey else "RGB")
    except (ValueError, RuntimeError):  # not a format it knows, or a damaged file: Pillow says
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        with Image.open(path) as opened:
            return pil_to_tensor(opened.convert("L" if grey else "RGB"))
    return image[0] if image.ndim == 4 else image


def transform(data: DataConfig, train: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """RandomResizedCrop + flip for training, resize + centre crop for evaluation. The built-in
    datasets' own images are already image_size square, so files given for them (`boostpipe
    predict`) are resized to image_size, not to the folder datasets' larger evaluation side."""
    from torchvision.transforms import v2

    size = data.spec.image_size
    if train:
        return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])
    resize = data.eval_resize if data.is_folder else size
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size)])


class ImageFiles(Dataset):
    """A FileSplit's images, decoded and cropped one by one in loader processes."""

    def __init__(
        self, split: FileSplit, root: Path, crop: Callable[[torch.Tensor], torch.Tensor], grey: bool
    ) -> None:
        self.files, self.targets, self.root, self.crop = split.files, split.targets, root, crop
        self.grey = grey

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str | None]:
        name = str(self.files[index])
        try:
            image = self.crop(decode(self.root / name, self.grey))
        except ImportError:  # a decoder missing from the install: no file is to blame
            raise
        except Exception as exc:  # any decoder's failure: the consumer decides (stop or skip)
            reason = " ".join(str(exc).split())[:120] or exc.__class__.__name__
            return None, int(self.targets[index]), f"{name} ({reason})"
        return image, int(self.targets[index]), None


def _collate(items: list[tuple[torch.Tensor | None, int, str | None]]) -> Batch:
    good = [(image, target) for image, target, bad in items if bad is None]
    bad = [bad for _, _, bad in items if bad is not None]
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), bad
    return (
        torch.stack([image for image, _ in good]),
        torch.tensor([target for _, target in good], dtype=torch.int64),
        bad,
    )


def file_loader(
    split: FileSplit,
    root: Path,
    data: DataConfig,
    batch_size: int,
    *,
    train: bool = False,
    workers: int = 0,
    sampler: Sampler | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over a FileSplit yielding `Batch`es (random crops when `train`)."""
    return DataLoader(
        ImageFiles(split, root, transform(data, train), grey=data.spec.channels == 1),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        persistent_workers=train and workers > 0,  # no re-spawn every epoch
        prefetch_factor=4 if workers > 0 else None,
    )


def eval_batches(
    split: AnySplit,
    data: DataConfig,
    batch_size: int,
    root: Path | None,
    workers: int = 0,
    augment: str = "none",
    seed: int = 0,
) -> Iterator[Batch]:
    """Every sample in order, as evaluation sees it: clean, or with the training augmentation
    `augment` (seeded; `calibrate.augment` asks for it)."""
    if isinstance(split, FileSplit):
        train = augment != "none"
        yield from file_loader(split, root, data, batch_size, train=train, workers=workers)
        return
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, len(split), batch_size):
        end = start + batch_size
        images = batch_augment(split.images[start:end], augment, generator)
        yield images, split.targets[start:end], []


def check_bad(bad: list[str], data: DataConfig) -> int:
    """Stop on the first unreadable file unless data.skip_bad; returns how many were skipped."""
    if bad and not data.skip_bad:
        raise BadImage(
            f"data.root: cannot decode {bad[0]}; fix or remove it, or set data.skip_bad: true"
        )
    return len(bad)


def default_loader_workers(cpus: float, override: int | None) -> int:
    """Decoding processes beside one training process: its CPUs minus the one it trains on."""
    return override if override is not None else max(1, int(cpus) - 1)
