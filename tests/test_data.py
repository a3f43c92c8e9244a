"""Tests of sharpkit.data against scikit-learn's own arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits as sk_load_digits

from sharpkit.data import load_digits


def test_split_is_a_stratified_partition_of_the_scaled_digits() -> None:
    d = load_digits(seed=3, test_fraction=0.25)
    raw = sk_load_digits()
    assert d.num_features == 64 and d.num_classes == 10
    assert len(d.x_train) + len(d.x_test) == len(raw.data)
    assert float(d.x_train.max()) <= 1.0 and float(d.x_train.min()) >= 0.0
    # every (image, label) pair is one of scikit-learn's (scaled to [0, 1])
    rows = {(*tuple(r), t) for r, t in zip((raw.data / 16.0).tolist(), raw.target.tolist())}
    ours = [(*tuple(r), t) for r, t in zip(d.x_train.double().tolist(), d.y_train.tolist())]
    ours += [(*tuple(r), t) for r, t in zip(d.x_test.double().tolist(), d.y_test.tolist())]
    assert all(o in rows for o in ours)
    counts = np.bincount(d.y_test.numpy(), minlength=10)
    expected = np.round(0.25 * np.bincount(raw.target, minlength=10))
    assert np.array_equal(counts, expected)


def test_seed_decides_the_split() -> None:
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, c.x_train)


def test_label_noise_changes_exactly_the_masked_labels() -> None:
    d = load_digits(seed=0, label_noise=0.3)
    changed = d.y_train != d.clean_y_train
    assert torch.equal(changed, d.noisy_mask)
    assert abs(d.noisy_mask.float().mean().item() - 0.3) < 1 / len(d.y_train)


def test_class_subset_is_relabelled_in_order() -> None:
    d = load_digits(classes=(7, 3))
    raw = sk_load_digits()
    assert d.num_classes == 2
    n7, n3 = int((raw.target == 7).sum()), int((raw.target == 3).sum())
    y = torch.cat([d.y_train, d.y_test])
    assert int((y == 0).sum()) == n7 and int((y == 1).sum()) == n3


def test_loader_yields_all_training_examples() -> None:
    d = load_digits()
    loader = d.train_loader(100, generator=torch.Generator().manual_seed(0))
    assert sum(len(x) for x, _ in loader) == len(d.x_train)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"label_noise": -0.1}, "label_noise"),
        ({"label_noise": 1.0}, "label_noise"),
        ({"classes": (1,)}, "classes"),
        ({"classes": (1, 12)}, "classes"),
        ({"dtype": torch.long}, "dtype"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, name: str) -> None:
    with pytest.raises((ValueError, TypeError), match=name):
        load_digits(**kwargs)
