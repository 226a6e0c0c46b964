"""Folder datasets: listing real image folders, the manifest prepare writes, and its errors."""

import shutil

import pytest
import torch
from helpers import compose, write_image_folder

from pipeline.config import ConfigError
from pipeline.data import FileSplit, list_folder_dataset, load_split, save_splits, split_holdout
from pipeline.folders import DatasetError


def _folder_params(root, **overrides):
    return compose(
        **{
            "data.dataset": "imagefolder",
            "data.root": str(root),
            "data.image_size": 32,
            "data.val_size": 6,
            **overrides,
        }
    )


def test_listing_keeps_images_of_every_format_and_ignores_other_files(tmp_path):
    root = write_image_folder(tmp_path / "ds")
    dataset = list_folder_dataset(_folder_params(root).data)
    assert dataset.classes == ["n00000000", "n00000001", "n00000002"]
    assert (len(dataset.train), len(dataset.test)) == (36, 12)
    files = dataset.train.files.tolist()
    assert "train/n00000000/train_0_0.png" in files and "train/n00000000/train_0_1.webp" in files
    assert not any(f.endswith(".txt") for f in files)
    assert dataset.train.targets.bincount().tolist() == [12, 12, 12]


def test_fingerprint_follows_names_and_sizes(tmp_path):
    root = write_image_folder(tmp_path / "ds")
    data = _folder_params(root).data
    first = list_folder_dataset(data).fingerprint
    assert list_folder_dataset(data).fingerprint == first
    with open(root / "val/n00000001/val_1_0.JPEG", "ab") as image:
        image.write(b"\0")
    assert list_folder_dataset(data).fingerprint != first


def test_manifest_round_trips_through_prepared_npz_and_holds_out_validation(tmp_path):
    root = write_image_folder(tmp_path / "ds")
    params = _folder_params(root)
    dataset = list_folder_dataset(params.data)
    train, val, test = split_holdout(dataset.train, dataset.test, params.data, seed=0)
    assert not set(train.files.tolist()) & set(val.files.tolist())
    save_splits(tmp_path / "prepared.npz", {"train": train, "val": val, "test": test})
    loaded = load_split(tmp_path / "prepared.npz", "val")
    assert isinstance(loaded, FileSplit)
    assert loaded.files.tolist() == val.files.tolist()
    assert torch.equal(loaded.targets, val.targets)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda r: shutil.rmtree(r / "val/n00000002"), r"val/ classes differ .*missing n00000002"),
        (lambda r: (r / "val/n00000009").mkdir(), r"val/ classes differ .*extra n00000009"),
        (lambda r: (r / "train/n00000009").mkdir(), r"missing n00000009"),
        (
            lambda r: [p.unlink() for p in (r / "train/n00000001").iterdir()],
            r"train/n00000001/ holds no images",
        ),
        (lambda r: shutil.rmtree(r / "val"), r"val/ is missing"),
    ],
)
def test_broken_layouts_fail_with_one_line_naming_the_folder(tmp_path, damage, expected):
    root = write_image_folder(tmp_path / "ds")
    damage(root)
    with pytest.raises(DatasetError, match=expected) as error:
        list_folder_dataset(_folder_params(root).data)
    assert "\n" not in str(error.value)


def test_folder_params_derive_size_stem_and_classes(tmp_path):
    small = _folder_params(tmp_path)
    assert (small.data.spec.image_size, small.data.spec.stem) == (32, "small")
    assert small.data.eval_resize == 37
    with pytest.raises(ConfigError, match=r"model.num_classes: .*prepare"):
        _ = small.num_classes
    assert small.with_dataset({"num_classes": 7}).num_classes == 7
    large = _folder_params(tmp_path, **{"data.image_size": 128})  # 3 scales: 32, 16, 8
    assert large.data.spec.stem == "imagenet" and large.data.eval_resize == 146
    with pytest.raises(ConfigError, match=r"model\.gr_factor: 3 scales take 256x256"):
        _folder_params(tmp_path, **{"data.image_size": 256})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data.dataset": "imagefolder", "data.root": "x"}, "data.image_size: is required"),
        ({"data.image_size": 32}, "data.image_size: applies to folder datasets"),
        ({"data.skip_bad": True}, "data.skip_bad: applies to folder datasets"),
        ({"train.augment": "random-resized-crop"}, "train.augment: random-resized-crop needs"),
        (
            {"data.dataset": "imagefolder", "data.image_size": 64, "data.resize": 60},
            "data.resize: is 60, below",
        ),
    ],
)
def test_folder_keys_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose(**overrides)


@pytest.mark.parametrize(("suffix", "options"), [(".JPEG", {"quality": 90}), (".png", {}),
                                                  (".webp", {"lossless": True}), (".gif", {}),
                                                  (".bmp", {})])  # fmt: skip
def test_decoded_pixels_equal_torchvisions_and_pillows(tmp_path, suffix, options):
    """TorchCodec gives the pixels torchvision's deprecated decoder gave (the same codecs, so
    models trained before the move see the same inputs); BMP, which it lacks, goes to Pillow;
    grey is read as one channel."""
    import warnings

    import numpy as np
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.functional import pil_to_tensor

    from pipeline.inputs import decode

    rng = np.random.default_rng(0)
    pixels = np.cumsum(rng.integers(0, 8, size=(37, 53, 3)), axis=1).clip(0, 255)
    path = tmp_path / f"image{suffix}"
    Image.fromarray(pixels.astype(np.uint8)).save(path, **options)
    ours = decode(path)
    with Image.open(path) as image:
        assert torch.equal(ours, pil_to_tensor(image.convert("RGB"))) or suffix == ".JPEG"
    if suffix != ".bmp":  # torchvision never read BMP either: Pillow did
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        with warnings.catch_warnings():  # its deprecation notice: the point of the move
            warnings.simplefilter("ignore")
            assert torch.equal(ours, decode_image(data, mode=ImageReadMode.RGB))
    assert ours.shape == (3, 37, 53) and ours.dtype == torch.uint8
    assert decode(path, grey=True).shape == (1, 37, 53)


def test_a_file_neither_decoder_reads_raises_for_the_loader_to_name(tmp_path):
    """A truncated JPEG (TorchCodec fails, then Pillow) and a file that is no image (Pillow
    does not know it) both raise; the loader turns that into one line naming the file."""
    from pipeline.inputs import decode

    (tmp_path / "truncated.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "text.png").write_text("not an image")
    for name in ("truncated.JPEG", "text.png"):
        with pytest.raises(OSError):
            decode(tmp_path / name)


def test_a_decoder_missing_from_the_install_is_not_an_unreadable_image(tmp_path, monkeypatch):
    """Without TorchCodec every file would fail to decode: that is the install's fault, and it
    must stop the run, not mark (or, with data.skip_bad, skip) every image as unreadable."""
    import sys

    import numpy as np
    from PIL import Image

    from pipeline.inputs import ImageFiles

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    split = FileSplit(np.array(["a.png"]), torch.tensor([0]))
    files = ImageFiles(split, tmp_path, lambda x: x, False)
    assert files[0][2] is None  # read as it is
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # as if not installed
    with pytest.raises(ImportError, match="torchcodec"):
        files[0]
