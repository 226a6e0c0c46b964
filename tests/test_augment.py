import torch
import torch.nn.functional as F

from pipeline.augment import normalise, random_crop_flip


def test_every_output_is_a_padded_crop_or_its_mirror_image():
    images = torch.randint(1, 256, (32, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(images, padding=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = F.pad(images, (2,) * 4)
    flips = 0
    for i in range(len(images)):
        windows = [padded[i, :, y : y + 8, x : x + 8] for y in range(5) for x in range(5)]
        plain = any(torch.equal(out[i], w) for w in windows)
        mirrored = any(torch.equal(out[i], w.flip(-1)) for w in windows)
        assert plain or mirrored
        flips += mirrored and not plain
    assert 0 < flips < len(images)  # both outcomes happen
    assert not torch.equal(out, images)


def test_same_generator_seed_gives_the_same_batch():
    images = torch.randint(0, 256, (4, 1, 6, 6), dtype=torch.uint8)
    a = random_crop_flip(images, 4, torch.Generator().manual_seed(3))
    b = random_crop_flip(images, 4, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_normalise_standardises_each_channel():
    images = torch.full((1, 2, 2, 2), 255, dtype=torch.uint8)
    out = normalise(images, mean=(0.5, 0.0), std=(0.5, 2.0))
    assert torch.allclose(out[0, 0], torch.ones(2, 2)) and torch.allclose(
        out[0, 1], 0.5 * torch.ones(2, 2)
    )
