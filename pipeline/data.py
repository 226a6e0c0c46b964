"""Find a dataset, load it with torchvision's loaders, and split off a held-out validation set.

Two kinds of split share one file (data/prepared.npz) and one interface (`load_split`, `subset`,
`len`, `targets`): the small built-in datasets are uint8 tensors kept in memory by the training
workers (Fashion-MNIST and CIFAR fit in a few hundred MB, and batched tensor augmentation then
needs no loader processes competing with training for the CPU); folder datasets (ImageNet layout)
are a manifest of file paths relative to data.root, decoded while training (pipeline/inputs.py).
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ConfigError, DataConfig
from pipeline.errors import DatasetNotFound
from pipeline.folders import listing_fingerprint, scan
from pipeline.io import load_arrays, save_arrays

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass
class Split:
    images: torch.Tensor  # uint8 [n, C, H, W]
    targets: torch.Tensor  # int64 [n]

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, index: torch.Tensor) -> Split:
        return Split(self.images[index], self.targets[index])


@dataclass
class FileSplit:
    """A folder dataset's split: image paths relative to data.root, decoded when read."""

    files: np.ndarray  # str [n]
    targets: torch.Tensor  # int64 [n]

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, index: torch.Tensor) -> FileSplit:
        return FileSplit(self.files[index.numpy()], self.targets[index])


AnySplit = Split | FileSplit


def save_splits(path: Path, splits: dict[str, AnySplit]) -> None:
    arrays = {}
    for name, split in splits.items():
        if isinstance(split, FileSplit):
            arrays[f"{name}_files"] = split.files.astype(str)
        else:
            arrays[f"{name}_images"] = split.images.numpy()
        arrays[f"{name}_targets"] = split.targets.numpy()
    save_arrays(path, arrays)


def load_split(path: Path, name: str) -> AnySplit:
    return split_from(load_arrays(path), name)


def split_from(arrays: dict[str, np.ndarray], name: str) -> AnySplit:
    """Split `name` of the arrays `save_splits` wrote: read from the file, or handed to a Ray
    worker through the object store (read-only there, so copied into the worker's memory)."""

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array if array.flags.writeable else array.copy())

    targets = tensor(arrays[f"{name}_targets"])
    if f"{name}_files" in arrays:
        return FileSplit(arrays[f"{name}_files"], targets)
    return Split(tensor(arrays[f"{name}_images"]), targets)


@dataclass(frozen=True)
class FolderDataset:
    """What prepare learns from a folder dataset's listing (no pixels read)."""

    train: FileSplit
    test: FileSplit
    root: Path
    classes: list[str]
    fingerprint: str


def list_folder_dataset(config: DataConfig) -> FolderDataset:
    """train/ and val/ (the test split) of data.root, listed and fingerprinted."""
    if config.root is None:
        raise DatasetNotFound(f"data.root: is required for {config.dataset} (the dataset folder)")
    root = Path(config.root).resolve()
    classes, listings = scan(root)
    train, test = (
        FileSplit(
            np.array(listings[name].files, dtype=str),
            torch.tensor(listings[name].labels, dtype=torch.int64),
        )
        for name in ("train", "val")
    )
    return FolderDataset(train, test, root, classes, listing_fingerprint(classes, listings))


def _fashion_mnist_dir(candidate: Path) -> Path | None:
    """`candidate` itself or torchvision's FashionMNIST/raw below it, if it holds the IDX files."""
    for folder in (candidate, candidate / "FashionMNIST" / "raw"):
        if all(
            (folder / name).exists() or (folder / f"{name}.gz").exists()
            for name in FASHION_MNIST_FILES
        ):
            return folder
    return None


def _load_fashion_mnist(folder: Path) -> tuple[Split, Split]:
    """torchvision's FashionMNIST reader over IDX files, gzipped (as Debian ships them) or not."""
    from torchvision.datasets import FashionMNIST

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for name in FASHION_MNIST_FILES:
            plain = folder / name
            if plain.exists():
                (raw / name).symlink_to(plain.resolve())
            else:
                with gzip.open(folder / f"{name}.gz") as src, open(raw / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        train = FashionMNIST(tmp, train=True, download=False)
        test = FashionMNIST(tmp, train=False, download=False)
        return (
            Split(train.data.unsqueeze(1).clone(), train.targets.clone()),
            Split(test.data.unsqueeze(1).clone(), test.targets.clone()),
        )


def _load_cifar(name: str, root: Path, download: bool) -> tuple[Split, Split]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    splits = []
    for train in (True, False):
        data = cls(str(root), train=train, download=download)
        images = torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous()
        splits.append(Split(images, torch.tensor(data.targets, dtype=torch.int64)))
    return splits[0], splits[1]


def load_dataset(config: DataConfig, download_dir: Path) -> tuple[Split, Split, str]:
    """(train, test, where it came from). Looks in data.root, then the usual places."""
    looked = []
    if config.dataset == "fashion-mnist":
        candidates = [(Path(config.root), "data.root")] if config.root else []
        candidates.append((DEBIAN_FASHION_MNIST, "Debian package dataset-fashion-mnist"))
        for candidate, label in candidates:
            folder = _fashion_mnist_dir(candidate)
            if folder is not None:
                return (*_load_fashion_mnist(folder), str(folder))
            looked.append(f"{candidate} ({label})")
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(download_dir), train=True, download=True)
            FashionMNIST(str(download_dir), train=False, download=True)
            folder = download_dir / "FashionMNIST" / "raw"
            return (*_load_fashion_mnist(folder), str(folder))
        except Exception as exc:  # any network or file error: report all three places
            looked.append(f"torchvision download into {download_dir} ({exc.__class__.__name__})")
    elif config.dataset in ("cifar10", "cifar100"):
        root = Path(config.root) if config.root else download_dir
        try:
            return (*_load_cifar(config.dataset, root, download=not config.root), str(root))
        except Exception as exc:
            how = "data.root" if config.root else "torchvision download"
            looked.append(f"{root} ({how}: {exc.__class__.__name__}: {exc})")
    else:
        raise ValueError(f"data.dataset: {config.dataset} is a folder dataset, not in-memory")
    raise DatasetNotFound(f"{config.dataset} not found; looked in: " + "; ".join(looked))


def fingerprint(*splits: Split) -> str:
    """Content hash of the images and labels, so runs can say exactly which data they saw."""
    digest = hashlib.sha256()
    for split in splits:
        digest.update(split.images.numpy().tobytes())
        digest.update(split.targets.numpy().tobytes())
    return digest.hexdigest()[:16]


def split_holdout(
    train: AnySplit, test: AnySplit, config: DataConfig, seed: int
) -> tuple[AnySplit, AnySplit, AnySplit]:
    """(train, validation, test): a seeded permutation of the training set; its last
    `val_size` images are never trained on; with 0 the validation split is
    empty and every image is trained on. Subsets shrink train and test."""
    if config.val_size >= len(train):
        raise ConfigError(
            f"data.val_size: {config.val_size} leaves no training images out of {len(train)}"
        )
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    cut = len(train) - config.val_size
    fit, held_out = order[:cut], order[cut:]
    if config.train_subset is not None:
        fit = fit[: config.train_subset]
    test_index = torch.arange(len(test))
    if config.test_subset is not None:
        test_index = test_index[: config.test_subset]
    return train.subset(fit), train.subset(held_out), test.subset(test_index)
