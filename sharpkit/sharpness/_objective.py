"""The shared machinery of the sharpness metrics: the model evaluated at ``w + d``,
batch losses, gradients and cost counts.

The caller's model is never modified (not its weights, not its buffers, not its
train/eval modes): every evaluation goes through the functional layer
(:class:`sharpkit._functional.FrozenModel`: frozen copies in the requested dtype
and device, ``torch.func.functional_call``, buffers cloned per call).
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

    Attributes:
        names: the measured parameter names; ``w0`` their values (frozen copies).
        batches, sizes: the materialised batches and their example counts.
        weights: each batch's weight in a mean over batches, in the loss's own
            normalisation (:func:`sharpkit._batch.batch_weight`: its example count,
            or its number of target tokens for a token-mean loss);
            ``total_weight`` their sum and ``weighting`` what they count
            (``"examples"`` or ``"tokens"``). :meth:`weighted_mean` averages
            per-batch numbers with them.
        frozen: the :class:`~sharpkit._functional.FrozenModel` every evaluation uses.
        cost: the running :class:`Cost`.

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
    ) -> None:
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
        self.total_weight = sum(self.weights)
        if not self.total_weight > 0:
            raise ValueError(
                f"data: the batches have no weight in the loss's mean (weights "
                f"{self.weights}: no target tokens?)"
            )
        self.weighting = weighting(self.loss_fn, batches)
        self.cost = Cost()

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
        complete when the block ends), then add them to the running total."""
        before, self.cost = self.cost, Cost()
        block = self.cost
        try:
            yield block
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

    def weighted_mean(self, values: Sequence[float]) -> float:
        """``sum_b w_b v_b / sum_b w_b`` for one number per batch (``weights``)."""
        return sum(v * w for v, w in zip(values, self.weights)) / self.total_weight

    def mean_loss(self, d: Sequence[torch.Tensor] | None = None) -> float:
        """Weighted mean loss over all batches at ``w0 + d`` (the loss of all the data)."""
        return self.weighted_mean([self.loss(b, d) for b in self.batches])

    def protocol(
        self, estimator: str, seed: int | None = None, **extra: Any
    ) -> MeasurementProtocol:
        return MeasurementProtocol(
            estimator=estimator,
            examples=self.num_examples,
            batches=len(self.batches),
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
