import pytest
import torch
from helpers import compose

from pipeline import data
from pipeline.config import ConfigError
from pipeline.data import DatasetNotFound, Split, load_dataset, split_holdout


def test_missing_dataset_names_every_place_looked_in(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    params = compose(**{"data.root": str(tmp_path / "mine")})
    with pytest.raises(DatasetNotFound) as error:
        load_dataset(params.data, tmp_path / "downloads")  # no network here: download fails
    message = str(error.value)
    assert "\n" not in message
    for place in (tmp_path / "mine", tmp_path / "debian", tmp_path / "downloads"):
        assert str(place) in message


def _toy(n, offset=0):
    images = torch.arange(offset, offset + n, dtype=torch.int64).to(torch.uint8)
    return Split(images.view(n, 1, 1, 1).expand(n, 1, 2, 2).clone(), torch.arange(n) % 10)


def test_holdout_split_is_seeded_disjoint_and_shrinkable():
    params = compose(**{"data.val_size": 20, "data.train_subset": 50, "data.test_subset": 7})
    train, test = _toy(100), _toy(30, offset=100)
    fit, val, small_test = split_holdout(train, test, params.data, seed=3)
    assert (len(fit), len(val), len(small_test)) == (50, 20, 7)
    fit_ids = set(fit.images[:, 0, 0, 0].tolist())
    assert not fit_ids & set(val.images[:, 0, 0, 0].tolist())
    again = split_holdout(train, test, params.data, seed=3)[1]
    other = split_holdout(train, test, params.data, seed=4)[1]
    assert torch.equal(val.images, again.images) and not torch.equal(val.images, other.images)


def test_a_validation_split_that_swallows_the_training_set_is_refused():
    params = compose(**{"data.val_size": 100})
    with pytest.raises(ConfigError, match=r"data\.val_size"):
        split_holdout(_toy(100), _toy(10), params.data, seed=0)
