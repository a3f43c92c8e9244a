"""SAM: Sharpness-Aware Minimization (Foret et al., 2021)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ._base import SAMBase, check_bool, check_nonneg_float, global_norm

__all__ = ["SAM"]


class SAM(SAMBase):
    r"""Sharpness-Aware Minimization around any ``torch.optim`` optimizer.

    SAM minimises :math:`\max_{\|e\| \le \rho} L_B(w + e)` with the first-order
    inner solution

    .. math::

        e = \rho \, \frac{T_w^2 \, g}{\| T_w \, g \|}, \qquad
        w \leftarrow \mathrm{base\_step}\big(w,\; \nabla L_B(w + e)\big),

    with :math:`g = \nabla L_B(w)` and one global 2-norm over all parameters.
    Plain SAM has :math:`T_w = 1`. ``adaptive=True`` is ASAM's scale-invariant
    form (Kwon et al., 2021; :class:`~sharpkit.optim.ASAM` sets its defaults):
    :math:`T_w = |w| + \xi` elementwise on weight tensors and :math:`T_w = 1` on
    biases, as in the authors' code. A *bias* here is any parameter with at most
    one dimension (the biases of linear and convolution layers, and also the
    scales and shifts of normalisation layers, which the authors' name-based rule
    counts as weights); ``adaptive_bias=True`` applies :math:`T_w` to every
    parameter (sharpkit's earlier form). ``xi`` defaults to 0.01, the authors'
    value: with ``xi = 0`` a weight that is exactly zero (LoRA's ``B`` factor at
    initialisation) has :math:`T_w = 0` and is never perturbed.

    A group's own ``rho`` scales its part of ``e``; the norm stays global. A zero
    or non-finite gradient norm gives ``e = 0`` (and a non-finite gradient skips
    the update, leaving weights, buffers and optimizer state unchanged, with a
    ``RuntimeWarning``).

    The constructor matches the most widely used PyTorch SAM
    (``SAM(params, base_optimizer, rho=0.05, adaptive=False, **kwargs)``), so code
    written for it runs after changing the import. One difference:
    ``step(closure)`` evaluates the closure at ``w`` itself, so no
    ``loss.backward()`` is needed before it.

    Args:
        params: parameters or parameter-group dicts (groups may set ``rho``,
            ``adaptive``, ``xi`` and ``adaptive_bias``).
        base_optimizer: optimizer class applied with the perturbed gradient,
            e.g. ``torch.optim.SGD``.
        rho: perturbation radius (>= 0). ``rho=0`` reproduces the base optimizer
            bit for bit. Typical values 0.05-0.1 (ASAM: 0.5-2).
        adaptive: scale the perturbation by :math:`T_w = |w| + \xi`.
        xi: the offset :math:`\xi \ge 0` of :math:`T_w` (only with ``adaptive``).
        adaptive_bias: with ``adaptive``, scale biases (parameters with at most one
            dimension) by :math:`T_w` too instead of :math:`T = 1`.
        model: optional module whose buffers (BatchNorm running statistics) are
            restored after the perturbed pass, so they come from the clean pass;
            needed for ``step(loss_fn=..., batch=...)``.
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ...).

    Returns:
        ``step(closure)`` returns what the closure's first call (at ``w``)
        returned; ``step(loss_fn=..., batch=...)`` the mean loss at ``w`` as a
        detached 0-d tensor.

    Example:
        >>> import torch
        >>> from sharpkit.optim import SAM
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
        >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, model=model)
        >>> def closure():
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> first = opt.step(closure).item()
        >>> later = [opt.step(loss_fn=torch.nn.MSELoss(), batch=(x, y)) for _ in range(20)]
        >>> later[-1].item() < first
        True

    References:
        Foret, Kleiner, Mobahi, Neyshabur. Sharpness-Aware Minimization for
        Efficiently Improving Generalization. ICLR 2021. arXiv:2010.01412.
        Kwon, Kim, Park, Choi. ASAM: Adaptive Sharpness-Aware Minimization for
        Scale-Invariant Learning of Deep Neural Networks. ICML 2021. arXiv:2102.11600.
    """

    _OWN_KEYS = ("rho", "adaptive", "xi", "adaptive_bias")

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Callable[..., Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        xi: float = 0.01,
        *,
        adaptive_bias: bool = False,
        model: nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        defaults = {
            "rho": check_nonneg_float("rho", rho),
            "adaptive": check_bool("adaptive", adaptive),
            "xi": check_nonneg_float("xi", xi),
            "adaptive_bias": check_bool("adaptive_bias", adaptive_bias),
        }
        super().__init__(params, base_optimizer, defaults, base_kwargs, model=model)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        if "xi" in group:
            group["xi"] = check_nonneg_float("xi", group["xi"])
        for key in ("adaptive", "adaptive_bias"):
            if key in group:
                group[key] = check_bool(key, group[key])

    def _ascent_direction(
        self, groups: list[tuple[dict[str, Any], list[torch.Tensor]]]
    ) -> tuple[list[Any], torch.Tensor]:
        # Adaptive groups return the pair (T_w, T_w g): e = alpha * T_w * (T_w g) is
        # applied in one fused pass (_apply_ascent). Temporaries live in reusable
        # scratch buffers: fresh parameter-sized tensors every step cost more than
        # the arithmetic on the CPU.
        directions: list[Any] = []
        scaled: list[torch.Tensor] = []  # T_w g, whose global norm normalises e
        for i, (group, ps) in enumerate(groups):
            grads = [p.grad for p in ps]
            if group["adaptive"] and ps:
                t = self._scratch(f"t{i}", ps)
                tg = self._scratch(f"tg{i}", ps)
                every = group["adaptive_bias"]
                for p, ti, gi, tgi in zip(ps, t, grads, tg):
                    if every or p.dim() > 1:
                        torch.abs(p, out=ti)
                        if group["xi"]:
                            ti.add_(group["xi"])
                    else:  # a bias: T = 1
                        ti.fill_(1.0)
                    torch.mul(ti, gi, out=tgi)
                scaled.extend(tg)
                directions.append((t, tg))
            else:
                scaled.extend(grads)
                directions.append(grads)
        return directions, global_norm(scaled)

    def _apply_ascent(self, params: list[torch.Tensor], direction: Any, alpha: float) -> None:
        if isinstance(direction, tuple):
            t, tg = direction
            torch._foreach_addcmul_(params, t, tg, value=alpha)
        else:
            torch._foreach_add_(params, direction, alpha=alpha)
