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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sharpkit.io.results import MeasurementProtocol, to_jsonable, write_json_atomic
from sharpkit.sharpness._objective import Cost, MetricResult, Objective, supervised_accuracy
from sharpkit.sharpness.average_case import _average_case
from sharpkit.sharpness.fisher_rao import _fisher_rao
from sharpkit.sharpness.pac_bayes import _pac_bayes
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
METRICS: dict[str, str] = {
    "lambda_max": "largest Hessian eigenvalue (Lanczos)",
    "top_k": "k largest Hessian eigenvalues (Lanczos)",
    "lambda_min": "smallest Hessian eigenvalue (Lanczos)",
    "trace": "Hessian trace (Hutch++)",
    "esd": "Hessian spectral density (SLQ)",
    "worst_case": "worst-case sharpness, p=2, c=1 (auto-PGD)",
    "worst_case_adaptive": "worst-case sharpness, p=2, c=|w| (auto-PGD)",
    "worst_case_inf": "worst-case sharpness, p=inf, c=1 (auto-PGD)",
    "worst_case_adaptive_inf": "worst-case sharpness, p=inf, c=|w| (auto-PGD)",
    "average_case": "average-case sharpness, Gaussian, c=1",
    "average_case_adaptive": "average-case sharpness, Gaussian, c=|w|",
    "pac_bayes": "PAC-Bayes flatness 1/sigma^2 (accuracy drop 0.1)",
    "pac_bayes_mag": "magnitude-aware PAC-Bayes flatness 1/sigma^2",
    "fisher_rao": "Fisher-Rao norm (empirical Fisher)",
    "epsilon_sharpness": "Keskar epsilon-sharpness (box, full data)",
}

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
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "lambda_max": {"tol": 1e-4},
    "top_k": {"k": 5, "tol": 1e-4},
    "lambda_min": {"tol": 1e-4},
    "trace": {"method": "hutch++", "num_samples": 60},
    "esd": {"runs": 3, "steps": 60, "num_points": 400},
    "worst_case": {"rho": 0.05, "steps": 20, "m": 128},
    "worst_case_adaptive": {"rho": 0.5, "steps": 20, "m": 128},
    "worst_case_inf": {"rho": 0.001, "steps": 20, "m": 128},
    "worst_case_adaptive_inf": {"rho": 0.01, "steps": 20, "m": 128},
    "average_case": {"rho": 0.01, "samples": 32},
    "average_case_adaptive": {"rho": 0.1, "samples": 32},
    "pac_bayes": {"samples": 4},
    "pac_bayes_mag": {"samples": 4},
    "fisher_rao": {},
    "epsilon_sharpness": {"epsilon": 1e-3, "steps": 20},
}


@dataclasses.dataclass
class SharpnessReport:
    """A sharpness profile: metrics with error bars, costs and protocols.

    Attributes:
        metrics: name -> :class:`MetricResult`, in the order computed.
        base: loss (and accuracy for classification) at the unperturbed weights.
        model: number of parameters and their dtype.
        protocol: the measurement as a whole (data, mode, dtype, seed, options).
        timings: wall seconds per metric.
        schema_version: version of the JSON layout (:data:`SCHEMA_VERSION`).
    """

    metrics: dict[str, MetricResult]
    base: dict[str, float]
    model: dict[str, Any]
    protocol: MeasurementProtocol
    timings: dict[str, float]
    schema_version: int = SCHEMA_VERSION

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
            }
        )

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` atomically to ``path``."""
        return write_json_atomic(path, self.to_dict())

    def values(self) -> dict[str, float]:
        """name -> value, for tables over several reports."""
        return {k: v.value for k, v in self.metrics.items()}

    def table(self, title: str | None = None) -> Any:
        """A :class:`rich.table.Table` (metric, value, stderr, cost, time)."""
        from rich.table import Table

        t = Table(title=title or "sharpness profile")
        for col, just in (
            ("metric", "left"),
            ("value", "right"),
            ("± stderr", "right"),
            ("setting", "left"),
            ("cost (batch evals)", "right"),
            ("time [s]", "right"),
        ):
            t.add_column(col, justify=just)  # type: ignore[arg-type]
        for name, r in self.metrics.items():
            t.add_row(
                name,
                _fmt(r.value),
                "" if r.stderr is None else _fmt(r.stderr),
                _setting(r),
                _cost(r.cost),
                f"{self.timings.get(name, math.nan):.2f}",
            )
        return t

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        Console(width=120, file=buf).print(self.table())
        return buf.getvalue()


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return str(x)
    return f"{x:.4g}"


def _cost(c: Cost) -> str:
    parts = [f"{n} {k}" for k, n in dataclasses.asdict(c).items() if n]
    return ", ".join(parts) or "0"


def _setting(r: MetricResult) -> str:
    d = r.details
    if r.name == "esd":
        return f"{r.protocol.extra.get('runs', '')} runs (SLQ)".strip()
    for key in ("rho", "sigma", "epsilon"):
        if key in d:
            return f"{key}={_fmt(d[key])}"
    if "converged" in d:
        return "converged" if d["converged"] else "NOT converged"
    return ""


def _curvature(name: str, op: Any, opts: dict[str, Any], seed: int, progress: bool) -> MetricResult:
    from sharpkit.curvature import eigenvalues, spectral_density, trace

    batches = op.num_batches
    proto = op.protocol()
    if name in ("lambda_max", "top_k", "lambda_min"):
        which = "smallest" if name == "lambda_min" else "largest"
        k = int(opts.get("k", 1))
        res = eigenvalues(
            op, k=k, which=which, tol=opts.get("tol", 1e-4), seed=seed, progress=progress
        )
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
            op, method=opts.get("method", "hutch++"), num_samples=int(opts.get("num_samples", 60)),
            seed=seed, progress=progress,
        )  # fmt: skip
        return MetricResult(
            name=name,
            value=float(res.estimate),
            stderr=float(res.stderr),
            details={
                "ci": list(res.ci),
                "confidence": res.confidence,
                "method": opts.get("method", "hutch++"),
            },
            cost=Cost(hvp=res.num_matvecs * batches),
            protocol=res.protocol,
        )
    if name == "esd":
        res = spectral_density(
            op, runs=int(opts.get("runs", 3)), steps=int(opts.get("steps", 60)),
            num_points=int(opts.get("num_points", 400)), seed=seed, progress=progress,
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
    del proto
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
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"metrics: unknown {unknown}; known: {sorted(METRICS)}")
    if not metrics:
        raise ValueError("metrics: choose at least one")
    options = options or {}
    bad = [k for k in options if k not in METRICS]
    if bad:
        raise ValueError(f"options: unknown metrics {bad}")
    obj = Objective(model, loss_fn, data, params=params, mode=mode, dtype=dtype, device=device)
    base: dict[str, float] = {"loss": obj.mean_loss()}
    acc_fn = accuracy_fn or supervised_accuracy
    try:
        base["accuracy"] = (
            sum(obj.metric(acc_fn, b, None) * n for b, n in zip(obj.batches, obj.sizes))
            / obj.num_examples
        )
    except (ValueError, RuntimeError, IndexError):
        if accuracy_fn is not None:
            raise
    m_objectives: dict[int | None, Objective] = {None: obj}

    def objective_for(m: int | None) -> Objective:
        if m is not None and m >= max(obj.sizes):
            m = None
        if m not in m_objectives:
            m_objectives[m] = Objective(
                model, loss_fn, obj.batches, params=obj.names, mode=mode, dtype=obj.dtype,
                device=obj.device, m=m,
            )  # fmt: skip
            m_objectives[m].random_state = obj.random_state  # every metric: the same draws
        return m_objectives[m]

    op = None
    results: dict[str, MetricResult] = {}
    timings: dict[str, float] = {}
    for name in metrics:
        opts = {**DEFAULT_OPTIONS[name], **options.get(name, {})}
        t0 = time.perf_counter()
        if name in ("lambda_max", "top_k", "lambda_min", "trace", "esd"):
            if op is None:
                op = obj.hessian(hvp=hvp)  # the objective's copies, batches and random state
            res = _curvature(name, op, opts, seed, progress)
        elif name.startswith("worst_case"):
            res = _worst_case(
                objective_for(opts.get("m")), opts["rho"], p="inf" if name.endswith("_inf") else 2,
                adaptive="adaptive" in name, steps=opts.get("steps", 20),
                restarts=opts.get("restarts", 1), seed=seed, progress=progress, name=name,
            )  # fmt: skip
        elif name.startswith("average_case"):
            res = _average_case(
                obj, opts["rho"], noise=opts.get("noise", "gaussian"), adaptive="adaptive" in name,
                samples=opts.get("samples", 32), seed=seed, progress=progress, name=name,
            )  # fmt: skip
        elif name.startswith("pac_bayes"):
            res = _pac_bayes(
                obj, target=opts.get("target", "accuracy"), max_drop=opts.get("max_drop", 0.1),
                magnitude_aware=name == "pac_bayes_mag", samples=opts.get("samples", 4),
                sigma_init=opts.get("sigma_init", 0.01), rtol=opts.get("rtol", 0.05),
                max_iter=opts.get("max_iter", 40), accuracy_fn=accuracy_fn, seed=seed,
            )  # fmt: skip
        elif name == "fisher_rao":
            res = _fisher_rao(obj, fisher=opts.get("fisher", "empirical"), seed=seed)
        else:  # epsilon_sharpness
            res = _epsilon(
                obj, opts["epsilon"], steps=opts.get("steps", 20), restarts=opts.get("restarts", 1),
                seed=seed,
            )  # fmt: skip
        timings[name] = time.perf_counter() - t0
        results[name] = res
    protocol = obj.protocol(
        "measure_sharpness", seed, metrics=list(metrics),
        options={k: {**DEFAULT_OPTIONS[k], **options.get(k, {})} for k in metrics},
    )  # fmt: skip
    model_info = {
        "parameters": obj.dim,
        "tensors": len(obj.names),
        "dtype": str(obj.dtype),
    }
    return SharpnessReport(results, base, model_info, protocol, timings)
