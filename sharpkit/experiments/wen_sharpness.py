r"""Experiment 9: which sharpness SAM descends (Wen, Ma, Li, ICLR 2023).

**Claim.** Near a manifold :math:`\Gamma` of minimisers and in the limit
:math:`\eta, \rho \to 0`, full-batch SAM drifts along :math:`\Gamma` down the
projected gradient of the largest Hessian eigenvalue, :math:`-P\nabla\lambda_1(H)`,
while batch-size-1 SAM ("1-SAM", one example per step with its own perturbation)
drifts down the projected gradient of the trace, :math:`-P\nabla\mathrm{tr}(H)`.
The claim is about *which functional each method descends*; it does not say that
full SAM lowers :math:`\lambda_1` more than 1-SAM in a finite run (where
:math:`\|P\nabla\mathrm{tr}\|` is larger, the trace flow can lower
:math:`\lambda_1` faster).

**Setting.** A diagonal linear network :math:`f(x) = x^\top(u \odot v)` (``dim``
weights each in ``u`` and ``v``) on ``n < dim`` Gaussian examples with a sparse
teacher, squared loss: the zero-loss set is a manifold of dimension
:math:`2\,\mathrm{dim} - n` whose points differ in sharpness. Gradient descent
runs to the manifold (``warmup`` steps); from that same point full-batch SAM and
1-SAM (the SAM update around gradient descent, :func:`sam_step`, the same update
as :class:`~sharpkit.optim.SAM` around SGD; same ``lr``, ``rho``, ``steps``) move
along it. On :math:`\Gamma` the Hessian is the Gauss-Newton matrix
:math:`H(w) = \tfrac1n J(w)^\top J(w)` with rows
:math:`J_i = (x_i \odot v,\ x_i \odot u)`, and the tangent projection is
:math:`P = I - J^\top (J J^\top)^{-1} J`. Both gradients are exact (float64
autograd): :math:`\nabla\lambda_1 = \nabla_w (q^\top H(w) q)` with :math:`q` the
top eigenvector held fixed, and :math:`\nabla \mathrm{tr} H`.

**Measured.** The run is cut into windows of ``window`` steps. For a window
starting at :math:`w_s` with displacement :math:`d = w_{s+K} - w_s`, the cosines of
its tangent part :math:`P d` with :math:`-P\nabla\lambda_1(w_s)` and with
:math:`-P\nabla\mathrm{tr}(w_s)`, and the baseline cosine between the two projected
gradients themselves. Per seed and method, the window means ``cos_lam_<m>``,
``cos_tr_<m>`` and ``baseline_<m>``, and the paired *preference*
``pref_full = cos_lam_full - cos_tr_full`` (full SAM for :math:`\lambda_1`) and
``pref_one = cos_tr_one - cos_lam_one`` (1-SAM for the trace). A displacement
exactly along one gradient has cosine 1 with it and the baseline with the other,
so each preference lies in :math:`[-(1-b), 1-b]` for baseline :math:`b`. Also
(descriptive) the relative change of :math:`\lambda_1` and :math:`\mathrm{tr}H`
over the run and the final losses.

**Decision rule** (fixed before the runs). The two gradients must be
distinguishable: the baseline's 95% CI upper bound below ``MAX_BASELINE`` (0.95);
otherwise inconclusive. Then supported when the CIs over seeds of both
``pref_full`` and ``pref_one`` lie above 0 (each method follows its own functional
better than the other one's), not supported when either lies below 0,
inconclusive otherwise.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import torch

from ._core import Experiment, ExperimentConfig, RunResult, Stat, Verdict, check, make_result

__all__ = ["EXPERIMENT", "MAX_BASELINE", "WenConfig", "decide", "geometry", "run", "sam_step"]

#: the projected gradients of lambda_1 and tr(H) must differ this much (cosine)
MAX_BASELINE = 0.95

METHODS = ("full", "one")


@dataclass(frozen=True)
class WenConfig(ExperimentConfig):
    """Config of the Wen et al. experiment.

    Attributes:
        dim: weights in each of u and v.
        n: training examples (< dim, so the minimisers form a manifold).
        sparsity: non-zero entries of the teacher.
        init: scale of the (positive) initialisation of u and v.
        warmup: GD steps to reach the manifold.
        steps: steps of full SAM and of 1-SAM from there.
        window: steps per window of the drift measurement (divides ``steps``).
        lr: learning rate of all methods.
        rho: SAM radius.
    """

    dim: int = 20
    n: int = 10
    sparsity: int = 3
    init: float = 0.5
    warmup: int = 3000
    steps: int = 8000
    window: int = 1000
    lr: float = 0.02
    rho: float = 0.05

    def validate(self) -> None:
        super().validate()
        check(self.dim >= 2, f"dim: need at least 2, got {self.dim}")
        check(0 < self.n < self.dim, f"n: need 0 < n < dim, got n={self.n}, dim={self.dim}")
        check(0 < self.sparsity <= self.dim, f"sparsity: need 1..dim, got {self.sparsity}")
        check(self.init > 0, f"init: must be positive, got {self.init}")
        check(self.warmup >= 0, f"warmup: must be >= 0, got {self.warmup}")
        check(self.steps >= 1, f"steps: must be >= 1, got {self.steps}")
        check(
            1 <= self.window <= self.steps and self.steps % self.window == 0,
            f"window: must divide steps, got window={self.window}, steps={self.steps}",
        )
        check(self.lr > 0, f"lr: must be positive, got {self.lr}")
        check(self.rho > 0, f"rho: must be positive, got {self.rho}")


def _loss(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    d = x.shape[1]
    return 0.5 * ((x @ (w[:d] * w[d:]) - y) ** 2).mean()


def _jacobian(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Rows J_i = (x_i * v, x_i * u): the per-example output gradients."""
    d = x.shape[1]
    return torch.cat([x * w[d:], x * w[:d]], dim=1)


def _gauss_newton(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    j = _jacobian(w, x)
    return j.T @ j / x.shape[0]


def geometry(w: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor | float]:
    r"""At ``w``: the tangent projection ``P``, ``lambda_1`` and ``tr`` of the
    Gauss-Newton Hessian, and their gradients (float64 autograd)."""
    w = w.detach().clone().requires_grad_(True)
    h = _gauss_newton(w, x)
    evals, evecs = torch.linalg.eigh(h.detach())
    q = evecs[:, -1]
    (g_lam,) = torch.autograd.grad(q @ h @ q, w, retain_graph=True)
    (g_tr,) = torch.autograd.grad(torch.trace(h), w)
    j = _jacobian(w.detach(), x)
    proj = torch.eye(w.numel(), dtype=w.dtype) - j.T @ torch.linalg.solve(j @ j.T, j)
    return {
        "P": proj,
        "g_lam": g_lam,
        "g_tr": g_tr,
        "lam": float(evals[-1]),
        "tr": float(torch.trace(h.detach())),
    }


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def _grad(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Closed-form gradient of :func:`_loss`: (J^T r) / n with residuals r."""
    d = x.shape[1]
    r = x @ (w[:d] * w[d:]) - y
    xr = x.T @ r / x.shape[0]
    return torch.cat([xr * w[d:], xr * w[:d]])


def sam_step(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lr: float, rho: float):
    """One SAM step around plain gradient descent (Foret et al.), in closed form:
    ``w - lr * grad L(w + rho g / ||g||)`` with ``g = grad L(w)``; ``rho = 0`` is GD.
    The same update as :class:`~sharpkit.optim.SAM` around ``torch.optim.SGD``
    (the tests check them step for step); written out because the experiment takes
    tens of thousands of steps on 40 weights, where an optimizer's per-step
    overhead would dominate."""
    if rho == 0:
        return w - lr * _grad(w, x, y)
    g = _grad(w, x, y)
    return w - lr * _grad(w + rho * g / g.norm().clamp_min(1e-300), x, y)


def _train(w0, x, y, cfg: WenConfig, method: str, steps: int, gen) -> list[torch.Tensor]:
    """Run ``steps`` steps; return the iterate at the start and after every window."""
    w = w0.clone()
    rho = 0.0 if method == "gd" else cfg.rho
    every = cfg.window if method != "gd" else steps
    n = x.shape[0]
    picks = torch.randint(n, (steps,), generator=gen).tolist() if method == "one" else None
    trace = [w.clone()]
    for t in range(steps):
        if picks is not None:
            i = picks[t]
            w = sam_step(w, x[i : i + 1], y[i : i + 1], cfg.lr, rho)
        else:
            w = sam_step(w, x, y, cfg.lr, rho)
        if (t + 1) % every == 0:
            trace.append(w.clone())
    return trace


def run(cfg: WenConfig) -> RunResult:
    """One seed: a GD warm start, then full SAM and 1-SAM from the same point, their
    window displacements against the two projected gradients."""
    cfg.validate()
    t0 = time.perf_counter()
    f64 = torch.float64
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.n, cfg.dim, generator=gen, dtype=f64)
    teacher = torch.zeros(cfg.dim, dtype=f64)
    teacher[: cfg.sparsity] = torch.randn(cfg.sparsity, generator=gen, dtype=f64).sign()
    y = x @ teacher
    w0 = cfg.init * (1 + 0.2 * torch.randn(2 * cfg.dim, generator=gen, dtype=f64))
    warm = _train(w0, x, y, cfg, "gd", cfg.warmup, gen)[-1] if cfg.warmup else w0
    summary: dict[str, float] = {"warm_loss": float(_loss(warm, x, y))}
    series: dict[str, object] = {"window": cfg.window}
    for method in METHODS:
        trace = _train(warm, x, y, cfg, method, cfg.steps, gen)
        rows = {"cos_lam": [], "cos_tr": [], "baseline": []}
        for a, b in itertools.pairwise(trace):
            geo = geometry(a, x)
            p = geo["P"]
            d = p @ (b - a)
            down_lam, down_tr = -(p @ geo["g_lam"]), -(p @ geo["g_tr"])
            rows["cos_lam"].append(_cos(d, down_lam))
            rows["cos_tr"].append(_cos(d, down_tr))
            rows["baseline"].append(_cos(down_lam, down_tr))
        for k, v in rows.items():
            summary[f"{k}_{method}"] = sum(v) / len(v)
            series[f"{k}_{method}"] = v
        start, end = geometry(trace[0], x), geometry(trace[-1], x)
        summary[f"lam_change_{method}"] = end["lam"] / start["lam"] - 1
        summary[f"tr_change_{method}"] = end["tr"] / start["tr"] - 1
        summary[f"loss_{method}"] = float(_loss(trace[-1], x, y))
    summary["pref_full"] = summary["cos_lam_full"] - summary["cos_tr_full"]
    summary["pref_one"] = summary["cos_tr_one"] - summary["cos_lam_one"]
    summary["baseline"] = (summary["baseline_full"] + summary["baseline_one"]) / 2
    return make_result(EXPERIMENT, cfg, series, summary, time.perf_counter() - t0)


def _ci(s: Stat) -> tuple[float, float]:
    return (s.ci_low, s.ci_high) if s.has_ci else (s.mean, s.mean)


def decide(stats: dict[str, Stat]) -> Verdict:
    base = stats["baseline"]
    parts = {}
    for key in ("pref_full", "pref_one"):
        lo, hi = _ci(stats[key])
        parts[key] = True if lo > 0 else False if hi < 0 else None
    distinguishable = _ci(base)[1] < MAX_BASELINE
    if not distinguishable:
        holds: bool | None = None
    elif all(parts.values()):
        holds = True
    elif False in parts.values():
        holds = False
    else:
        holds = None

    def word(v: bool | None) -> str:
        return {True: "holds", False: "fails", None: "inconclusive"}[v]

    statement = (
        f"full SAM's drift: cosine {stats['cos_lam_full'].fmt()} with -P grad lambda_1 vs "
        f"{stats['cos_tr_full'].fmt()} with -P grad tr (preference {stats['pref_full'].fmt()}, "
        f"{word(parts['pref_full'])}); 1-SAM's drift: {stats['cos_tr_one'].fmt()} with "
        f"-P grad tr vs {stats['cos_lam_one'].fmt()} with -P grad lambda_1 (preference "
        f"{stats['pref_one'].fmt()}, {word(parts['pref_one'])}); baseline cosine between "
        f"the two projected gradients {base.fmt()} (must be below {MAX_BASELINE:g}: "
        f"{'yes' if distinguishable else 'no'})."
    )
    return Verdict(
        holds=holds,
        statement=statement,
        numbers={
            "pref_full": stats["pref_full"].mean,
            "pref_one": stats["pref_one"].mean,
            "baseline": base.mean,
        },
    )


def _setting(cfg: WenConfig) -> str:
    return (
        f"Diagonal linear network, {cfg.dim} + {cfg.dim} weights, {cfg.n} Gaussian examples, "
        f"{cfg.sparsity}-sparse teacher; GD warm start {cfg.warmup} steps, then full SAM and "
        f"1-SAM for {cfg.steps} steps each (lr {cfg.lr:g}, rho {cfg.rho:g}), windows of "
        f"{cfg.window} steps; exact float64 gradients of lambda_1 and tr of the Gauss-Newton "
        f"Hessian, projected on the manifold's tangent space."
    )


def _plot(report, out_dir):
    from sharpkit.plotting.experiments.wen_sharpness import plot

    return plot(report, out_dir)


EXPERIMENT = Experiment(
    name="wen_sharpness",
    title="Full-batch SAM vs 1-SAM: which sharpness each descends",
    claim=(
        "Near the manifold of minimisers, full-batch SAM drifts down the projected gradient "
        "of lambda_max, batch-size-1 SAM down that of tr(H)."
    ),
    source="Wen, Ma, Li (ICLR 2023), How Does Sharpness-Aware Minimization Minimize "
    "Sharpness?, Theorems 4.5 and 5.4.",
    config_cls=WenConfig,
    scales={
        "test": WenConfig(steps=3000, window=1000),
        "small": WenConfig(),
        "large": WenConfig(dim=60, n=30, sparsity=5, warmup=10000, steps=50000, window=5000),
    },
    seeds={"test": 3, "small": 5, "large": 10},
    run=run,
    decide=decide,
    plot=_plot,
    setting=_setting,
    bounds={
        "cos_*": (-1.0, 1.0),
        "baseline*": (-1.0, 1.0),
        "pref_*": (-2.0, 2.0),
        "*loss*": (0.0, math.inf),
        "*_change_*": (-1.0, math.inf),
    },
)
