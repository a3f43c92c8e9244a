r"""Experiment 9: which sharpness SAM minimises (Wen, Ma, Li, ICLR 2023).

**Claim.** Near a manifold of minimisers, full-batch SAM's implicit bias
minimises the largest Hessian eigenvalue :math:`\lambda_{\max}`, while
batch-size-1 SAM ("1-SAM", one example per step, its own perturbation) minimises
the trace :math:`\mathrm{tr}(H)`.

**Setting.** A diagonal linear network :math:`f(x) = x^\top(u \odot v)`
(``dim`` weights each in ``u`` and ``v``) on ``n < dim`` random Gaussian examples
with a sparse teacher: the zero-loss set is a manifold, and its points differ in
sharpness. Gradient descent is run to a minimiser (``warmup`` steps), then from
that same point GD (the baseline), full-batch SAM and 1-SAM (sharpkit's
:class:`~sharpkit.optim.SAM` with an SGD base, same ``lr``, ``rho``, ``steps``)
move along the manifold. The Hessian of the full training loss is formed densely
(float64, ``torch.func.jacrev`` twice) at each end point.

**Measured.** The relative reductions against GD's end point,
``lam_cut_full``, ``lam_cut_one`` (of :math:`\lambda_{\max}`) and
``tr_cut_full``, ``tr_cut_one`` (of :math:`\mathrm{tr} H`), and the paired
differences ``tr_gap = tr_cut_one - tr_cut_full`` and
``lam_gap = lam_cut_full - lam_cut_one``; final training losses.

**Verdict.** Two parts, reported separately: (trace) 1-SAM cuts the trace more
than full SAM (CI of ``tr_gap`` above 0); (lambda_max) full SAM cuts
:math:`\lambda_{\max}` (CI of ``lam_cut_full`` above 0) and at least as much as
1-SAM (CI of ``lam_gap`` not below 0). Supported if both hold, refuted if the
CIs point the other way for either, inconclusive otherwise. A CI over seeds is
the natural margin: the effects are relative and the seeds vary the data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sharpkit.optim import SAM

from ._core import Experiment, ExperimentConfig, RunResult, Stat, Verdict, check, make_result
from ._train import train_step

__all__ = ["EXPERIMENT", "WenConfig", "run"]


@dataclass(frozen=True)
class WenConfig(ExperimentConfig):
    """Config of the Wen et al. experiment.

    Attributes:
        dim: weights in each of u and v.
        n: training examples (< dim, so the minimisers form a manifold).
        sparsity: non-zero entries of the teacher.
        init: scale of the (positive) initialisation of u and v.
        warmup: GD steps to reach the manifold.
        steps: steps of GD / SAM / 1-SAM from there.
        lr: learning rate of all methods.
        rho: SAM radius.
    """

    dim: int = 20
    n: int = 10
    sparsity: int = 3
    init: float = 0.5
    warmup: int = 3000
    steps: int = 8000
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
        check(self.lr > 0, f"lr: must be positive, got {self.lr}")
        check(self.rho > 0, f"rho: must be positive, got {self.rho}")


def _loss(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    d = x.shape[1]
    return 0.5 * ((x @ (w[:d] * w[d:]) - y) ** 2).mean()


def _hessian_stats(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    # reverse-over-reverse: torch.func.hessian (forward-over-reverse) emits torch.jit
    # deprecation warnings from inside torch 2.13
    h = torch.func.jacrev(torch.func.jacrev(lambda v: _loss(v, x, y)))(w.detach())
    ev = torch.linalg.eigvalsh(h)
    return float(ev[-1]), float(ev.sum())


def _train(
    w0: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: WenConfig,
    method: str,
    gen: torch.Generator,
) -> torch.Tensor:
    w = torch.nn.Parameter(w0.clone())
    if method == "gd":
        opt: torch.optim.Optimizer = torch.optim.SGD([w], lr=cfg.lr)
    else:
        opt = SAM([w], torch.optim.SGD, rho=cfg.rho, lr=cfg.lr)
    n = x.shape[0]
    for _ in range(cfg.steps):
        if method == "sam1":
            i = int(torch.randint(n, (1,), generator=gen))
            xb, yb = x[i : i + 1], y[i : i + 1]
        else:
            xb, yb = x, y

        train_step(opt, w, lambda _, b: _loss(w, *b), (xb, yb))
    return w.detach()


def run(cfg: WenConfig) -> RunResult:
    """One seed: data, a GD warm start, then GD vs full SAM vs 1-SAM from the same point."""
    cfg.validate()
    t0 = time.perf_counter()
    f64 = torch.float64
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.n, cfg.dim, generator=gen, dtype=f64)
    teacher = torch.zeros(cfg.dim, dtype=f64)
    teacher[: cfg.sparsity] = torch.randn(cfg.sparsity, generator=gen, dtype=f64).sign()
    y = x @ teacher
    w0 = cfg.init * (1 + 0.2 * torch.randn(2 * cfg.dim, generator=gen, dtype=f64))
    warm = _train(w0, x, y, WenConfig(**{**_fields(cfg), "steps": cfg.warmup}), "gd", gen)
    summary: dict[str, float] = {}
    stats = {}
    for method in ("gd", "sam_full", "sam1"):
        w = _train(warm, x, y, cfg, method, gen)
        lam, tr = _hessian_stats(w, x, y)
        stats[method] = (lam, tr)
        summary[f"loss_{method}"] = float(_loss(w, x, y))
        summary[f"lambda_max_{method}"] = lam
        summary[f"trace_{method}"] = tr
    lam_gd, tr_gd = stats["gd"]
    summary["lam_cut_full"] = 1 - stats["sam_full"][0] / lam_gd
    summary["lam_cut_one"] = 1 - stats["sam1"][0] / lam_gd
    summary["tr_cut_full"] = 1 - stats["sam_full"][1] / tr_gd
    summary["tr_cut_one"] = 1 - stats["sam1"][1] / tr_gd
    summary["tr_gap"] = summary["tr_cut_one"] - summary["tr_cut_full"]
    summary["lam_gap"] = summary["lam_cut_full"] - summary["lam_cut_one"]
    summary["warm_loss"] = float(_loss(warm, x, y))
    # descriptive, not part of the verdict: how much of each method's cut is in
    # lambda_max relative to the trace (> 1: it targets lambda_max preferentially)
    summary["selectivity_full"] = summary["lam_cut_full"] / summary["tr_cut_full"]
    summary["selectivity_one"] = summary["lam_cut_one"] / summary["tr_cut_one"]
    return make_result(EXPERIMENT, cfg, {}, summary, time.perf_counter() - t0)


def _fields(cfg: WenConfig) -> dict:
    from dataclasses import asdict

    return asdict(cfg)


def _ci(s: Stat) -> tuple[float, float]:
    return (s.ci_low, s.ci_high) if s.has_ci else (s.mean, s.mean)


def decide(stats: dict[str, Stat]) -> Verdict:
    tr_lo, tr_hi = _ci(stats["tr_gap"])
    lf_lo, lf_hi = _ci(stats["lam_cut_full"])
    lg_lo, lg_hi = _ci(stats["lam_gap"])
    trace_part = True if tr_lo > 0 else False if tr_hi < 0 else None
    if lf_lo > 0 and lg_lo >= 0:
        lam_part: bool | None = True
    elif lf_hi < 0 or lg_hi < 0:
        lam_part = False
    else:
        lam_part = None
    if trace_part is False or lam_part is False:
        holds: bool | None = False
    elif trace_part and lam_part:
        holds = True
    else:
        holds = None

    def fmt(name: str) -> str:
        s = stats[name]
        ci = f" [{100 * s.ci_low:.1f}, {100 * s.ci_high:.1f}]" if s.has_ci else ""
        return f"{100 * s.mean:.1f}%{ci}"

    return Verdict(
        holds=holds,
        statement=(
            f"trace part ({'holds' if trace_part else 'fails' if trace_part is False else 'inconclusive'}): "
            f"1-SAM cuts tr(H) by {fmt('tr_cut_one')}, full SAM by {fmt('tr_cut_full')} (vs GD); "
            f"lambda_max part ({'holds' if lam_part else 'fails' if lam_part is False else 'inconclusive'}): "
            f"full SAM cuts lambda_max by {fmt('lam_cut_full')}, 1-SAM by {fmt('lam_cut_one')}."
        ),
        numbers={
            "tr_gap": stats["tr_gap"].mean,
            "lam_cut_full": stats["lam_cut_full"].mean,
            "lam_gap": stats["lam_gap"].mean,
        },
    )


def _setting(cfg: WenConfig) -> str:
    return (
        f"Diagonal linear network, {cfg.dim} + {cfg.dim} weights, {cfg.n} Gaussian examples, "
        f"{cfg.sparsity}-sparse teacher; GD warm start {cfg.warmup} steps, then GD / full SAM / "
        f"1-SAM for {cfg.steps} steps (lr {cfg.lr:g}, rho {cfg.rho:g}); dense float64 Hessians."
    )


def _plot(report, out_dir):
    from sharpkit.plotting.experiments.wen_sharpness import plot

    return plot(report, out_dir)


EXPERIMENT = Experiment(
    name="wen_sharpness",
    title="Full-batch SAM vs 1-SAM: lambda_max vs trace",
    claim=(
        "Full-batch SAM minimises lambda_max of the Hessian; batch-size-1 SAM minimises its trace."
    ),
    source="Wen, Ma, Li (ICLR 2023), How Does Sharpness-Aware Minimization Minimize Sharpness?; PAPERS.md section 6.",
    config_cls=WenConfig,
    scales={
        "test": WenConfig(warmup=1500, steps=2500),
        "small": WenConfig(),
        "large": WenConfig(dim=60, n=30, sparsity=5, warmup=10000, steps=50000),
    },
    seeds={"test": 3, "small": 5, "large": 10},
    run=run,
    decide=decide,
    plot=_plot,
    setting=_setting,
)
