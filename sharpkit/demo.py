"""The built-in demo of ``sharpkit measure --demo``: a small MLP trained on digits.

Everything is local and seeded: scikit-learn's bundled 8x8 digits (no download), a
64-32-10 ReLU MLP, a few seconds of SGD with momentum on the CPU. The training
trajectory (one snapshot per epoch) is kept for the PCA landscape plot.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

__all__ = ["DemoRun", "demo_data", "demo_model", "train_demo"]


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")


def demo_model(hidden: int = 32, *, seed: int = 0) -> nn.Module:
    """The demo network: ``Linear(64, hidden) -> ReLU -> Linear(hidden, 10)``.

    Example:
        >>> sum(p.numel() for p in demo_model().parameters())
        2410
    """
    _check_int("hidden", hidden, 1)
    _check_int("seed", seed, 0)
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    with torch.no_grad():
        for p in model.parameters():
            bound = 1.0 / (p.shape[-1] ** 0.5) if p.dim() > 1 else 0.1
            p.uniform_(-bound, bound, generator=g)
    return model


def demo_data(seed: int = 0) -> Any:
    """The digits data: :func:`sharpkit.data.load_digits` (25% stratified test split)."""
    from sharpkit.data import load_digits

    return load_digits(seed=seed)


@dataclasses.dataclass
class DemoRun:
    """A trained demo model with its data and training trajectory.

    Attributes:
        model: the trained network (eval mode).
        train: ``(x_train, y_train)``.
        test: ``(x_test, y_test)``.
        trajectory: parameter snapshots (state dicts), one per epoch, last = final.
        test_accuracy: accuracy on the test split.
    """

    model: nn.Module
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    trajectory: list[dict[str, torch.Tensor]]
    test_accuracy: float


def train_demo(
    *, seed: int = 0, epochs: int = 30, batch_size: int = 64, lr: float = 0.1, hidden: int = 32
) -> DemoRun:
    """Train the demo MLP on digits with SGD (momentum 0.9), seeded; a few seconds on a CPU.

    Example:
        >>> run = train_demo(epochs=2)
        >>> len(run.trajectory), run.test_accuracy > 0.5
        (3, True)
    """
    _check_int("epochs", epochs, 0)
    _check_int("batch_size", batch_size, 1)
    _check_int("hidden", hidden, 1)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ValueError(f"lr: expected a finite positive number, got {lr!r}")
    data = demo_data(seed)
    x, y = data.x_train, data.y_train
    model = demo_model(hidden, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    trajectory = [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        trajectory.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    model.eval()
    with torch.no_grad():
        acc = float((model(data.x_test).argmax(-1) == data.y_test).float().mean())
    return DemoRun(model, (x, y), (data.x_test, data.y_test), trajectory, acc)
