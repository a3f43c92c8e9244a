"""The shared machinery of the sharpness metrics: the model evaluated at ``w + d``,
batch losses, gradients and cost counts.

The caller's model is never modified (not its weights, not its buffers, not its
train/eval modes): every evaluation goes through the functional layer
(:class:`sharpkit._functional.FrozenModel`: frozen copies in the requested dtype
and device, ``torch.func.functional_call``, buffers cloned per call).

**Sharded data.** Given a ``process_group``, each rank's objective holds its shard
of the batches and the metrics reduce at three kinds of site, all through this
class: :meth:`Objective.reduce` (example-weighted sums over the ranks: mean losses,
accuracies, Monte-Carlo increases, full-data gradients), :meth:`Objective.gather`
(per-batch values in global batch order: m-sharpness maxima) and
:meth:`Objective.batch_generators` (the random stream of global batch ``i`` is the
same whichever rank holds it). Every rank then computes the single-process answer
over the union of the shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from sharpkit._batch import (
    as_batch_loss,
    batch_size,
    batch_weight,
    iter_batches,
    move_batch,
    split_batch,
    weighting,
)
from sharpkit._functional import FrozenModel, RandomState, check_model_mode_dtype
from sharpkit.curvature._linop import make_generator
from sharpkit.protocol import MeasurementProtocol

__all__ = [
    "Cost",
    "MetricResult",
    "Objective",
    "make_generator",
    "supervised_accuracy",
    "weighted_mean_stderr",
]


@dataclasses.dataclass
class Cost:
    """What a metric cost, counted per batch evaluation.

    Attributes:
        forward: loss evaluations without a gradient (one per batch).
        gradient: loss + gradient evaluations (one forward and one backward per batch).
        hvp: Hessian-vector products (one per batch).
        jvp: forward-mode directional derivatives (one per batch).
    """

    forward: int = 0
    gradient: int = 0
    hvp: int = 0
    jvp: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.forward + other.forward,
            self.gradient + other.gradient,
            self.hvp + other.hvp,
            self.jvp + other.jvp,
        )


@dataclasses.dataclass
class MetricResult:
    """One sharpness number with its error bar, its cost and its protocol.

    Attributes:
        name: metric name (e.g. ``"worst_case"``).
        value: the estimate.
        stderr: standard error of ``value`` over batches/samples (``None`` when the
            metric is deterministic given its inputs).
        details: metric-specific numbers (base loss, perturbation norm, sigma, ...).
        cost: batch evaluations used (:class:`Cost`).
        protocol: how it was measured.
    """

    name: str
    value: float
    stderr: float | None
    details: dict[str, Any]
    cost: Cost
    protocol: MeasurementProtocol

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (see :func:`sharpkit.protocol.to_jsonable`)."""
        return dataclasses.asdict(self)


def supervised_accuracy(model: Callable[..., Any], batch: Any) -> torch.Tensor:
    """Fraction of ``(inputs, targets)`` examples whose arg-max output is the target."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(
            "accuracy_fn: the default accuracy expects (inputs, targets) batches; "
            "pass accuracy_fn(model, batch) for other layouts"
        )
    inputs, targets = batch
    out = model(inputs)
    return (out.argmax(dim=-1) == targets).to(out.dtype).mean()


def _check_positive(name: str, value: Any, *, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        what = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    if not integer and not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")


class Objective:
    """Batch losses of the model at ``w + d``, evaluated without touching the model.

    Args:
        model: the network; never modified.
        loss_fn: ``loss_fn(model, batch)`` or an nn loss module (``(inputs, targets)``
            batches), see :mod:`sharpkit._batch`.
        data: one batch or an iterable of batches (materialised once).
        params: ``None`` (all trainable parameters), a list of names or a predicate
            (parameters with ``requires_grad=False`` may be named: only the loss is
            differentiated, not the module).
        mode: ``"eval"`` (default) or ``"train"`` module mode for every evaluation.
            Every evaluation replays one random state, so dropout in training mode
            draws the same masks at ``w`` and at ``w + d``.
        dtype: compute dtype (``None`` keeps the model's).
        device: compute device (``None`` keeps the model's).
        m: re-split the data into batches of at most ``m`` examples (m-sharpness);
            ``None`` keeps the batches as given.
        random_state: the random state to replay (:class:`sharpkit._rng.RandomState`;
            ``None``: the global state at construction). Objectives that must see
            the same draws share one.
        process_group: ``None`` (one process: ``data`` is all the data) or a
            ``torch.distributed`` process group (``torch.distributed.group.WORLD``)
            whose ranks each hold a shard of the batches (uneven shards allowed;
            global batch order is rank 0's batches, then rank 1's, ...). Every
            rank must build its objectives in the same order (construction
            exchanges the shards' sizes).

    Attributes:
        names: the measured parameter names; ``w0`` their values (frozen copies).
        batches, sizes: the materialised batches and their example counts.
        weights: each batch's weight in a mean over batches, in the loss's own
            normalisation (:func:`sharpkit._batch.batch_weight`: its example count,
            or its number of target tokens for a token-mean loss);
            ``total_weight`` their sum over all ranks and ``weighting`` what they count
            (``"examples"`` or ``"tokens"``). :meth:`weighted_mean` averages
            per-batch numbers with them.
        frozen: the :class:`~sharpkit._functional.FrozenModel` every evaluation uses.
        cost: the running :class:`Cost` (over all ranks, when sharded).
        total_examples, total_batches: over all shards (the local counts without
            a process group); ``batch_offset``: the global index of this rank's
            first batch.

    Example:
        >>> model = nn.Linear(2, 1, bias=False)
        >>> x = torch.ones(4, 2)
        >>> obj = Objective(model, lambda m, b: (m(b) ** 2).mean(), x)
        >>> w = model.weight.detach()
        >>> abs(obj.mean_loss([-w]))  # at w + d = 0
        0.0
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
        m: int | None = None,
        random_state: RandomState | None = None,
        process_group: Any = None,
    ) -> None:
        if process_group is not None:
            from sharpkit.distributed import require_process_group

            require_process_group("process_group")
        check_model_mode_dtype(model, mode, dtype)
        if m is not None:
            _check_positive("m", m, integer=True)
        if next(iter(model.parameters()), None) is None:
            raise ValueError("model: has no parameters")
        self.loss_fn = as_batch_loss(loss_fn, reduction="mean")
        self.frozen = FrozenModel(
            model, params, mode=mode, dtype=dtype, device=device, allow_frozen=True,
            random_state=random_state,
        )  # fmt: skip
        self.model = model
        self.device = self.frozen.device
        self.dtype = self.frozen.dtype
        self.mode = mode
        self.names = list(self.frozen.names)
        self.w0 = list(self.frozen.values.values())
        self._at = list(self.w0)
        batches = []
        for b in iter_batches(data):
            b = move_batch(b, self.device, self.dtype)
            if m is not None and batch_size(b) > m:
                batches.extend(split_batch(b, math.ceil(batch_size(b) / m)))
            else:
                batches.append(b)
        if not batches:
            raise ValueError("data: no batches")
        self.batches = batches
        self.sizes = [batch_size(b) for b in batches]
        self.weights = [batch_weight(self.loss_fn, b) for b in batches]
        self.weighting = weighting(self.loss_fn, batches)
        self.cost = Cost()
        self.process_group = process_group
        counts = self.gather([float(len(batches))])
        rank = self.rank
        self.batch_offset = int(sum(counts[:rank]))
        self.total_batches = int(sum(counts))
        examples, self.total_weight = self.reduce(float(sum(self.sizes)), float(sum(self.weights)))
        self.total_examples = int(examples)
        if not self.total_weight > 0:
            raise ValueError(
                f"data: the batches have no weight in the loss's mean (weights "
                f"{self.weights}: no target tokens?)"
            )

    # -- shards -----------------------------------------------------------------
    @property
    def rank(self) -> int:
        """This process's rank in :attr:`process_group` (0 without one)."""
        from sharpkit.distributed import world

        return world(self.process_group)[0] if self.process_group is not None else 0

    @property
    def world_size(self) -> int:
        """The ranks the data is sharded over (1 without a process group)."""
        from sharpkit.distributed import world

        return world(self.process_group)[1] if self.process_group is not None else 1

    def reduce(self, *values: float | torch.Tensor) -> list[Any]:
        """Sums over the ranks, in one all-reduce (float64): each float stays a float,
        each tensor a tensor of its shape, dtype and device; the values themselves
        without a process group."""
        if self.process_group is None:
            return list(values)
        from sharpkit.distributed import all_reduce_sum

        flat = torch.cat(
            [torch.as_tensor(v, dtype=torch.float64).detach().reshape(-1).cpu() for v in values]
        )
        total = all_reduce_sum(flat, self.process_group)
        out: list[Any] = []
        at = 0
        for v in values:
            if isinstance(v, torch.Tensor):
                out.append(total[at : at + v.numel()].reshape(v.shape).to(v))
                at += v.numel()
            else:
                out.append(float(total[at]))
                at += 1
        return out

    def gather(self, values: Sequence[float]) -> list[float]:
        """Every rank's ``values`` concatenated in rank order (per-batch numbers in
        global batch order); ``values`` itself without a process group."""
        if self.process_group is None:
            return [float(v) for v in values]
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, [float(v) for v in values], group=self.process_group)
        return [v for part in parts for v in part]

    def shared_seed(self, seed: int | torch.Generator | None) -> int | torch.Generator | None:
        """``seed`` checked equal on every rank (``None``: rank 0's draw), so that
        every rank draws the same random numbers; ``seed`` itself without a group."""
        if self.process_group is None or isinstance(seed, torch.Generator):
            return seed
        from sharpkit.distributed import shared_seed

        return shared_seed(seed, self.process_group)

    def batch_generators(self, gen: torch.Generator, seed: int) -> list[torch.Generator]:
        """One generator per local batch: global batch 0 draws from ``gen`` itself,
        global batch ``i > 0`` from a generator seeded ``seed + i``. A batch sees the
        same random numbers whichever rank holds it and however many draws the
        batches before it took (``gen, seed`` from ``make_generator``)."""
        return [
            gen
            if self.batch_offset + i == 0
            else torch.Generator().manual_seed(seed + self.batch_offset + i)
            for i in range(len(self.batches))
        ]

    @property
    def random_state(self) -> RandomState:
        """The random state every evaluation replays, so that with dropout in training
        mode the metrics compare losses under the same masks (a report's Hessian and
        m-sharpness objectives share it)."""
        return self.frozen.random_state

    @random_state.setter
    def random_state(self, state: RandomState) -> None:
        if not isinstance(state, RandomState):
            raise TypeError(f"random_state: expected a RandomState, got {type(state).__name__}")
        self.frozen.random_state = state

    def replayed(self) -> contextlib.AbstractContextManager[None]:
        """Context for one evaluation: the module mode and the replayed random state."""
        return self.frozen.evaluating()

    def at(self) -> Callable[..., Any]:
        """The model as a callable at the current point ``w0 + d`` (see :meth:`set_offset`)."""
        return self.frozen.caller(self._at)

    def hessian(self, hvp: str = "auto") -> Any:
        """The :class:`~sharpkit.curvature.HessianOperator` of this objective at ``w0``:
        the same frozen copies, batches and random state (``hvp`` as there)."""
        from sharpkit.curvature.hessian import HessianOperator

        return HessianOperator._on(self.frozen, self.loss_fn, self.batches, hvp=hvp)

    # -- parameters -------------------------------------------------------------
    @property
    def num_examples(self) -> int:
        return sum(self.sizes)

    @property
    def dim(self) -> int:
        return sum(w.numel() for w in self.w0)

    def set_offset(self, d: Sequence[torch.Tensor | None] | None) -> None:
        """Evaluate at ``w0 + d`` from now on (``None``, or a ``None`` entry: ``w0``)."""
        with torch.no_grad():
            self._at = [
                w if di is None else w + di for w, di in zip(self.w0, d or [None] * len(self.w0))
            ]

    def zeros(self) -> list[torch.Tensor]:
        return [torch.zeros_like(w) for w in self.w0]

    def scale(self, adaptive: bool, offset: float = 0.0) -> list[torch.Tensor]:
        """The per-coordinate scale ``c`` of a perturbation ``d = c * u``:
        ``|w| + offset`` (adaptive metrics) or 1."""
        if adaptive:
            return [w.abs() + offset for w in self.w0]
        return [torch.ones_like(w) for w in self.w0]

    @contextlib.contextmanager
    def metered(self) -> Iterator[Cost]:
        """Count the evaluations of the block in a fresh :class:`Cost` (yielded; it is
        complete when the block ends, summed over the ranks when sharded), then add
        them to the running total."""
        before, self.cost = self.cost, Cost()
        block = self.cost
        try:
            yield block
            if self.process_group is not None:  # after a normal exit only: no collective
                names = [f.name for f in dataclasses.fields(Cost)]  # in a failing block
                totals = self.reduce(*[float(getattr(block, k)) for k in names])
                for k, t in zip(names, totals):
                    setattr(block, k, int(t))
        finally:
            self.cost = before + block

    # -- evaluations --------------------------------------------------------------
    def _scalar(self, loss: torch.Tensor) -> torch.Tensor:
        if loss.dim() != 0:
            raise ValueError(f"loss_fn: expected a scalar mean loss, got shape {tuple(loss.shape)}")
        return loss

    def loss(self, batch: Any, d: Sequence[torch.Tensor] | None = None) -> float:
        """Loss of one batch at ``w0 + d``."""
        self.set_offset(d)
        with torch.no_grad(), self.replayed():
            value = float(self._scalar(self.loss_fn(self.at(), batch)))
        self.cost.forward += 1
        return value

    def metric(self, fn: Callable[..., Any], batch: Any, d: Sequence[torch.Tensor] | None) -> float:
        """Any ``fn(model, batch)`` at ``w0 + d`` (counted as a forward)."""
        self.set_offset(d)
        with torch.no_grad(), self.replayed():
            value = float(fn(self.at(), batch))
        self.cost.forward += 1
        return value

    def loss_and_grad(
        self, batch: Any, d: Sequence[torch.Tensor] | None = None
    ) -> tuple[float, list[torch.Tensor]]:
        """Loss of one batch at ``w0 + d`` and its gradient w.r.t. the parameters."""
        self.set_offset(d)
        leaves = [t.detach().requires_grad_(True) for t in self._at]
        with torch.enable_grad(), self.replayed():
            loss = self._scalar(self.loss_fn(self.frozen.caller(leaves), batch))
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        self.cost.gradient += 1
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads)]
        return float(loss.detach()), grads

    def weighted_sum(self, values: Sequence[float]) -> float:
        """``sum_b w_b v_b`` over this rank's batches, one number per batch (``weights``);
        :meth:`reduce` it and divide by ``total_weight`` for the mean over all data."""
        return sum(v * w for v, w in zip(values, self.weights))

    def weighted_mean(self, values: Sequence[float]) -> float:
        """``sum_b w_b v_b / sum_b w_b`` over the batches of every rank (one all-reduce
        when sharded; every rank must call it)."""
        return self.reduce(self.weighted_sum(values))[0] / self.total_weight

    def mean_loss(self, d: Sequence[torch.Tensor] | None = None) -> float:
        """Weighted mean loss over all batches (of all ranks) at ``w0 + d``: the loss
        of all the data."""
        return self.weighted_mean([self.loss(b, d) for b in self.batches])

    def protocol(
        self, estimator: str, seed: int | None = None, **extra: Any
    ) -> MeasurementProtocol:
        if self.process_group is not None:
            import torch.distributed as dist

            from sharpkit.distributed import _initialised

            extra = {
                "world_size": self.world_size,
                "backend": dist.get_backend(self.process_group) if _initialised() else None,
                **extra,
            }
        return MeasurementProtocol(
            estimator=estimator,
            examples=self.total_examples,
            batches=self.total_batches,
            weighting=self.weighting,
            mode=self.mode,
            dtype=str(self.dtype),
            device=str(self.device),
            seed=seed,
            extra={
                **({"tokens": self.total_weight} if self.weighting == "tokens" else {}),
                "params": len(self.names),
                "dim": self.dim,
                **extra,
            },
        )


def weighted_mean_stderr(
    values: Sequence[float], weights: Sequence[float]
) -> tuple[float, float | None]:
    """Weighted mean and the standard error of it (``None`` for a single value)."""
    v = torch.tensor(values, dtype=torch.float64)
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    mean = float((w * v).sum())
    if len(values) < 2:
        return mean, None
    # standard error of a weighted mean with weights treated as fixed
    n_eff = 1.0 / float((w**2).sum())
    var = float((w * (v - mean) ** 2).sum()) * n_eff / (n_eff - 1.0)
    return mean, math.sqrt(var / n_eff)
