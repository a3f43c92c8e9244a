"""ASAM: Adaptive Sharpness-Aware Minimization (Kwon et al., 2021)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn
from torch.optim import Optimizer

from .sam import SAM

__all__ = ["ASAM"]


class ASAM(SAM):
    r"""Adaptive SAM: a scale-invariant perturbation.

    With :math:`T_w = |w| + \xi` elementwise,

    .. math::

        e = \rho \, \frac{T_w^2 \, g}{\| T_w \, g \|}, \qquad
        w \leftarrow \mathrm{base\_step}\big(w,\; \nabla L_B(w + e)\big).

    Rescaling a weight by a constant rescales its part of ``e`` with it, so the
    sharpness probed is invariant to the reparametrisations that leave a ReLU
    network's function unchanged (up to :math:`\xi`). As in the authors' code,
    :math:`T_w` applies to weight tensors only and biases are perturbed with
    :math:`T = 1`; a bias is any parameter with at most one dimension (which
    includes the scales and shifts of normalisation layers). ``adaptive_bias=True``
    applies :math:`T_w` to every parameter. This is :class:`SAM` with
    ``adaptive=True`` and ASAM's defaults (``rho=0.5``, ``xi=0.01``); typical
    radii are 0.5-2.

    Args:
        params: parameters or parameter-group dicts (groups may set ``rho``,
            ``xi`` and ``adaptive``).
        base_optimizer: optimizer class, e.g. ``torch.optim.SGD``.
        rho: perturbation radius (>= 0).
        xi: offset of :math:`T_w` (>= 0); keeps zero weights perturbable.
        adaptive_bias: scale biases by :math:`T_w` too (default: :math:`T = 1`).
        model: optional module whose buffers are restored after the perturbed pass.
        **base_kwargs: passed to ``base_optimizer``.

    Returns:
        As :class:`SAM`: ``step`` returns the loss at ``w``.

    Example:
        >>> import torch
        >>> from sharpkit.optim import ASAM
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = ASAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
        >>> g = opt.param_groups[0]
        >>> g["adaptive"], g["xi"], g["adaptive_bias"]
        (True, 0.01, False)

    References:
        Kwon, Kim, Park, Choi. ASAM: Adaptive Sharpness-Aware Minimization for
        Scale-Invariant Learning of Deep Neural Networks. ICML 2021. arXiv:2102.11600.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Callable[..., Optimizer],
        rho: float = 0.5,
        xi: float = 0.01,
        *,
        adaptive_bias: bool = False,
        model: nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            base_optimizer,
            rho=rho,
            adaptive=True,
            xi=xi,
            adaptive_bias=adaptive_bias,
            model=model,
            **base_kwargs,
        )
