"""One training step with any optimizer the experiments compare.

Every sharpkit optimizer built with ``model=`` takes ``step(loss_fn=...,
batch=...)`` (the batch-loss convention ``loss_fn(model, batch)`` of
:mod:`sharpkit._batch`); without a model, sharpkit optimizers and plain
``torch.optim`` ones alike take ``step(closure)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["train_step"]


def train_step(
    opt: torch.optim.Optimizer,
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batch: Any,
) -> None:
    """One step of ``opt`` on ``batch``.

    ``loss_fn(model, batch)`` returns the mean loss, or one loss per example for
    :class:`~sharpkit.optim.DeltaSAM` (which needs them).
    """
    if getattr(opt, "model", None) is not None:
        opt.step(loss_fn=loss_fn, batch=batch)
        return

    def closure() -> torch.Tensor:
        loss = loss_fn(model, batch)
        loss.backward()
        return loss

    opt.zero_grad(set_to_none=True)  # torch.optim's closure contract; sharpkit's zeroes too
    opt.step(closure)
