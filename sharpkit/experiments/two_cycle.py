r"""Experiment 8: SAM's 2-cycle on a quadratic (Bartlett, Long, Bousquet, 2023).

**Claim.** On a quadratic :math:`L(w) = \tfrac12 w^\top A w`, SAM with a fixed
radius does not converge to the minimum: it ends in a 2-cycle across it, along
the top eigenvector :math:`v_1` of :math:`A`. In 1-D with curvature
:math:`\lambda`, SAM is :math:`w \leftarrow (1-\eta\lambda) w - \eta\lambda\rho\,
\mathrm{sign}(w)`, whose 2-cycle has amplitude

.. math::

    |w^*| = \frac{\eta\lambda\rho}{2 - \eta\lambda}, \qquad 0 < \eta\lambda < 2.

**Measured.** sharpkit's :class:`~sharpkit.optim.SAM` (plain SGD base) on a
random quadratic with a spectral gap (the top eigenvalue :math:`\lambda_1`, the
rest in ``[eigen_min, gap * lambda_1]``), for several values of
:math:`\eta\lambda_1`: the amplitude :math:`|w_t \cdot v_1|` averaged over the
last ``tail`` steps, the fraction of sign flips of :math:`w_t \cdot v_1` in the
tail, and the size of the orthogonal part :math:`\|w_t - (w_t\cdot v_1) v_1\|`.

**Verdict.** Supported if for every :math:`\eta\lambda_1` the relative error of
the amplitude is below ``REL_TOL`` (1e-3), the iterate flips sign every step in
the tail, and the orthogonal part has decayed below ``REL_TOL`` times the amplitude.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import torch

from sharpkit.optim import SAM

from ._core import Experiment, ExperimentConfig, RunResult, Stat, Verdict, check, make_result

__all__ = ["EXPERIMENT", "TwoCycleConfig", "run"]


@dataclass(frozen=True)
class TwoCycleConfig(ExperimentConfig):
    """Config of the 2-cycle experiment.

    Attributes:
        dim: dimension of the quadratic.
        lambda_max: top eigenvalue :math:`\\lambda_1`.
        eigen_min: smallest eigenvalue.
        gap: the other eigenvalues lie in ``[eigen_min, gap * lambda_max]``.
        rho: SAM radius.
        eta_lambdas: the values of :math:`\\eta\\lambda_1` to run (each in (0, 2)).
        steps: SAM steps per run.
        tail: steps at the end over which the cycle is measured.
    """

    dim: int = 20
    lambda_max: float = 2.0
    eigen_min: float = 0.1
    gap: float = 0.5
    rho: float = 0.05
    eta_lambdas: tuple[float, ...] = (0.2, 0.5, 1.0, 1.5)
    steps: int = 4000
    tail: int = 50

    def validate(self) -> None:
        super().validate()
        check(self.dim >= 2, f"dim: need at least 2, got {self.dim}")
        check(self.lambda_max > 0, f"lambda_max: must be positive, got {self.lambda_max}")
        check(
            0 < self.eigen_min <= self.gap * self.lambda_max < self.lambda_max,
            "eigen_min, gap: need 0 < eigen_min <= gap * lambda_max < lambda_max, got "
            f"eigen_min={self.eigen_min}, gap={self.gap}",
        )
        check(self.rho > 0, f"rho: must be positive, got {self.rho}")
        check(len(self.eta_lambdas) > 0, "eta_lambdas: need at least one value")
        check(
            all(0 < a < 2 for a in self.eta_lambdas),
            f"eta_lambdas: each must lie in (0, 2), got {self.eta_lambdas}",
        )
        check(0 < self.tail < self.steps, f"tail: need 0 < tail < steps, got {self.tail}")


def _quadratic(cfg: TwoCycleConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    f64 = torch.float64
    q, _ = torch.linalg.qr(torch.randn(cfg.dim, cfg.dim, generator=gen, dtype=f64))
    rest = torch.linspace(cfg.eigen_min, cfg.gap * cfg.lambda_max, cfg.dim - 1, dtype=f64)
    eig = torch.cat([torch.tensor([cfg.lambda_max], dtype=f64), rest])
    return q @ torch.diag(eig) @ q.T, q[:, 0]


def run(cfg: TwoCycleConfig) -> RunResult:
    """One seed: a random quadratic, SAM at each eta * lambda_1."""
    cfg.validate()
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    a, v1 = _quadratic(cfg, gen)
    w0 = torch.randn(cfg.dim, generator=gen, dtype=torch.float64)
    series: dict[str, list] = {"eta_lambda": [], "proj_tail": [], "orth_tail": []}
    summary: dict[str, float] = {}
    rel_errors, flips, orths = [], [], []
    for eta_lam in cfg.eta_lambdas:
        w = torch.nn.Parameter(w0.clone())
        opt = SAM([w], torch.optim.SGD, rho=cfg.rho, lr=eta_lam / cfg.lambda_max)

        def closure(w=w):
            loss = 0.5 * w @ a @ w
            loss.backward()
            return loss

        proj, orth = [], []
        for t in range(cfg.steps):
            opt.step(closure)
            if t >= cfg.steps - cfg.tail:
                wd = w.detach()
                p = float(wd @ v1)
                proj.append(p)
                orth.append(float(torch.linalg.vector_norm(wd - p * v1)))
        predicted = eta_lam * cfg.rho / (2 - eta_lam)
        amplitude = sum(abs(p) for p in proj) / len(proj)
        rel = abs(amplitude - predicted) / predicted
        flip = sum(1 for x, y in itertools.pairwise(proj) if x * y < 0) / (len(proj) - 1)
        rel_orth = max(orth) / predicted
        rel_errors.append(rel)
        flips.append(flip)
        orths.append(rel_orth)
        summary[f"amplitude@{eta_lam:g}"] = amplitude
        summary[f"predicted@{eta_lam:g}"] = predicted
        series["eta_lambda"].append(eta_lam)
        series["proj_tail"].append(proj)
        series["orth_tail"].append(orth)
    summary["max_rel_error"] = max(rel_errors)
    summary["min_flip_fraction"] = min(flips)
    summary["max_rel_orthogonal"] = max(orths)
    return make_result(EXPERIMENT, cfg, series, summary, time.perf_counter() - t0)


def decide(stats: dict[str, Stat]) -> Verdict:
    tol = REL_TOL
    err = stats["max_rel_error"].mean
    flip = stats["min_flip_fraction"].mean
    orth = stats["max_rel_orthogonal"].mean
    holds = err < tol and flip == 1.0 and orth < tol
    return Verdict(
        holds=holds,
        statement=(
            f"worst relative error of the measured amplitude against eta*lambda*rho/(2 - eta*lambda): "
            f"{err:.2e} (tolerance {tol:g}); sign flips every step in the tail: "
            f"{'yes' if flip == 1.0 else f'no ({flip:.2f})'}; orthogonal part "
            f"{orth:.2e} of the amplitude."
        ),
        numbers={"max_rel_error": err, "min_flip_fraction": flip, "max_rel_orthogonal": orth},
    )


#: relative tolerance of the verdict: the 2-cycle is an exact fixed point of the
#: 1-D dynamics, so once the orthogonal part has decayed the measured amplitude
#: matches the formula to rounding; 1e-3 leaves room for a not-quite-decayed tail.
REL_TOL = 1e-3


def _setting(cfg: TwoCycleConfig) -> str:
    return (
        f"Quadratic in {cfg.dim} dimensions, lambda_1 = {cfg.lambda_max:g}, other eigenvalues in "
        f"[{cfg.eigen_min:g}, {cfg.gap * cfg.lambda_max:g}]; SAM (SGD base), rho = {cfg.rho:g}, "
        f"eta*lambda_1 in {list(cfg.eta_lambdas)}, {cfg.steps} steps, cycle measured over the "
        f"last {cfg.tail}."
    )


def _plot(report, out_dir):
    from sharpkit.plotting.experiments.two_cycle import plot

    return plot(report, out_dir)


EXPERIMENT = Experiment(
    name="two_cycle",
    title="SAM's 2-cycle on a quadratic",
    claim=(
        "On a quadratic, SAM ends in a 2-cycle across the minimum along the top eigenvector, "
        "with amplitude eta*lambda*rho/(2 - eta*lambda)."
    ),
    source="Bartlett, Long, Bousquet (2023), The Dynamics of Sharpness-Aware Minimization.",
    config_cls=TwoCycleConfig,
    scales={
        "test": TwoCycleConfig(dim=5, eta_lambdas=(0.5, 1.5), steps=800, tail=20),
        "small": TwoCycleConfig(),
        "large": TwoCycleConfig(
            dim=200, eta_lambdas=(0.1, 0.2, 0.5, 1.0, 1.5, 1.9), steps=20000, tail=200
        ),
    },
    seeds={"test": 2, "small": 3, "large": 5},
    run=run,
    decide=decide,
    plot=_plot,
    setting=_setting,
    bounds={
        "amplitude@*": (0.0, math.inf),
        "predicted@*": (0.0, math.inf),
        "max_rel_*": (0.0, math.inf),
        "min_flip_fraction": (0.0, 1.0),
    },
)
