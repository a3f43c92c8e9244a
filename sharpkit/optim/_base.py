"""The machinery every sharpkit optimizer shares: one step contract, one transaction.

:class:`WrappedOptimizer` owns a *base optimizer* (any ``torch.optim`` class) and
shares its parameter groups, so LR schedulers, ``zero_grad`` and
``state_dict``/``load_state_dict`` behave as users of ``torch.optim`` expect. It
also owns the **one step** of the whole SAM family,

.. code-block:: text

    step(closure=None, *, loss_fn=None, batch=None) -> loss at w
        oracle = Oracle(closure | loss_fn, batch)        # checked before any compute
        hyperparameters checked (also after param_groups edits, schedulers, loads)
        transaction:                                      # weights, buffers, state
            loss = _clean_gradient(oracle)                # g at w
            _perturbation(oracle)                         # w -> w + e (or functional)
            _perturbed_gradient(oracle)                   # G, weights back at w
            _guarded_base_step()                          # finite check, GradScaler
        on exception: everything restored, exception re-raised
        on a non-finite value: everything restored, RuntimeWarning, step skipped

and :class:`SAMBase` supplies the hooks of Sharpness-Aware Minimization
(Foret et al., 2021): gradient at ``w``, ascent ``e`` (subclasses choose it in
:meth:`SAMBase._ascent_direction`), gradient at ``w + e``, restore ``w`` from a
copy (never by subtracting ``e``). Each method (SAM, ASAM, mSAM, delta-SAM, BAR)
overrides only the hooks that are its own.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim import optimizer as _torch_optimizer

__all__ = [
    "BatchDrivenSAM",
    "BufferSnapshot",
    "Oracle",
    "SAMBase",
    "SkipStep",
    "WrappedOptimizer",
    "frozen_buffers",
]

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


#: the code of torch's step wrapper (``Optimizer.profile_hook_step``), to recognise it
_TORCH_STEP_WRAPPER = Optimizer.profile_hook_step(lambda *args, **kwargs: None).__code__


def _step_observed(opt: Optimizer) -> bool:
    """Whether anything observes ``opt.step()`` besides its result: a step hook
    (the optimizer's own or a global one) or a running profiler."""
    return bool(
        opt._optimizer_step_pre_hooks
        or opt._optimizer_step_post_hooks
        or _torch_optimizer._global_optimizer_pre_hooks
        or _torch_optimizer._global_optimizer_post_hooks
        or torch.autograd._profiler_enabled()
    )


def check_bool(name: str, value: Any) -> bool:
    """Validate a boolean hyperparameter (``1`` or ``"yes"`` are refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return value


def check_lr(value: Any) -> None:
    """The base optimizer's ``lr`` must be a finite number >= 0 (tensors allowed)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"lr: expected a scalar, got a tensor of shape {tuple(value.shape)}")
        value = float(value)
    check_nonneg_float("lr", value)


# ----------------------------------------------------------------------------
# The oracle: what one step evaluates
# ----------------------------------------------------------------------------


class SkipStep(Exception):
    """Raised by a step hook that found a non-finite value (or GradScaler's
    ``found_inf``): the step is skipped and everything restored; ``message`` (if
    not ``None``) is issued as a ``RuntimeWarning``."""

    def __init__(self, message: str | None) -> None:
        super().__init__(message)
        self.message = message


class Oracle:
    """The loss one step evaluates: a closure, or ``loss_fn(model, batch)``.

    ``backward()`` zeroes the optimizer's gradients, evaluates the loss on the
    module as it is now (at ``w`` or at ``w + e``) under ``torch.enable_grad()``
    and leaves its gradient in ``.grad``.

    - With a closure (torch.optim's contract: it computes the loss and calls
      ``backward()``), it returns whatever the closure returned.
    - With ``loss_fn`` and ``batch`` (sharpkit's batch-loss convention,
      :mod:`sharpkit._batch`), ``loss_fn(model, batch)`` returns the mean loss
      (a scalar) or, for ``reduction="none"`` optimizers, one loss per example;
      the mean is differentiated and returned detached (``last_losses`` keeps
      the per-example values of the latest call). The mean of per-example losses
      is weighted as the loss's own mean is (``example_weights``, see
      :func:`sharpkit._batch.example_weights`: the token mean for
      ``sharpkit.hf.HFLoss``); ``weight`` is the batch's weight in a mean over
      batches or ranks (:func:`sharpkit._batch.batch_weight`).

    Args:
        closure: the closure, or ``None``.
        loss_fn: the batch loss (or an ``nn`` loss module), or ``None``.
        batch: the batch ``loss_fn`` is evaluated on.
        model: the module ``loss_fn`` is called with.
        reduction: ``"mean"`` (a scalar loss) or ``"none"`` (one loss per example).
    """

    def __init__(
        self,
        closure: Closure | None,
        loss_fn: Any,
        batch: Any,
        model: nn.Module | None,
        reduction: str = "mean",
    ) -> None:
        self.closure = closure
        self.loss_fn = loss_fn
        self.batch = batch
        self.model = model
        self.reduction = reduction
        self.last_losses: torch.Tensor | None = None
        self.n: int | None = None
        self.example_weights: torch.Tensor | None = None
        if loss_fn is not None:
            # local: _batch has no optim dependency
            from .._batch import batch_size, example_weights

            self.n = batch_size(batch)
            if reduction == "none":
                self.example_weights = example_weights(loss_fn, batch)

    @property
    def weight(self) -> float | None:
        """The batch's weight in a mean over batches or ranks (``None`` with a closure);
        computed when asked (a token count reads the labels)."""
        if self.loss_fn is None:
            return None
        from .._batch import batch_weight

        return batch_weight(self.loss_fn, self.batch)

    @property
    def is_closure(self) -> bool:
        return self.closure is not None

    def evaluate(self, where: str) -> torch.Tensor:
        """``loss_fn(model, batch)`` with its shape checked (no backward)."""
        out = self.loss_fn(self.model, self.batch)
        return check_loss(out, self.reduction, self.n, where)

    def backward(self, opt: Optimizer, where: str) -> Any:
        """Zero the gradients, evaluate the loss, backpropagate its mean; return the loss."""
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            if self.closure is not None:
                return self.closure()
            loss = self.evaluate(where)
            if loss.dim() == 1:
                from .._batch import weighted_mean

                self.last_losses = loss.detach()
                loss = weighted_mean(loss, self.example_weights)
            loss.backward()
        return loss.detach()


def check_loss(loss: Any, reduction: str, n: int | None, where: str) -> torch.Tensor:
    """Check what a batch loss returned: a scalar (``"mean"``) or shape ``(n,)`` (``"none"``)."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn: must return a tensor, got {type(loss).__name__} ({where})")
    if reduction == "none":
        if loss.shape != (n,):
            raise ValueError(
                f"loss_fn: must return one loss per example (reduction='none'), i.e. shape "
                f"({n},) for this batch of {n}; got shape {tuple(loss.shape)} ({where})"
            )
    elif loss.dim() != 0:
        raise ValueError(
            f"loss_fn: must return the mean loss of the batch as a scalar tensor, "
            f"got shape {tuple(loss.shape)} ({where})"
        )
    return loss


# ----------------------------------------------------------------------------
# Optimizer state snapshot (restored when a base step raises midway)
# ----------------------------------------------------------------------------


class _StateSnapshot:
    """Copies of the base optimizer's per-parameter state (and of weights), in reusable storage.

    ``save`` keeps a shallow copy of each parameter's state dict (its keys and
    non-tensor values, and which tensor objects it held) and copies the values of
    those tensors, and of the ``weights`` it is given, into storage kept between
    steps, in one fused copy; ``restore`` puts the dicts back and copies the values
    back into the same tensor objects, so references held elsewhere (a scheduler,
    a user) see the restored values. ``save`` is called under ``torch.no_grad()``
    (the weights are leaves that require gradients); ``restore`` enters it itself.
    """

    def __init__(self) -> None:
        self._dicts: list[tuple[Any, dict[str, Any]]] = []
        self._src: list[torch.Tensor] = []
        self._dst: list[torch.Tensor] = []

    def save(self, state: dict[Any, dict[str, Any]], weights: list[torch.Tensor]) -> None:
        self._dicts = [(p, dict(s)) for p, s in state.items()]
        src = weights + [
            v for _, d in self._dicts for v in d.values() if isinstance(v, torch.Tensor)
        ]
        if len(src) == len(self._src) and all(map(operator.is_, src, self._src)):
            if src:
                torch._foreach_copy_(self._dst, src)
        else:  # new state (first steps, a loaded state_dict): fresh storage
            self._dst = [t.detach().clone() for t in src]
            self._src = src

    @torch.no_grad()
    def restore(self, state: dict[Any, dict[str, Any]]) -> None:
        kept = {id(p) for p, _ in self._dicts}
        for p in [p for p in state if id(p) not in kept]:
            del state[p]  # created by the failed step
        for p, saved in self._dicts:
            s = state.setdefault(p, {})
            s.clear()
            s.update(saved)
        if self._src:
            torch._foreach_copy_(self._src, self._dst)


# ----------------------------------------------------------------------------
# WrappedOptimizer: own a base optimizer, share its groups, one step template
# ----------------------------------------------------------------------------

_META = "sharpkit"


class WrappedOptimizer(Optimizer):
    """An optimizer that wraps a ``torch.optim`` base optimizer, with one step template.

    The wrapper and the base optimizer share the *same* parameter-group dicts and
    the same ``state`` mapping, so an LR scheduler attached to the wrapper changes
    the base optimizer's learning rate, and ``optimizer.state[p]`` shows the base
    optimizer's buffers (momentum, Adam moments). ``state_dict()`` is the base
    optimizer's state dict (its groups include the wrapper's own hyperparameters,
    such as ``rho``) plus a ``"sharpkit"`` entry naming the optimizer and its base;
    ``load_state_dict`` refuses a state dict of another optimizer type, of another
    base optimizer or of a plain ``torch.optim`` optimizer (``ValueError``), then
    restores it and re-links the shared groups, so a resumed run steps exactly as
    an uninterrupted one.

    :meth:`step` is the template described in :mod:`sharpkit.optim._base`;
    subclasses set ``defaults`` for their own hyperparameters, validate them in
    :meth:`_validate_group` (run at construction, on ``add_param_group``, on
    ``load_state_dict`` and at the start of every step, so values changed later
    through ``param_groups`` or a scheduler are checked before any compute) and
    override the hooks they need.

    Args:
        params: iterable of parameters or of parameter-group dicts.
        base_optimizer: an optimizer *class* (or a factory) such as
            ``torch.optim.SGD``; it is called as ``base_optimizer(groups, **base_kwargs)``.
        defaults: the wrapper's own hyperparameters and their defaults.
        base_kwargs: keyword arguments for the base optimizer (``lr``, ``momentum``...).
        model: optional module whose buffers (BatchNorm running statistics) the
            step's transaction saves and restores, and which ``loss_fn`` is called with.
    """

    #: GradScaler hands ``grad_scale``/``found_inf`` to ``step()`` instead of
    #: skipping it, so that SAM can always restore the unperturbed weights.
    _step_supports_amp_scaling = True
    #: whether ``step(closure)`` is accepted (methods that must see the batch say no)
    _accepts_closure = True
    #: the reduction ``loss_fn`` must have: ``"mean"`` or ``"none"``
    _loss_reduction = "mean"
    #: whether ``step()`` with neither closure nor loss_fn applies the gradients
    #: already in ``.grad`` (one-pass methods, as torch.optim does)
    _steps_on_existing_grads = False

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
        self._backup: list[torch.Tensor] = []
        self._backup_params: list[torch.Tensor] = []
        self._weights_saved = False
        self._state_snapshot = _StateSnapshot()
        self._state_saved = False
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
        # buffers before the step, put back if it raises or is skipped
        self._pre_step_buffers = BufferSnapshot(model) if model is not None else None
        self._buffers_saved = False
        self._wrapper_ready = True

    # -- groups ---------------------------------------------------------------

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Validate (and normalise in place) the wrapper's keys of one group."""

    def check_hyperparameters(self) -> None:
        """Validate every group's hyperparameters as they are now; ``ValueError``
        (or ``TypeError``) naming the argument if one is out of range.

        Called at the start of every step, before any compute, so a value set
        through ``param_groups``, a scheduler or ``load_state_dict`` is checked
        as a constructor argument is.
        """
        for group in self.param_groups:
            self._validate_group(group)
            if "lr" in group:
                check_lr(group["lr"])

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
        sd = dict(self.base_optimizer.state_dict())
        sd[_META] = {
            "optimizer": type(self).__name__,
            "base_optimizer": type(self.base_optimizer).__name__,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_not_mid_step("load_state_dict")
        name = type(self).__name__
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(
                f"state_dict: expected an optimizer state dict with 'state' and "
                f"'param_groups' (from {name}.state_dict()), got "
                f"{type(state_dict).__name__}"
                + (
                    f" with keys {sorted(map(str, state_dict))[:8]}"
                    if isinstance(state_dict, dict)
                    else ""
                )
            )
        state_dict = dict(state_dict)
        meta = state_dict.pop(_META, None)
        base_name = type(self.base_optimizer).__name__
        if meta is not None:
            if not isinstance(meta, dict) or meta.get("optimizer") != name:
                saved = meta.get("optimizer") if isinstance(meta, dict) else meta
                raise ValueError(
                    f"state_dict: saved by {saved}, cannot be loaded into {name} "
                    "(its hyperparameters and state mean something else)"
                )
            if meta.get("base_optimizer") != base_name:
                raise ValueError(
                    f"state_dict: saved with base optimizer {meta.get('base_optimizer')}, "
                    f"this {name} wraps {base_name}"
                )
        groups = state_dict["param_groups"]
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict: has {len(groups) if isinstance(groups, list) else groups!r} "
                f"parameter groups, this optimizer has {len(self.param_groups)}"
            )
        need = [*self._own_keys(), *self.base_optimizer.defaults]
        for i, group in enumerate(groups):
            missing = [k for k in need if k not in group]
            if missing:
                raise ValueError(
                    f"state_dict: parameter group {i} lacks {missing}; it was not saved by "
                    f"{name}({base_name}) (a plain torch.optim state dict, or another "
                    "optimizer's)"
                )
            self._validate_group(dict(group))
            if "lr" in group:
                check_lr(group["lr"])
        self._check_loaded_state_dict(state_dict)
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def _check_loaded_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Hook: pop and check the subclass's own entries (before anything changes)."""

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

    # -- torch.optim's step wrapper -------------------------------------------------

    @staticmethod
    def profile_hook_step(func: Callable[..., Any]) -> Callable[..., Any]:
        """The step wrapper ``Optimizer`` installs on every optimizer class's ``step``.

        Like torch's own, it runs the step hooks around ``func``: the global and then
        the optimizer's pre-hooks (:meth:`~torch.optim.Optimizer.register_step_pre_hook`;
        one may return new ``(args, kwargs)``), then the optimizer's and the global
        post-hooks, all inside a ``record_function`` profiler label. Unlike torch's,
        it calls ``func`` directly when no hook is registered and no profiler runs,
        because an idle ``record_function`` still slows every operation inside it.
        """

        @functools.wraps(func)
        def step(*args: Any, **kwargs: Any) -> Any:
            self = args[0]
            if not _step_observed(self):
                out = func(*args, **kwargs)
                self._optimizer_step_code()
                return out
            label = f"Optimizer.step#{type(self).__name__}.step"
            with torch.autograd.profiler.record_function(label):
                pre = _torch_optimizer._global_optimizer_pre_hooks
                for hook in [*pre.values(), *self._optimizer_step_pre_hooks.values()]:
                    result = hook(self, args, kwargs)
                    if result is None:
                        continue
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise RuntimeError(
                            f"step pre-hook {hook!r} must return None or a tuple "
                            f"(new_args, new_kwargs), got {result!r}"
                        )
                    args, kwargs = result
                out = func(*args, **kwargs)
                self._optimizer_step_code()
                post = _torch_optimizer._global_optimizer_post_hooks
                for hook in [*self._optimizer_step_post_hooks.values(), *post.values()]:
                    hook(self, args, kwargs)
                return out

        return step

    def _base_optimizer_step(self) -> None:
        """``base_optimizer.step()``; torch's step wrapper around it (hooks, profiler
        label) is skipped when nothing can observe it, as :meth:`profile_hook_step` does."""
        base = self.base_optimizer
        step = type(base).step
        unwrapped = getattr(step, "__wrapped__", None)
        if (
            getattr(step, "__code__", None) is not _TORCH_STEP_WRAPPER  # decorated again
            or unwrapped is None
            or "step" in vars(base)  # replaced on the instance (a test, a scheduler)
            or _step_observed(base)
        ):
            base.step()
            return
        unwrapped(base)
        base._optimizer_step_code()

    # -- the transaction: weights, buffers, optimizer state ------------------------

    @torch.no_grad()
    def _save_weights(self, params: list[torch.Tensor]) -> None:
        """Copy ``params`` (the weights at ``w``) into the reusable backup."""
        same = len(self._backup_params) == len(params) and all(
            a is b for a, b in zip(self._backup_params, params)
        )
        if same:
            torch._foreach_copy_(self._backup, params)
        else:
            self._backup = [p.detach().clone() for p in params]
            self._backup_params = list(params)
        self._weights_saved = True

    @torch.no_grad()
    def _load_weights(self) -> None:
        """Put the saved weights back (exactly: a copy, not an undo)."""
        if self._weights_saved and self._backup_params:
            torch._foreach_copy_(self._backup_params, self._backup)

    def _begin(self, oracle: Oracle | None) -> None:
        self._step_loss: Any = None
        self._weights_saved = False
        self._state_saved = False
        # buffers can only move if the step evaluates the model (a closure or loss_fn)
        self._buffers_saved = oracle is not None and self._pre_step_buffers is not None
        if self._buffers_saved:
            self._pre_step_buffers.save()
        self._extra_snapshot = self._save_extra()

    def _rollback(self) -> None:
        """Restore weights, buffers, optimizer state and extra state as before the step."""
        self._restore_perturbation()
        self._load_weights()
        if self._buffers_saved:
            self._pre_step_buffers.restore()
        if self._state_saved:
            self._state_snapshot.restore(self.state)
        self._restore_extra(self._extra_snapshot)

    def _end(self) -> None:
        self._weights_saved = False
        self._state_saved = False
        self._extra_snapshot = None

    def _save_extra(self) -> Any:
        """Hook: snapshot extra mutable state (a random generator...) at the step's start."""
        return None

    def _restore_extra(self, saved: Any) -> None:
        """Hook: put back what :meth:`_save_extra` returned."""

    def _restore_perturbation(self) -> None:
        """Hook: leave any perturbed state (SAM's flag) before the weights are restored."""

    # -- the step template ----------------------------------------------------------

    def _oracle(self, closure: Any, loss_fn: Any, batch: Any) -> Oracle | None:
        """Check the step's arguments (before any compute) and build the oracle."""
        name = type(self).__name__
        if closure is not None and (loss_fn is not None or batch is not None):
            raise TypeError(f"{name}.step(): pass either closure or loss_fn and batch, not both")
        if closure is not None:
            if not self._accepts_closure:
                raise TypeError(
                    f"{name}.step(): closure is not accepted ({self._why_no_closure()}); "
                    "call step(loss_fn=..., batch=...)"
                )
            if not callable(closure):
                raise TypeError(f"closure: expected a callable, got {type(closure).__name__}")
            return Oracle(closure, None, None, self.model)
        if loss_fn is None and batch is None:
            return None
        if loss_fn is None or batch is None:
            missing = "loss_fn" if loss_fn is None else "batch"
            raise TypeError(f"{name}.step(): {missing} is required with the other")
        if self.model is None:
            raise TypeError(
                f"model: {name}.step(loss_fn=..., batch=...) calls loss_fn(model, batch), so "
                f"pass the module as {name}(..., model=...)"
            )
        from .._batch import as_batch_loss

        fn = as_batch_loss(loss_fn, reduction=self._loss_reduction)
        if not callable(fn):
            raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
        return Oracle(None, fn, batch, self.model, self._loss_reduction)

    def _why_no_closure(self) -> str:
        return "it needs the batch"

    def _no_oracle(self) -> None:
        """``step()`` without closure or loss_fn: the default refuses."""
        name = type(self).__name__
        raise TypeError(
            f"{name}.step(): closure is required (a function that computes the loss and "
            "calls loss.backward()), or loss_fn=... and batch=..."
        )

    def step(  # type: ignore[override]
        self, closure: Closure | None = None, *, loss_fn: Any = None, batch: Any = None
    ) -> Any:
        """One update of the method; returns the loss at ``w``.

        Args:
            closure: computes the loss and calls ``backward()`` (torch.optim's
                contract); the step zeroes the gradients before each call.
            loss_fn: ``loss_fn(model, batch)`` returning the mean loss (or one loss
                per example where the method needs them); an ``nn`` loss module
                means ``(inputs, targets)`` batches. Needs ``model=`` at construction.
            batch: the batch ``loss_fn`` is evaluated on.

        Returns:
            The loss at ``w``: with a closure, what its first call returned; with
            ``loss_fn``/``batch``, the mean loss as a detached 0-d tensor. A skipped
            step (non-finite value) returns it too.
        """
        oracle = self._oracle(closure, loss_fn, batch)
        if oracle is None and not self._steps_on_existing_grads:
            return self._no_oracle()
        self._check_not_mid_step("step")
        self.check_hyperparameters()
        return self._transaction(oracle)

    def _transaction(self, oracle: Oracle | None) -> Any:
        """Run the hooks and the base step; restore everything on exception or skip."""
        self._begin(oracle)
        try:
            loss = self._run_and_reduce(oracle)
            if self._guarded_base_step():
                self._committed()
            else:  # skipped (non-finite gradient, found_inf): the clean pass's buffers go too
                self._rollback()
            return loss
        except SkipStep as skip:
            self._rollback()
            if skip.message:
                warnings.warn(
                    f"{type(self).__name__}: {skip.message}; the step was skipped and "
                    "the weights are unchanged",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return self._step_loss
        except BaseException:
            self._rollback()
            raise
        finally:
            self._end()

    def _run_and_reduce(self, oracle: Oracle | None) -> Any:
        """:meth:`_run`, then (data-parallel methods) the reduction of its gradient
        over the process group; the loss at ``w``."""
        return self._run(oracle)

    def _run(self, oracle: Oracle | None) -> Any:
        """Clean gradient, perturbation, perturbed gradient; the loss at ``w``."""
        loss = self._clean_gradient(oracle)
        self._step_loss = loss
        self._perturbation(oracle)
        self._perturbed_gradient(oracle)
        return loss

    # hooks ---------------------------------------------------------------------------

    def _clean_gradient(self, oracle: Oracle | None) -> Any:
        """Leave ``g = grad L(w)`` in ``.grad``; return the loss at ``w``."""
        assert oracle is not None
        loss = oracle.backward(self, "at w")
        self._require_grads("calling the closure at w" if oracle.is_closure else "loss_fn at w")
        return loss

    def _perturbation(self, oracle: Oracle | None) -> None:
        """Move to ``w + e`` (default: no perturbation). Raise :class:`SkipStep` on a
        non-finite value at ``w``."""

    def _perturbed_gradient(self, oracle: Oracle | None) -> None:
        """Leave the gradient the base step applies in ``.grad``, with the weights at ``w``."""

    def _committed(self) -> None:
        """Hook: the step was taken (advance counters)."""

    def _guarded_base_step(self) -> bool:
        """The base step inside the transaction: the weights (unless the perturbation
        saved them) and the optimizer state are copied first, in one fused copy, so a
        base step that raises midway is undone exactly. ``False`` if skipped."""
        weights = [] if self._weights_saved else self._step_params()
        with torch.no_grad():
            self._save_state(weights)
            return self._base_step()

    def _step_params(self) -> list[torch.Tensor]:
        """The parameters the base step updates: those holding a gradient."""
        return [p for _, ps in self._params_with_grad() for p in ps]

    def _save_state(self, weights: list[torch.Tensor]) -> None:
        """Snapshot the optimizer state and ``weights`` (under ``torch.no_grad()``);
        a rollback restores both."""
        self._state_snapshot.save(self.state, weights)
        self._state_saved = True

    def _base_step(self, check_finite: bool = True) -> bool:
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
            self._base_optimizer_step()
            return True
        grads = self._all_grads() if check_finite else []
        if grads and not bool(torch.isfinite(global_norm(grads))):
            warnings.warn(
                f"{type(self).__name__}: non-finite gradient; the step was skipped and "
                "the weights are unchanged",
                RuntimeWarning,
                stacklevel=6,  # the caller of step()
            )
            return False
        self._base_optimizer_step()
        return True


# ----------------------------------------------------------------------------
# SAMBase: perturb, second pass, restore, base step
# ----------------------------------------------------------------------------


class SAMBase(WrappedOptimizer):
    r"""Two-pass Sharpness-Aware Minimization on top of any base optimizer.

    One update, with ``g(w)`` the gradient of the loss at ``w``:

    .. math::

        e = \rho \, d(w, g(w)) / \|\cdot\|, \qquad
        w \leftarrow \mathrm{base\_step}\big(w,\; g(w + e)\big)

    where the ascent direction ``d`` is supplied by the subclass
    (:meth:`_ascent_direction`) and the gradient is *evaluated* at ``w + e`` but
    *applied* at ``w``.

    Three ways to drive it:

    - ``step(closure)``: the closure computes the loss and calls ``backward()``;
      ``step`` zeroes gradients itself, evaluates the closure at ``w``, perturbs,
      evaluates it at ``w + e``, restores ``w``, applies the base step and returns
      what the first closure call returned.
    - ``step(loss_fn=..., batch=...)`` with ``model=`` given: the same with
      ``loss_fn(model, batch)``; returns the mean loss at ``w``, detached.
    - ``first_step()`` / ``second_step()``: the manual form (forward/backward
      before each), for gradient accumulation and mixed precision. With a
      :class:`torch.amp.GradScaler`, call ``scaler.step(optimizer)`` in place of
      ``second_step()``: the weights are restored even when the scaler skips the
      update because of inf/NaN gradients.

    If ``model`` is given, its buffers (BatchNorm running statistics) are saved
    before the perturbed pass and restored after it, so they come from the clean
    pass only. If anything raises during ``step``, the weights, buffers and the
    base optimizer's state are restored before the exception propagates.
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
        super().__init__(params, base_optimizer, defaults, base_kwargs, model=model)
        # buffers after the clean pass, restored after the perturbed pass
        self._buffers = BufferSnapshot(model) if model is not None else None

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
    ) -> tuple[list[Any], torch.Tensor]:
        """Return, per group, the unnormalised direction ``d`` and the norm to divide by.

        The perturbation is ``e = rho_group * d / norm``. The default is plain SAM:
        ``d = g`` and ``norm = ||g||`` over all parameters together. Subclasses that
        need temporaries should write them into :meth:`_scratch` buffers (allocating
        fresh parameter-sized tensors every step is slow on the CPU).
        """
        grads = [[p.grad for p in ps] for _, ps in groups]
        flat = [g for gs in grads for g in gs]
        return grads, global_norm(flat)

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
        self._save_weights(params)
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

    def _restore_perturbation(self) -> None:
        self._restore()

    # -- hooks of the step template ---------------------------------------------------

    def _perturbation(self, oracle: Oracle | None) -> None:
        if not self._perturb() and not bool(torch.isfinite(global_norm(self._all_grads()))):
            raise SkipStep("non-finite gradient at w")

    def _perturbed_gradient(self, oracle: Oracle | None) -> None:
        assert oracle is not None
        oracle.backward(self, "at w + e")
        self._restore()

    # -- the manual two-phase form ---------------------------------------------------

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
        self._state_saved = False
        try:
            self._guarded_base_step()
        except BaseException:
            self._load_weights()
            if self._state_saved:
                self._state_snapshot.restore(self.state)
            raise
        finally:
            self._weights_saved = False
            self._state_saved = False
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def _no_oracle(self) -> Any:
        if self._perturbed:  # GradScaler.step(opt) after first_step(): the second phase
            self.second_step()
            return None
        name = type(self).__name__
        raise TypeError(
            f"{name}.step(): closure is required (a function that computes the loss and "
            "calls loss.backward()), or loss_fn=... and batch=... (with model=); or drive "
            "the two passes yourself with first_step() and second_step()"
        )


class BatchDrivenSAM(SAMBase):
    r"""Base of SAM variants driven by ``step(loss_fn=..., batch=...)`` only.

    They must see inside the batch (to split it, or to get one loss per example),
    so neither a closure nor the manual two-phase form ``first_step()``/
    ``second_step()`` can drive them; subclasses say why in ``_needs_batch``.

    **Data parallel.** Given a ``DistributedDataParallel`` model (or a
    ``process_group``), each rank runs the method on its own batch ``B_r``
    locally, with no communication (the DDP wrapper is bypassed: its hooks
    would all-reduce every backward pass), and the ranks' update directions
    are then averaged by one all-reduce, weighted by their batch weights
    (example counts, or target tokens for a token-mean loss:
    :func:`sharpkit._batch.batch_weight`):

    .. math:: G = \sum_r \frac{n_r}{N} G_r, \qquad N = \sum_r n_r,

    so every rank takes the same base step. The returned loss is the global
    weighted mean. A non-finite value on any rank skips the step on
    every rank. The model's buffers (BatchNorm running statistics, updated by
    each rank's own clean passes) are then rank 0's on every rank, as DDP's
    forward would make them: replicas never drift apart. For mSAM this is the
    paper's parallel form: each rank's micro-batches are micro-batches of the
    global batch, so ``R`` ranks with ``m`` micro-batches each equal one process
    with ``R * m`` micro-batches on the concatenated batch, with one all-reduce
    per step where SAM under DDP needs two.
    """

    _needs_batch = "it needs the batch"
    _accepts_closure = False

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Callable[..., Optimizer],
        defaults: dict[str, Any],
        base_kwargs: dict[str, Any],
        model: nn.Module | None = None,
        process_group: Any = None,
    ) -> None:
        ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
        if ddp is not None:
            model = ddp.module
            if process_group is None:
                process_group = ddp.process_group
        super().__init__(params, base_optimizer, defaults, base_kwargs, model=model)
        #: the group the update directions are averaged over (``None``: one process)
        self.process_group = process_group
        if process_group is not None:
            from sharpkit.distributed import require_process_group

            require_process_group("process_group")

    def _run_and_reduce(self, oracle: Oracle | None) -> Any:
        if self.process_group is None:
            return self._run(oracle)
        from sharpkit.distributed import all_reduce_sum

        assert oracle is not None and oracle.loss_fn is not None
        skipped: SkipStep | None = None
        try:
            loss = self._run(oracle)
        except SkipStep as skip:
            skipped, loss = skip, self._step_loss
        n = oracle.weight  # the batch's weight in the loss's normalisation (examples, tokens)
        assert n is not None
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        has = [p.grad is not None for p in params] if skipped is None else [False] * len(params)
        value = float(loss) if skipped is None and loss is not None else 0.0
        meta = torch.tensor(
            [float(n), value * n, 1.0 if skipped is not None else 0.0, *map(float, has)],
            dtype=torch.float64,
        )
        flat = [
            (p.grad.reshape(-1) * n)
            if h
            else torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
            for p, h in zip(params, has)
        ]
        by_dtype: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, p in enumerate(params):
            by_dtype.setdefault((p.dtype, p.device), []).append(i)
        meta = all_reduce_sum(meta, self.process_group)
        total = float(meta[0])
        self._step_loss = loss.new_tensor(float(meta[1]) / total) if loss is not None else None
        if float(meta[2]) > 0:
            raise SkipStep("non-finite value on some rank")
        for idx in by_dtype.values():
            reduced = all_reduce_sum(torch.cat([flat[i] for i in idx]), self.process_group)
            for i, chunk in zip(idx, torch.split(reduced, [params[i].numel() for i in idx])):
                if float(meta[3 + i]) > 0:
                    params[i].grad = chunk.view_as(params[i]).div_(total)
                else:
                    params[i].grad = None
        if self.model is not None:  # the wrapper's forward, bypassed, would have done it
            from sharpkit.distributed import broadcast_from_first

            broadcast_from_first(list(self.model.buffers()), self.process_group)
        return self._step_loss

    def _why_no_closure(self) -> str:
        return self._needs_batch

    def first_step(self, zero_grad: bool = False) -> None:
        raise TypeError(
            f"{type(self).__name__} has no first_step()/second_step(): {self._needs_batch}; "
            "call step(loss_fn=..., batch=...)"
        )

    def second_step(self, zero_grad: bool = False) -> None:
        self.first_step()

    def _no_oracle(self) -> Any:
        name = type(self).__name__
        raise TypeError(
            f"{name}.step(loss_fn=..., batch=...): loss_fn and batch are required "
            f"({self._needs_batch}; a closure cannot do that)"
        )
