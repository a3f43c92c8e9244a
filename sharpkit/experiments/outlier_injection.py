r"""Experiment 2: outlier injection, SAM's balancing responds to the data (Li, Zhang, He 2024).

**Claim.** SAM's balancing force on two-factor problems is data-responsive: it
grows with the noise in the data (for NOP, :math:`E[\|g_y\|^2 - \|g_x\|^2]` grows
like :math:`a^2`), so outliers drive balancing; SGD does not respond (it
conserves :math:`B` whatever the data).

**Setting.** The paper's NOP toy :math:`\tfrac12\|xy^\top - (A + aN)\|_F^2`
(:class:`~sharpkit.balance.toys.NOPToy`, base noise ``noise``) in which each
step's sample is, with probability ``p``, an *outlier*: its noise term is scaled
by ``k``. SAM (radius 0.1, the paper's) and SGD from the paper's start
(:func:`~sharpkit.balance.toys.simulate`, ``runs`` noise streams), over a grid
of ``p`` and ``k``.

**Measured.** The balancing rate ``rate_<method>@p,k`` =
:math:`\log(|B_0|/|B_T|)/(\eta T)` (mean over runs; per unit of time, so
independent of the step size), on every grid point.

**Verdict.** Supported when (i) SAM's rate at the largest ``p`` and ``k``
exceeds its rate without outliers (``p = 0``) by more than the CI of both over
seeds, (ii) SAM's mean rate does not decrease along ``p`` (for every ``k > 1``)
nor along ``k`` (for every ``p > 0``), and (iii) SGD does not respond: its
largest absolute rate is below ``SGD_FRACTION`` (0.1) of SAM's largest (a
drift, not a balancing force; SGD's drift at finite step size is ``O(eta)``).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from sharpkit.balance.toys import NOPToy, simulate

from ._core import Experiment, ExperimentConfig, RunResult, Stat, Verdict, check, make_result

__all__ = ["EXPERIMENT", "OutlierInjectionConfig", "OutlierNOPToy", "run"]

#: SGD "does not respond" when its largest |rate| is below this fraction of SAM's largest
SGD_FRACTION = 0.1
#: the paper's SAM radius on the NOP toy (Appendix A.4)
_RHO = 0.1


class OutlierNOPToy(NOPToy):
    """The NOP toy whose samples are outliers with probability ``p``: noise scaled by ``k``."""

    def __init__(self, noise: float, p: float, k: float, *, generator: torch.Generator) -> None:
        super().__init__(noise=noise, generator=generator)
        self.p, self.k = float(p), float(k)

    def sample_target(self, batch_shape: tuple[int, ...] = ()) -> torch.Tensor:
        target = super().sample_target(batch_shape)
        if self.p == 0.0 or self.k == 1.0:
            return target
        outlier = torch.rand(batch_shape, generator=self.generator, dtype=self.dtype) < self.p
        scale = torch.where(outlier, self.k, 1.0)[..., None, None]
        return self.A + scale * (target - self.A)


@dataclass(frozen=True)
class OutlierInjectionConfig(ExperimentConfig):
    """Config of the outlier-injection experiment.

    Attributes:
        noise: base noise level ``a`` of every sample (>= 0).
        fractions: outlier probabilities ``p`` (each in [0, 1]; include 0).
        strengths: outlier noise multipliers ``k`` (each >= 1; include 1).
        lr: step size.
        steps: steps per run.
        runs: independent noise streams per grid point.
    """

    noise: float = 0.25
    fractions: tuple[float, ...] = (0.0, 0.1, 0.3)
    strengths: tuple[float, ...] = (1.0, 3.0, 10.0)
    lr: float = 1e-3
    steps: int = 5000
    runs: int = 16

    def validate(self) -> None:
        super().validate()
        check(self.noise >= 0, f"noise: must be >= 0, got {self.noise}")
        check(
            all(0 <= p <= 1 for p in self.fractions),
            f"fractions: each p must lie in [0, 1], got {self.fractions}",
        )
        check(0.0 in self.fractions, f"fractions: must include 0 (the baseline), got {self.fractions}")  # fmt: skip
        check(len(self.fractions) >= 2, "fractions: need at least two values")
        check(all(k >= 1 for k in self.strengths), f"strengths: each k must be >= 1, got {self.strengths}")  # fmt: skip
        check(len(self.strengths) >= 2, "strengths: need at least two values")
        check(self.lr > 0, f"lr: must be positive, got {self.lr}")
        check(self.steps >= 1, f"steps: must be >= 1, got {self.steps}")
        check(self.runs >= 1, f"runs: must be >= 1, got {self.runs}")


def _key(method: str, p: float, k: float) -> str:
    return f"rate_{method}@{p:g},{k:g}"


def run(cfg: OutlierInjectionConfig) -> RunResult:
    """One seed: SAM and SGD on every (p, k) grid point."""
    cfg.validate()
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    summary: dict[str, float] = {}
    horizon = cfg.lr * cfg.steps
    for p, k in itertools.product(cfg.fractions, cfg.strengths):
        for method in ("sam", "sgd"):
            toy = OutlierNOPToy(cfg.noise, p, k, generator=gen)
            traj = simulate(
                toy, method, steps=cfg.steps, lr=cfg.lr, rho=_RHO, runs=cfg.runs,
                record_every=cfg.steps,
            ).balancedness  # fmt: skip
            rates = np.log(np.abs(traj[0]) / np.abs(traj[-1])) / horizon
            summary[_key(method, p, k)] = float(np.mean(rates))
    series = {"fractions": list(cfg.fractions), "strengths": list(cfg.strengths)}
    return make_result(EXPERIMENT, cfg, series, summary, time.perf_counter() - t0)


def _grid(stats: dict[str, Stat]) -> tuple[list[str], list[str]]:
    pts = [k.split("@")[1].split(",") for k in stats if k.startswith("rate_sam@")]
    ps = sorted({p for p, _ in pts}, key=float)
    ks = sorted({k for _, k in pts}, key=float)
    return ps, ks


def decide(stats: dict[str, Stat]) -> Verdict:
    ps, ks = _grid(stats)

    def s(method: str, p: str, k: str) -> Stat:
        return stats[f"rate_{method}@{p},{k}"]

    top, base = s("sam", ps[-1], ks[-1]), s("sam", ps[0], ks[-1])
    top_lo = top.ci_low if top.has_ci else top.mean
    base_hi = base.ci_high if base.has_ci else base.mean
    responds = top_lo > base_hi
    along_p = all(
        s("sam", b, k).mean >= s("sam", a, k).mean
        for k in ks[1:]
        for a, b in itertools.pairwise(ps)
    )
    along_k = all(
        s("sam", p, b).mean >= s("sam", p, a).mean
        for p in ps[1:]
        for a, b in itertools.pairwise(ks)
    )
    sam_max = max(s("sam", p, k).mean for p in ps for k in ks)
    sgd_max = max(abs(s("sgd", p, k).mean) for p in ps for k in ks)
    sgd_flat = sgd_max < SGD_FRACTION * sam_max
    holds = bool(responds and along_p and along_k and sgd_flat)
    return Verdict(
        holds=holds,
        statement=(
            f"SAM's balancing rate (log|B| per unit time) at p = {ps[-1]}, k = {ks[-1]}: "
            f"{top.fmt(3)} vs {base.fmt(3)} without outliers; non-decreasing along p: "
            f"{'yes' if along_p else 'no'}, along k: {'yes' if along_k else 'no'}; SGD's largest "
            f"|rate| {sgd_max:.3g} = {sgd_max / sam_max if sam_max > 0 else math.inf:.3f} of SAM's "
            f"largest {sam_max:.3g} (threshold {SGD_FRACTION})."
        ),
        numbers={"sam_top": top.mean, "sam_base": base.mean, "sgd_max": sgd_max},
    )


def _setting(cfg: OutlierInjectionConfig) -> str:
    return (
        f"Paper's NOP toy, base noise a = {cfg.noise:g}, outliers with probability p in "
        f"{list(cfg.fractions)} scaling the noise by k in {list(cfg.strengths)}; SAM (rho 0.1) "
        f"and SGD, lr {cfg.lr:g}, {cfg.steps} steps, {cfg.runs} noise streams per point."
    )


def _plot(report, out_dir):
    from sharpkit.plotting.experiments.outlier_injection import plot

    return plot(report, out_dir)


EXPERIMENT = Experiment(
    name="outlier_injection",
    title="Outlier injection: data-responsive balancing",
    claim=(
        "SAM's balancing of two-factor problems speeds up with the fraction p and strength k of "
        "outliers in the data; SGD does not respond."
    ),
    source="Li, Zhang, He (NeurIPS 2024), data-responsiveness of SAM's implicit regularisation; PAPERS.md section 4.",
    config_cls=OutlierInjectionConfig,
    scales={
        "test": OutlierInjectionConfig(
            fractions=(0.0, 0.3), strengths=(1.0, 10.0), steps=1500, runs=8
        ),
        "small": OutlierInjectionConfig(),
        "large": OutlierInjectionConfig(
            fractions=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5),
            strengths=(1.0, 2.0, 3.0, 5.0, 10.0),
            lr=1e-4,
            steps=50_000,
            runs=64,
        ),
    },
    seeds={"test": 1, "small": 3, "large": 5},
    run=run,
    decide=decide,
    plot=_plot,
    setting=_setting,
)
