"""Evaluating a model at other weights without touching it: the one functional layer.

Every measurement in sharpkit (Hessian-vector products, sharpness metrics, loss
landscapes, dense test oracles) evaluates the user's network at weights other
than its own. They all do it the same way, here:

- **Parameter selection** (:func:`select_parameters`): ``None`` (the trainable
  parameters), a list of names, or a predicate on names.
- **Evaluation at other weights** (:class:`FrozenModel`): the parameters and
  buffers are copied once (in the compute dtype, on the compute device); a call
  ``frozen.caller(values)`` returns a function that runs the module through
  :func:`torch.func.functional_call` with ``values`` in place of the selected
  parameters. The module's own tensors are never read again nor written.
- **BatchNorm policy**: buffers are cloned for every call, so a BatchNorm in
  training mode normalises with the batch statistics but its running statistics
  never accumulate (neither in the copy nor in the module);
  :func:`train_mode_batchnorm` names a BatchNorm that would update them.
- **Module mode**: :meth:`FrozenModel.evaluating` puts the module in the
  requested mode (``"eval"`` or ``"train"``) for the block and restores every
  submodule's own flag afterwards.
- **Random-state replay** (:class:`~sharpkit._rng.RandomState`): every
  evaluation replays one saved global random state, so dropout in training mode
  draws the same masks at every evaluation and the loss is a fixed function of
  the weights. Measurements that must agree share one state (``random_state``).
- **Second order through attention** (:func:`second_order_kernels`): torch's
  fused attention kernels (flash / memory-efficient
  ``scaled_dot_product_attention``, the native fast path of
  ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``) have no double
  backward and no forward-mode derivative. Second-order and forward-mode
  evaluations run with the math backend and the fast path off; first-order
  evaluations keep the fast kernels.
- **vmap over models** (:func:`vmap_over_model`): ``torch.func.vmap`` with
  the value checks of Hugging Face's attention-mask builders turned off (they
  branch on mask values to skip building a mask, which ``vmap`` cannot trace),
  and attention on its math backend (the fused kernels have no batching
  rule), so MSAM's micro-batches and per-example gradients vectorise on
  transformers.
- **Batch trees** (:func:`tree_flatten`): one walker over the tensors of a batch
  (nested tuples, lists, named tuples and mappings, including mapping types such
  as Hugging Face's ``BatchEncoding``).
- :class:`FunctionalView`: the optimizer-side view (the trainable parameters of
  an optimizer's groups as named tensors of the live module, for ``vmap``).

References:
    PyTorch documentation: ``torch.func.functional_call``,
    ``torch.nn.attention.sdpa_kernel``, ``torch.backends.mha``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from sharpkit._device import resolve_device
from sharpkit._rng import RandomState

__all__ = [
    "MODES",
    "FrozenModel",
    "FunctionalView",
    "NotVectorisable",
    "RandomState",
    "batch_leaves",
    "check_model_mode_dtype",
    "second_order_kernels",
    "select_parameters",
    "train_mode_batchnorm",
    "tree_flatten",
    "vmap_over_model",
    "vmap_safe_masks",
]

#: The module modes a measurement can run in.
MODES = ("eval", "train")


# ----------------------------------------------------------------------------
# Argument checks and parameter selection
# ----------------------------------------------------------------------------


def check_model_mode_dtype(model: Any, mode: Any, dtype: Any) -> None:
    """Check the arguments shared by every measurement on a model.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``dtype`` is not a floating dtype.
        ValueError: ``mode`` is not ``"eval"`` or ``"train"``.

    Example:
        >>> check_model_mode_dtype(nn.Linear(2, 1), "test", None)
        Traceback (most recent call last):
        ...
        ValueError: mode: expected one of ('eval', 'train'), got 'test'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")


def select_parameters(model: nn.Module, params: Any, *, allow_frozen: bool = False) -> list[str]:
    """The parameter names chosen by ``params``, in ``named_parameters`` order for a predicate.

    Args:
        model: the network.
        params: ``None`` (every parameter with ``requires_grad=True``), a list of
            parameter names (kept in the given order), or a predicate ``name -> bool``.
        allow_frozen: accept parameters with ``requires_grad=False`` among those
            selected by name or predicate (metrics that only evaluate the loss at
            other values may use them; gradients and Hessians may not).

    Returns:
        The selected names (at least one).

    Raises:
        TypeError: ``params`` of another type, or a list entry that is not a string.
        ValueError: nothing selected, an unknown or repeated name, or a frozen
            parameter without ``allow_frozen``.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
        >>> select_parameters(model, lambda n: n.endswith("weight"))
        ['0.weight', '1.weight']
    """
    named = dict(model.named_parameters())
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
        if not names:
            raise ValueError(
                "params: the model has no trainable parameters (all have requires_grad=False)"
            )
        return names
    if callable(params) and not isinstance(params, (str, list, tuple)):
        names = [n for n in named if params(n)]
        if not names:
            raise ValueError("params: the predicate selected no parameter")
    elif isinstance(params, (list, tuple)):
        if not params:
            raise ValueError("params: the list of parameter names is empty")
        names = []
        for n in params:
            if not isinstance(n, str):
                raise TypeError(f"params: expected parameter names (str), got {type(n).__name__}")
            if n not in named:
                raise ValueError(f"params: the model has no parameter named {n!r}")
            if n in names:
                raise ValueError(f"params: {n!r} is listed twice")
            names.append(n)
    else:
        raise TypeError(
            "params: expected None, a list of parameter names or a predicate on names, "
            f"got {type(params).__name__}"
        )
    frozen = [n for n in names if not named[n].requires_grad]
    if frozen and not allow_frozen:
        raise ValueError(
            f"params: {frozen} have requires_grad=False (no gradient); select trainable "
            "parameters only"
        )
    return names


def train_mode_batchnorm(model: nn.Module) -> str | None:
    """Name of the first BatchNorm that updates running statistics on a forward, if any.

    Example:
        >>> train_mode_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
        '1'
        >>> train_mode_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval()) is None
        True
    """
    for name, mod in model.named_modules():
        if (
            isinstance(mod, nn.modules.batchnorm._BatchNorm)
            and mod.training
            and mod.track_running_stats
            and mod.running_mean is not None
        ):
            return name or type(mod).__name__
    return None


def _has_tied_tensors(model: nn.Module) -> bool:
    owners = [id(t) for _, t in model.named_parameters(remove_duplicate=False)]
    owners += [id(t) for _, t in model.named_buffers(remove_duplicate=False)]
    return len(owners) != len(set(owners))


# ----------------------------------------------------------------------------
# Attention kernels with second derivatives
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def second_order_kernels() -> Iterator[None]:
    """Inside the block, attention runs on kernels that have second derivatives.

    ``F.scaled_dot_product_attention`` uses the math backend (its fused flash and
    memory-efficient kernels, on the CPU and on CUDA, have neither a double
    backward nor a forward-mode derivative), and the native fast path of
    ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` (taken in eval
    mode when no gradient is recorded, e.g. under ``torch.func.jvp``) is off, so
    those modules call the differentiable composite. The math backend computes
    the same function (to rounding) with more memory for the attention matrix.
    Both settings are restored afterwards.

    Example:
        >>> attn = nn.MultiheadAttention(4, 2, batch_first=True).eval()
        >>> x = torch.randn(1, 3, 4)
        >>> f = lambda x: attn(x, x, x, need_weights=False)[0]
        >>> with torch.no_grad(), second_order_kernels():
        ...     _, tangent = torch.func.jvp(f, (x,), (torch.ones_like(x),))
        >>> tangent.shape
        torch.Size([1, 3, 4])
    """
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


# ----------------------------------------------------------------------------
# vmap over models
# ----------------------------------------------------------------------------

#: Hugging Face's mask shortcuts: each decides, from the *values* of the padding
#: mask (``mask.all()``), whether the attention mask can be left out (SDPA's
#: ``is_causal`` instead). Returning False builds the explicit mask, the same
#: function of the inputs.
_HF_MASK_SHORTCUTS = ("_ignore_causal_mask_sdpa", "_ignore_bidirectional_mask_sdpa")


def _never_skip(*args: Any, **kwargs: Any) -> bool:
    return False


@contextlib.contextmanager
def vmap_safe_masks() -> Iterator[None]:
    """Inside the block, Hugging Face models build their attention masks without
    reading the mask's values, so ``torch.func.vmap`` can run them.

    ``transformers.masking_utils`` checks whether a padding mask is all ones
    (``if padding_mask.all()``) to leave the attention mask out; under ``vmap``
    that is data-dependent control flow and fails ("vmap: It looks like you're
    ... attempting to use a Tensor in some data-dependent control flow"). In the
    block these shortcuts answer "no", so the explicit mask is built: the same
    attention (a mask of ones where the shortcut would have used none). Nothing
    is done when transformers is not imported, and functions a transformers
    version lacks are left alone (its models then fail under ``vmap`` as before
    and the caller's sequential fallback names the cause). The module attributes
    are restored afterwards; not thread-safe.

    Example:
        >>> with vmap_safe_masks():
        ...     pass
    """
    masks = sys.modules.get("transformers.masking_utils")
    saved = {n: getattr(masks, n) for n in _HF_MASK_SHORTCUTS if hasattr(masks, n)}
    for name in saved:
        setattr(masks, name, _never_skip)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(masks, name, fn)


def vmap_over_model(func: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
    """``torch.func.vmap(func, **kwargs)`` whose calls run in :func:`vmap_safe_masks`
    with ``scaled_dot_product_attention`` on its math backend.

    Every vmap that sharpkit runs over a user's model (MSAM's micro-batches,
    per-example gradients, delta-SAM's probes, the per-instance target) goes
    through it. The fused attention kernels (flash, memory-efficient) have no
    ``vmap`` batching rule, so under ``vmap`` torch runs them one slice at a time
    (its "performance drop" warning); the math backend is ordinary batched
    matrix products, the same attention to rounding.

    Example:
        >>> lin = nn.Linear(3, 1)
        >>> vmap_over_model(lin)(torch.zeros(5, 2, 3)).shape
        torch.Size([5, 2, 1])
    """
    batched = vmap(func, **kwargs)

    def call(*args: Any, **kw: Any) -> Any:
        with vmap_safe_masks(), sdpa_kernel(SDPBackend.MATH):
            return batched(*args, **kw)

    return call


# ----------------------------------------------------------------------------
# Batch trees
# ----------------------------------------------------------------------------


def tree_flatten(tree: Any) -> tuple[list[Any], Callable[[Sequence[Any]], Any]]:
    """The leaves of a batch tree and a function that rebuilds the tree from new leaves.

    Tuples, lists, named tuples and mappings (any ``Mapping``, rebuilt with its own
    type) are walked; everything else (tensors, numbers, strings, ``None``) is a
    leaf, in depth-first order.

    Example:
        >>> leaves, rebuild = tree_flatten({"x": torch.zeros(2), "meta": ("a", 3)})
        >>> leaves
        [tensor([0., 0.]), 'a', 3]
        >>> rebuild([1, "b", 4])
        {'x': 1, 'meta': ('b', 4)}
    """
    leaves: list[Any] = []

    def walk(x: Any) -> Callable[[Sequence[Any]], Any]:
        if isinstance(x, Mapping):
            parts = {k: walk(v) for k, v in x.items()}
            return lambda vals: type(x)({k: f(vals) for k, f in parts.items()})
        if isinstance(x, tuple) and hasattr(x, "_fields"):  # a named tuple
            items = [walk(v) for v in x]
            return lambda vals: type(x)(*(f(vals) for f in items))
        if isinstance(x, (tuple, list)):
            items = [walk(v) for v in x]
            return lambda vals: type(x)(f(vals) for f in items)
        i = len(leaves)
        leaves.append(x)
        return lambda vals: vals[i]

    rebuild = walk(tree)
    return leaves, rebuild


def batch_leaves(batch: Any, n: int) -> tuple[list[torch.Tensor], Callable[[list[Any]], Any]]:
    """The tensors of ``batch`` with ``n`` leading examples, and a function that
    rebuilds the batch from replacements for them (every other leaf is kept).

    Example:
        >>> leaves, rebuild = batch_leaves((torch.zeros(3, 2), torch.zeros(5)), 3)
        >>> [tuple(t.shape) for t in leaves]
        [(3, 2)]
        >>> [tuple(t.shape) for t in rebuild([torch.ones(1, 2)])]
        [(1, 2), (5,)]
    """
    leaves, rebuild = tree_flatten(batch)
    picked = [
        i
        for i, x in enumerate(leaves)
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n
    ]

    def replace(vals: list[Any]) -> Any:
        new = list(leaves)
        for i, v in zip(picked, vals):
            new[i] = v
        return rebuild(new)

    return [leaves[i] for i in picked], replace


# ----------------------------------------------------------------------------
# Frozen copies evaluated functionally
# ----------------------------------------------------------------------------


def _module_modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _describe_modes(modes: dict[nn.Module, bool]) -> str:
    flags = set(modes.values())
    if flags == {True}:
        return "train"
    if flags == {False}:
        return "eval"
    return "mixed"


class FrozenModel:
    r"""A module's parameters and buffers copied once, and the module run at other values.

    For selected parameters :math:`w` (``names``) and the rest :math:`c` (other
    parameters and buffers, held at their values at construction), a call

    .. math::  f(x; w') = \mathrm{model}(x; w', c)

    runs the module through ``torch.func.functional_call`` with ``w'`` in place of
    ``w``. The module's own tensors are neither read nor written after
    construction, so later optimizer steps do not change what this evaluates.

    Args:
        model: the network (never modified; its modes are switched only inside
            :meth:`evaluating` and restored there).
        params: the selection (see :func:`select_parameters`).
        mode: ``"eval"`` or ``"train"``: the module mode of every evaluation.
        dtype: compute dtype of the copies (``None`` keeps the parameters').
        device: compute device (``None`` uses the parameters').
        allow_frozen: accept selected parameters with ``requires_grad=False``.
        random_state: the random state every evaluation replays (``None``: the
            global state at construction); pass another measurement's state to
            make both see the same random draws.

    Attributes:
        names: selected parameter names; ``values`` their frozen copies (a dict).
        constants: the other parameters' copies; ``buffers`` the buffers' copies.
        caller_mode: the modes the module had at construction (``"train"``,
            ``"eval"`` or ``"mixed"``).

    Example:
        >>> lin = nn.Linear(2, 1)
        >>> frozen = FrozenModel(lin, dtype=torch.float64)
        >>> w = {n: torch.zeros_like(t) for n, t in frozen.values.items()}
        >>> with frozen.evaluating():
        ...     out = frozen.caller(w)(torch.ones(3, 2, dtype=torch.float64))
        >>> out.abs().sum().item(), lin.weight.dtype
        (0.0, torch.float32)
    """

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[str] | Callable[[str], bool] | None = None,
        *,
        mode: str = "eval",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        allow_frozen: bool = False,
        random_state: RandomState | None = None,
    ) -> None:
        check_model_mode_dtype(model, mode, dtype)
        if random_state is not None and not isinstance(random_state, RandomState):
            raise TypeError(
                f"random_state: expected a sharpkit RandomState or None, got "
                f"{type(random_state).__name__}"
            )
        names = select_parameters(model, params, allow_frozen=allow_frozen)
        named = dict(model.named_parameters())
        first = named[names[0]]
        self.model = model
        self.mode = mode
        self.device = resolve_device(device) if device is not None else first.device
        self.dtype = dtype if dtype is not None else first.dtype
        copies = {n: self._cast(p) for n, p in named.items()}
        self.names = names
        self.values = {n: copies[n] for n in names}
        self.constants = {n: t for n, t in copies.items() if n not in self.values}
        self.buffers = {n: self._cast(b) for n, b in model.named_buffers()}
        self.tied = _has_tied_tensors(model)
        self.caller_mode = _describe_modes(_module_modes(model))
        self._plain_train = all(type(m).train is nn.Module.train for m in model.modules())
        self.random_state = (
            random_state if random_state is not None else RandomState(self.values.values())
        )

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.is_floating_point():
            return t.to(device=self.device, dtype=self.dtype, copy=True)
        return t.to(device=self.device, copy=True)

    def select(self, names: Sequence[str]) -> FrozenModel:
        """The same frozen copies and random state with another selection (a sub-block).

        Example:
            >>> frozen = FrozenModel(nn.Linear(2, 1))
            >>> frozen.select(["bias"]).names, list(frozen.select(["bias"]).constants)
            (['bias'], ['weight'])
        """
        every = {**self.values, **self.constants}
        unknown = [n for n in names if n not in every]
        if unknown or not names:
            raise ValueError(f"names: expected parameter names of the model, got {list(names)}")
        view = object.__new__(FrozenModel)
        view.__dict__.update(self.__dict__)
        view.names = list(names)
        view.values = {n: every[n] for n in names}
        view.constants = {n: t for n, t in every.items() if n not in view.values}
        return view

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace every frozen copy (parameters and buffers) by the entries of a full
        ``state_dict`` of the module (cast to the compute dtype and device).

        Raises:
            ValueError: the keys are not those of ``model.state_dict()``.
        """
        expected = set(self.model.state_dict())
        if set(state) != expected:
            raise ValueError(
                f"state: keys differ from the model's state_dict: missing "
                f"{sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)}"
            )
        for table in (self.values, self.constants, self.buffers):
            for n in table:
                table[n] = self._cast(state[n])

    def caller(
        self, values: Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | None = None
    ) -> Callable[..., Any]:
        """A function that runs the module with ``values`` for the selected parameters.

        Args:
            values: ``{name: tensor}`` or tensors in ``names`` order; ``None``: the
                frozen values. Buffers are cloned per call (the BatchNorm policy).
        """
        if values is None:
            values = self.values
        elif not isinstance(values, Mapping):
            values = dict(zip(self.names, values))
        model, tied = self.model, self.tied
        fixed = {**self.constants, **values}
        buffers = self.buffers

        def call(*args: Any, **kwargs: Any) -> Any:
            state = {**fixed, **{n: b.clone() for n, b in buffers.items()}}
            return functional_call(model, state, args, kwargs, tie_weights=tied)

        return call

    @contextlib.contextmanager
    def evaluating(self, *, second_order: bool = False) -> Iterator[None]:
        """Context for evaluations: the module in ``mode``, the random state replayed,
        and with ``second_order`` the attention kernels of :func:`second_order_kernels`.
        Every submodule's own mode is restored afterwards."""
        flag = self.mode == "train"
        changed = [m for m in self.model.modules() if m.training != flag]
        if changed and self._plain_train:
            for m in changed:  # the flag itself: what Module.train sets, without its walk
                m.__dict__["training"] = flag
        elif changed:
            self.model.train(flag)  # some module overrides train(): let it run
        try:
            with self.random_state.replayed():
                if second_order:
                    with second_order_kernels():
                        yield
                else:
                    yield
        finally:
            for m in changed:
                m.__dict__["training"] = not flag


# ----------------------------------------------------------------------------
# The optimizer-side view of the live module
# ----------------------------------------------------------------------------


class NotVectorisable(Exception):
    """The model or the optimizer's parameters rule out ``torch.func.vmap``."""


class FunctionalView:
    """The optimizer's trainable parameters as named tensors of ``model``.

    ``trainable`` lists ``(name, parameter, group)`` for every parameter of the
    optimizer that requires a gradient, in group order. ``caller(params)``
    returns a callable that runs ``model`` with ``params`` in place of the
    trainable tensors (``torch.func.functional_call``; every other parameter and
    buffer is the module's own unless ``extra`` replaces it), so a loss function
    that calls its model argument works unchanged under ``vmap``. A tensor
    registered under several names (tied weights) is replaced under all of them;
    ``tied`` says whether the model has any.

    Args:
        model: the live module.
        groups: the optimizer's ``param_groups`` (dicts with a ``"params"`` list).

    Raises:
        NotVectorisable: if a trainable parameter is not one of ``model``'s.

    Example:
        >>> lin = nn.Linear(2, 1)
        >>> view = FunctionalView(lin, [{"params": list(lin.parameters())}])
        >>> zeros = {n: torch.zeros_like(p) for n, p in zip(view.names, view.params)}
        >>> view.caller(zeros)(torch.ones(1, 2)).item()
        0.0
    """

    def __init__(self, model: nn.Module, groups: list[dict[str, Any]]) -> None:
        name_of = {id(p): n for n, p in model.named_parameters()}
        self.model = model
        self.trainable: list[tuple[str, torch.Tensor, dict[str, Any]]] = []
        seen: set[int] = set()
        for group in groups:
            for p in group["params"]:
                if not p.requires_grad or id(p) in seen:
                    continue
                if id(p) not in name_of:
                    raise NotVectorisable(
                        "a parameter of the optimizer is not a parameter of `model` "
                        f"(shape {tuple(p.shape)})"
                    )
                seen.add(id(p))
                self.trainable.append((name_of[id(p)], p, group))
        self.names = [n for n, _, _ in self.trainable]
        self.params = [p for _, p, _ in self.trainable]
        # functional_call's weight-tying pass walks the whole module on every call;
        # it is needed only when one tensor is registered under several names
        self.tied = _has_tied_tensors(model)

    def caller(
        self,
        params: Mapping[str, torch.Tensor],
        extra: Mapping[str, torch.Tensor] | None = None,
    ) -> Callable[..., Any]:
        """A callable running ``model`` with ``params`` (and ``extra``) in place of its tensors."""
        tensors = {**params, **extra} if extra else dict(params)
        model, tied = self.model, self.tied

        def call(*args: Any, **kwargs: Any) -> Any:
            return functional_call(model, tensors, args, kwargs, tie_weights=tied)

        return call
