"""The Hessian of a loss over data, as a linear operator (Hessian-vector products).

For parameters ``w`` (all trainable ones, a named subset, or one module's block),
data made of batches ``B_1, ..., B_m`` with ``n_b`` examples each and a batch loss
``L_b(w)`` that is the *mean* over its batch, the operator is the Hessian of the
example-weighted average

    L(w) = sum_b (n_b / N) L_b(w),   N = sum_b n_b,   H v = sum_b (n_b / N) H_b v,

so a short last batch weighs less (PAPERS.md section 5). ``H v`` is never formed
from a dense ``H``: it is one Hessian-vector product through ``torch.func``'s
``functional_call``: reverse-over-reverse (double backward), forward-over-reverse
(``jvp`` of ``grad``, Pearlmutter 1994), or forward-over-reverse on a cached
linearisation of the gradient map (``torch.func.linearize``: the map
``v -> H v`` is traced once per batch, and each product then evaluates only its
tangent part, none of the forward or backward pass). Parameters and
buffers are passed to ``functional_call`` explicitly, frozen at construction, so
the caller's model is never written to. The module mode is explicit (``"eval"``
by default); the caller's modes are restored after every product and recorded.
Every evaluation replays the random-number state of construction, so a model
with dropout in ``"train"`` mode gives the Hessian of one fixed draw of its
masks (the same draw at every product) rather than a new random matrix each time.

References:
    Pearlmutter. Fast exact multiplication by the Hessian. Neural Computation, 1994.
    Dangel, Tatzel, Hennig. curvlinops (operator/estimator split).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from sharpkit._batch import as_batch_loss, batch_size, iter_batches, move_batch
from sharpkit._device import resolve_device
from sharpkit._quiet import torch_internal_notices_hidden
from sharpkit._rng import RandomState
from sharpkit.io.results import MeasurementProtocol

__all__ = ["HVP_IMPLEMENTATIONS", "HessianOperator", "linearize_blocker"]

#: Hessian-vector-product implementations: reverse-over-reverse (double backward,
#: the gradient graph of a single batch is cached and reused), torch.func
#: forward-over-reverse (``jvp`` of ``grad``) and forward-over-reverse on a cached
#: linearisation (``torch.func.linearize`` of ``grad``, traced once per batch).
HVP_IMPLEMENTATIONS = ("rev-rev", "fwd-rev", "linearize")

# What "auto" takes, chosen by measurement (analysis/benchmarks/bench_curvature.py,
# results/curvature.md). On the 2-core CPU, one product on 512 digits examples cost,
# in gradients: cached rev-rev 1.7-2.1x (MLP, CNN, transformer block), linearize
# 1.8x (faster on the CNN and the transformer, not on the MLP, after a one-off
# trace of 0.1-0.8 s, with 2-5x the peak memory), torch.func fwd-rev 4.2-8.1x,
# rev-rev without the cache 3.3-3.5x. linearize is not the default: in torch 2.13
# tracing the second derivative of nn.MSELoss kills the process with a
# segmentation fault (no exception to fall back from), torch.func.linearize has
# failed on other graphs before (pytorch/pytorch#124550), and it is not faster
# everywhere. CUDA was not measured yet (no GPU was lent): rev-rev until a
# measurement says otherwise.
_DEFAULT_HVP = {"cpu": "rev-rev", "cuda": "rev-rev"}
_CACHING = ("rev-rev", "linearize")

_MODES = ("eval", "train")


def linearize_blocker(loss_fn: Any) -> str | None:
    """Why ``hvp="linearize"`` must not run with ``loss_fn``, or ``None``.

    Tracing the second derivative of ``nn.MSELoss`` kills the process with a
    segmentation fault in torch 2.13 (no exception to catch), so that case is
    refused up front. A loss that calls ``F.mse_loss`` inside a function cannot
    be recognised here; write it as ``((out - y) ** 2).mean()`` to use linearize.
    """
    if isinstance(loss_fn, nn.MSELoss):
        return (
            "torch's tracer crashes the process (segmentation fault, seen in torch 2.13) "
            "on nn.MSELoss; use hvp='rev-rev', or write the loss as ((out - y) ** 2).mean()"
        )
    return None


def _check_model_mode_dtype(model: Any, mode: Any, dtype: Any) -> None:
    """The argument checks shared by every measurement on a model (Hessian, sharpness)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if mode not in _MODES:
        raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")


def _select_names(model: nn.Module, params: Any, *, allow_frozen: bool = False) -> list[str]:
    """Parameter names chosen by ``params`` (None, a list of names or a predicate).

    ``allow_frozen`` accepts explicitly named parameters with ``requires_grad=False``
    (metrics that perturb a private copy may select them; Hessians may not).
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


def _module_modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _describe_modes(modes: dict[nn.Module, bool]) -> str:
    flags = set(modes.values())
    if flags == {True}:
        return "train"
    if flags == {False}:
        return "eval"
    return "mixed"


class HessianOperator:
    """The Hessian of ``loss_fn`` over ``data`` w.r.t. selected parameters, as ``v -> H v``.

    Args:
        model: the network (an ``nn.Module``); it is never modified.
        loss_fn: ``loss_fn(model, batch) -> scalar mean loss`` or an nn loss module
            (then batches are ``(inputs, targets)``), see :mod:`sharpkit._batch`.
        data: one batch or an iterable of batches. Batches are materialised (moved to
            ``device``/``dtype``) once, so the operator is a fixed matrix even for a
            shuffling loader.
        params: ``None`` (all trainable parameters), a list of parameter names, or a
            predicate ``name -> bool``. The other parameters and all buffers are held
            constant.
        mode: ``"eval"`` (default) or ``"train"``: the module mode used inside each
            product. The caller's modes are restored afterwards; ``protocol()`` records
            both.
        dtype: compute dtype (e.g. ``torch.float64``); ``None`` keeps the parameters'.
        device: compute device; ``None`` uses the parameters' device.
        hvp: ``"auto"`` (the measured default for the device, see below),
            ``"rev-rev"``, ``"fwd-rev"`` or ``"linearize"`` (opt-in, see below).
        cache_graph: keep per-batch work for reuse by every product. Reverse-over-
            reverse keeps each batch's gradient graph (one double-backward per
            product instead of a forward, a backward and a double-backward);
            ``"linearize"`` always caches (its linearisation is the cache).
            ``None`` caches when the data is a single batch. Costs the memory of
            the graphs (about the activations of the forward and backward passes).

    **Choice of implementation.** ``"auto"`` is ``"rev-rev"`` (cached for one
    batch), the robust choice on every device. ``"linearize"``
    (forward-over-reverse on a ``torch.func.linearize`` trace of ``v -> H v``,
    made once per batch: 0.1-0.8 s for small models, about 1 s more on the first
    use in a process) computes a product at 1.8 gradients on the CPU against
    1.7-2.1 for the cached double backward and 3.3 for the uncached one that
    several batches get by default (analysis/benchmarks/results/curvature.md),
    but holds more memory (the trace keeps every intermediate: 2-5x the cached
    graph's peak on those models). Worth it for long runs (trace, spectral
    density) on convolutional or attention models. Opt in with care: in torch
    2.13 the tracer crashes the process (segmentation fault) on ``nn.MSELoss``,
    which is therefore refused with ``ValueError`` (:func:`linearize_blocker`;
    ``F.mse_loss`` inside a function cannot be recognised); a model the tracer
    cannot trace raises ``RuntimeError`` at the first product. All
    implementations agree to rounding (tested against dense float64 Hessians).

    Attributes:
        dim: number of selected scalar parameters; ``shape == (dim, dim)``.
        num_matvecs: products computed so far (a product over m batches counts once).
        param_names: the selected parameter names, in flattening order.
        num_examples, num_batches: the data the operator averages over.

    Raises:
        ValueError: empty data, bad ``params``/``mode``/``hvp``; at product time a
            non-scalar loss or a non-finite product.
        RuntimeError: at the first product, ``hvp="linearize"`` on a model that
            ``torch.func.linearize`` cannot trace.

    Note:
        The parameters, buffers and batches are copied at construction (in ``dtype``
        on ``device``): later optimizer steps on the model do not change the
        operator; build a new one at new weights. Memory: one copy of the model's
        state and of the data, plus the cached graphs when ``cache_graph``.

    References:
        Pearlmutter. Fast exact multiplication by the Hessian. Neural Computation 6(1),
        1994. Yao, Gholami, Keutzer, Mahoney. PyHessian. IEEE BigData 2020 (the peer
        library this is benchmarked against).

    Example:
        >>> model = nn.Linear(3, 1, bias=False)
        >>> x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
        >>> loss_fn = lambda m, b: 0.5 * (m(b) ** 2).mean()
        >>> H = HessianOperator(model, loss_fn, x, dtype=torch.float64)
        >>> torch.allclose(H.matvec(torch.ones(3)), (x.T @ x / 10).double() @ torch.ones(3).double())
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        *,
        params: Sequence[str] | Callable[[str], bool] | None = None,
        mode: str = "eval",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        hvp: str = "auto",
        cache_graph: bool | None = None,
        _batches: list[Any] | None = None,
        _parent: HessianOperator | None = None,
        _rng: RandomState | None = None,
    ) -> None:
        _check_model_mode_dtype(model, mode, dtype)
        if hvp == "linearize" and (why := linearize_blocker(loss_fn)) is not None:
            raise ValueError(f"hvp='linearize': {why}")
        self.model = model
        self.loss_fn = as_batch_loss(loss_fn, reduction="mean")
        self.mode = mode
        self.param_names = _select_names(model, params)
        named = dict(model.named_parameters())
        first = named[self.param_names[0]]
        self.device = resolve_device(device) if device is not None else first.device
        self.dtype = dtype if dtype is not None else first.dtype
        if hvp == "auto":
            hvp = _DEFAULT_HVP.get(self.device.type, "rev-rev")
        if hvp not in HVP_IMPLEMENTATIONS:
            raise ValueError(f"hvp: expected 'auto' or one of {HVP_IMPLEMENTATIONS}, got {hvp!r}")

        def cast(t: torch.Tensor) -> torch.Tensor:
            t = t.detach()
            if t.is_floating_point():
                return t.to(device=self.device, dtype=self.dtype, copy=True)
            return t.to(device=self.device, copy=True)

        # Frozen copies: the operator is the Hessian at the weights it was built with
        # (blocks share their parent's copies).
        if _parent is not None:
            frozen = {**_parent._params, **_parent._const}
            buffers = _parent._buffers
        else:
            frozen = {n: cast(p) for n, p in named.items()}
            buffers = {n: cast(b) for n, b in model.named_buffers()}
        self._params = {n: frozen[n] for n in self.param_names}
        self._const = {n: t for n, t in frozen.items() if n not in self._params}
        self._buffers = buffers
        self.shapes = [p.shape for p in self._params.values()]
        self.numels = [p.numel() for p in self._params.values()]
        self.dim = int(sum(self.numels))
        self.shape = (self.dim, self.dim)

        if _batches is None:
            _batches = [move_batch(b, self.device, self.dtype) for b in iter_batches(data)]
        if not _batches:
            raise ValueError(
                "data: no batches (empty data); the Hessian needs at least one example"
            )
        self._batches = _batches
        sizes = [batch_size(b) for b in _batches]
        if any(s <= 0 for s in sizes):
            raise ValueError(f"data: a batch has no examples (batch sizes {sizes})")
        self.num_examples = int(sum(sizes))
        self.num_batches = len(sizes)
        self._weights = [s / self.num_examples for s in sizes]
        self.caller_mode = _describe_modes(_module_modes(model))
        if cache_graph is None:
            cache_graph = hvp == "linearize" or (hvp == "rev-rev" and self.num_batches == 1)
        if cache_graph and hvp not in _CACHING:
            raise ValueError(f"cache_graph: only {_CACHING} cache per-batch work, not {hvp!r}")
        if not cache_graph and hvp == "linearize":
            raise ValueError(
                "cache_graph: 'linearize' always caches its per-batch linearisation; "
                "use hvp='rev-rev' or 'fwd-rev' for cache_graph=False"
            )
        self.hvp = hvp
        self.cache_graph = bool(cache_graph)
        self._graphs: list[tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None
        self._linear: list[Callable[..., Any]] | None = None
        self.num_matvecs = 0
        # every loss evaluation replays one random state: with dropout in training mode
        # the operator is the Hessian of one fixed realisation of the masks, not a new
        # random matrix at every product (blocks share their parent's state, so they
        # are blocks of the same matrix; a sharpness report shares its objective's)
        self._rng = _rng if _rng is not None else RandomState(self._params.values())

    # ----------------------------------------------------------------- helpers
    @contextlib.contextmanager
    def _in_mode(self) -> Iterator[None]:
        saved = _module_modes(self.model)
        self.model.train(self.mode == "train")
        try:
            yield
        finally:
            for m, flag in saved.items():
                m.training = flag

    def _loss(self, params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        # Buffers are cloned per call so train-mode BatchNorm updates never accumulate.
        state = {**self._const, **{n: b.clone() for n, b in self._buffers.items()}, **params}

        def functional_model(*args: Any, **kwargs: Any) -> Any:
            return functional_call(self.model, state, args, kwargs)

        with self._rng.replayed():
            loss = self.loss_fn(functional_model, batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn: must return a scalar (the mean loss over the batch), got {shape}; "
                "use reduction='mean'"
            )
        return loss

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-parameter tensors (in ``param_names`` order) into one flat vector."""
        if len(tensors) != len(self.shapes):
            raise ValueError(f"tensors: expected {len(self.shapes)} tensors, got {len(tensors)}")
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, v: torch.Tensor) -> list[torch.Tensor]:
        """Split a flat vector into per-parameter tensors shaped like the parameters."""
        if v.shape != (self.dim,):
            raise ValueError(
                f"v: expected a flat vector of shape ({self.dim},), got {tuple(v.shape)}"
            )
        return [c.view(s) for c, s in zip(torch.split(v, self.numels), self.shapes)]

    def parameters_vector(self) -> torch.Tensor:
        """The (frozen) parameter values the Hessian is taken at, flattened."""
        return self.flatten(list(self._params.values()))

    def _leaves(self) -> list[torch.Tensor]:
        return [p.detach().requires_grad_(True) for p in self._params.values()]

    def _grad_graph(self, batch: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        leaves = self._leaves()
        with torch.enable_grad():
            loss = self._loss(dict(zip(self._params, leaves)), batch)
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        return leaves, [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, leaves)]

    def _hvp_revrev(
        self, batch: Any, vs: list[torch.Tensor], cached: int | None
    ) -> list[torch.Tensor]:
        if cached is not None:
            assert self._graphs is not None
            leaves, grads = self._graphs[cached]
            retain = True
        else:
            leaves, grads = self._grad_graph(batch)
            retain = False
        pairs = [(g, v) for g, v in zip(grads, vs) if g.requires_grad]
        if not pairs:  # the loss is at most linear in these parameters
            return [torch.zeros_like(v) for v in vs]
        with torch.enable_grad():
            hv = torch.autograd.grad(
                [g for g, _ in pairs],
                leaves,
                grad_outputs=[v for _, v in pairs],
                retain_graph=retain,
                allow_unused=True,
            )
        return [h if h is not None else torch.zeros_like(v) for h, v in zip(hv, vs)]

    def _hvp_fwdrev(self, batch: Any, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        names = list(self._params)
        argnums = tuple(range(len(names)))

        def loss_of(*qs: torch.Tensor) -> torch.Tensor:
            return self._loss(dict(zip(names, qs)), batch)

        def grad_fn(*ps: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return torch.func.grad(loss_of, argnums=argnums)(*ps)

        with torch_internal_notices_hidden():
            _, hv = torch.func.jvp(grad_fn, tuple(self._params.values()), tuple(vs))
        return list(hv)

    def _linearize(self, batch: Any) -> Callable[..., Any]:
        """``v -> H_b v`` for one batch: ``torch.func.linearize`` of the gradient map."""
        names = list(self._params)

        def grad_map(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return torch.func.grad(lambda p: self._loss(p, batch))(params)

        with torch_internal_notices_hidden():
            _, jvp_fn = torch.func.linearize(grad_map, dict(self._params))

        def product(vs: list[torch.Tensor]) -> list[torch.Tensor]:
            with self._rng.replayed():  # the trace re-draws its random ops on every call
                out = jvp_fn(dict(zip(names, vs)))
            return [out[n] for n in names]

        return product

    def _cached(self) -> bool:
        """Whether every product now replays cached work (a trace or recorded graphs)."""
        if self.hvp == "linearize":
            return self._linear is not None
        return self.hvp == "rev-rev" and self.cache_graph and self._graphs is not None

    def _build_caches(self) -> None:
        """Trace (linearize) or record (rev-rev) every batch once, before the first product."""
        if self.hvp == "linearize" and self._linear is None:
            try:
                self._linear = [self._linearize(b) for b in self._batches]
            except Exception as err:  # the tracer's failures have no common type
                raise RuntimeError(
                    "hvp='linearize': torch.func.linearize could not trace this model "
                    f"({type(err).__name__}: {err}); use hvp='rev-rev'"
                ) from err
        if self.hvp == "rev-rev" and self.cache_graph and self._graphs is None:
            self._graphs = [self._grad_graph(b) for b in self._batches]

    # ------------------------------------------------------------------ public
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return ``H v`` for a flat vector ``v`` of length ``dim`` (same dtype/device as ``H``).

        Raises:
            ValueError: wrong shape, a non-scalar loss, or a non-finite product.
            RuntimeError: ``hvp="linearize"`` on a model the tracer cannot trace.
        """
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"v: expected a tensor, got {type(v).__name__}")
        v = v.detach().to(device=self.device, dtype=self.dtype)
        vs = self.unflatten(v)
        out: torch.Tensor | None = None
        if not self._cached():
            with self._in_mode():
                self._build_caches()
        # cached products replay recorded work and never call the module: no mode switch
        with contextlib.nullcontext() if self._cached() else self._in_mode():
            for i, (w, batch) in enumerate(zip(self._weights, self._batches)):
                if self.hvp == "linearize":
                    assert self._linear is not None
                    hv = self._linear[i](vs)
                elif self.hvp == "rev-rev":
                    hv = self._hvp_revrev(batch, vs, i if self.cache_graph else None)
                else:
                    hv = self._hvp_fwdrev(batch, vs)
                flat = self.flatten([h.detach() for h in hv])
                if self.num_batches == 1:
                    out = flat  # weight 1: no extra pass over the vector
                elif out is None:
                    out = flat.mul_(w)
                else:
                    out.add_(flat, alpha=w)
        assert out is not None
        self.num_matvecs += 1
        if not bool(torch.isfinite(out).all()):
            raise ValueError(
                "matvec: the Hessian-vector product is not finite (nan/inf); check the loss "
                "and the data at these weights, and that v is finite"
            )
        return out

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        if isinstance(v, torch.Tensor) and v.dim() == 2:
            return torch.stack([self.matvec(c) for c in v.T], dim=1)
        return self.matvec(v)

    def gradient(self) -> torch.Tensor:
        """The flat gradient of the example-weighted loss (for comparisons and timing)."""
        out = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        with self._in_mode():
            for w, batch in zip(self._weights, self._batches):
                leaves = self._leaves()
                with torch.enable_grad():
                    loss = self._loss(dict(zip(self._params, leaves)), batch)
                    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                out.add_(
                    self.flatten(
                        [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, leaves)]
                    ),
                    alpha=w,
                )
        return out

    def blocks(self, by: str = "module") -> dict[str, HessianOperator]:
        """Diagonal blocks of ``H``: one operator per module (``by="module"``) or per
        parameter (``by="parameter"``), keyed by the module/parameter name.

        Per-layer spectra are the spectra of these blocks (not of ``H`` itself).

        Example:
            >>> model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
            >>> H = HessianOperator(model, nn.MSELoss(), (torch.randn(4, 2), torch.randn(4, 1)))
            >>> {k: b.dim for k, b in H.blocks().items()}
            {'0': 9, '2': 4}
        """
        if by not in ("module", "parameter"):
            raise ValueError(f"by: expected 'module' or 'parameter', got {by!r}")
        groups: dict[str, list[str]] = {}
        for n in self.param_names:
            key = n.rpartition(".")[0] if by == "module" else n
            groups.setdefault(key, []).append(n)
        return {
            key: HessianOperator(
                self.model,
                self.loss_fn,
                None,
                params=names,
                mode=self.mode,
                dtype=self.dtype,
                device=self.device,
                hvp=self.hvp,
                cache_graph=self.cache_graph,
                _batches=self._batches,
                _parent=self,
                _rng=self._rng,
            )
            for key, names in groups.items()
        }

    def protocol(self) -> MeasurementProtocol:
        """How this operator was built: examples, batches, mode, dtype, device, matvecs."""
        return MeasurementProtocol(
            estimator="hessian",
            examples=self.num_examples,
            batches=self.num_batches,
            mode=self.mode,
            dtype=str(self.dtype),
            device=str(self.device),
            matvecs=self.num_matvecs,
            extra={
                "dim": self.dim,
                "params": len(self.param_names),
                "caller_mode": self.caller_mode,
                "hvp": self.hvp,
                "cache_graph": self.cache_graph,
            },
        )

    def __repr__(self) -> str:
        return (
            f"HessianOperator(dim={self.dim}, examples={self.num_examples}, "
            f"batches={self.num_batches}, mode={self.mode!r}, dtype={self.dtype}, "
            f"device={self.device}, hvp={self.hvp!r})"
        )
