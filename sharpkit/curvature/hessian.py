"""The Hessian of a loss over data, as a linear operator (Hessian-vector products).

For parameters ``w`` (all trainable ones, a named subset, or one module's block),
data made of batches ``B_1, ..., B_m`` and a batch loss ``L_b(w)`` that is the
*mean* over its batch, the operator is the Hessian of the weighted average

    L(w) = sum_b (n_b / N) L_b(w),   N = sum_b n_b,   H v = sum_b (n_b / N) H_b v,

with ``n_b`` the weight of batch ``b`` in the loss's own normalisation
(:func:`sharpkit._batch.batch_weight`): its number of examples, or its number of
target tokens for a token-mean loss (``sharpkit.hf.HFLoss``), so that ``L`` is
the loss of all the data as one batch and a short last batch weighs less (see
``docs/theory.md``). ``H v`` is never formed
from a dense ``H``: it is one Hessian-vector product through ``torch.func``'s
``functional_call``: reverse-over-reverse (double backward), forward-over-reverse
(``jvp`` of ``grad``, Pearlmutter 1994), or forward-over-reverse on a cached
linearisation of the gradient map (``torch.func.linearize``: the map
``v -> H v`` is traced once per batch, and each product then evaluates only its
tangent part, none of the forward or backward pass). Parameters and
buffers are passed to ``functional_call`` explicitly, frozen at construction
(:class:`sharpkit._functional.FrozenModel`), so the caller's model is never
written to. Attention runs on kernels with second derivatives inside every
product (:func:`sharpkit._functional.second_order_kernels`), so transformers
work at their default attention. The module mode is explicit (``"eval"``
by default); the caller's modes are restored after every product and recorded.
Every evaluation replays the random-number state of construction, so a model
with dropout in ``"train"`` mode gives the Hessian of one fixed draw of its
masks (the same draw at every product) rather than a new random matrix each time.

References:
    Pearlmutter. Fast exact multiplication by the Hessian. Neural Computation, 1994.
    Dangel, Tatzel, Hennig. curvlinops (operator/estimator split).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from sharpkit._batch import (
    as_batch_loss,
    batch_size,
    batch_weight,
    iter_batches,
    move_batch,
    weighting,
)
from sharpkit._device import available_memory
from sharpkit._functional import (
    FrozenModel,
    RandomState,
    check_model_mode_dtype,
    second_order_kernels,
    tree_flatten,
)
from sharpkit._quiet import torch_internal_notices_hidden
from sharpkit.protocol import MeasurementProtocol

__all__ = [
    "CACHE_SHARE",
    "HVP_IMPLEMENTATIONS",
    "HessianOperator",
    "default_cache_budget",
    "linearize_blocker",
]

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


#: the groupings of :meth:`HessianOperator.blocks`
_BLOCKS = ("module", "parameter", "lora")

#: one batch's gradient graph: its leaves, and ``(parameter index, gradient edge)`` of the
#: gradients that depend on the leaves
_Graph = tuple[list[torch.Tensor], list[tuple[int, torch.autograd.graph.GradientEdge]]]


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


#: The share of the device's available memory that the default cache budget may use.
CACHE_SHARE = 0.25


def default_cache_budget(device: torch.device | str) -> int:
    """The default memory budget (bytes) of the cached gradient graphs on ``device``.

    A quarter (:data:`CACHE_SHARE`) of the memory available now
    (:func:`sharpkit._device.available_memory`: free device memory on CUDA,
    ``MemAvailable`` on the CPU).

    Example:
        >>> default_cache_budget("cpu") > 0
        True
    """
    return int(available_memory(device) * CACHE_SHARE)


def _check_cache_options(hvp: str, cache_graph: Any, cache_budget: Any) -> None:
    if cache_graph is not None and not isinstance(cache_graph, bool):
        raise TypeError(f"cache_graph: expected True, False or None, got {cache_graph!r}")
    if cache_budget is None:
        return
    if isinstance(cache_budget, bool) or not isinstance(cache_budget, int) or cache_budget < 0:
        raise ValueError(
            f"cache_budget: expected a number of bytes (a non-negative int) or None, "
            f"got {cache_budget!r}"
        )
    if cache_graph is not None:
        raise ValueError(
            f"cache_budget: applies to cache_graph=None (cache within a budget), not "
            f"cache_graph={cache_graph}"
        )


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
            reverse keeps each batch's gradient graph (one double backward per
            product instead of a forward, a backward and a double backward);
            ``"linearize"`` always caches (its linearisation is the cache). ``True``
            caches every batch, ``False`` none, ``None`` (default) as many batches as
            ``cache_budget`` holds, in order (at least the first).
        cache_budget: the bytes the cached gradient graphs of ``cache_graph=None``
            may hold, measured as the storage of the tensors the graph saves (the
            parameters and batches, held anyway, not counted; the gradient tensors
            themselves are not kept, only the graph behind them).
            ``None``: :func:`default_cache_budget` (a quarter of the memory
            available on the device at construction). The budget is not
            applied to ``"linearize"``.
        random_state: the random state every evaluation replays
            (:class:`sharpkit._rng.RandomState`); ``None`` takes the global state at
            construction. Pass another measurement's state to see the same draws
            of dropout masks (the sharpness report does).

    **Choice of implementation.** ``"auto"`` is ``"rev-rev"``, cached within the
    memory budget, the robust choice on every device: a cached product is one
    double backward, an uncached one a forward, a backward and a double backward
    (``analysis/benchmarks/results/curvature.md`` has the measured ratios).
    ``"linearize"`` (forward-over-reverse on a ``torch.func.linearize`` trace of
    ``v -> H v``, made once per batch) can be faster per product on convolutional
    or attention models but holds more memory (the trace keeps every
    intermediate) and pays a one-off trace. Opt in with care: in torch 2.13 the
    tracer crashes the process (segmentation fault) on ``nn.MSELoss``, which is
    therefore refused with ``ValueError`` (:func:`linearize_blocker`;
    ``F.mse_loss`` inside a function cannot be recognised); a model the tracer
    cannot trace raises ``RuntimeError`` at the first product. All
    implementations agree to rounding (tested against dense float64 Hessians).

    **Attention.** The fused ``scaled_dot_product_attention`` kernels (flash,
    memory-efficient) and the native fast path of ``nn.MultiheadAttention`` have
    no second derivative; every product runs with the math backend and the fast
    path off. :meth:`gradient` (first order) keeps the fused kernels.

    Attributes:
        dim: number of selected scalar parameters; ``shape == (dim, dim)``.
        num_matvecs: products computed so far (a product over m batches counts once).
        param_names: the selected parameter names, in flattening order.
        num_examples, num_batches: the data the operator averages over.
        weighting: ``"examples"`` or ``"tokens"``: what the batch weights count
            (:func:`sharpkit._batch.batch_weight`); ``total_weight`` their sum.
        cache_graph: whether per-batch work is cached; ``cached_batches`` how many
            batches are (known after the first product) and ``cache_bytes`` what
            their graphs hold.
        random_state: the random state every evaluation replays.

    Raises:
        ValueError: empty data, bad ``params``/``mode``/``hvp``; at product time a
            non-scalar loss or a non-finite product.
        RuntimeError: at the first product, ``hvp="linearize"`` on a model that
            ``torch.func.linearize`` cannot trace.

    Note:
        The parameters, buffers and batches are copied at construction (in ``dtype``
        on ``device``): later optimizer steps on the model do not change the
        operator; build a new one at new weights. Memory: one copy of the model's
        state and of the data, plus the cached graphs (at most ``cache_budget``).

        What a ``"rev-rev"`` product holds beyond that: the result, per parameter:
        the first batch's double backward, with every later batch added to it
        parameter by parameter (a batch's weight ``n_b / N`` multiplies its loss inside the graph,
        so no vector is scaled); while a double backward runs, autograd's partial gradients of the
        parameters still waiting for their second contribution (a layer's weight
        gets one from the gradient's graph and one from the forward graph: up to
        one parameter-sized vector, which in the first batch becomes the result
        itself) and activation-sized intermediates; at the end one flat copy of
        the result, the returned vector. An uncached batch adds its forward and
        backward pass, freed after its product. ``"fwd-rev"`` and
        ``"linearize"`` hold a batch's per-parameter product and the flat sum.
        A product leaves nothing behind but the returned vector.

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
        cache_budget: int | None = None,
        random_state: RandomState | None = None,
    ) -> None:
        check_model_mode_dtype(model, mode, dtype)
        if hvp == "linearize" and (why := linearize_blocker(loss_fn)) is not None:
            raise ValueError(f"hvp='linearize': {why}")
        if hvp != "auto" and hvp not in HVP_IMPLEMENTATIONS:
            raise ValueError(f"hvp: expected 'auto' or one of {HVP_IMPLEMENTATIONS}, got {hvp!r}")
        _check_cache_options(hvp, cache_graph, cache_budget)
        loss = as_batch_loss(loss_fn, reduction="mean")
        frozen = FrozenModel(
            model, params, mode=mode, dtype=dtype, device=device, random_state=random_state
        )
        batches = [move_batch(b, frozen.device, frozen.dtype) for b in iter_batches(data)]
        self._setup(frozen, loss, batches, hvp, cache_graph, cache_budget)

    @classmethod
    def _on(
        cls,
        frozen: FrozenModel,
        loss_fn: Any,
        batches: list[Any],
        *,
        hvp: str = "auto",
        cache_graph: bool | None = None,
        cache_budget: int | None = None,
    ) -> HessianOperator:
        """The operator on an existing :class:`~sharpkit._functional.FrozenModel`
        (its copies, selection and random state) and already materialised batches:
        blocks of an operator, the Hessian of a sharpness objective."""
        if hvp != "auto" and hvp not in HVP_IMPLEMENTATIONS:
            raise ValueError(f"hvp: expected 'auto' or one of {HVP_IMPLEMENTATIONS}, got {hvp!r}")
        _check_cache_options(hvp, cache_graph, cache_budget)
        op = cls.__new__(cls)
        op._setup(frozen, as_batch_loss(loss_fn, reduction="mean"), batches, hvp, cache_graph,
                  cache_budget)  # fmt: skip
        return op

    def _setup(
        self,
        frozen: FrozenModel,
        loss_fn: Any,
        batches: list[Any],
        hvp: str,
        cache_graph: bool | None,
        cache_budget: int | None,
    ) -> None:
        self._frozen = frozen
        self.model = frozen.model
        self.loss_fn = loss_fn
        self.mode = frozen.mode
        self.param_names = list(frozen.names)
        self.device = frozen.device
        self.dtype = frozen.dtype
        self.random_state = frozen.random_state
        if hvp == "auto":
            hvp = _DEFAULT_HVP.get(self.device.type, "rev-rev")
        self._params = frozen.values
        self.shapes = [p.shape for p in self._params.values()]
        self.numels = [p.numel() for p in self._params.values()]
        self.dim = int(sum(self.numels))
        self.shape = (self.dim, self.dim)
        if not batches:
            raise ValueError(
                "data: no batches (empty data); the Hessian needs at least one example"
            )
        self._batches = batches
        sizes = [batch_size(b) for b in batches]
        if any(s <= 0 for s in sizes):
            raise ValueError(f"data: a batch has no examples (batch sizes {sizes})")
        weights = [batch_weight(loss_fn, b) for b in batches]
        self.num_examples = int(sum(sizes))
        self.num_batches = len(sizes)
        self.total_weight = sum(weights)
        if not self.total_weight > 0:
            raise ValueError(
                f"data: the batches have no weight in the loss's mean (weights {weights}: "
                "no target tokens?)"
            )
        self._weights = [w / self.total_weight for w in weights]
        self.weighting = weighting(loss_fn, batches)
        self.caller_mode = frozen.caller_mode
        if cache_graph and hvp not in _CACHING:
            raise ValueError(f"cache_graph: only {_CACHING} cache per-batch work, not {hvp!r}")
        if cache_graph is False and hvp == "linearize":
            raise ValueError(
                "cache_graph: 'linearize' always caches its per-batch linearisation; "
                "use hvp='rev-rev' or 'fwd-rev' for cache_graph=False"
            )
        self.hvp = hvp
        self._cache_option = cache_graph
        #: whether per-batch work is cached (every batch, or as many as the budget holds)
        self.cache_graph = hvp == "linearize" or (hvp == "rev-rev" and cache_graph is not False)
        #: the memory the cached gradient graphs may hold (bytes; ``None``: no limit)
        self.cache_budget: int | None = None
        if hvp == "rev-rev" and cache_graph is None:
            self.cache_budget = (
                cache_budget if cache_budget is not None else default_cache_budget(self.device)
            )
        #: batches whose work is cached (known after the first product)
        self.cached_batches: int | None = None
        #: bytes held by the cached gradient graphs (saved tensors; after the first product)
        self.cache_bytes: int | None = None
        self._graphs: list[_Graph] | None = None
        self._linear: list[Callable[..., Any]] | None = None
        self.num_matvecs = 0

    # ----------------------------------------------------------------- helpers
    def _loss(
        self, params: dict[str, torch.Tensor], batch: Any, *, second_order: bool = True
    ) -> torch.Tensor:
        # the functional layer: frozen copies, buffers cloned per call, the module mode,
        # the replayed random state and (for second order) attention kernels with
        # second derivatives
        with self._frozen.evaluating(second_order=second_order):
            loss = self.loss_fn(self._frozen.caller(params), batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn: must return a scalar (the mean loss over the batch), got {shape}; "
                "use reduction='mean'"
            )
        return loss

    def flatten(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Concatenate per-parameter tensors (in ``param_names`` order) into one flat
        vector in the operator's dtype; a ``None`` entry stands for zeros."""
        if len(tensors) != len(self.shapes):
            raise ValueError(f"tensors: expected {len(self.shapes)} tensors, got {len(tensors)}")
        out = torch.empty(self.dim, dtype=self.dtype, device=self.device)
        for view, part in zip(self.unflatten(out), tensors):
            if part is None:
                view.zero_()
            else:
                view.copy_(part.reshape(view.shape))
        return out

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

    def _weighted_loss(
        self, leaves: list[torch.Tensor], batch: Any, weight: float, *, second_order: bool = True
    ) -> torch.Tensor:
        """``n_b / N`` times the batch loss: the weight of the average enters the graph at
        its root, so no product or gradient scales a parameter-sized vector."""
        loss = self._loss(dict(zip(self._params, leaves)), batch, second_order=second_order)
        return loss if weight == 1.0 else loss * weight

    def _grad_graph(self, batch: Any, weight: float) -> _Graph:
        """The gradient graph of one (weighted) batch: the leaves it was built on and the
        gradient edges of the gradients that depend on the leaves, by parameter index.

        Only the edges are kept, not the gradient tensors: a double backward needs the
        graph behind a gradient, not its values, so the gradients' own storage (one
        parameter-sized vector in all) is freed here unless the graph saved it."""
        leaves = self._leaves()
        with torch.enable_grad():
            loss = self._weighted_loss(leaves, batch, weight)
            if not loss.requires_grad:  # no selected parameter is used: H = 0
                return leaves, []
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        # a gradient that is None (unused parameter) or needs no grad (the loss is at
        # most linear in the leaves through it) adds nothing to H v
        roots = [
            (j, torch.autograd.graph.get_gradient_edge(g))
            for j, g in enumerate(grads)
            if g is not None and g.requires_grad
        ]
        return leaves, roots

    def _measured_graph(self, batch: Any, weight: float) -> tuple[_Graph, int]:
        """The gradient graph of one batch and the bytes it holds: the storages of the
        tensors its nodes save (the activations of the forward and backward passes),
        not counting the parameters and the batch."""
        held = {t.untyped_storage().data_ptr() for t in self._params.values()}
        held |= {
            t.untyped_storage().data_ptr()
            for t in tree_flatten(batch)[0]
            if isinstance(t, torch.Tensor)
        }
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in held:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            graph = self._grad_graph(batch, weight)
        return graph, sum(saved.values())

    @staticmethod
    def _accumulate(
        sums: list[torch.Tensor | None],
        leaves: list[torch.Tensor],
        roots: Sequence[Any],
        grad_tensors: Sequence[torch.Tensor] | None,
        *,
        retain_graph: bool,
    ) -> list[torch.Tensor | None]:
        """``sums`` plus the gradient of ``roots`` (weighted by ``grad_tensors``) w.r.t.
        ``leaves``, per parameter (``None``: no gradient so far).

        The first pass's gradients become the sums (no copy); later ones are added out
        of place, one parameter at a time, since a gradient autograd returns may be a
        tensor it also holds elsewhere (a direction passed through unchanged, say).
        ``torch.autograd.grad``, not ``backward`` into the leaves' ``.grad``: on an
        11M-parameter ResNet-18 (one CPU thread) accumulating through ``.grad`` made a
        product about 10% slower and its peak higher; nothing is left on the leaves."""
        got = torch.autograd.grad(
            list(roots), leaves, grad_tensors, retain_graph=retain_graph, allow_unused=True
        )
        return [g if s is None else (s if g is None else s + g) for s, g in zip(sums, got)]

    def _hvp_revrev(self, vs: list[torch.Tensor], cached: int) -> list[torch.Tensor | None]:
        """``H v = sum_b (n_b / N) H_b v`` per parameter, by double backward: the weights
        are in the graphs' losses and autograd accumulates over the batches."""
        hv: list[torch.Tensor | None] = [None] * len(vs)
        for i, (w, batch) in enumerate(zip(self._weights, self._batches)):
            if i < cached:
                assert self._graphs is not None
                leaves, roots = self._graphs[i]
            else:
                leaves, roots = self._grad_graph(batch, w)
            if roots:  # else the loss is at most linear in these parameters
                edges, directions = [e for _, e in roots], [vs[j] for j, _ in roots]
                hv = self._accumulate(hv, leaves, edges, directions, retain_graph=i < cached)
        return hv

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
            # the trace re-draws its random ops on every call: replay the state
            with self.random_state.replayed(), second_order_kernels():
                out = jvp_fn(dict(zip(names, vs)))
            return [out[n] for n in names]

        return product

    def _build_caches(self) -> None:
        """Trace (linearize) or record (rev-rev) the batches once, before the first
        product; rev-rev under a budget records batches in order while their graphs
        fit (always the first: an uncached product builds one graph too)."""
        if self.hvp == "linearize" and self._linear is None:
            try:
                self._linear = [self._linearize(b) for b in self._batches]
            except Exception as err:  # the tracer's failures have no common type
                raise RuntimeError(
                    "hvp='linearize': torch.func.linearize could not trace this model "
                    f"({type(err).__name__}: {err}); use hvp='rev-rev'"
                ) from err
            self.cached_batches = self.num_batches
        if self.hvp == "rev-rev" and self.cache_graph and self._graphs is None:
            graphs, used = [], 0
            for batch, weight in zip(self._batches, self._weights):
                graph, size = self._measured_graph(batch, weight)
                if graphs and self.cache_budget is not None and used + size > self.cache_budget:
                    del graph  # over the budget: this and later batches are recomputed
                    break
                graphs.append(graph)
                used += size
            self._graphs = graphs
            self.cached_batches = len(graphs)
            self.cache_bytes = used
        if self.cached_batches is None:
            self.cached_batches = 0

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
        if self.cached_batches is None:
            self._build_caches()
        cached = self.cached_batches or 0
        if self.hvp == "rev-rev":
            out = self.flatten(self._hvp_revrev(vs, cached))
        else:
            out = None
            for i, (w, batch) in enumerate(zip(self._weights, self._batches)):
                if self.hvp == "linearize":
                    assert self._linear is not None
                    hv = self._linear[i](vs)
                else:
                    hv = self._hvp_fwdrev(batch, vs)
                if out is None:  # after the batch's work has freed its intermediates
                    out = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
                for view, h in zip(self.unflatten(out), hv):
                    view.add_(h.detach(), alpha=w)
                del hv
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
        """The flat gradient of the weighted loss (for comparisons and timing).

        A first-order evaluation: attention keeps its fused kernels."""
        grads: list[torch.Tensor | None] = [None] * len(self.shapes)
        for w, batch in zip(self._weights, self._batches):
            leaves = self._leaves()
            with torch.enable_grad():
                loss = self._weighted_loss(leaves, batch, w, second_order=False)
            if loss.requires_grad:  # else no selected parameter is used: gradient 0
                grads = self._accumulate(grads, leaves, [loss], None, retain_graph=False)
        return self.flatten(grads)

    def blocks(self, by: str = "module") -> dict[str, HessianOperator]:
        """Diagonal blocks of ``H``: one operator per module (``by="module"``), per
        parameter (``by="parameter"``) or per LoRA adapter (``by="lora"``).

        ``by="lora"`` groups the two factors of each adapted layer, ``A`` and ``B``
        together (the factor pairs of :func:`sharpkit.balance.find_pairs`:
        sharpkit's :class:`~sharpkit.balance.LoRALinear` and PEFT's LoRA layers,
        ``...lora_A.<adapter>.weight`` / ``...lora_B.<adapter>.weight``), keyed by
        the pair's name (the module path, plus ``.<adapter>`` for PEFT); selected
        parameters outside every pair (a classifier head, say) are in no block.
        Its block is the Hessian of the loss in that adapter's ``(A, B)``, whose
        off-diagonal part couples the factors of the product ``B A``.

        Per-layer spectra are the spectra of these blocks (not of ``H`` itself). The
        blocks share this operator's frozen copies, batches and random state (they
        are blocks of the same matrix) and its caching options; within a block the
        parameters keep this operator's order (:attr:`param_names`).

        Raises:
            ValueError: ``by`` unknown, or ``"lora"`` with no selected LoRA factor.

        Example:
            >>> model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
            >>> H = HessianOperator(model, nn.MSELoss(), (torch.randn(4, 2), torch.randn(4, 1)))
            >>> {k: b.dim for k, b in H.blocks().items()}
            {'0': 9, '2': 4}
            >>> from sharpkit.balance import add_lora
            >>> lora = add_lora(model, ["0", "2"], rank=1)  # A (1, in) and B (out, 1) each
            >>> H = HessianOperator(lora, nn.MSELoss(), (torch.randn(4, 2), torch.randn(4, 1)))
            >>> {k: b.param_names for k, b in H.blocks(by="lora").items()}
            {'0': ['0.lora_A', '0.lora_B'], '2': ['2.lora_A', '2.lora_B']}
        """
        if by not in _BLOCKS:
            raise ValueError(f"by: expected one of {_BLOCKS}, got {by!r}")
        groups: dict[str, list[str]] = {}
        if by == "lora":
            groups = self._adapter_groups()
        else:
            for n in self.param_names:
                key = n.rpartition(".")[0] if by == "module" else n
                groups.setdefault(key, []).append(n)
        return {
            key: HessianOperator._on(
                self._frozen.select(names),
                self.loss_fn,
                self._batches,
                hvp=self.hvp,
                cache_graph=self._cache_option,
                cache_budget=self.cache_budget,
            )
            for key, names in groups.items()
        }

    def _adapter_groups(self) -> dict[str, list[str]]:
        """The selected parameters of each LoRA factor pair, by pair name."""
        from sharpkit.balance.pairs import find_pairs

        names = {id(p): n for n, p in self.model.named_parameters(remove_duplicate=False)}
        selected = set(self.param_names)
        groups: dict[str, list[str]] = {}
        for pair in find_pairs(self.model, trainable_only=False):
            members = {names.get(id(t)) for t in pair} & selected
            if members:
                groups[pair.name] = [n for n in self.param_names if n in members]
        if not groups:
            raise ValueError(
                "by: 'lora' found no LoRA factor (sharpkit's LoRALinear, PEFT's lora_A / "
                "lora_B) among the selected parameters"
            )
        return groups

    def protocol(self) -> MeasurementProtocol:
        """How this operator was built: examples, batches, mode, dtype, device, matvecs."""
        return MeasurementProtocol(
            estimator="hessian",
            examples=self.num_examples,
            batches=self.num_batches,
            weighting=self.weighting,
            mode=self.mode,
            dtype=str(self.dtype),
            device=str(self.device),
            matvecs=self.num_matvecs,
            extra={
                **({"tokens": self.total_weight} if self.weighting == "tokens" else {}),
                "dim": self.dim,
                "params": len(self.param_names),
                "caller_mode": self.caller_mode,
                "hvp": self.hvp,
                "cache_graph": self.cache_graph,
                "cache_budget": self.cache_budget,
                "cached_batches": self.cached_batches,
            },
        )

    def __repr__(self) -> str:
        return (
            f"HessianOperator(dim={self.dim}, examples={self.num_examples}, "
            f"batches={self.num_batches}, mode={self.mode!r}, dtype={self.dtype}, "
            f"device={self.device}, hvp={self.hvp!r})"
        )
