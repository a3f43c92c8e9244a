"""mSAM in the contract registry: both execution paths, and BatchNorm semantics.

mSAM is driven by ``opt.step(loss_fn=..., batch=...)`` only (it has to split the
batch), so every spec has ``closure_driven=False``. Neutral hyperparameters are ``rho = 0`` *and*
``micro_batches = 1``: with ``m > 1`` even ``rho = 0`` averages micro-batch
gradients, equal to the full-batch gradient only up to rounding (and, with
BatchNorm, not at all, since each micro-batch has its own batch statistics).

- ``MSAM-vectorised`` forces the ``vmap`` path on a LayerNorm MLP (vmap cannot
  update BatchNorm running statistics in place, so a BatchNorm model never takes
  that path). ``fail_call = 2``: the clean pass over all micro-batches is one
  (vmapped) ``loss_fn`` call, the perturbed pass the second.
- ``MSAM-sequential`` is the loop on the same model; ``fail_call = 2`` because
  each micro-batch's clean pass is followed by its perturbed pass.
- ``MSAM-sequential-BN`` checks that BatchNorm statistics come from the clean
  micro-batch forwards only (``clean_pass`` replays them). Its batch is one
  block of 8 examples repeated 4 times, so that each micro-batch has the batch
  statistics of the whole batch: the contract compares the returned loss with
  the full-batch loss, which mSAM's loss (the size-weighted mean of the
  micro-batch losses, each with its own BatchNorm statistics) equals only then.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sharpkit._batch import split_batch
from sharpkit.optim import MSAM

from .registry import OptimizerSpec, default_batch

M = 4


def layernorm_model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def tiled_batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = default_batch(dtype, n=8)
    return x.repeat(M, 1), y.repeat(M)


def micro_batch_clean_pass(model: nn.Module, loss_fn: Any, batch: Any) -> None:
    """The clean forwards mSAM performs: one per micro-batch, in order."""
    with torch.no_grad():
        for piece in split_batch(batch, M):
            loss_fn(model, piece)


_BAD = [
    ({"rho": -0.1}, ValueError, "rho"),
    ({"rho": float("nan")}, ValueError, "rho"),
    ({"rho": "0.05"}, TypeError, "rho"),
    ({"micro_batches": 0}, ValueError, "micro_batches"),
    ({"micro_batches": 2.0}, TypeError, "micro_batches"),
    ({"micro_batches": True}, TypeError, "micro_batches"),
    ({"path": "fast"}, ValueError, "path"),
]
_LATER = [("rho", -0.1, ValueError, "rho")]

SPECS = [
    OptimizerSpec(
        name="MSAM-vectorised",
        factory=MSAM,
        hyper={"rho": 0.05, "micro_batches": M, "path": "vectorised"},
        neutral={"rho": 0.0, "micro_batches": 1, "path": "vectorised"},
        bad=_BAD,
        closure_driven=False,
        bad_later=_LATER,
        fail_call=2,
        make_model=layernorm_model,
    ),
    OptimizerSpec(
        name="MSAM-sequential",
        factory=MSAM,
        hyper={"rho": 0.05, "micro_batches": M, "path": "sequential"},
        neutral={"rho": 0.0, "micro_batches": 1, "path": "sequential"},
        bad=_BAD,
        closure_driven=False,
        bad_later=_LATER,
        fail_call=2,
        make_model=layernorm_model,
    ),
    OptimizerSpec(
        name="MSAM-sequential-BN",
        factory=MSAM,
        hyper={"rho": 0.05, "micro_batches": M, "path": "sequential"},
        neutral={"rho": 0.0, "micro_batches": 1, "path": "sequential"},
        bad=_BAD,
        closure_driven=False,
        bad_later=_LATER,
        fail_call=2,
        make_batch=tiled_batch,
        clean_pass=micro_batch_clean_pass,
    ),
]
