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
from ..balance.rules import (
    VARIANTS,
    bar_coefficient,
    bar_signs,
    check_schedule,
    schedule_factor,
)
from ._base import Oracle, SkipStep, WrappedOptimizer, check_lr, check_nonneg_float

__all__ = ["BAR"]

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

    Valid range: the factors must stay positive, :math:`1 - a_t\eta_t > 0`, so
    ``mu0 * lr < 1`` is required for every group; it is checked at construction
    and again at every step (an ``lr`` raised later by ``param_groups`` edits, a
    scheduler or ``load_state_dict`` is refused with ``ValueError`` before any
    compute).

    Cost: per step one fused ``_foreach_norm`` over the gradients (which also
    serves the finiteness check), one host synchronisation, one copy of the
    trainable weights and optimizer state (the step's transaction) and one
    fused ``_foreach_mul_`` over the factors; ``mu0 = 0`` skips the scaling and
    reproduces the base optimizer bit for bit. BAR follows the step contract of
    every sharpkit optimizer: a non-finite gradient skips the whole step with a
    ``RuntimeWarning`` (weights, optimizer state and, with ``model=`` and a
    closure or ``loss_fn``, the buffers as they were before the forward pass);
    with a :class:`torch.amp.GradScaler`, its ``found_inf`` decides instead. If
    the closure or the base step raises, weights, buffers and state are
    restored exactly from the copy before the exception propagates.

    Args:
        params: parameters or parameter-group dicts (groups may set ``mu0``).
        base_optimizer: optimizer class, e.g. ``torch.optim.AdamW``.
        variant: ``"nbar"`` (NOP, the right choice for LoRA) or ``"obar"`` (OP).
        mu0: initial strength :math:`\mu_0 \ge 0` of :math:`a_t` (paper: 0.05-2),
            with ``mu0 * lr < 1``.
        schedule: ``"constant"``, ``"linear"`` or ``"cosine"``.
        total_steps: the horizon :math:`T` of the linear/cosine schedules
            (required for them).
        pairs: explicit factor pairs; ``None`` discovers them on ``model``.
        model: the model to search for pairs (when ``pairs`` is ``None``).
        on_missing: ``"raise"`` or ``"warn"`` when there is no pair.
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``weight_decay``...).

    Returns:
        ``step(closure)`` returns what the closure returned; ``step(loss_fn=...,
        batch=...)`` (with ``model=``) the mean loss at ``w``, detached; ``step()``
        on gradients already in ``.grad`` returns ``None``.

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
        self.check_hyperparameters()  # mu0 * lr < 1, now that the groups have lr
        self.pairs = self._resolve_pairs(pairs, model)
        self._layout: tuple[list[int], list[int], set[int]] | None = None
        self._plan: tuple[list[torch.Tensor], list[float]] = ([], [])

    # -- setup ------------------------------------------------------------------

    _steps_on_existing_grads = True

    def _validate_group(self, group: dict[str, Any]) -> None:
        if "mu0" in group:
            group["mu0"] = check_nonneg_float("mu0", group["mu0"])
        if "mu0" in group and "lr" in group:
            check_lr(group["lr"])
            product = group["mu0"] * float(group["lr"])
            if product >= 1.0:
                raise ValueError(
                    f"mu0: mu0 * lr = {group['mu0']} * {float(group['lr'])} = {product} >= 1 "
                    "makes the factor 1 - a_t * lr zero or negative; BAR needs mu0 * lr < 1"
                )

    def check_hyperparameters(self) -> None:
        """Also ``variant``, ``schedule`` and ``total_steps``, in case they were changed."""
        super().check_hyperparameters()
        if not isinstance(self.variant, str) or self.variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {VARIANTS}, got {self.variant!r}")
        self.schedule, self.total_steps = check_schedule(self.schedule, self.total_steps)

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
        bar = state_dict.get("bar") if isinstance(state_dict, dict) else None
        if bar is not None:
            step = bar.get("step") if isinstance(bar, dict) else None
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(f"state_dict: 'bar' must be {{'step': int >= 0}}, got {bar!r}")
            state_dict = {k: v for k, v in state_dict.items() if k != "bar"}
        super().load_state_dict(state_dict)
        if bar is not None:
            self._bar_step = int(bar["step"])
        self._layout = None

    # -- the step: BAR's hooks ------------------------------------------------------------

    def _clean_gradient(self, oracle: Oracle | None) -> Any:
        """With a closure or ``loss_fn``: the gradient at ``w``. Without: the
        gradients already in ``.grad`` (torch.optim's convention)."""
        if oracle is not None:
            return super()._clean_gradient(oracle)
        if not self._all_grads():
            raise TypeError(
                "BAR.step(): no parameter has a gradient; call loss.backward() before "
                "step(), or pass a closure that does (or loss_fn=... and batch=...)"
            )
        return None

    def _perturbation(self, oracle: Oracle | None) -> None:
        """BAR perturbs nothing; it plans the scaling (and checks finiteness) here."""
        found_inf = getattr(self, "found_inf", None)  # set by GradScaler.step
        if found_inf is not None and float(found_inf) != 0.0:
            raise SkipStep(None)  # the scaler skips the step (and lowers its scale)
        factor_ids = self._group_layout()[2]
        rest = [p.grad for _, ps in self._params_with_grad() for p in ps if id(p) not in factor_ids]
        plan = self._scaling(rest, check_finite=found_inf is None)
        if plan is None:
            raise SkipStep("non-finite gradient")
        self._plan = plan

    def _guarded_base_step(self) -> bool:
        """Scale the pairs, then the base step, inside the transaction (restored
        from the copy, never by dividing, if anything raises)."""
        tensors, scales = self._plan
        self._plan = ([], [])
        with torch.no_grad():
            self._save_state(self._step_params())  # the weights and the state, one copy
            if tensors:
                torch._foreach_mul_(tensors, scales)
            return self._base_step(check_finite=False)  # finiteness was checked with the norms

    def _committed(self) -> None:
        self._bar_step += 1

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
        norms = _stack_norms(torch._foreach_norm(to_norm))
        if not need_scaling:
            if check_finite and not bool(torch.isfinite(norms).all()):
                return None
            return [], []
        values = norms.tolist()  # the one host sync
        if check_finite and not all(map(math.isfinite, values)):
            return None
        gxn, gyn = values[:n_active], values[n_active : 2 * n_active]
        if self.variant == "obar":
            first_h, second_h = values[-2 * n_active : -n_active], values[-n_active:]
        else:
            first_h, second_h = gxn, gyn
        sign = bar_signs(self.variant, first_h, second_h)  # the one rule (balance.rules)
        tensors: list[torch.Tensor] = []
        scales: list[float] = []
        for k, i in enumerate(active):
            if gxn[k] == 0.0 and gyn[k] == 0.0:
                continue  # zero gradient: SAM's drift vanishes, so does BAR's
            s = sign[k]
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
