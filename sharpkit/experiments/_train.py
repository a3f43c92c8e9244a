"""One training step with any optimizer the experiments compare.

The SAM family differs in how a step is driven: torch optimizers step after a
``backward()``, two-pass SAM-type optimizers take a closure, and mSAM/delta-SAM
take the loss function and the batch (they must split it or see one loss per
example). :func:`train_step` hides that behind the batch-loss convention
``loss_fn(model, batch)`` of :mod:`sharpkit._batch`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sharpkit.optim import MSAM, DeltaSAM, SAMBase

__all__ = ["train_step"]


def train_step(
    opt: torch.optim.Optimizer,
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batch: Any,
) -> None:
    """One step of ``opt`` on ``batch``.

    ``loss_fn(model, batch)`` returns the mean loss, except for
    :class:`~sharpkit.optim.DeltaSAM`, which needs one loss per example.
    """
    if isinstance(opt, (MSAM, DeltaSAM)):
        opt.step(loss_fn, batch)
        return

    def closure() -> torch.Tensor:
        loss = loss_fn(model, batch)
        loss.backward()
        return loss

    if isinstance(opt, SAMBase):
        opt.step(closure)
    else:
        opt.zero_grad(set_to_none=True)
        closure()
        opt.step()
