r"""Experiment 1: balancedness is conserved by SGD and promoted by SAM (Li, Zhang, He 2024).

**Claim.** On scale-invariant two-factor problems, SGD and normalised SGD conserve
the balancedness :math:`B = (\|x\|^2 - \|y\|^2)/2` (in continuous time; at a finite
step size :math:`\eta` it drifts by :math:`O(\eta)` over a fixed time), while SAM
drives :math:`|B|` down, faster with noisier data; with clean data SAM on NOP
need not balance at all.

**Setting.** The paper's toys (Appendix A.4; :mod:`sharpkit.balance.toys`): NOP
:math:`\tfrac12\|xy^\top - (A + aN)\|_F^2` with SAM radius 0.1 and OP
:math:`(x^\top y - (0.5 + an))^2` with radius 0.2, from the paper's start
(:math:`B_0 = -0.56`), noise :math:`a \in \{0, 0.25, 0.5, 1, 2\}`, ``runs``
independent noise streams per setting, ``steps`` steps of size ``lr`` (the
paper: :math:`\eta = 10^{-4}`, :math:`10^5` steps, the same time horizon
:math:`\eta T = 10` as the small scale's :math:`10^{-3} \times 10^4`). Methods:
SGD and SAM via :func:`~sharpkit.balance.toys.simulate`; normalised SGD
(:math:`w \leftarrow w - \eta g/\|g\|`) on the toys' closed-form gradients here.

**Measured.** ``ratio_<toy>_<method>@a`` = mean over runs of
:math:`|B_T|/|B_0|`; ``sgd_drift_ratio`` = SGD's mean :math:`|B_T - B_0|` on NOP
(a = 1) at ``lr`` over that at ``lr/2`` with twice the steps (an
:math:`O(\eta)` drift gives 2).

**Verdict.** Supported when (i) SGD and normalised SGD keep :math:`|B|`:
:math:`|1 - \text{ratio}| \le` ``KEEP_BAND`` (0.2) at every noise level on both
toys, (ii) SAM's ratio is below SGD's at every :math:`a \ge 0.5` on both toys
(by at least ``KEEP_BAND``, i.e. outside SGD's band), (iii) SAM's ratio does not
increase with :math:`a` on either toy, and (iv) the drift ratio lies in
``[1.5, 2.5]`` (first order in :math:`\eta`, with room for the noise of a finite
number of runs).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from sharpkit.balance.toys import NOPToy, OPToy, paper_init, simulate

from ._core import Experiment, ExperimentConfig, RunResult, Stat, Verdict, check, make_result

__all__ = ["EXPERIMENT", "KEEP_BAND", "BalanceToysConfig", "run"]

#: the band around 1 of |B_T|/|B_0| within which a method "keeps" |B|
KEEP_BAND = 0.2
#: SAM radii of the paper's toys (Appendix A.4)
_RHO = {"nop": 0.1, "op": 0.2}


@dataclass(frozen=True)
class BalanceToysConfig(ExperimentConfig):
    """Config of the balancedness-toys experiment.

    Attributes:
        noises: the noise levels ``a`` (>= 0).
        lr: step size ``eta``.
        steps: steps per run.
        runs: independent noise streams per setting.
        record_every: record ``B`` every this many steps (for the figure).
    """

    noises: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0)
    lr: float = 1e-3
    steps: int = 10_000
    runs: int = 16
    record_every: int = 100

    def validate(self) -> None:
        super().validate()
        check(len(self.noises) >= 2, f"noises: need at least two levels, got {self.noises}")
        check(all(a >= 0 for a in self.noises), f"noises: must be >= 0, got {self.noises}")
        check(self.lr > 0, f"lr: must be positive, got {self.lr}")
        check(self.steps >= 2, f"steps: must be >= 2, got {self.steps}")
        check(self.runs >= 1, f"runs: must be >= 1, got {self.runs}")
        check(
            1 <= self.record_every <= self.steps,
            f"record_every: need 1 <= record_every <= steps, got {self.record_every}",
        )


def _toy(kind: str, noise: float, gen: torch.Generator) -> NOPToy | OPToy:
    return (
        NOPToy(noise=noise, generator=gen) if kind == "nop" else OPToy(noise=noise, generator=gen)
    )


def _normalised_sgd(
    toy: NOPToy | OPToy, steps: int, lr: float, runs: int, record_every: int
) -> np.ndarray:
    """|B| trajectory (records x runs) of normalised SGD on the toy's closed-form gradients."""
    x0, y0 = paper_init()
    x, y = x0.expand(runs, -1).clone(), y0.expand(runs, -1).clone()
    rec = [0.5 * (x.pow(2).sum(-1) - y.pow(2).sum(-1))]
    for t in range(1, steps + 1):
        gx, gy = toy.grads(x, y, toy.sample_target((runs,)))
        norm = torch.sqrt(gx.pow(2).sum(-1) + gy.pow(2).sum(-1)).clamp_min(
            torch.finfo(x.dtype).tiny
        )[:, None]
        x, y = x - lr * gx / norm, y - lr * gy / norm
        if t % record_every == 0:
            rec.append(0.5 * (x.pow(2).sum(-1) - y.pow(2).sum(-1)))
    return torch.stack(rec).numpy()


def run(cfg: BalanceToysConfig) -> RunResult:
    """One seed: every toy, noise level and method; plus SGD's drift at two step sizes."""
    cfg.validate()
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    summary: dict[str, float] = {}
    series: dict[str, dict] = {}
    for kind in ("nop", "op"):
        for a in cfg.noises:
            for method in ("sgd", "nsgd", "sam"):
                toy = _toy(kind, a, gen)
                if method == "nsgd":
                    traj = _normalised_sgd(toy, cfg.steps, cfg.lr, cfg.runs, cfg.record_every)
                else:
                    traj = simulate(
                        toy, method, steps=cfg.steps, lr=cfg.lr, rho=_RHO[kind], runs=cfg.runs,
                        record_every=cfg.record_every,
                    ).balancedness  # fmt: skip
                ratio = float(np.mean(np.abs(traj[-1]) / np.abs(traj[0])))
                summary[f"ratio_{kind}_{method}@{a:g}"] = ratio
                series[f"{kind}_{method}@{a:g}"] = np.abs(traj).mean(axis=1).tolist()
    drifts = []
    for lr, steps in ((cfg.lr, cfg.steps), (cfg.lr / 2, 2 * cfg.steps)):
        traj = simulate(
            NOPToy(noise=1.0, generator=gen), "sgd", steps=steps, lr=lr, runs=cfg.runs,
            record_every=steps,
        ).balancedness  # fmt: skip
        drifts.append(float(np.mean(np.abs(traj[-1] - traj[0]))))
    summary["sgd_drift_ratio"] = drifts[0] / drifts[1]
    series["time"] = (np.arange(len(series[f"nop_sgd@{cfg.noises[0]:g}"])) * cfg.record_every * cfg.lr).tolist()  # fmt: skip
    series["noises"] = list(cfg.noises)
    return make_result(EXPERIMENT, cfg, series, summary, time.perf_counter() - t0)


def _noises(stats: dict[str, Stat]) -> list[str]:
    return sorted({k.split("@")[1] for k in stats if k.startswith("ratio_nop_sgd@")}, key=float)


def decide(stats: dict[str, Stat]) -> Verdict:
    noises = _noises(stats)
    worst_keep = max(
        abs(1 - stats[f"ratio_{k}_{m}@{a}"].mean)
        for k in ("nop", "op")
        for m in ("sgd", "nsgd")
        for a in noises
    )
    keep = worst_keep <= KEEP_BAND
    promoted = all(
        stats[f"ratio_{k}_sam@{a}"].mean < stats[f"ratio_{k}_sgd@{a}"].mean - KEEP_BAND
        for k in ("nop", "op")
        for a in noises
        if float(a) >= 0.5
    )
    monotone = all(
        all(
            stats[f"ratio_{k}_sam@{b}"].mean <= stats[f"ratio_{k}_sam@{a}"].mean + 1e-12
            for a, b in itertools.pairwise(noises)
        )
        for k in ("nop", "op")
    )
    drift = stats["sgd_drift_ratio"].mean
    drift_ok = 1.5 <= drift <= 2.5
    holds = keep and promoted and monotone and drift_ok

    def sam(k: str) -> str:
        return ", ".join(f"{stats[f'ratio_{k}_sam@{a}'].mean:.3g}" for a in noises)

    return Verdict(
        holds=holds,
        statement=(
            f"|B_T|/|B_0| under SAM for a = {', '.join(noises)}: NOP {sam('nop')}; OP {sam('op')} "
            f"({'non-increasing' if monotone else 'NOT monotone'} in a); SGD and normalised SGD "
            f"stay within {worst_keep:.3f} of 1 (band {KEEP_BAND}); SAM below SGD by more than "
            f"the band at a >= 0.5: {'yes' if promoted else 'no'}; SGD drift ratio eta vs eta/2: "
            f"{drift:.2f} (first order: 2)."
        ),
        numbers={"worst_keep": worst_keep, "sgd_drift_ratio": drift},
    )


def _setting(cfg: BalanceToysConfig) -> str:
    return (
        f"Paper's NOP (rho 0.1) and OP (rho 0.2) toys, start B_0 = -0.56, noise a in "
        f"{list(cfg.noises)}; SGD, normalised SGD, SAM; lr {cfg.lr:g}, {cfg.steps} steps "
        f"(time {cfg.lr * cfg.steps:g}), {cfg.runs} noise streams per setting."
    )


def _plot(report, out_dir):
    from sharpkit.plotting.experiments.balance_toys import plot

    return plot(report, out_dir)


EXPERIMENT = Experiment(
    name="balance_toys",
    title="Balancedness: conserved by SGD, promoted by SAM",
    claim=(
        "SGD and normalised SGD conserve balancedness (drift O(eta)); SAM drives |B| down on NOP "
        "and OP, faster with noisier data."
    ),
    source="Li, Zhang, He (NeurIPS 2024), Theorems 1-3 and Appendix A.4.",
    config_cls=BalanceToysConfig,
    scales={
        "test": BalanceToysConfig(
            noises=(0.0, 0.5, 2.0), steps=2000, lr=2e-3, runs=4, record_every=100
        ),
        "small": BalanceToysConfig(),
        "large": BalanceToysConfig(lr=1e-4, steps=100_000, runs=64, record_every=1000),
    },
    seeds={"test": 1, "small": 2, "large": 5},
    run=run,
    decide=decide,
    plot=_plot,
    setting=_setting,
    bounds={"ratio_*": (0.0, math.inf), "sgd_drift_ratio": (0.0, math.inf)},
)
