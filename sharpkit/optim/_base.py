"""The machinery every sharpkit optimizer shares.

Two layers, so that each method supplies only what is its own (DESIGN.md, the
optax lesson):

- :class:`WrappedOptimizer` owns a *base optimizer* (any ``torch.optim`` class)
  and shares its parameter groups, so LR schedulers, ``zero_grad`` and
  ``state_dict``/``load_state_dict`` behave as users of ``torch.optim`` expect.
  It applies the base step with a finiteness check (a non-finite gradient skips
  the step and leaves the weights as they were) and honours
  :class:`torch.amp.GradScaler`.
- :class:`SAMBase` adds the two-pass machinery of Sharpness-Aware Minimization
  (Foret et al., 2021): evaluate the gradient at ``w``, move to ``w + e``,
  evaluate the gradient there, restore ``w`` exactly (from a copy, not by
  subtracting ``e``) and hand the perturbed gradient to the base step. Subclasses
  override :meth:`SAMBase._ascent_direction` to choose ``e``.

Both restore the weights (and, when given a model, its buffers such as BatchNorm
running statistics) if anything raises while the weights are perturbed.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

__all__ = ["BatchDrivenSAM", "BufferSnapshot", "SAMBase", "WrappedOptimizer", "frozen_buffers"]

Closure = Callable[[], Any]


# ----------------------------------------------------------------------------
# Buffers (BatchNorm running statistics and the like)
# ----------------------------------------------------------------------------


class BufferSnapshot:
    """A reusable copy of a module's floating and integer buffers.

    ``save()`` copies every buffer into preallocated storage, ``restore()``
    copies them back. SAM uses it so that BatchNorm's ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` come from the clean pass only:
    the perturbed forward pass updates them, and the snapshot undoes it.

    Args:
        module: the module whose buffers (recursively) are saved.

    Example:
        >>> bn = nn.BatchNorm1d(3)
        >>> snap = BufferSnapshot(bn)
        >>> snap.save()
        >>> _ = bn(torch.randn(8, 3))           # a training-mode forward moves the stats
        >>> snap.restore()
        >>> bn.running_mean.abs().sum().item()
        0.0
    """

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(module).__name__}")
        self.module = module
        self._copies: list[torch.Tensor] | None = None

    def _buffers(self) -> list[torch.Tensor]:
        return [b for b in self.module.buffers() if b is not None]

    @torch.no_grad()
    def save(self) -> None:
        bufs = self._buffers()
        if (
            self._copies is None
            or len(self._copies) != len(bufs)
            or any(
                c.shape != b.shape or c.dtype != b.dtype or c.device != b.device
                for c, b in zip(self._copies, bufs)
            )
        ):
            self._copies = [b.detach().clone() for b in bufs]
        else:
            for c, b in zip(self._copies, bufs):
                c.copy_(b)

    @torch.no_grad()
    def restore(self) -> None:
        if self._copies is None:
            raise RuntimeError("BufferSnapshot.restore() called before save()")
        for b, c in zip(self._buffers(), self._copies):
            b.copy_(c)


@contextlib.contextmanager
def frozen_buffers(module: nn.Module) -> Iterator[None]:
    """Context manager: buffers changed inside the block are put back on exit.

    Use it around the perturbed forward pass when driving SAM by hand without
    passing ``model=`` to the optimizer. Restores also when the block raises.

    Example:
        >>> bn = nn.BatchNorm1d(2)
        >>> with frozen_buffers(bn):
        ...     _ = bn(torch.randn(4, 2) + 5.0)
        >>> bn.running_mean.tolist()
        [0.0, 0.0]
    """
    snap = BufferSnapshot(module)
    snap.save()
    try:
        yield
    finally:
        snap.restore()


# ----------------------------------------------------------------------------
# Validation helpers (messages name the argument)
# ----------------------------------------------------------------------------


def check_nonneg_float(name: str, value: Any) -> float:
    """Validate a finite, non-negative real hyperparameter; return it as ``float``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        else:
            raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value}")
    if value < 0:
        raise ValueError(f"{name}: must be >= 0, got {value}")
    return value


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of the concatenation of ``tensors`` as a 0-d tensor (no host sync).

    Per-tensor norms come from one ``torch._foreach_norm`` call; tensors on
    several devices or of several dtypes are combined on the first tensor's
    device in the widest floating dtype among them.
    """
    if not tensors:
        raise ValueError("global_norm: no tensors")
    norms = torch._foreach_norm(tensors)
    dtype = norms[0].dtype
    for n in norms[1:]:
        dtype = torch.promote_types(dtype, n.dtype)
    dev = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device=dev, dtype=dtype) for n in norms]))


# ----------------------------------------------------------------------------
# WrappedOptimizer: own a base optimizer, share its groups
# ----------------------------------------------------------------------------


class WrappedOptimizer(Optimizer):
    """An optimizer that wraps a ``torch.optim`` base optimizer.

    The wrapper and the base optimizer share the *same* parameter-group dicts and
    the same ``state`` mapping, so an LR scheduler attached to the wrapper changes
    the base optimizer's learning rate, and ``optimizer.state[p]`` shows the base
    optimizer's buffers (momentum, Adam moments). ``state_dict()`` is the base
    optimizer's state dict (its groups include the wrapper's own hyperparameters,
    such as ``rho``); ``load_state_dict`` restores it and re-links the shared
    groups, so a resumed run steps exactly as an uninterrupted one.

    Subclasses set ``defaults`` for their own hyperparameters, validate them in
    :meth:`_validate_group` and implement ``step``.

    Args:
        params: iterable of parameters or of parameter-group dicts.
        base_optimizer: an optimizer *class* (or a factory) such as
            ``torch.optim.SGD``; it is called as ``base_optimizer(groups, **base_kwargs)``.
        defaults: the wrapper's own hyperparameters and their defaults.
        base_kwargs: keyword arguments for the base optimizer (``lr``, ``momentum``...).
        model: optional module whose buffers the wrapper may snapshot (see
            :class:`SAMBase`).
    """

    #: GradScaler hands ``grad_scale``/``found_inf`` to ``step()`` instead of
    #: skipping it, so that SAM can always restore the unperturbed weights.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Callable[..., Optimizer],
        defaults: dict[str, Any],
        base_kwargs: dict[str, Any],
        model: nn.Module | None = None,
    ) -> None:
        if isinstance(base_optimizer, Optimizer):
            raise TypeError(
                "base_optimizer: pass the optimizer class (e.g. torch.optim.SGD) and its "
                "keyword arguments, not an optimizer instance"
            )
        if not callable(base_optimizer):
            raise TypeError(
                f"base_optimizer: expected an optimizer class such as torch.optim.SGD, "
                f"got {type(base_optimizer).__name__}"
            )
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module or None, got {type(model).__name__}")
        self._wrapper_ready = False
        super().__init__(params, defaults)
        try:
            base = base_optimizer(self.param_groups, **base_kwargs)
        except TypeError as err:
            raise TypeError(
                f"base_optimizer: {getattr(base_optimizer, '__name__', base_optimizer)!s} "
                f"rejected its arguments {sorted(base_kwargs)}: {err}"
            ) from err
        if not isinstance(base, Optimizer):
            raise TypeError(
                f"base_optimizer: calling it must return a torch.optim.Optimizer, "
                f"got {type(base).__name__}"
            )
        if len(base.param_groups) != len(self.param_groups) or any(
            a is not b for a, b in zip(base.param_groups, self.param_groups)
        ):
            raise TypeError(
                "base_optimizer: it must keep the parameter-group dicts it is given "
                "(every torch.optim optimizer does)"
            )
        self.base_optimizer = base
        self.param_groups = base.param_groups
        self.state = base.state
        self.defaults.update(base.defaults)
        self.model = model
        self._wrapper_ready = True

    # -- groups ---------------------------------------------------------------

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Validate (and normalise in place) the wrapper's keys of one group."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, default in self.defaults.items():
            if key in self._own_keys():
                param_group.setdefault(key, default)
        self._validate_group(param_group)
        if getattr(self, "_wrapper_ready", False):
            self.base_optimizer.add_param_group(param_group)
        else:
            super().add_param_group(param_group)

    def _own_keys(self) -> tuple[str, ...]:
        return tuple(getattr(self, "_OWN_KEYS", ()))

    # -- state dict -----------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_not_mid_step("load_state_dict")
        saved_groups = state_dict.get("param_groups", [])
        for group in saved_groups:
            self._validate_group(dict(group))
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def _check_not_mid_step(self, what: str) -> None:
        """Hook: refuse operations that would be wrong while weights are perturbed."""

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    # -- helpers for subclasses -------------------------------------------------

    def _params_with_grad(self) -> list[tuple[dict[str, Any], list[torch.Tensor]]]:
        """Per group, the parameters that currently hold a gradient."""
        out = []
        for group in self.param_groups:
            params = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                params.append(p)
            out.append((group, params))
        return out

    def _all_grads(self) -> list[torch.Tensor]:
        return [p.grad for _, ps in self._params_with_grad() for p in ps]

    def _require_grads(self, where: str) -> None:
        if not self._all_grads():
            raise RuntimeError(
                f"{type(self).__name__}: no parameter has a gradient after {where}; "
                "the closure must compute the loss and call loss.backward()"
            )

    @torch.no_grad()
    def _base_step(self) -> bool:
        """Apply the base optimizer's step to the current gradients.

        Returns ``True`` if the step was taken. Skips it (weights untouched) when
        a :class:`torch.amp.GradScaler` reports inf/NaN gradients, or, without a
        scaler, when any gradient is non-finite (with a ``RuntimeWarning``).
        """
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None:  # called from GradScaler.step (see _step_supports_amp_scaling)
            if float(found_inf) != 0.0:
                return False
            grad_scale = getattr(self, "grad_scale", None)
            if grad_scale is not None:
                grads = self._all_grads()
                torch._foreach_div_(grads, grad_scale.to(grads[0].device))
            self.base_optimizer.step()
            return True
        grads = self._all_grads()
        if grads and not bool(torch.isfinite(global_norm(grads))):
            warnings.warn(
                f"{type(self).__name__}: non-finite gradient; the step was skipped and "
                "the weights are unchanged",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        self.base_optimizer.step()
        return True


# ----------------------------------------------------------------------------
# SAMBase: perturb, second pass, restore, base step
# ----------------------------------------------------------------------------


class SAMBase(WrappedOptimizer):
    """Two-pass Sharpness-Aware Minimization on top of any base optimizer.

    One update, with ``g(w)`` the gradient the closure leaves in ``.grad``:

    .. math::

        e = \\rho \\, d(w, g(w)) / \\|\\cdot\\|, \\qquad
        w \\leftarrow \\mathrm{base\\_step}\\big(w,\\; g(w + e)\\big)

    where the ascent direction ``d`` is supplied by the subclass
    (:meth:`_ascent_direction`) and the gradient is *evaluated* at ``w + e`` but
    *applied* at ``w``.

    Two ways to drive it:

    - ``step(closure)``: the closure zeroes nothing, computes the loss and calls
      ``backward()``; ``step`` zeroes gradients itself, evaluates the closure at
      ``w``, perturbs, evaluates it at ``w + e``, restores ``w``, applies the base
      step and returns the loss at ``w``.
    - ``first_step()`` / ``second_step()``: the manual form (forward/backward
      before each), for gradient accumulation and mixed precision. With a
      :class:`torch.amp.GradScaler`, call ``scaler.step(optimizer)`` in place of
      ``second_step()``: the weights are restored even when the scaler skips the
      update because of inf/NaN gradients.

    If ``model`` is given, its buffers (BatchNorm running statistics) are saved
    before the perturbed pass and restored after it, so they come from the clean
    pass only. If anything raises while the weights are perturbed, the weights and
    buffers are restored before the exception propagates.
    """

    _OWN_KEYS: tuple[str, ...] = ("rho",)

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Callable[..., Optimizer],
        defaults: dict[str, Any],
        base_kwargs: dict[str, Any],
        model: nn.Module | None = None,
    ) -> None:
        self._perturbed = False
        self._backup: list[torch.Tensor] = []
        self._backup_params: list[torch.Tensor] = []
        super().__init__(params, base_optimizer, defaults, base_kwargs, model=model)
        # buffers after the clean pass (restored after the perturbed pass) and
        # before the step (restored if the step fails)
        self._buffers = BufferSnapshot(model) if model is not None else None
        self._pre_step_buffers = BufferSnapshot(model) if model is not None else None

    # -- validation -------------------------------------------------------------

    def _validate_group(self, group: dict[str, Any]) -> None:
        if "rho" in group:
            group["rho"] = check_nonneg_float("rho", group["rho"])

    def _check_not_mid_step(self, what: str) -> None:
        if self._perturbed:
            raise RuntimeError(
                f"{type(self).__name__}.{what}() called between first_step() and "
                "second_step(): the weights are perturbed"
            )

    @property
    def perturbed(self) -> bool:
        """``True`` between :meth:`first_step` and :meth:`second_step`."""
        return self._perturbed

    # -- the perturbation -----------------------------------------------------

    def _ascent_direction(
        self, groups: list[tuple[dict[str, Any], list[torch.Tensor]]]
    ) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
        """Return, per group, the unnormalised direction ``d`` and the norm to divide by.

        The perturbation is ``e = rho_group * d / norm``. The default is plain SAM:
        ``d = g`` and ``norm = ||g||`` over all parameters together. Subclasses that
        need temporaries should write them into :meth:`_scratch` buffers (allocating
        fresh parameter-sized tensors every step is slow on the CPU).
        """
        grads = [[p.grad for p in ps] for _, ps in groups]
        flat = [g for gs in grads for g in gs]
        return grads, global_norm(flat)

    def _scratch(self, key: str, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """Reusable uninitialised tensors shaped like ``like`` (kept between steps)."""
        store = self.__dict__.setdefault("_scratch_store", {})
        bufs = store.get(key)
        if (
            bufs is None
            or len(bufs) != len(like)
            or any(
                b.shape != t.shape or b.dtype != t.dtype or b.device != t.device
                for b, t in zip(bufs, like)
            )
        ):
            bufs = [torch.empty_like(t) for t in like]
            store[key] = bufs
        return bufs

    @torch.no_grad()
    def _perturb(self) -> bool:
        """Move every parameter with a gradient to ``w + e``; return False if ``e = 0``
        because the gradient norm was zero or non-finite."""
        groups = self._params_with_grad()
        params = [p for _, ps in groups for p in ps]
        if not params:
            raise RuntimeError(
                f"{type(self).__name__}: no parameter has a gradient; compute the loss "
                "and call backward() before first_step()"
            )
        self._save(params)
        directions, norm = self._ascent_direction(groups)
        norm_value = float(norm)  # one host sync: decides e = 0 and scales e
        usable = math.isfinite(norm_value) and norm_value > 0.0
        if usable:
            for (group, ps), d in zip(groups, directions):
                if ps and group["rho"] != 0.0:
                    self._apply_ascent(ps, d, group["rho"] / norm_value)
        return usable

    def _apply_ascent(self, params: list[torch.Tensor], direction: Any, alpha: float) -> None:
        """``w += alpha * d`` for one group (``direction`` as :meth:`_ascent_direction` gave it)."""
        torch._foreach_add_(params, direction, alpha=alpha)

    def _save(self, params: list[torch.Tensor]) -> None:
        same = len(self._backup_params) == len(params) and all(
            a is b for a, b in zip(self._backup_params, params)
        )
        if same:
            torch._foreach_copy_(self._backup, params)
        else:
            self._backup = [p.detach().clone() for p in params]
            self._backup_params = list(params)
        if self._buffers is not None:
            self._buffers.save()
        self._perturbed = True

    @torch.no_grad()
    def _restore(self) -> None:
        if not self._perturbed:
            return
        torch._foreach_copy_(self._backup_params, self._backup)
        if self._buffers is not None:
            self._buffers.restore()
        self._perturbed = False

    # -- public API -------------------------------------------------------------

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move the weights to ``w + e`` using the gradients now in ``.grad``."""
        if self._perturbed:
            raise RuntimeError(
                f"{type(self).__name__}.first_step() called twice without second_step()"
            )
        self._perturb()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` and apply the base step with the gradient now in ``.grad``
        (computed at ``w + e``)."""
        if not self._perturbed:
            raise RuntimeError(
                f"{type(self).__name__}.second_step() called without a preceding first_step()"
            )
        self._restore()
        self._guarded_base_step()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def _guarded_base_step(self) -> bool:
        """Base step that leaves the weights at ``w`` if it raises midway."""
        try:
            return self._base_step()
        except BaseException:
            if self._backup_params:
                with torch.no_grad():
                    torch._foreach_copy_(self._backup_params, self._backup)
            raise

    def step(self, closure: Closure | None = None) -> Any:  # type: ignore[override]
        """One SAM update driven by ``closure``; returns the loss at ``w``.

        Args:
            closure: computes the loss and calls ``backward()``. It is called
                twice, at ``w`` and at ``w + e``; ``step`` zeroes the gradients
                before each call. Without a closure, ``step()`` is only valid
                after :meth:`first_step` (it then acts as :meth:`second_step`, the
                form :class:`torch.amp.GradScaler` uses).

        Returns:
            Whatever the first call of the closure returned.
        """
        if closure is None:
            if self._perturbed:
                self.second_step()
                return None
            raise TypeError(
                f"{type(self).__name__}.step(): closure is required (a function that "
                "computes the loss and calls loss.backward()); or drive the two passes "
                "yourself with first_step() and second_step()"
            )
        if not callable(closure):
            raise TypeError(f"closure: expected a callable, got {type(closure).__name__}")
        self._check_not_mid_step("step")
        if self._pre_step_buffers is not None:
            self._pre_step_buffers.save()
        try:
            return self._closure_step(closure)
        except BaseException:
            self._restore()
            self._undo_step_buffers()
            raise

    def _closure_step(self, closure: Closure) -> Any:
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
        self._require_grads("calling the closure at w")
        usable = self._perturb()
        if not usable and not bool(torch.isfinite(global_norm(self._all_grads()))):
            # Non-finite gradient at w: the update would be garbage. Skip it.
            self._restore()
            self._undo_step_buffers()
            warnings.warn(
                f"{type(self).__name__}: non-finite gradient at w; the step was skipped "
                "and the weights are unchanged",
                RuntimeWarning,
                stacklevel=3,
            )
            return loss
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            closure()
        self._restore()
        if not self._guarded_base_step():
            self._undo_step_buffers()
        return loss

    def _undo_step_buffers(self) -> None:
        """A skipped step leaves the buffers as they were before it."""
        if self._pre_step_buffers is not None:
            self._pre_step_buffers.restore()


class BatchDrivenSAM(SAMBase):
    """Base of SAM variants driven by ``step(loss_fn, batch)`` instead of a closure.

    They must see inside the batch (to split it, or to get one loss per example),
    so the manual two-phase form ``first_step()``/``second_step()`` does not exist
    for them; subclasses say why in ``_needs_batch``.
    """

    _needs_batch = "it needs the batch"

    def first_step(self, zero_grad: bool = False) -> None:
        raise TypeError(
            f"{type(self).__name__} has no first_step()/second_step(): {self._needs_batch}; "
            "call step(loss_fn, batch)"
        )

    def second_step(self, zero_grad: bool = False) -> None:
        self.first_step()
