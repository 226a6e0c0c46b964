"""What the pipeline needs to know about each supported dataset before loading any data.

The model's stem, input size and class count follow from the dataset, so a params file names the
dataset once and everything else is derived from this table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetSpec:
    image_size: int  # side of the (square) network input
    channels: int
    num_classes: int | None  # None: counted from the class folders by prepare (imagefolder)
    stem: str  # "small": 3x3 conv, 128-wide heads; "imagenet": 7x7/2 conv + max-pool, wide heads
    mean: tuple[float, ...]
    std: tuple[float, ...]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(28, 1, 10, "small", (0.2860,), (0.3530,)),
    "cifar10": DatasetSpec(32, 3, 10, "small", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetSpec(
        32, 3, 100, "small", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    ),
    "imagenet": DatasetSpec(224, 3, 1000, "imagenet", IMAGENET_MEAN, IMAGENET_STD),
}
FOLDER_DATASETS = ("imagenet", "imagefolder")  # files listed by prepare, decoded while training
# A 3x3 stem keeps small inputs (CIFAR-sized) at full resolution; above this side the ImageNet
# stem's stride-4 reduction keeps MSDNet's coarsest scale within what its exit heads expect.
SMALL_STEM_MAX_SIZE = 64


def folder_spec(image_size: int, num_classes: int | None) -> DatasetSpec:
    """Users' own RGB images: ImageNet statistics, stem chosen by input size."""
    stem = "small" if image_size <= SMALL_STEM_MAX_SIZE else "imagenet"
    return DatasetSpec(image_size, 3, num_classes, stem, IMAGENET_MEAN, IMAGENET_STD)
