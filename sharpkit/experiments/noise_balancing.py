r"""Experiment 12: SAM balances to a floor, not to zero, with a force that grows like a^2.

Two claims of Li, Zhang, He (NeurIPS 2024) on the NOP toy
:math:`\tfrac12\|xy^\top - (A + aN)\|_F^2` (:class:`~sharpkit.balance.toys.NOPToy`,
the paper's Appendix A.4 problem):

**(d) Corollary 1's threshold.** SAM shrinks :math:`|B|` only while it is above a
threshold: :math:`|B_t|` becomes small, not zero. *Measured*: SAM (``rho``, the
paper's 0.1) from two starts, ``runs`` noise streams each: *above*, the paper's
start (:math:`B_0 = -0.56`), and *below*, the balanced start
:math:`x_0 = y_0 = \sqrt3\,(0.2, -0.1, 0.3)` (:math:`B_0 = 0`, the same
:math:`\|x_0\|\|y_0\|`). With :math:`\bar B(t)` the mean of :math:`|B|` over the
runs: ``shrink`` = last-quarter mean of :math:`\bar B` over :math:`|B_0|`
(above), ``plateau`` = last quarter over third quarter (above: 1 when it has
stopped shrinking, below 1 while it still decays), ``floor_ratio`` = the floor
reached from below over the floor from above (1 when both ends meet at the
same floor; 0 if SAM drove :math:`|B|` to zero), and ``sgd_below_share``: SGD's
last-quarter :math:`\bar B` from the balanced start over SAM's floor (how much
of the floor the step-size noise alone would produce; SGD conserves :math:`B`
up to :math:`O(\eta)` drift).

**(e) The a^2 growth of the balancing force.** The force in Theorem 2,
:math:`E[\|g_y\|^2 - \|g_x\|^2]`, grows with the noise level like :math:`a^2`:
with :math:`R_0 = xy^\top - A`, :math:`g_x = (R_0 - aN)y`, :math:`g_y = (R_0 - aN)^\top x`
and :math:`E[N] = 0`,

.. math::

    E[\|g_y\|^2 - \|g_x\|^2] = \|R_0^\top x\|^2 - \|R_0 y\|^2
    + a^2\big(d\,\textstyle\sum_i s_i^2 x_i^2 - \|s\|^2\|y\|^2\big)

(:math:`N = \mathrm{diag}(s)U`). *Measured* by Monte Carlo with the toy's
gradient code at ``states`` states along a noisy SGD trajectory (paper's start,
``a = 1``), ``samples`` draws of :math:`U` per state, shared by every noise level
(common random numbers): the excess :math:`F(a) - F(0)` over ``noises``;
``force_slope`` is the log-log slope of :math:`|F(a) - F(0)|` against ``a``
and ``force_coef_ratio`` the fitted :math:`a^2` coefficient (least squares
through the origin in :math:`a^2`) over the closed form's.

**Verdict**, fixed before the run. (d) holds when the CIs over seeds put
``shrink`` below 0.5, ``plateau`` inside [0.8, 1.25], ``floor_ratio`` inside
[0.67, 1.5] and ``sgd_below_share`` below 0.5. (e) holds when the CI of
``force_slope`` lies in [1.8, 2.2] and that of ``force_coef_ratio`` in
[0.9, 1.1]. Supported when both hold; not supported otherwise.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from sharpkit.balance.toys import NOPToy, paper_init, simulate

from ._core import Experiment, ExperimentConfig, RunResult, Stat, Verdict, check, make_result

__all__ = ["EXPERIMENT", "NoiseBalancingConfig", "force_closed_form", "run"]

#: the decision intervals (see the module docstring)
SHRINK_MAX, PLATEAU, FLOOR, SGD_SHARE_MAX = 0.5, (0.8, 1.25), (0.67, 1.5), 0.5
SLOPE, COEF = (1.8, 2.2), (0.9, 1.1)


@dataclass(frozen=True)
class NoiseBalancingConfig(ExperimentConfig):
    """Config of the floor / a^2 experiment.

    Attributes:
        noise: noise level ``a`` of the floor part (> 0).
        rho: SAM's radius (the paper's 0.1 on NOP).
        lr: step size of the floor runs.
        steps: steps per floor run (at least 8; quarters are compared).
        runs: independent noise streams per start.
        noises: the noise levels of the force sweep (> 0, at least 3).
        states: states of the force measurement (along noisy SGD, ``a = 1``).
        stride: SGD steps between states (after ``stride`` warm-up steps).
        samples: noise draws per state.
    """

    noise: float = 1.0
    rho: float = 0.1
    lr: float = 5e-3
    steps: int = 5000
    runs: int = 16
    noises: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0)
    states: int = 64
    stride: int = 20
    samples: int = 4096

    def validate(self) -> None:
        super().validate()
        check(self.noise > 0, f"noise: must be positive, got {self.noise}")
        check(self.rho > 0, f"rho: must be positive, got {self.rho}")
        check(self.lr > 0, f"lr: must be positive, got {self.lr}")
        check(self.steps >= 8, f"steps: must be >= 8, got {self.steps}")
        check(self.runs >= 1, f"runs: must be >= 1, got {self.runs}")
        check(
            len(set(self.noises)) >= 3 and all(a > 0 for a in self.noises),
            f"noises: need at least 3 distinct positive levels, got {self.noises}",
        )
        check(self.states >= 1, f"states: must be >= 1, got {self.states}")
        check(self.stride >= 1, f"stride: must be >= 1, got {self.stride}")
        check(self.samples >= 2, f"samples: must be >= 2, got {self.samples}")


def force_closed_form(toy: NOPToy, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""The :math:`a^2` coefficient of :math:`E[\|g_y\|^2 - \|g_x\|^2]` on the NOP toy,
    :math:`d\sum_i s_i^2 x_i^2 - \|s\|^2\|y\|^2` (batched over leading dimensions).

    Example:
        >>> toy = NOPToy(noise=1.0)
        >>> x0, y0 = paper_init()
        >>> round(float(force_closed_form(toy, x0, y0)), 4)   # 3 * 0.0689 - 1.89 * 1.26
        -2.1747
    """
    s2 = toy.noise_scales.pow(2)
    return toy.dim * (s2 * x.pow(2)).sum(-1) - s2.sum() * y.pow(2).sum(-1)


def _quarters(b: np.ndarray) -> tuple[float, float]:
    """Means of the third and the last quarter of a recorded series."""
    k = len(b)
    return float(b[k // 2 : 3 * k // 4].mean()), float(b[3 * k // 4 :].mean())


def _floor_part(cfg: NoiseBalancingConfig, summary: dict, series: dict) -> None:
    toy = NOPToy(noise=cfg.noise, generator=torch.Generator().manual_seed(cfg.seed))
    x0, y0 = paper_init()
    xb = math.sqrt(3.0) * x0  # B = 0, |x||y| = 3|x0|^2 as at the paper's start
    every = max(1, cfg.steps // 40)
    curves = {}
    for name, (xs, ys), method in (
        ("sam_above", (x0, y0), "sam"),
        ("sam_below", (xb, xb), "sam"),
        ("sgd_below", (xb, xb), "sgd"),
    ):
        out = simulate(toy, method, steps=cfg.steps, lr=cfg.lr, rho=cfg.rho, runs=cfg.runs,
                       x0=xs, y0=ys, record_every=every)  # fmt: skip
        curves[name] = np.abs(out.balancedness).mean(1)
        series["time"] = (out.steps * cfg.lr).tolist()
        series[f"abs_B_{name}"] = curves[name].tolist()
    mid, floor_above = _quarters(curves["sam_above"])
    _, floor_below = _quarters(curves["sam_below"])
    _, sgd_below = _quarters(curves["sgd_below"])
    summary["shrink"] = floor_above / float(curves["sam_above"][0])
    summary["plateau"] = floor_above / mid
    summary["floor_above"] = floor_above
    summary["floor_below"] = floor_below
    summary["floor_ratio"] = floor_below / floor_above
    summary["sgd_below_share"] = sgd_below / floor_above


def _force_part(cfg: NoiseBalancingConfig, summary: dict, series: dict) -> None:
    gen = torch.Generator().manual_seed(cfg.seed + 10_000)
    toy = NOPToy(noise=1.0, generator=gen)
    x, y = paper_init()
    xs, ys = [], []
    for t in range(cfg.stride * (cfg.states + 1)):
        gx, gy = toy.grads(x, y, toy.sample_target())
        x, y = x - cfg.lr * gx, y - cfg.lr * gy
        if t >= cfg.stride and t % cfg.stride == 0 and len(xs) < cfg.states:
            xs.append(x)
            ys.append(y)
    x, y = torch.stack(xs)[:, None, :], torch.stack(ys)[:, None, :]  # (S, 1, d)
    u = torch.randn((len(xs), cfg.samples, toy.dim, toy.dim), generator=gen, dtype=toy.dtype)
    noise = toy.noise_scales[:, None] * u  # N = diag(s) U, shared by every a

    def force(a: float) -> float:
        gx, gy = toy.grads(x, y, toy.A + a * noise)
        return float((gy.pow(2).sum(-1) - gx.pow(2).sum(-1)).mean())

    f0 = force(0.0)
    a = np.asarray(cfg.noises, dtype=float)
    excess = np.array([force(float(v)) - f0 for v in a])
    closed = float(force_closed_form(toy, x[:, 0], y[:, 0]).mean())
    slope, _ = np.polyfit(np.log(a), np.log(np.abs(excess)), 1)
    coef = float((excess * a**2).sum() / (a**4).sum())
    summary["force_slope"] = float(slope)
    summary["force_coef_ratio"] = coef / closed
    summary["force_at_0"] = f0
    series["noises"] = a.tolist()
    series["force_excess"] = excess.tolist()
    series["force_closed_coef"] = closed


def run(cfg: NoiseBalancingConfig) -> RunResult:
    """One seed: the floor runs (three of ``runs`` streams each) and the force sweep."""
    cfg.validate()
    t0 = time.perf_counter()
    summary: dict[str, float] = {}
    series: dict[str, object] = {}
    _floor_part(cfg, summary, series)
    _force_part(cfg, summary, series)
    return make_result(EXPERIMENT, cfg, series, summary, time.perf_counter() - t0)


def _within(s: Stat, lo: float, hi: float) -> bool:
    a, b = (s.ci_low, s.ci_high) if s.has_ci else (s.mean, s.mean)
    return lo <= a and b <= hi


def decide(stats: dict[str, Stat]) -> Verdict:
    floor_ok = (
        _within(stats["shrink"], -math.inf, SHRINK_MAX)
        and _within(stats["plateau"], *PLATEAU)
        and _within(stats["floor_ratio"], *FLOOR)
        and _within(stats["sgd_below_share"], -math.inf, SGD_SHARE_MAX)
    )
    force_ok = _within(stats["force_slope"], *SLOPE) and _within(stats["force_coef_ratio"], *COEF)
    statement = (
        f"(d) Corollary 1's floor {'holds' if floor_ok else 'is not shown'}: from B_0 = -0.56 "
        f"SAM's mean |B| falls to {stats['floor_above'].fmt(3)} (shrink {stats['shrink'].fmt(3)}, "
        f"threshold {SHRINK_MAX}) and stops there (last over third quarter "
        f"{stats['plateau'].fmt(3)}, accepted in {list(PLATEAU)}); from a balanced start (B = 0) "
        f"it rises to {stats['floor_below'].fmt(3)} (ratio to the floor from above "
        f"{stats['floor_ratio'].fmt(3)}, accepted in {list(FLOOR)}), where SGD reaches "
        f"{stats['sgd_below_share'].fmt(3)} of it (threshold {SGD_SHARE_MAX}). (e) The balancing "
        f"force {'grows' if force_ok else 'does not grow'} like a^2: log-log slope of "
        f"|F(a) - F(0)| {stats['force_slope'].fmt(4)} (accepted in {list(SLOPE)}), fitted a^2 "
        f"coefficient over the closed form {stats['force_coef_ratio'].fmt(4)} (accepted in "
        f"{list(COEF)})."
    )
    return Verdict(
        holds=bool(floor_ok and force_ok),
        statement=statement,
        numbers={k: s.mean for k, s in stats.items()},
    )


def _setting(cfg: NoiseBalancingConfig) -> str:
    return (
        f"NOP toy (3x3, A = diag(0.5, 0, 0), N = diag(1, 0.8, 0.5) U). Floor: noise a = "
        f"{cfg.noise:g}, SAM rho {cfg.rho:g} and SGD, lr {cfg.lr:g}, {cfg.steps} steps, "
        f"{cfg.runs} noise streams, from the paper's start and from a balanced one. Force: "
        f"{cfg.states} states along noisy SGD (a = 1), {cfg.samples} noise draws each, a in "
        f"{list(cfg.noises)}."
    )


def _plot(report, out_dir):
    from sharpkit.plotting.experiments.noise_balancing import plot

    return plot(report, out_dir)


EXPERIMENT = Experiment(
    name="noise_balancing",
    title="SAM balances to a floor (Cor. 1); the force grows like a^2",
    claim=(
        "Under SAM |B| shrinks while above a threshold, to a floor and not to zero (Cor. 1); "
        "the balancing force E[|g_y|^2 - |g_x|^2] grows like a^2 with the noise level a."
    ),
    source="Li, Zhang, He (NeurIPS 2024, arXiv:2410.14802), Corollary 1 and the data-responsiveness discussion; docs/theory.md.",
    config_cls=NoiseBalancingConfig,
    scales={
        "test": NoiseBalancingConfig(steps=1500, lr=1e-2, runs=8, states=8, samples=512),
        "small": NoiseBalancingConfig(),
        "large": NoiseBalancingConfig(lr=1e-3, steps=50_000, runs=64, states=256, samples=16_384),
    },
    seeds={"test": 1, "small": 5, "large": 10},
    run=run,
    decide=decide,
    plot=_plot,
    setting=_setting,
)
