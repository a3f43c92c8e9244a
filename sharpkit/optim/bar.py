"""BAR: balancedness-aware regularisation (Li, Zhang, He, NeurIPS 2024)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ..balance.pairs import FactorPair, find_pairs, pairs_from
from ..balance.rules import VARIANTS, bar_coefficient, check_schedule, schedule_factor
from ._base import BufferSnapshot, WrappedOptimizer, check_nonneg_float

__all__ = ["BAR"]

Closure = Callable[[], Any]
_ON_MISSING = ("raise", "warn")


class BAR(WrappedOptimizer):
    r"""Balancedness-aware regularisation around any ``torch.optim`` optimizer.

    SAM drives the balancedness :math:`B = (\|x\|^2 - \|y\|^2)/2` of every
    scale-invariant factor pair towards zero (Li, Zhang, He, NeurIPS 2024,
    Theorems 2 and 3). BAR makes that implicit regulariser explicit, at the cost of
    *one* forward/backward pass: at step :math:`t`, for every pair and before the
    base optimizer's update (like decoupled weight decay),

    - **nBAR** (Algorithm 3, NOP problems :math:`f(xy^\top)`, e.g. LoRA with
      :math:`x = B`, :math:`y = A`): if :math:`\|g_x\| \ge \|g_y\|`,

      .. math:: x \leftarrow (1 + a_t\eta_t)\,x, \qquad y \leftarrow (1 - a_t\eta_t)\,y,

      otherwise the signs swap. It follows SAM's NOP drift
      :math:`\dot B = \rho(\|g_x\|^2 - \|g_y\|^2)/\sqrt{\|g_x\|^2 + \|g_y\|^2}`.
    - **oBAR** (Algorithm 2, OP problems :math:`f(x^\top y)`): if
      :math:`\|x\| \ge \|y\|`,

      .. math:: x \leftarrow (1 - a_t\eta_t)\,x, \qquad y \leftarrow (1 + a_t\eta_t)\,y,

      otherwise the signs swap; it follows SAM's OP drift
      :math:`\dot B \propto -B`.

    Then the base optimizer steps with the gradient computed at the unscaled
    weights. :math:`\eta_t` is the current ``lr`` of the factor's parameter group
    (so LR schedulers act on it) and :math:`a_t` decays from ``mu0``:
    constant :math:`a_t = \mu_0`, linear :math:`\mu_0(1 - t/T)`, cosine
    :math:`\mu_0(1 + \cos(\pi t/T))/2` with :math:`T` = ``total_steps``
    (:func:`sharpkit.balance.rules.bar_coefficient`). Ties take the first branch,
    as in the paper. The step counter :math:`t` is saved in ``state_dict()``.

    Two cases the paper does not spell out, decided here: a pair whose factors
    have no gradient this step (``.grad is None``) is left alone, as torch
    optimizers leave such parameters alone; and a pair whose gradient is exactly
    zero is left alone too, because the SAM drift BAR stands in for is
    proportional to the gradient and vanishes there (so a step with zero
    gradient moves nothing). Factors in parameter groups with different ``lr`` or
    ``mu0`` each use their own group's values.

    Pairs come from ``pairs`` (a list of :class:`~sharpkit.balance.FactorPair` or
    ``(x, y)`` tuples, every factor among ``params``) or, without it, from
    :func:`sharpkit.balance.find_pairs` on ``model`` (sharpkit's
    :class:`~sharpkit.balance.LoRALinear` and PEFT LoRA layers; discovered pairs
    whose factors are not among ``params`` are ignored). With no pair,
    ``on_missing="raise"`` raises ``ValueError`` and ``"warn"`` warns and
    degrades to the base optimizer.

    Cost: per step one fused ``_foreach_norm`` over the gradients (which also
    serves the finiteness check), one host synchronisation, and one fused
    ``_foreach_mul_`` over the factors; ``mu0 = 0`` skips the scaling and
    reproduces the base optimizer bit for bit. A non-finite gradient skips the
    whole step with a ``RuntimeWarning`` (weights and optimizer state untouched;
    with ``step(closure)`` and ``model=``, the buffers, e.g. BatchNorm running
    statistics, are put back as they were before the closure's forward pass);
    with a :class:`torch.amp.GradScaler`, its ``found_inf`` decides instead. If
    the closure raises, nothing has changed (buffers restored as above); if
    the base step raises, the scaling is undone (by dividing by the same factors:
    exact up to one rounding per element) before the exception propagates.

    Args:
        params: parameters or parameter-group dicts (groups may set ``mu0``).
        base_optimizer: optimizer class, e.g. ``torch.optim.AdamW``.
        variant: ``"nbar"`` (NOP, the right choice for LoRA) or ``"obar"`` (OP).
        mu0: initial strength :math:`\mu_0 \ge 0` of :math:`a_t` (paper: 0.05-2).
        schedule: ``"constant"``, ``"linear"`` or ``"cosine"``.
        total_steps: the horizon :math:`T` of the linear/cosine schedules
            (required for them).
        pairs: explicit factor pairs; ``None`` discovers them on ``model``.
        model: the model to search for pairs (when ``pairs`` is ``None``).
        on_missing: ``"raise"`` or ``"warn"`` when there is no pair.
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``weight_decay``...).

    Example:
        >>> import torch
        >>> from sharpkit.balance import LoRALinear, balancedness, find_pairs
        >>> from sharpkit.optim import BAR
        >>> g = torch.Generator().manual_seed(0)
        >>> net = torch.nn.Sequential(LoRALinear(4, 4, rank=2, alpha=2.0, generator=g))
        >>> _ = torch.nn.init.normal_(net[0].lora_B, std=1.0, generator=g)  # unbalanced start
        >>> opt = BAR(net.parameters(), torch.optim.SGD, mu0=1.0, model=net, lr=0.01)
        >>> x, y = torch.randn(64, 4, generator=g), torch.randn(64, 4, generator=g)
        >>> def closure():
        ...     loss = torch.nn.functional.mse_loss(net(x), y)
        ...     loss.backward()
        ...     return loss
        >>> pair = find_pairs(net)[0]
        >>> round(balancedness(pair), 2)
        3.08
        >>> for _ in range(100):
        ...     _ = opt.step(closure)
        >>> round(balancedness(pair), 2)  # plain SGD (mu0=0) would keep 3.08
        0.35

    References:
        Li, Zhang, He. Implicit Regularization of Sharpness-Aware Minimization
        for Scale-Invariant Problems. NeurIPS 2024 (Algorithms 2 and 3).
    """

    _OWN_KEYS = ("mu0",)

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Callable[..., Optimizer],
        *,
        variant: str = "nbar",
        mu0: float = 0.1,
        schedule: str = "constant",
        total_steps: int | None = None,
        pairs: Iterable[FactorPair | tuple[torch.Tensor, torch.Tensor]] | None = None,
        model: nn.Module | None = None,
        on_missing: str = "raise",
        **base_kwargs: Any,
    ) -> None:
        if not isinstance(variant, str) or variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
        if not isinstance(on_missing, str) or on_missing not in _ON_MISSING:
            raise ValueError(f"on_missing: expected one of {_ON_MISSING}, got {on_missing!r}")
        self.variant = variant
        self.schedule, self.total_steps = check_schedule(schedule, total_steps)
        self.on_missing = on_missing
        self._bar_step = 0
        defaults = {"mu0": check_nonneg_float("mu0", mu0)}
        super().__init__(params, base_optimizer, defaults, base_kwargs, model=model)
        self.pairs = self._resolve_pairs(pairs, model)
        # buffers before the closure's forward pass, put back if the step is skipped
        self._pre_step_buffers = BufferSnapshot(model) if model is not None else None
        self._layout: tuple[list[int], list[int], set[int]] | None = None

    # -- setup ------------------------------------------------------------------

    def _validate_group(self, group: dict[str, Any]) -> None:
        if "mu0" in group:
            group["mu0"] = check_nonneg_float("mu0", group["mu0"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._layout = None

    def _resolve_pairs(self, pairs: Any, model: nn.Module | None) -> list[FactorPair]:
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        if pairs is not None:
            resolved = pairs_from(pairs, "pairs")
            for pair in resolved:
                for arg, t in (("x", pair.x), ("y", pair.y)):
                    if id(t) not in owned:
                        raise ValueError(
                            f"pairs: factor {arg} of pair {pair.name!r} is not among params"
                        )
        elif model is not None:
            resolved = [p for p in find_pairs(model) if id(p.x) in owned and id(p.y) in owned]
        else:
            resolved = []
        if not resolved:
            where = "in pairs" if pairs is not None else "in model" if model is not None else ""
            msg = (
                f"pairs: no factor pair {where} among params (pass pairs=[(x, y), ...] or "
                "model= with sharpkit LoRALinear / PEFT LoRA layers)"
            ).replace("  ", " ")
            if self.on_missing == "raise":
                raise ValueError(msg + "; on_missing='warn' degrades to the base optimizer")
            warnings.warn(msg + "; BAR acts as the base optimizer", UserWarning, stacklevel=3)
        seen: set[int] = set()
        for pair in resolved:
            for t in (pair.x, pair.y):
                if id(t) in seen:
                    raise ValueError(f"pairs: a factor of {pair.name!r} appears in two pairs")
                seen.add(id(t))
        return resolved

    def _group_layout(self) -> tuple[list[int], list[int], set[int]]:
        """The group index of each pair's x and y, and the ids of all factors."""
        if self._layout is None:
            where = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
            gx = [where[id(p.x)] for p in self.pairs]
            gy = [where[id(p.y)] for p in self.pairs]
            self._layout = (gx, gy, {id(t) for p in self.pairs for t in (p.x, p.y)})
        return self._layout

    # -- schedule and state -------------------------------------------------------

    @property
    def bar_step(self) -> int:
        """The number of BAR steps taken (the ``t`` of ``a_t``)."""
        return self._bar_step

    def coefficient(self, group: dict[str, Any] | None = None) -> float:
        """``a_t`` for the next step (of ``group``, default the first group)."""
        group = self.param_groups[0] if group is None else group
        return bar_coefficient(group["mu0"], self.schedule, self._bar_step, self.total_steps)

    def state_dict(self) -> dict[str, Any]:
        sd = dict(super().state_dict())
        sd["bar"] = {"step": self._bar_step}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        bar = state_dict.pop("bar", None)
        super().load_state_dict(state_dict)
        if bar is not None:
            self._bar_step = int(bar["step"])
        self._layout = None

    # -- the step ------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:  # type: ignore[override]
        """Scale every pair (Algorithm 2 or 3), then take the base optimizer's step.

        Args:
            closure: optional; computes the loss and calls ``backward()``. If
                given, ``step`` zeroes the gradients first and calls it once
                (sharpkit's SAM convention, so a loop can switch between SAM and
                BAR unchanged). Without it, the gradients already in ``.grad``
                are used, as with any ``torch.optim`` optimizer.

        Returns:
            The closure's return value, or ``None``.
        """
        loss = None
        buffers = self._pre_step_buffers if closure is not None else None
        if closure is not None:
            if not callable(closure):
                raise TypeError(f"closure: expected a callable, got {type(closure).__name__}")
            if buffers is not None:
                buffers.save()
            self.zero_grad(set_to_none=True)
            try:
                with torch.enable_grad():
                    loss = closure()
            except BaseException:
                if buffers is not None:
                    buffers.restore()
                raise
        factor_ids = self._group_layout()[2]
        rest: list[torch.Tensor] = []  # gradients of parameters outside every pair
        has_grad = False
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("BAR does not support sparse gradients")
                    has_grad = True
                    if id(p) not in factor_ids:
                        rest.append(p.grad)
        if not has_grad:
            if closure is None:
                raise TypeError(
                    "BAR.step(): no parameter has a gradient; call loss.backward() before "
                    "step(), or pass a closure that does"
                )
            self._require_grads("calling the closure")

        found_inf = getattr(self, "found_inf", None)  # set by GradScaler.step
        if found_inf is not None and float(found_inf) != 0.0:
            if buffers is not None:
                buffers.restore()
            return loss
        factors = self._scaling(rest, check_finite=found_inf is None)
        if factors is None:  # non-finite gradient
            if buffers is not None:
                buffers.restore()
            warnings.warn(
                "BAR: non-finite gradient; the step was skipped and the weights are unchanged",
                RuntimeWarning,
                stacklevel=3,  # the caller of step() (through torch.no_grad's wrapper)
            )
            return loss
        tensors, scales = factors
        if tensors:
            torch._foreach_mul_(tensors, scales)
        try:
            if found_inf is not None:
                self._base_step()  # unscales the gradients, then steps
            else:
                self.base_optimizer.step()
        except BaseException:
            if tensors:
                torch._foreach_div_(tensors, scales)
            if buffers is not None:
                buffers.restore()
            raise
        self._bar_step += 1
        return loss

    def _scaling(
        self, rest: list[torch.Tensor], *, check_finite: bool
    ) -> tuple[list[torch.Tensor], list[float]] | None:
        """The factors to scale and their multipliers; ``None`` if a gradient is not finite."""
        gx_idx, gy_idx, _ = self._group_layout()
        active = [
            i for i, p in enumerate(self.pairs) if p.x.grad is not None and p.y.grad is not None
        ]
        factor = schedule_factor(self.schedule, self._bar_step, self.total_steps)
        coefs = [g["mu0"] * factor * float(g["lr"]) for g in self.param_groups]
        need_scaling = any(coefs[gx_idx[i]] != 0.0 or coefs[gy_idx[i]] != 0.0 for i in active)
        if not need_scaling and not check_finite:
            return [], []
        # one fused norm pass over the pair gradients (first), the other gradients
        # (finiteness) and, for oBAR, the factors themselves; one host sync.
        to_norm = [self.pairs[i].x.grad for i in active] + [self.pairs[i].y.grad for i in active]
        if check_finite:
            to_norm += rest
        n_active = len(active)
        if need_scaling and self.variant == "obar":
            to_norm += [self.pairs[i].x for i in active] + [self.pairs[i].y for i in active]
        if not to_norm:
            return [], []
        norms = _stack_norms(torch._foreach_norm(to_norm)).tolist()
        if check_finite and not all(map(math.isfinite, norms)):
            return None
        if not need_scaling:
            return [], []
        gxn, gyn = norms[:n_active], norms[n_active : 2 * n_active]
        if self.variant == "obar":
            first, second = norms[-2 * n_active : -n_active], norms[-n_active:]
        else:
            first, second = gxn, gyn
        tensors: list[torch.Tensor] = []
        scales: list[float] = []
        for k, i in enumerate(active):
            if gxn[k] == 0.0 and gyn[k] == 0.0:
                continue  # zero gradient: SAM's drift vanishes, so does BAR's
            s = 1.0 if first[k] >= second[k] else -1.0
            if self.variant == "obar":
                s = -s
            cx, cy = coefs[gx_idx[i]], coefs[gy_idx[i]]
            if cx != 0.0:
                tensors.append(self.pairs[i].x)
                scales.append(1.0 + s * cx)
            if cy != 0.0:
                tensors.append(self.pairs[i].y)
                scales.append(1.0 - s * cy)
        return tensors, scales


def _stack_norms(norms: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Stack per-tensor norms (promoting dtype and moving to one device if needed)."""
    try:
        return torch.stack(list(norms))  # the common case: one device (dtypes promote)
    except RuntimeError:
        first = norms[0]
        dtype = first.dtype
        for n in norms[1:]:
            dtype = torch.promote_types(dtype, n.dtype)
        return torch.stack([n.to(device=first.device, dtype=dtype) for n in norms])
