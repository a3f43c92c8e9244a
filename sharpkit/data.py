"""Built-in data: scikit-learn's bundled handwritten digits, as tensors.

Nothing is downloaded: the 1797 8x8 digit images ship inside scikit-learn
(``sklearn.datasets.load_digits``). Pixels (0..16) are scaled to ``[0, 1]``;
the split is stratified and seeded; optional label noise replaces a fraction of
the *training* labels by a different random class and records which ones.

Example:
    >>> from sharpkit.data import load_digits
    >>> d = load_digits(seed=0, label_noise=0.1)
    >>> d.x_train.shape[1], d.num_classes, round(d.noisy_mask.float().mean().item(), 2)
    (64, 10, 0.1)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DigitsData", "load_digits"]

#: the digits' pixel values lie in 0..16
_PIXEL_MAX = 16.0


@dataclass
class DigitsData:
    """A train/test split of the digits as tensors.

    Attributes:
        x_train, y_train: training inputs ``(n, 64)`` and (possibly noisy) labels ``(n,)``.
        x_test, y_test: test inputs and clean labels.
        noisy_mask: ``(n,)`` bool, True where a training label was corrupted.
        clean_y_train: the training labels before corruption.
        num_classes: number of classes (10, or ``len(classes)``).
        num_features: 64.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    noisy_mask: torch.Tensor
    clean_y_train: torch.Tensor
    num_classes: int
    num_features: int

    def train_loader(
        self, batch_size: int, shuffle: bool = True, generator: torch.Generator | None = None
    ) -> DataLoader:
        """A loader of ``(inputs, targets)`` training batches (seed it with ``generator``)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: need a positive integer, got {batch_size!r}")
        return DataLoader(
            TensorDataset(self.x_train, self.y_train),
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
        )


def load_digits(
    *,
    test_fraction: float = 0.25,
    seed: int = 0,
    label_noise: float = 0.0,
    classes: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> DigitsData:
    """scikit-learn's bundled digits, split and optionally label-corrupted.

    Args:
        test_fraction: fraction of each class held out for testing, in (0, 1).
        seed: seeds the stratified split and the label noise.
        label_noise: fraction of training labels replaced by a *different*
            uniformly random class, in [0, 1).
        classes: keep only these digit classes, relabelled ``0..len(classes)-1``
            in the given order (e.g. ``(0, 1, 2, 3, 4)`` for a pre-training task).
        dtype: floating dtype of the inputs.
        device: where the tensors live.

    Returns:
        A :class:`DigitsData`.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: must lie in (0, 1), got {test_fraction}")
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise: must lie in [0, 1), got {label_noise}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: need a floating torch.dtype, got {dtype!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    from sklearn.datasets import load_digits as _sk_load_digits

    raw = _sk_load_digits()
    x = raw.data.astype(np.float64) / _PIXEL_MAX
    y = raw.target.astype(np.int64)
    if classes is not None:
        classes = [int(c) for c in classes]
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise ValueError(f"classes: need at least two distinct digits, got {classes}")
        if any(c not in range(10) for c in classes):
            raise ValueError(f"classes: digits are 0..9, got {classes}")
        keep = np.isin(y, classes)
        remap = {c: i for i, c in enumerate(classes)}
        x, y = x[keep], np.array([remap[int(t)] for t in y[keep]], dtype=np.int64)
    num_classes = int(y.max()) + 1
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = max(1, round(test_fraction * len(idx)))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr = rng.permutation(np.concatenate(train_idx))
    te = np.sort(np.concatenate(test_idx))
    y_tr_clean = y[tr]
    y_tr = y_tr_clean.copy()
    noisy = np.zeros(len(tr), dtype=bool)
    n_noisy = round(label_noise * len(tr))
    if n_noisy:
        flip = rng.choice(len(tr), size=n_noisy, replace=False)
        shift = rng.integers(1, num_classes, size=n_noisy)  # never the true class
        y_tr[flip] = (y_tr[flip] + shift) % num_classes
        noisy[flip] = True

    def tensor(a: np.ndarray, dt: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(a, dtype=dt, device=device)

    return DigitsData(
        x_train=tensor(x[tr], dtype),
        y_train=tensor(y_tr, torch.long),
        x_test=tensor(x[te], dtype),
        y_test=tensor(y[te], torch.long),
        noisy_mask=tensor(noisy, torch.bool),
        clean_y_train=tensor(y_tr_clean, torch.long),
        num_classes=num_classes,
        num_features=x.shape[1],
    )
