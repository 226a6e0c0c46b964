"""Folder-dataset input throughput (images/s) on this machine, on generated ImageNet-like JPEGs.

Figures, each the median of interleaved repeats over the same files:
  decode    one process: TorchCodec decode_image vs Pillow (open + convert RGB), per image
  loaders   training crops at --size (RandomResizedCrop + flip) with --workers loader processes:
            ours (pipeline/inputs.py: TorchCodec decode, uint8 out) vs the reference ImageNet
            recipe (torchvision ImageFolder + PIL transforms + ToTensor + Normalize), vs Ray Data
            (from_items + map_batches with our decode, iter_torch_batches)
  listing   prepare's scan + fingerprint of a tree of many small files, seconds per 100k files
  training  images/s of a shrunk ImageNet-stem MSDNet fed by our loader vs by in-memory uint8
            tensors of the same size (the difference is what the input costs)
Run: `python benchmarks/input_pipeline.py [--images 400] [--workers 2] [--repeats 3]`.
The JPEGs are written once to --folder (default /tmp/boostpipe-bench-images).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from pipeline.augment import normalise
from pipeline.boosting import BoostNet
from pipeline.config import parse_params
from pipeline.data import list_folder_dataset
from pipeline.inputs import decode, file_loader

CLASSES = 4


def write_images(root: Path, count: int) -> None:
    """JPEGs of ImageNet-like sizes (around 500x375, quality 90) with some texture."""
    from PIL import Image

    if (root / "val").exists() and len(list(root.glob("train/*/*.JPEG"))) == count:
        return
    rng = np.random.default_rng(0)
    for split, n in (("train", count), ("val", CLASSES)):
        for i in range(n):
            folder = root / split / f"n{i % CLASSES:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            width, height = int(rng.integers(400, 600)), int(rng.integers(300, 450))
            small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
            image.save(folder / f"{i}.JPEG", quality=90)


def params_for(root: Path, size: int, workers: int, model_from: Path | None = None):
    """params.yaml with a folder dataset and a shrunk ImageNet-stem MSDNet (4 scales), or the
    model of `model_from` (e.g. configs/imagenet-msdnet-anytime.yaml, for a GPU)."""
    import yaml

    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["data"].update(dataset="imagefolder", root=str(root), image_size=size, val_size=4)
    if model_from is None:
        raw["model"].update(
            n_blocks=2, n_channels=8, growth_rate=4, gr_factor=[1, 2, 4, 4], bn_factor=[1, 2, 4, 4]
        )
    else:
        raw["model"] = yaml.safe_load(model_from.read_text())["model"]
    raw["model"]["num_classes"] = CLASSES
    raw["train"].update(augment="random-resized-crop", loader_workers=workers)
    raw["boost"].update(temperature=0.5, loss_weights=1.0)
    return parse_params(raw, "benchmark")


def rate(batches: Iterable) -> float:
    """Images/s over one whole pass of `batches`, loader start-up included (the same for all)."""
    seen, start = 0, time.perf_counter()
    for batch in batches:
        seen += len(batch[1])
    return seen / (time.perf_counter() - start)


def reference_loader(root: Path, size: int, workers: int, batch_size: int):
    from torchvision import datasets, transforms

    recipe = transforms.Compose(
        [
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    dataset = datasets.ImageFolder(str(root / "train"), recipe)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers
    )


def ray_data_batches(root: Path, files: list[str], size: int, batch_size: int):
    import ray

    from pipeline.inputs import transform

    params = params_for(root, size, 0)
    crop = transform(params.data, train=True)

    def decode_batch(batch: dict) -> dict:
        images = [crop(decode(root / name)).numpy() for name in batch["file"]]
        return {"image": np.stack(images), "label": batch["label"]}

    dataset = ray.data.from_items([{"file": f, "label": i % CLASSES} for i, f in enumerate(files)])
    dataset = dataset.map_batches(decode_batch, batch_size=batch_size)
    for batch in dataset.iter_torch_batches(batch_size=batch_size):
        yield batch["image"], batch["label"]


def listing_seconds_per_100k(root: Path, count: int) -> float:
    """prepare's listing (names and sizes, no decoding) of `count` tiny files in 100 classes."""
    from pipeline.config import DataConfig

    if not (root / "val").exists():
        for split, n in (("train", count), ("val", 100)):
            for i in range(n):
                folder = root / split / f"n{i % 100:08d}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{i}.JPEG").write_bytes(b"x" * (i % 97))
    config = DataConfig(dataset="imagefolder", root=str(root), image_size=32)
    start = time.perf_counter()
    list_folder_dataset(config)
    return (time.perf_counter() - start) * 100_000 / (count + 100)


def decode_rates(root: Path, files: list[str]) -> tuple[float, float]:
    from PIL import Image

    def pil(path: Path) -> None:
        with Image.open(path) as image:
            np.asarray(image.convert("RGB"))

    rates = []
    for reader in (decode, pil):
        start = time.perf_counter()
        for name in files:
            reader(root / name)
        rates.append(len(files) / (time.perf_counter() - start))
    return rates[0], rates[1]


def training_rate(
    params, batches: Callable[[], Iterable], steps: int, device: torch.device
) -> float:
    """Images/s of training steps fed by `batches`; on CUDA channels-last with bf16 autocast,
    as training runs there."""
    torch.manual_seed(0)
    spec = params.data.spec
    cuda = device.type == "cuda"
    net = BoostNet.from_params(params).to(device).train()
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    optimiser = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    seen, start = 0, None
    for step, (images, targets, *_) in enumerate(batches()):
        if step == 1:  # after the first step (loader start-up, allocator warm-up)
            if cuda:
                torch.cuda.synchronize()
            start, seen = time.perf_counter(), 0
        images = images.to(device, non_blocking=True)
        if cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, torch.bfloat16, enabled=cuda):
            logits = net(normalise(images, spec.mean, spec.std))
            losses = net.exit_losses([z.float() for z in logits], targets.to(device))
        optimiser.zero_grad()
        net.total_loss(losses).backward()
        optimiser.step()
        seen += len(targets)
        if step >= steps:
            break
    if cuda:
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def in_memory(images: torch.Tensor, batch_size: int, steps: int) -> Iterable:
    """Random batches of already-decoded uint8 crops: training with no input cost."""
    labels = torch.randint(0, CLASSES, (len(images),))
    for _ in range(steps + 2):
        index = torch.randint(0, len(images), (batch_size,))
        yield images[index], labels[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/boostpipe-bench-images"))
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=6)
    parser.add_argument("--listing-files", type=int, default=50_000)
    parser.add_argument("--skip", nargs="*", default=[], help="listing decode loaders ray training")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="for training")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the trainer")
    parser.add_argument("--model-from", type=Path, help="a params file whose model to train")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    write_images(args.folder, args.images)
    params = params_for(args.folder, args.size, args.workers, args.model_from)
    listing = list_folder_dataset(params.data)
    train, files = listing.train, listing.train.files.tolist()
    print(
        f"{len(files)} JPEGs (~500x375) in {args.folder}; crops {args.size}x{args.size}; "
        f"{args.workers} loader process(es); medians of {args.repeats} interleaved repeats"
    )

    def ours() -> Iterable:
        return file_loader(
            train,
            args.folder,
            params.data,
            args.batch_size,
            train=True,
            workers=args.workers,
            pin_memory=device.type == "cuda",
        )

    figures: dict[str, list[float]] = {}
    if "ray" not in args.skip:
        from pipeline.rayenv import prepare_ray

        prepare_ray()  # before `import ray`
        import ray

        ray.init(num_cpus=args.workers, include_dashboard=False, configure_logging=False)
    for _ in range(args.repeats):
        if "listing" not in args.skip:
            tree = args.folder.with_name(args.folder.name + "-listing")
            figures.setdefault("listing (s per 100k files)", []).append(
                listing_seconds_per_100k(tree, args.listing_files)
            )
        if "decode" not in args.skip:
            codec, pil = decode_rates(args.folder, files[:100])
            figures.setdefault("decode TorchCodec (img/s, 1 process)", []).append(codec)
            figures.setdefault("decode Pillow (img/s, 1 process)", []).append(pil)
        if "loaders" not in args.skip:
            figures.setdefault("loader ours (img/s)", []).append(rate(ours()))
            reference = reference_loader(args.folder, args.size, args.workers, args.batch_size)
            figures.setdefault("loader reference ImageFolder+PIL (img/s)", []).append(
                rate(reference)
            )
        if "ray" not in args.skip:
            batches = ray_data_batches(args.folder, files, args.size, args.batch_size)
            figures.setdefault("loader Ray Data (img/s)", []).append(rate(batches))
        if "training" not in args.skip:
            shape = (args.batch_size * 4, 3, args.size, args.size)
            memory = torch.randint(0, 256, shape, dtype=torch.uint8)
            figures.setdefault("training streamed (img/s)", []).append(
                training_rate(params, ours, args.train_steps, device)
            )
            figures.setdefault("training in-memory (img/s)", []).append(
                training_rate(
                    params,
                    partial(in_memory, memory, args.batch_size, args.train_steps),
                    args.train_steps,
                    device,
                )
            )
    medians = {name: statistics.median(values) for name, values in figures.items()}
    for name, value in medians.items():
        print(f"{name:45s} {value:8.1f}   (runs: {' '.join(f'{v:.1f}' for v in figures[name])})")
    if "loader ours (img/s)" in medians:
        ratio = medians["loader ours (img/s)"] / medians["loader reference ImageFolder+PIL (img/s)"]
        print(f"ours / reference: {ratio:.2f}x")
    if "training streamed (img/s)" in medians:
        cost = 1 - medians["training streamed (img/s)"] / medians["training in-memory (img/s)"]
        print(f"input cost in training: {100 * cost:.1f}% of in-memory throughput")


if __name__ == "__main__":
    main()
