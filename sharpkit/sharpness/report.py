"""One sharpness profile of a model: any set of metrics plus curvature, with protocol.

:func:`measure_sharpness` computes the chosen metrics (names in :data:`METRICS`) and
returns a :class:`SharpnessReport`, which serialises to JSON (with a schema version)
and prints as a table. Curvature comes from :mod:`sharpkit.curvature` (Lanczos,
Hutchinson, stochastic Lanczos quadrature on a :class:`~sharpkit.curvature.HessianOperator`).
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sharpkit.io.results import write_json_atomic
from sharpkit.protocol import MeasurementProtocol, to_jsonable
from sharpkit.sharpness._objective import Cost, MetricResult, Objective, supervised_accuracy
from sharpkit.sharpness._registry import REGISTRY, resolve_options
from sharpkit.sharpness.average_case import _average_case
from sharpkit.sharpness.fisher_rao import _fisher_rao
from sharpkit.sharpness.pac_bayes import _pac_bayes, check_max_drop
from sharpkit.sharpness.worst_case import _epsilon, _worst_case

__all__ = [
    "DEFAULT_METRICS",
    "METRICS",
    "SCHEMA_VERSION",
    "SharpnessReport",
    "measure_sharpness",
]

#: bump when a key of the JSON form changes meaning or disappears
SCHEMA_VERSION = 1

#: every metric name :func:`measure_sharpness` knows, with a one-line description
METRICS: dict[str, str] = {name: spec.description for name, spec in REGISTRY.items()}

#: what ``sharpkit measure`` computes unless told otherwise
DEFAULT_METRICS: tuple[str, ...] = (
    "lambda_max",
    "lambda_min",
    "trace",
    "esd",
    "worst_case",
    "worst_case_adaptive",
    "average_case_adaptive",
    "pac_bayes",
    "fisher_rao",
)

#: default settings per metric; ``measure_sharpness(options=...)`` overrides them
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {n: s.defaults() for n, s in REGISTRY.items()}


@dataclasses.dataclass
class SharpnessReport:
    """A sharpness profile: metrics with error bars, costs and protocols.

    Attributes:
        metrics: name -> :class:`MetricResult`, in the order computed.
        base: loss (and accuracy for classification) at the unperturbed weights.
        model: number of parameters and their dtype.
        protocol: the measurement as a whole (data, mode, dtype, seed, options).
        timings: wall seconds per metric.
        failures: name -> one-line reason, for each metric that raised while running
            (the others are kept).
        schema_version: version of the JSON layout (:data:`SCHEMA_VERSION`).
    """

    metrics: dict[str, MetricResult]
    base: dict[str, float]
    model: dict[str, Any]
    protocol: MeasurementProtocol
    timings: dict[str, float]
    failures: dict[str, str] = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def not_converged(self) -> list[str]:
        """Names of the metrics whose estimator stopped before its tolerance was met."""
        return [n for n, r in self.metrics.items() if r.details.get("converged") is False]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON form."""
        return to_jsonable(
            {
                "schema_version": self.schema_version,
                "base": self.base,
                "model": self.model,
                "protocol": self.protocol,
                "timings": self.timings,
                "metrics": {k: v.to_dict() for k, v in self.metrics.items()},
                "not_converged": self.not_converged,
                "failures": self.failures,
            }
        )

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` atomically to ``path``."""
        return write_json_atomic(path, self.to_dict())

    def values(self) -> dict[str, float]:
        """name -> value, for tables over several reports."""
        return {k: v.value for k, v in self.metrics.items()}

    def caption(self, data: str | None = None) -> str:
        """One line: the data measured on, the base loss and accuracy."""
        p = self.protocol
        parts = [f"data: {data + ', ' if data else ''}{p.examples} examples in {p.batches} batches"]
        parts.append(f"base loss {_fmt(self.base.get('loss'))}")
        if "accuracy" in self.base:
            parts.append(f"base accuracy {_fmt(self.base['accuracy'])}")
        return "; ".join(parts)

    def table(self, title: str | None = None, *, data: str | None = None) -> Any:
        """A :class:`rich.table.Table` (metric, value, stderr, setting, cost, time).

        Args:
            title: the table's title.
            data: what the data is (e.g. ``"digits, train split"``), for the caption.
        """
        from rich.table import Table

        t = Table(title=title or "sharpness profile", caption=self.caption(data))
        for col, just in (
            ("metric", "left"),
            ("value", "right"),
            ("± stderr", "right"),
            ("setting", "left"),
            ("cost (batch evals)", "right"),
            ("time", "right"),
        ):
            t.add_column(col, justify=just, no_wrap=col == "metric")  # type: ignore[arg-type]
        for name, r in self.metrics.items():
            t.add_row(
                name,
                _value(r),
                _error_note(r) if r.stderr is None else _fmt(r.stderr),
                _setting(r),
                _cost(r.cost),
                f"{self.timings.get(name, math.nan):.2f} s",
            )
        for name, why in self.failures.items():
            t.add_row(name, "FAILED", "", why, "", f"{self.timings.get(name, math.nan):.2f} s")
        return t

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        Console(width=120, file=buf).print(self.table())
        return buf.getvalue()


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return str(x)
    return f"{x:.4g}"


def _cost(c: Cost) -> str:
    parts = [f"{n} {k}" for k, n in dataclasses.asdict(c).items() if n]
    return ", ".join(parts) or "0"


def _value(r: MetricResult) -> str:
    if r.name == "esd":
        return "see esd.png"
    text = _fmt(r.value)
    if r.details.get("converged") is not False:
        return text
    if r.name.startswith("pac_bayes") and r.details.get("sigma", 0) > 0:
        drops = [dr for _, dr in r.details.get("evaluations", [])]
        if all(dr <= r.details["max_drop"] for dr in drops):  # no infeasible sigma found
            return f"<= {text} (!)"
    return f"{text} (!)"


def _error_note(r: MetricResult) -> str:
    spec = REGISTRY.get(r.name)
    note = spec.error_note if spec is not None else "n/a"
    residuals = r.details.get("residuals")
    if residuals:
        return f"n/a, residual {max(residuals):.1e}"
    return note


def _setting(r: MetricResult) -> str:
    d = r.details
    if r.name == "esd":
        rows = d.get("nodes", [])
        flat = [x for row in rows for x in (row if isinstance(row, list) else [row])]
        nodes = [x for x in flat if isinstance(x, float) and math.isfinite(x)]
        runs = r.protocol.extra.get("runs", "")
        span = f"; Ritz nodes in [{_fmt(min(nodes))}, {_fmt(max(nodes))}]" if nodes else ""
        return f"{runs} runs (SLQ){span}"
    if "sigma" in d and r.name.startswith("pac_bayes"):
        text = f"sigma={_fmt(d['sigma'])} (bigger = flatter)"
        return text if d.get("converged", True) else f"NOT converged; {text}"
    for key in ("rho", "epsilon"):
        if key in d:
            return f"{key}={_fmt(d[key])}"
    if "converged" in d:
        return "converged" if d["converged"] else "NOT converged"
    return ""


def _curvature(
    name: str, op: Any, opts: dict[str, Any], seed: int, progress: bool, batches: int
) -> MetricResult:
    """A curvature metric on ``op``; its cost is ``batches`` HVPs per product."""
    from sharpkit.curvature import eigenvalues, spectral_density, trace
    from sharpkit.curvature.lanczos import basis_storage_from_text

    if name in ("lambda_max", "top_k", "lambda_min"):
        which = "smallest" if name == "lambda_min" else "largest"
        k = opts.get("k", 1)
        res = eigenvalues(
            op, k=k, which=which, tol=opts["tol"], seed=seed, progress=progress,
            max_basis=opts.get("max_basis"),
            basis_storage=basis_storage_from_text(opts.get("basis_storage")),
        )  # fmt: skip
        return MetricResult(
            name=name,
            value=float(res.eigenvalues[0]),
            stderr=None,
            details={
                "eigenvalues": res.eigenvalues.tolist(),
                "residuals": res.residuals.tolist(),
                "converged": bool(res.converged),
            },
            cost=Cost(hvp=res.num_matvecs * batches),
            protocol=res.protocol,
        )
    if name == "trace":
        res = trace(
            op, method=opts["method"], num_samples=opts["num_samples"],
            seed=seed, progress=progress,
        )  # fmt: skip
        return MetricResult(
            name=name,
            value=float(res.estimate),
            stderr=float(res.stderr),
            details={
                "ci": list(res.ci),
                "confidence": res.confidence,
                "method": opts["method"],
            },
            cost=Cost(hvp=res.num_matvecs * batches),
            protocol=res.protocol,
        )
    if name == "esd":
        res = spectral_density(
            op, runs=opts["runs"], steps=opts["steps"],
            num_points=opts["num_points"], seed=seed, progress=progress,
        )  # fmt: skip
        nodes = torch.nan_to_num(res.nodes, nan=-math.inf)
        return MetricResult(
            name=name,
            value=float(nodes.max()),
            stderr=None,
            details={
                "grid": res.grid.tolist(),
                "density": res.density.tolist(),
                "nodes": res.nodes.tolist(),
                "weights": res.weights.tolist(),
                "sigma": res.sigma,
                "note": "value = largest Ritz node (an estimate of lambda_max)",
            },
            cost=Cost(hvp=res.num_matvecs * batches),
            protocol=res.protocol,
        )
    raise AssertionError(name)


def measure_sharpness(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    options: dict[str, dict[str, Any]] | None = None,
    accuracy_fn: Callable[..., Any] | None = None,
    seed: int = 0,
    params: Sequence[str] | Callable[[str], bool] | None = None,
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    hvp: str = "auto",
    progress: bool = False,
    process_group: Any = None,
) -> SharpnessReport:
    """Measure a set of sharpness metrics and curvature quantities of ``model``.

    Args:
        model: the network (never modified).
        loss_fn: ``loss_fn(model, batch)`` or an nn loss module.
        data: one batch or an iterable of batches (materialised once).
        metrics: names from :data:`METRICS`.
        options: per-metric overrides of :data:`DEFAULT_OPTIONS`, e.g.
            ``{"worst_case": {"rho": 0.1}}``.
        accuracy_fn: ``accuracy_fn(model, batch)`` for PAC-Bayes and the base accuracy;
            default arg-max accuracy when batches are ``(inputs, targets)``.
        seed: one seed for every stochastic metric (recorded in each protocol).
        params, mode, dtype, device: parameters measured, module mode, compute dtype
            and device (a private copy of the model).
        hvp: the Hessian-vector-product implementation of the curvature metrics
            (:class:`~sharpkit.curvature.HessianOperator`): ``"auto"`` (cached
            double backward), ``"rev-rev"``, ``"fwd-rev"`` or ``"linearize"`` (faster
            products on convolutional and attention models after a one-off trace per
            batch, more memory; refused with ``nn.MSELoss``, which crashes torch 2.13).
        progress: tqdm bars on long loops.
        process_group: ``None`` (``data`` is all the data), or a
            ``torch.distributed`` process group (``torch.distributed.group.WORLD``,
            which is ``None`` until ``init_process_group``) whose ranks each pass
            their shard of the batches (uneven shards allowed). Every metric then reduces over the shards (the Hessian
            through :class:`~sharpkit.distributed.ShardedOperator`, the others
            through :class:`~sharpkit.sharpness._objective.Objective`), every rank
            draws the same random numbers (``seed`` must be the same on all), and
            every rank returns the single-process report of the union of the
            shards, costs summed over the ranks. A metric that fails on any rank
            raises (instead of being recorded), since the ranks' collectives
            would no longer pair up; write the report on rank 0 only
            (:func:`~sharpkit.distributed.is_main_process`).

    Returns:
        A :class:`SharpnessReport`.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> data = (torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
        >>> rep = measure_sharpness(nn.Linear(4, 3), nn.CrossEntropyLoss(), data,
        ...                         ["lambda_max", "average_case"])
        >>> sorted(rep.to_dict()["metrics"]), rep.schema_version
        (['average_case', 'lambda_max'], 1)
    """
    from sharpkit.curvature import HVP_IMPLEMENTATIONS

    if hvp != "auto" and hvp not in HVP_IMPLEMENTATIONS:
        raise ValueError(f"hvp: expected 'auto' or one of {HVP_IMPLEMENTATIONS}, got {hvp!r}")
    if isinstance(metrics, str) or not all(isinstance(m, str) for m in metrics):
        raise ValueError(f"metrics: expected a sequence of metric names, got {metrics!r}")
    metrics = list(metrics)
    if not metrics:
        raise ValueError("metrics: choose at least one")
    if len(set(metrics)) != len(metrics):
        raise ValueError(f"metrics: each metric once, got {metrics}")
    resolved = resolve_options(metrics, options)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    if not isinstance(progress, bool):
        raise ValueError(f"progress: expected True or False, got {progress!r}")
    if accuracy_fn is not None and not callable(accuracy_fn):
        raise ValueError(f"accuracy_fn: expected accuracy_fn(model, batch), got {accuracy_fn!r}")
    check_requirements(metrics, resolved, loss_fn, hvp=hvp)
    obj = Objective(
        model, loss_fn, data, params=params, mode=mode, dtype=dtype, device=device,
        process_group=process_group,
    )  # fmt: skip
    seed = obj.shared_seed(seed)  # refused unless the same on every rank
    needs_accuracy = [m for m in metrics if resolved[m].get("target") == "accuracy"]
    if needs_accuracy and accuracy_fn is None and not _pair(obj.batches[0]):
        raise ValueError(
            f"accuracy_fn: {', '.join(needs_accuracy)} (target='accuracy') needs an accuracy; "
            f"the default expects (inputs, targets) batches, got {type(obj.batches[0]).__name__}"
            "; pass accuracy_fn(model, batch) or set target='loss'"
        )
    try:
        base: dict[str, float] = {"loss": obj.mean_loss()}
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as err:
        raise ValueError(
            "loss_fn/data: the loss failed at the unperturbed weights, before any metric "
            f"({type(err).__name__}: {_first_line(err)})"
        ) from None
    acc_fn = accuracy_fn or supervised_accuracy
    error: Exception | None = None
    try:
        correct = obj.weighted_sum([obj.metric(acc_fn, b, None) for b in obj.batches])
    except Exception as err:
        correct, error = 0.0, err
    # the ranks agree on whether the accuracy ran anywhere it failed (one collective)
    correct, failed = obj.reduce(correct, float(error is not None))
    if not failed:
        base["accuracy"] = correct / obj.total_weight
    elif accuracy_fn is not None or needs_accuracy:
        what = "accuracy_fn" if accuracy_fn is not None else "the default accuracy"
        why = f"{type(error).__name__}: {_first_line(error)}" if error else "on another rank"
        raise ValueError(f"accuracy_fn: {what} failed on the unperturbed model ({why})")
    largest = max(obj.gather([max(obj.sizes)]))  # the largest batch of any rank
    m_objectives: dict[int | None, Objective] = {None: obj}

    def objective_for(m: int | None) -> Objective:
        if m is not None and m >= largest:
            m = None
        if m not in m_objectives:
            m_objectives[m] = Objective(
                model, loss_fn, obj.batches, params=obj.names, mode=mode, dtype=obj.dtype,
                device=obj.device, m=m, process_group=process_group,
            )  # fmt: skip
            m_objectives[m].random_state = obj.random_state  # every metric: the same draws
        return m_objectives[m]

    op = None
    results: dict[str, MetricResult] = {}
    timings: dict[str, float] = {}
    failures: dict[str, str] = {}
    for name in metrics:
        opts = resolved[name]
        t0 = time.perf_counter()
        try:
            if REGISTRY[name].needs & {"hvp"}:
                if op is None:
                    op = obj.hessian(hvp=hvp)  # the objective's copies, batches and random state
                    if process_group is not None:
                        from sharpkit.distributed import ShardedOperator

                        op = ShardedOperator(op, group=process_group)
                res = _curvature(name, op, opts, seed, progress, obj.total_batches)
            elif name.startswith("worst_case"):
                res = _worst_case(
                    objective_for(opts["m"]), opts["rho"], p="inf" if name.endswith("_inf") else 2,
                    adaptive="adaptive" in name, steps=opts["steps"], restarts=opts["restarts"],
                    seed=seed, progress=progress, name=name,
                )  # fmt: skip
            elif name.startswith("average_case"):
                res = _average_case(
                    obj, opts["rho"], noise=opts["noise"], adaptive="adaptive" in name,
                    samples=opts["samples"], seed=seed, progress=progress, name=name,
                )  # fmt: skip
            elif name.startswith("pac_bayes"):
                res = _pac_bayes(
                    obj, target=opts["target"], max_drop=opts["max_drop"],
                    magnitude_aware=name == "pac_bayes_mag", samples=opts["samples"],
                    sigma_init=opts["sigma_init"], rtol=opts["rtol"], max_iter=opts["max_iter"],
                    accuracy_fn=accuracy_fn, seed=seed,
                )  # fmt: skip
            elif name == "fisher_rao":
                res = _fisher_rao(obj, fisher=opts["fisher"], seed=seed)
            else:  # epsilon_sharpness
                res = _epsilon(
                    obj, opts["epsilon"], steps=opts["steps"], restarts=opts["restarts"], seed=seed
                )
        except Exception as err:  # one metric's failure must not lose the others
            if process_group is not None:  # the other ranks may wait in a collective
                raise
            obj.set_offset(None)
            failures[name] = f"{type(err).__name__}: {_first_line(err)}"
            warnings.warn(f"measure_sharpness: {name} failed: {failures[name]}", stacklevel=2)
            timings[name] = time.perf_counter() - t0
            continue
        timings[name] = time.perf_counter() - t0
        results[name] = res
        if res.details.get("converged") is False:
            warnings.warn(
                f"measure_sharpness: {name} did not converge ({_why_not(res)}); its value "
                "is not a converged estimate",
                stacklevel=2,
            )
    protocol = obj.protocol("measure_sharpness", seed, metrics=list(metrics), options=resolved)
    model_info = {
        "parameters": obj.dim,
        "tensors": len(obj.names),
        "dtype": str(obj.dtype),
    }
    return SharpnessReport(results, base, model_info, protocol, timings, failures)


def _pair(batch: Any) -> bool:
    return isinstance(batch, (tuple, list)) and len(batch) == 2


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _why_not(res: MetricResult) -> str:
    it = res.protocol.extra.get("iterations")
    if res.name.startswith("pac_bayes"):
        return f"the bisection hit max_iter after {it} candidates; sigma is only bracketed"
    return "the iteration limit was reached before the tolerance"


def check_requirements(
    metrics: Sequence[str], options: dict[str, dict[str, Any]], loss_fn: Any, *, hvp: str = "auto"
) -> None:
    """Refuse, before any compute, a metric that cannot run with this loss.

    Args:
        metrics: requested metric names.
        options: their resolved options (:func:`~sharpkit.sharpness._registry.resolve_options`).
        loss_fn: the loss argument of :func:`measure_sharpness`.
        hvp: the Hessian-vector-product implementation.

    Raises:
        ValueError: naming the metric and why it cannot run (e.g. the Fisher-Rao norm
            needs per-example losses, which a ``loss_fn(model, batch)`` returning a
            mean does not give).

    Example:
        >>> check_requirements(["fisher_rao"], {"fisher_rao": {"fisher": "empirical"}},
        ...                    lambda model, batch: model(batch).mean())
        Traceback (most recent call last):
        ...
        ValueError: loss_fn: fisher_rao needs per-example losses, which a loss_fn(model, batch) returning a mean cannot give; pass an nn loss module (e.g. nn.CrossEntropyLoss()), a loss with a per_example form (sharpkit.hf's), or leave fisher_rao out
    """
    from sharpkit._batch import as_batch_loss
    from sharpkit.curvature.hessian import linearize_blocker
    from sharpkit.curvature.lanczos import _check_basis_storage, basis_storage_from_text

    as_batch_loss(loss_fn, reduction="mean")  # a TypeError/ValueError naming loss_fn
    criterion = loss_fn if isinstance(loss_fn, nn.modules.loss._Loss) else None
    criterion = criterion or getattr(loss_fn, "criterion", None)
    for name in metrics:
        if name.startswith("pac_bayes"):
            try:
                check_max_drop(options[name]["target"], options[name]["max_drop"])
            except ValueError as err:
                raise ValueError(f"options: {name}.{err}") from None
        if "max_basis" in options.get(name, {}):
            wanted, most = options[name].get("k", 1), options[name]["max_basis"]
            if most is not None and most < wanted + 3:
                raise ValueError(
                    f"options: {name}.max_basis: expected at least {wanted + 3} (the {wanted} "
                    f"wanted vectors and room to grow), got {most}"
                )
            try:
                _check_basis_storage(basis_storage_from_text(options[name]["basis_storage"]), None)
            except ValueError as err:
                raise ValueError(f"options: {name}.{err}") from None
        needs = REGISTRY[name].needs
        if "hvp" in needs and hvp == "linearize" and (why := linearize_blocker(loss_fn)):
            raise ValueError(f"hvp: {name} with 'linearize': {why}")
        if "per_example" in needs:
            if criterion is None and getattr(loss_fn, "per_example", None) is None:
                raise ValueError(
                    f"loss_fn: {name} needs per-example losses, which a loss_fn(model, batch) "
                    "returning a mean cannot give; pass an nn loss module (e.g. "
                    "nn.CrossEntropyLoss()), a loss with a per_example form (sharpkit.hf's), "
                    f"or leave {name} out"
                )
            if options[name].get("fisher") == "model" and not isinstance(
                criterion, nn.CrossEntropyLoss
            ):
                raise ValueError(
                    f"options: {name}.fisher='model' samples labels from a softmax and needs "
                    f"nn.CrossEntropyLoss, got {type(criterion or loss_fn).__name__}"
                )
