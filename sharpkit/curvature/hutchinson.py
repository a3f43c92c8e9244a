"""Trace and Frobenius-norm estimators: Hutchinson and Hutch++, with error bars.

Hutchinson (1989): for Rademacher probes ``z`` (entries +-1), ``E[z^T H z] = tr(H)``;
the mean of ``s`` samples has variance ``2 (||H||_F^2 - sum_i H_ii^2) / s``, so
``O(1/eps^2)`` probes reach relative error ``eps``.

Hutch++ (Meyer, Musco, Musco, Woodruff, 2021) spends a third of the budget on a
sketch ``Q = orth(H S)`` of the top eigenspace, takes its trace exactly and runs
Hutchinson only on the deflated remainder:

    tr(H) = tr(Q^T H Q) + E[ g^T (I - Q Q^T) H (I - Q Q^T) g ],

which needs ``O(1/eps)`` products when the spectrum decays.

Frobenius norm: ``||H||_F^2 = tr(H^2) = E ||H z||^2`` (one product per probe).

Error bars: the standard error is the sample standard deviation over ``sqrt(s)``;
the interval is ``estimate +- t_{(1+c)/2, s-1} * stderr`` (Student t). With
``rtol`` the sampling stops once its half-width is at most ``rtol * |estimate|``
(checked from ``_MIN_SAMPLES`` samples on).

Budget: the half-width shrinks like ``t * sigma / sqrt(s)``, so from the first
``_MIN_SAMPLES`` probes (sample std ``sigma_hat``, mean ``mu_hat``) the precision
needs about

    s_needed = (t * sigma_hat / (rtol * |mu_hat|))^2

probes. Each estimator reports that number, and when even an optimistic version
(the lower confidence bound of ``sigma`` over the upper one of ``|mu|``) exceeds
the cap (checked after 10 probes, then at 20, 40, ...), the precision is not
reachable within it: the estimator says so (``reached=False``, a
``RuntimeWarning`` naming the products needed) and stops there, or, with
``if_unreachable="warn"``, warns and runs on to the cap.

References:
    Hutchinson. A stochastic estimator of the trace of the influence matrix for
    Laplacian smoothing splines, 1989.
    Meyer, Musco, Musco, Woodruff. Hutch++: optimal stochastic trace estimation.
    SOSA 2021. arXiv:2010.09649
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import scipy.stats
import torch

from sharpkit._progress import progress_bar
from sharpkit.curvature._linop import as_operator, make_generator, operator_protocol, rademacher
from sharpkit.protocol import MeasurementProtocol, to_jsonable

__all__ = ["TraceResult", "frobenius_norm_sq", "trace"]

_METHODS = ("hutchinson", "hutch++")

# The sample standard deviation is too noisy to stop on with fewer samples than this.
_MIN_SAMPLES = 10
_IF_UNREACHABLE = ("stop", "warn")


@dataclasses.dataclass
class TraceResult:
    """A stochastic trace-type estimate with its error bar.

    Attributes:
        estimate: the estimate.
        stderr: its standard error (sample std / sqrt(samples) of the stochastic part).
        ci: ``(low, high)`` confidence interval at ``confidence``.
        confidence: the interval's nominal coverage.
        num_samples: random probes used for the stochastic part.
        num_matvecs: operator products used.
        samples: the per-probe values of the stochastic part (float64 tensor).
        protocol: how it was measured.
        rtol: the requested relative half-width, or ``None``.
        reached: whether the interval's half-width is at most ``rtol * |estimate|``
            (``None`` without ``rtol``).
        matvecs_needed: products (in all, sketch included) that the projection
            ``(t * sigma_hat / (rtol * |mu_hat|))^2`` from the probes taken says
            ``rtol`` needs (``None`` without ``rtol``; ``inf`` if the estimate is 0).
    """

    estimate: float
    stderr: float
    ci: tuple[float, float]
    confidence: float
    num_samples: int
    num_matvecs: int
    samples: torch.Tensor
    protocol: MeasurementProtocol
    rtol: float | None = None
    reached: bool | None = None
    matvecs_needed: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the raw samples included)."""
        return to_jsonable(dataclasses.asdict(self) | {"protocol": self.protocol})


def _check_common(
    num_samples: Any, rtol: Any, confidence: Any, if_unreachable: Any = "stop"
) -> None:
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 2:
        raise ValueError(f"num_samples: expected an integer >= 2, got {num_samples!r}")
    if rtol is not None and not (isinstance(rtol, (int, float)) and rtol > 0):
        raise ValueError(f"rtol: expected None or a positive number, got {rtol!r}")
    if not (isinstance(confidence, float) and 0 < confidence < 1):
        raise ValueError(f"confidence: expected a float in (0, 1), got {confidence!r}")
    if if_unreachable not in _IF_UNREACHABLE:
        raise ValueError(
            f"if_unreachable: expected one of {_IF_UNREACHABLE}, got {if_unreachable!r}"
        )


def _interval(
    samples: list[float], confidence: float, offset: float = 0.0
) -> tuple[float, float, float, float]:
    s = torch.tensor(samples, dtype=torch.float64)
    n = len(samples)
    mean = float(s.mean()) + offset
    stderr = float(s.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.inf
    half = float(scipy.stats.t.ppf(0.5 + confidence / 2, df=max(n - 1, 1))) * stderr
    return mean, stderr, mean - half, mean + half


class _Running:
    """Welford's running mean and variance, the stopping check and the budget projection.

    Args:
        confidence: the interval's coverage.
        rtol: the requested relative half-width (``None``: no stopping rule).
        offset: a constant added to the mean (Hutch++'s exact low-rank part).
        cap: the most probes the caller will take.
    """

    def __init__(self, confidence: float, rtol: float | None, offset: float, cap: int) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0
        self.confidence, self.rtol, self.offset, self.cap = confidence, rtol, offset, cap
        self.z = float(scipy.stats.norm.ppf(0.5 + confidence / 2))

    def add(self, x: float) -> None:
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    def _std(self) -> float:
        return math.sqrt(max(self.m2, 0.0) / (self.n - 1))

    def narrow(self) -> bool:
        """Is the t-interval's half-width <= rtol * |estimate| (from _MIN_SAMPLES on)?"""
        if self.rtol is None or self.n < _MIN_SAMPLES:
            return False
        stderr = self._std() / math.sqrt(self.n)
        target = self.rtol * abs(self.mean + self.offset)
        if self.z * stderr > target:  # t quantile >= normal quantile: cannot be narrow
            return False
        t = float(scipy.stats.t.ppf(0.5 + self.confidence / 2, df=self.n - 1))
        return t * stderr <= target

    def needed(self) -> float:
        """Probes the precision needs by the point projection (t sigma / (rtol |mu|))^2."""
        if self.rtol is None or self.n < 2:
            return math.nan
        t = float(scipy.stats.t.ppf(0.5 + self.confidence / 2, df=self.n - 1))
        target = self.rtol * abs(self.mean + self.offset)
        if target == 0:
            return math.inf if self.m2 > 0 else float(self.n)
        return max(float(self.n), math.ceil((t * self._std() / target) ** 2))

    def unreachable(self) -> bool:
        """Even optimistically, would rtol need more than ``cap`` probes?

        Checked after ``_MIN_SAMPLES`` probes and again each time their number doubles.

        Optimistic: the lower ``confidence`` bound of sigma (chi-square) over the upper
        bound of ``|mu|`` (normal), with the normal quantile in place of t.
        """
        if self.rtol is None or self.n % _MIN_SAMPLES or not _power_of_two(self.n // _MIN_SAMPLES):
            return False
        df = self.n - 1
        sigma_low = self._std() * math.sqrt(
            df / scipy.stats.chi2.ppf(0.5 + self.confidence / 2, df)
        )
        mu_high = abs(self.mean + self.offset) + self.z * self._std() / math.sqrt(self.n)
        if mu_high == 0:
            return sigma_low > 0
        return (self.z * sigma_low / (self.rtol * mu_high)) ** 2 > self.cap


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _sample(
    probe: Any,
    running: _Running,
    samples: list[float],
    if_unreachable: str,
    fixed_matvecs: int,
    name: str,
    progress: bool,
) -> None:
    """Draw up to ``running.cap`` probes; stop when narrow, or when unreachable (or warn)."""
    warned = False
    for _ in progress_bar(range(running.cap), name, enabled=progress):
        samples.append(probe())
        running.add(samples[-1])
        if running.narrow():
            return
        if not warned and running.unreachable():
            need = fixed_matvecs + running.needed()
            cap = fixed_matvecs + running.cap
            stop = if_unreachable == "stop"
            warnings.warn(
                f"{name}: rtol={running.rtol} needs about {need:.3g} products by the first "
                f"{running.n} probes (t * std / (rtol * |estimate|))^2; the cap is {cap}"
                + (": stopping here (reached=False)" if stop else ": running on to the cap"),
                RuntimeWarning,
                stacklevel=3,
            )
            if stop:
                return
            warned = True


def _result(
    op: Any,
    estimator: str,
    samples: list[float],
    confidence: float,
    matvecs: int,
    seed: int,
    offset: float,
    extra: dict[str, Any],
    running: _Running,
    fixed_matvecs: int = 0,
) -> TraceResult:
    est, stderr, low, high = _interval(samples, confidence, offset)
    rtol = running.rtol
    reached = None if rtol is None else bool((high - low) / 2 <= rtol * abs(est))
    needed = None if rtol is None else float(fixed_matvecs + running.needed())
    extra = {**extra, "reached": reached, "matvecs_needed": needed}
    proto = operator_protocol(op)
    proto = dataclasses.replace(
        proto,
        estimator=estimator,
        seed=seed,
        matvecs=matvecs,
        extra={**proto.extra, "confidence": confidence, **extra},
    )
    return TraceResult(
        estimate=est,
        stderr=stderr,
        ci=(low, high),
        confidence=confidence,
        num_samples=len(samples),
        num_matvecs=matvecs,
        samples=torch.tensor(samples, dtype=torch.float64),
        protocol=proto,
        rtol=rtol,
        reached=reached,
        matvecs_needed=needed,
    )


def trace(
    op: Any,
    *,
    method: str = "hutchinson",
    num_samples: int = 100,
    rtol: float | None = None,
    confidence: float = 0.95,
    seed: int | torch.Generator | None = None,
    progress: bool = False,
    if_unreachable: str = "stop",
) -> TraceResult:
    """Estimate ``tr(H)`` by Hutchinson or Hutch++ with a standard error and interval.

    Hutchinson: ``tr(H) ~ (1/s) sum_i z_i^T H z_i`` over Rademacher ``z_i``. Hutch++:
    ``tr(Q^T H Q) + (1/s) sum_i g_i^T P H P g_i`` with ``Q = orth(H S)`` for a
    Rademacher sketch ``S`` and ``P = I - Q Q^T``. With ``rtol`` the probes stop once
    the interval is narrow enough, and the products that precision needs are
    projected from the first 10 probes (module docstring): if even an optimistic
    projection exceeds the budget, the result says so (``reached=False``,
    ``matvecs_needed``) instead of running to the cap.

    Args:
        op: a :class:`~sharpkit.curvature.HessianOperator`, a linear operator or a
            dense symmetric tensor.
        method: ``"hutchinson"`` (``num_samples`` Rademacher probes, one product each)
            or ``"hutch++"`` (a budget of ``num_samples`` products: ``num_samples // 3``
            sketch probes, as many products for ``H Q``, the rest Hutchinson probes
            on the deflated remainder).
        num_samples: maximum number of products.
        rtol: if given, stop early once the ``confidence`` interval's half-width is at
            most ``rtol * |estimate|`` (needs at least 10 probes).
        confidence: coverage of ``ci`` (Student-t interval).
        seed: int, ``torch.Generator`` or ``None`` (fresh seed, recorded).
        progress: tqdm bar over probes.
        if_unreachable: with ``rtol``, what to do once the first probes show that the
            budget cannot reach it (a ``RuntimeWarning`` either way): ``"stop"``
            there, or ``"warn"`` and run on to the cap.

    Returns:
        A :class:`TraceResult`. For Hutch++, ``stderr``/``ci`` describe the Hutchinson
        part on the remainder (the sketch part is exact given the sketch), and the
        sketch, fixed by the budget, is spent before the first probe can tell.

    References:
        Hutchinson. A stochastic estimator of the trace of the influence matrix for
        Laplacian smoothing splines. Comm. Statist. Simul. Comput., 1989.
        Meyer, Musco, Musco, Woodruff. Hutch++: optimal stochastic trace estimation.
        SOSA 2021. arXiv:2010.09649

    Example:
        >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> trace(A, num_samples=20, seed=0).estimate  # diagonal: every probe is exact
        55.0
        >>> round(trace(A, method="hutch++", num_samples=30, seed=0).estimate, 6)
        55.0
    """
    op = as_operator(op)
    if method not in _METHODS:
        raise ValueError(f"method: expected one of {_METHODS}, got {method!r}")
    _check_common(num_samples, rtol, confidence, if_unreachable)
    gen, seed_used = make_generator(seed)
    dim, dtype, device = op.dim, op.dtype, op.device
    samples: list[float] = []
    matvecs = 0
    offset = 0.0
    extra: dict[str, Any] = {"method": method, "max_samples": num_samples, "rtol": rtol}
    if method == "hutch++":
        m = num_samples // 3
        if m < 1 or num_samples - 2 * m < 2:
            raise ValueError(
                f"num_samples: hutch++ needs a budget of at least 4, got {num_samples}"
            )
        m = min(m, dim)
        sketch = torch.stack([rademacher(dim, gen, dtype, device) for _ in range(m)], dim=1)
        hs = torch.stack([op.matvec(c) for c in sketch.T], dim=1)
        q, _ = torch.linalg.qr(hs)
        hq = torch.stack([op.matvec(c) for c in q.T], dim=1)
        matvecs += 2 * m
        offset = float(torch.sum(q * hq))
        n_res = num_samples - 2 * m
        extra |= {"sketch_size": m, "low_rank_trace": offset}

        def probe() -> float:
            g = rademacher(dim, gen, dtype, device)
            g = g - q @ (q.T @ g)
            hg = op.matvec(g)
            return float(torch.dot(g, hg - q @ (q.T @ hg)))

    else:
        n_res = num_samples

        def probe() -> float:
            z = rademacher(dim, gen, dtype, device)
            return float(torch.dot(z, op.matvec(z)))

    fixed = matvecs
    running = _Running(confidence, rtol, offset, n_res)
    _sample(probe, running, samples, if_unreachable, fixed, f"trace ({method})", progress)
    matvecs += len(samples)
    return _result(
        op, method, samples, confidence, matvecs, seed_used, offset, extra, running, fixed
    )


def frobenius_norm_sq(
    op: Any,
    *,
    num_samples: int = 100,
    rtol: float | None = None,
    confidence: float = 0.95,
    seed: int | torch.Generator | None = None,
    progress: bool = False,
    if_unreachable: str = "stop",
) -> TraceResult:
    """Estimate ``||H||_F^2 = tr(H^2) = E ||H z||^2`` with Rademacher probes ``z``.

    Args:
        op: an operator or a dense symmetric tensor.
        num_samples: maximum number of probes (one product each).
        rtol: optional stop once the interval half-width is at most ``rtol * estimate``.
        confidence: coverage of ``ci``.
        seed: int, ``torch.Generator`` or ``None``.
        progress: tqdm bar over probes.
        if_unreachable: ``"stop"`` or ``"warn"`` when ``rtol`` is out of the budget's
            reach (as in :func:`trace`).

    Returns:
        A :class:`TraceResult` for ``tr(H^2)``.

    Example:
        >>> A = torch.diag(torch.tensor([3.0, -1.0], dtype=torch.float64))
        >>> frobenius_norm_sq(A, num_samples=5, seed=0).estimate
        10.0
    """
    op = as_operator(op)
    _check_common(num_samples, rtol, confidence, if_unreachable)
    gen, seed_used = make_generator(seed)
    samples: list[float] = []

    def probe() -> float:
        z = rademacher(op.dim, gen, op.dtype, op.device)
        return float(torch.linalg.vector_norm(op.matvec(z)) ** 2)

    running = _Running(confidence, rtol, 0.0, num_samples)
    _sample(probe, running, samples, if_unreachable, 0, "tr(H^2)", progress)
    extra = {"method": "hutchinson-frobenius", "max_samples": num_samples, "rtol": rtol}
    return _result(
        op, "frobenius_norm_sq", samples, confidence, len(samples), seed_used, 0.0, extra, running
    )
