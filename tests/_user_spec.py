"""A user-style spec module for the ``sharpkit measure`` tests: they write it into
their temporary folder as ``user_spec.py`` and name its callables ``user_spec:NAME``."""

import torch
from torch import nn


def model():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g)


def endless():
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def dict_data():
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(16, 6, generator=g), "y": torch.randint(0, 3, (16,))}]


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def loss_factory():
    return loss_fn


def three(model, batch, extra):
    return 0.0


def accuracy(model, batch):
    x, y = batch
    return (model(x).argmax(-1) == y).float().mean()


def not_a_model():
    return 3


def summed():
    return nn.CrossEntropyLoss(reduction="sum")
