"""delta-SAM in the contract registry.

delta-SAM's loss returns one loss per example (``reduction='none'``) and its
``step(loss_fn, batch)`` returns the per-example losses at ``w``. The contract
suite compares against a plain base optimizer driven by the *same* ``loss_fn``
with an argument-free ``backward()``, which a vector loss cannot take. The
spec's loss therefore returns a :class:`PerExampleLoss`: per-example losses (a
plain tensor in every respect) whose argument-free ``backward()`` backpropagates
their mean, the reduction the batch loss stands for. delta-SAM itself never
relies on it (it always calls ``backward`` with explicit weights or on
``losses.mean()``); only the reference side of the contract uses it. The spec
also checks the returned per-example losses, elementwise, against the loss at ``w``.

``fail_call = 2``: the first ``loss_fn`` call is the clean pass at ``w``; the
second is at perturbed weights (the probe forwards in the probe modes, the
forward at ``w + e`` in exact mode). Probe forwards run functionally on
perturbed copies of the parameters, so the module itself is only ever evaluated
at ``w`` and at ``w + e`` (the zero-gradient contract test observes the module).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sharpkit.optim.delta_sam import DeltaSAM

from .registry import OptimizerSpec


class PerExampleLoss(torch.Tensor):
    """Per-example losses whose argument-free ``backward()`` backpropagates the mean."""

    def backward(self, gradient: Any = None, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if gradient is None and self.dim() == 1:
            torch.Tensor.backward(self.mean().as_subclass(torch.Tensor), *args, **kwargs)
            return
        torch.Tensor.backward(self, gradient, *args, **kwargs)


def per_example_ce(model: Any, batch: Any) -> torch.Tensor:
    x, y = batch
    out = nn.functional.cross_entropy(model(x), y, reduction="none")
    if isinstance(model, nn.Module):  # called on the module itself (not a functional view)
        return out.as_subclass(PerExampleLoss)
    return out


def delta_step(opt: Any, model: nn.Module, loss_fn: Any, batch: Any) -> Any:
    return opt.step(loss_fn, batch)


_BAD = [
    ({"rho": -0.1}, ValueError, "rho"),
    ({"rho": float("nan")}, ValueError, "rho"),
    ({"rho": "0.05"}, TypeError, "rho"),
    ({"mode": "cheap"}, ValueError, "mode"),
    ({"tau": 0.0}, ValueError, "tau"),
    ({"tau": -1.0}, ValueError, "tau"),
    ({"probes": 0}, ValueError, "probes"),
    ({"probes": 2.0}, TypeError, "probes"),
    ({"probe_radius": 0.0}, ValueError, "probe_radius"),
    ({"weighting": "softmax"}, TypeError, "weighting"),
    ({"weighting": lambda s: s.losses, "tau": 1.0}, ValueError, "tau"),
]


def _spec(name: str, mode: str) -> OptimizerSpec:
    return OptimizerSpec(
        name=name,
        factory=DeltaSAM,
        hyper={"rho": 0.05, "mode": mode, "probes": 3},
        neutral={"rho": 0.0, "mode": mode},
        bad=_BAD,
        step=delta_step,
        fail_call=2,
        loss_fn=per_example_ce,
    )


SPECS = [
    _spec("DeltaSAM-exact", "exact"),
    _spec("DeltaSAM-probe", "probe"),
    _spec("DeltaSAM-forward-only", "forward-only"),
]
