"""The BAR scaling rule and its ``a_t`` schedules (Li, Zhang, He, NeurIPS 2024).

Shared by :class:`sharpkit.optim.BAR` and the closed-form toy simulations in
:mod:`sharpkit.balance.toys`, so that both apply exactly one rule.

Algorithm 2 (oBAR, for OP problems ``f(x^T y)``), at step ``t`` with learning
rate ``eta_t``:

.. math::

    \\|x_t\\| \\ge \\|y_t\\|: \\; x \\leftarrow (1 - a_t \\eta_t) x,\\;
    y \\leftarrow (1 + a_t \\eta_t) y; \\quad \\text{otherwise the signs swap.}

Algorithm 3 (nBAR, for NOP problems ``f(x y^T)``, e.g. LoRA):

.. math::

    \\|g_x\\| \\ge \\|g_y\\|: \\; x \\leftarrow (1 + a_t \\eta_t) x,\\;
    y \\leftarrow (1 - a_t \\eta_t) y; \\quad \\text{otherwise the signs swap.}

Both are applied like decoupled weight decay, before the base optimizer's update.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = [
    "SCHEDULES",
    "VARIANTS",
    "bar_coefficient",
    "bar_signs",
    "check_schedule",
    "schedule_factor",
]

VARIANTS = ("nbar", "obar")
SCHEDULES = ("constant", "linear", "cosine")


def check_schedule(schedule: Any, total_steps: Any) -> tuple[str, int | None]:
    """Validate ``schedule`` and ``total_steps`` (required for linear/cosine)."""
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if total_steps is not None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int):
            raise TypeError(f"total_steps: expected an int, got {type(total_steps).__name__}")
        if total_steps <= 0:
            raise ValueError(f"total_steps: must be > 0, got {total_steps}")
    elif schedule != "constant":
        raise ValueError(
            f"total_steps: required for schedule={schedule!r} (a_t decays from mu0 to 0 "
            "over total_steps steps)"
        )
    return schedule, total_steps


def bar_coefficient(mu0: float, schedule: str, step: int, total_steps: int | None) -> float:
    """``a_t`` at 0-based ``step``.

    - constant: ``a_t = mu0``;
    - linear: ``a_t = mu0 (1 - t / T)``;
    - cosine: ``a_t = mu0 (1 + cos(pi t / T)) / 2``;

    with ``T = total_steps`` and ``t`` clipped to ``T`` (``a_t = 0`` from then on).

    Example:
        >>> [bar_coefficient(1.0, "linear", t, 4) for t in range(6)]
        [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
        >>> bar_coefficient(1.0, "cosine", 2, 4)
        0.5
    """
    schedule, total_steps = check_schedule(schedule, total_steps)
    return float(mu0) * schedule_factor(schedule, step, total_steps)


def schedule_factor(schedule: str, step: int, total_steps: int | None) -> float:
    """``a_t / mu0`` at 0-based ``step`` (arguments assumed valid: no checks, it is
    called on every optimizer step).

    Example:
        >>> schedule_factor("cosine", 1, 2)
        0.5
    """
    if schedule == "constant":
        return 1.0
    frac = min(step, total_steps) / total_steps  # type: ignore[operator]
    if schedule == "linear":
        return 1.0 - frac
    return 0.5 * (1.0 + math.cos(math.pi * frac))


def bar_signs(variant: str, first: Any, second: Any) -> Any:
    """The sign ``s`` of the update of ``x`` (``y`` gets ``-s``), elementwise over pairs.

    ``x <- (1 + s a_t eta_t) x``, ``y <- (1 - s a_t eta_t) y``. For nBAR ``first``
    and ``second`` are ``||g_x||`` and ``||g_y||`` and ``s = +1`` when
    ``||g_x|| >= ||g_y||``; for oBAR they are ``||x||`` and ``||y||`` and
    ``s = -1`` when ``||x|| >= ||y||``. Ties take the first branch, as in the
    paper's algorithms.

    Args:
        variant: ``"nbar"`` or ``"obar"``.
        first, second: tensors of the same shape (the signs come back as a
            tensor of their dtype), or sequences of floats (a list of floats comes
            back: what the optimizer uses once the norms are on the host).

    Example:
        >>> bar_signs("nbar", torch.tensor([2.0, 1.0]), torch.tensor([1.0, 2.0]))
        tensor([ 1., -1.])
        >>> bar_signs("obar", [2.0, 1.0], [1.0, 2.0])
        [-1.0, 1.0]
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    up = 1.0 if variant == "nbar" else -1.0  # the sign when first >= second
    if isinstance(first, torch.Tensor):
        ge = first >= second
        one = torch.full((), up, dtype=first.dtype, device=first.device)
        return torch.where(ge, one, -one)
    return [up if a >= b else -up for a, b in zip(first, second, strict=True)]
