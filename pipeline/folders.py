"""Folder datasets (ImageNet layout): list the image files of `root/train` and `root/val`.

Only names and sizes are read, never pixels, so listing takes seconds even for ImageNet's
1.28 M files; images are decoded later, by the training and evaluation loaders.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

# What Pillow or torchvision decode; anything else in a class folder (READMEs) is skipped.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
SPLIT_FOLDERS = ("train", "val")  # val is the test split, as in the paper


class DatasetError(ValueError):
    """A dataset folder or file that cannot be used; the message is one line naming it."""


@dataclass(frozen=True)
class FolderListing:
    """One split folder: files relative to the dataset root, their labels and byte sizes."""

    files: list[str]
    labels: list[int]
    sizes: list[int]


def _class_folders(folder: Path, shown: str) -> list[str]:
    if not folder.is_dir():
        raise DatasetError(f"data.root: {shown}/ is missing (expected {shown}/<class>/<images>)")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise DatasetError(f"data.root: {shown}/ has no class folders")
    return classes


def _list_split(root: Path, split: str, classes: list[str]) -> FolderListing:
    files, labels, sizes = [], [], []
    for label, name in enumerate(classes):
        images = sorted(
            (entry.name, entry.stat().st_size)
            for entry in os.scandir(root / split / name)
            if entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES
        )
        if not images:
            raise DatasetError(f"data.root: {split}/{name}/ holds no images")
        for file_name, size in images:
            files.append(f"{split}/{name}/{file_name}")
            labels.append(label)
            sizes.append(size)
    return FolderListing(files, labels, sizes)


def scan(root: Path) -> tuple[list[str], dict[str, FolderListing]]:
    """(class names, listing per split folder). Both splits must hold the same classes."""
    if not root.is_dir():
        raise DatasetError(f"data.root: {root} is not a folder")
    classes = _class_folders(root / "train", "train")
    other = _class_folders(root / "val", "val")
    if other != classes:
        missing, extra = sorted(set(classes) - set(other)), sorted(set(other) - set(classes))
        parts = [f"missing {', '.join(missing[:3])}" if missing else ""]
        parts.append(f"extra {', '.join(extra[:3])}" if extra else "")
        raise DatasetError(
            f"data.root: val/ classes differ from train/ ({'; '.join(p for p in parts if p)})"
        )
    return classes, {split: _list_split(root, split, classes) for split in SPLIT_FOLDERS}


def listing_fingerprint(classes: list[str], listings: dict[str, FolderListing]) -> str:
    """A hash of class names, file names, labels and sizes: changes when files are added,
    removed, relabelled or rewritten with a new size, without reading any pixels."""
    digest = hashlib.sha256("\n".join(classes).encode())
    for split in SPLIT_FOLDERS:
        listing = listings[split]
        for name, label, size in zip(listing.files, listing.labels, listing.sizes, strict=True):
            digest.update(f"{name}\0{label}\0{size}\n".encode())
    return digest.hexdigest()[:16]
