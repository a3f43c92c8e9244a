"""Replaying the global random-number state (common random numbers).

A forward pass with dropout (or any other random operation) in training mode
draws from torch's global generators, so two evaluations of the same loss at
the same weights differ. Whatever compares evaluations then measures the
randomness: a finite difference ``(l(w + s z) - l(w)) / s`` is of order
``1 / s``, a Hessian-vector product is a different matrix each call, and a
sharpness ``L(w + e) - L(w)`` is mostly mask noise. Replaying one saved state
around every evaluation makes the loss a fixed function of the weights (one
realisation of the masks per batch shape), which is what such comparisons need.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

__all__ = ["RandomState"]


class RandomState:
    """The global random-number state at construction, to replay around evaluations.

    Covers the CPU generator and the generators of the CUDA devices that hold
    ``tensors`` (the model's parameters, say).

    Example:
        >>> rng = RandomState([])
        >>> with rng.replayed():
        ...     a = torch.rand(2)
        >>> with rng.replayed():
        ...     b = torch.rand(2)
        >>> torch.equal(a, b)
        True
    """

    def __init__(self, tensors: Iterable[torch.Tensor]) -> None:
        self.devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Inside the block: the saved state. After it: the state as it was before."""
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for d, state in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(state, d)
            yield
