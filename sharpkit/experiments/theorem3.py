r"""Experiment 10: Theorem 3 of Li, Zhang, He (NeurIPS 2024) and m-sharpness on OP.

**Claims.** (a) On a scale-invariant OP problem :math:`f(x^\top y)`, SAM changes
the balancedness :math:`B = (\|x\|^2 - \|y\|^2)/2` at the rate

.. math::

    \dot B = -\frac{2\rho\,|f'|\,B}{\sqrt{\|x\|^2 + \|y\|^2}} + O(\rho^2 |B|).

(b) m-sharpness strengthens it: with ``m`` micro-batches, each perturbed on its
own (mSAM), :math:`|f'|` becomes :math:`\frac1m\sum_j |f'_j| \ge |f'|`
(:math:`f'_j` the derivative of micro-batch ``j``'s loss), so mSAM balances at
least as fast as SAM and faster when the micro-batches disagree.

**Measured.** At states along a noisy SGD trajectory on the paper's OP toy
(:class:`~sharpkit.balance.toys.OPToy`, loss :math:`(x^\top y - t)^2`,
:math:`t = 0.5 + a n`), each state gets a batch of ``batch`` noise samples split
into ``m`` contiguous micro-batches. One mSAM step (``m = 1``: SAM on the
batch) :math:`w' = w - \eta G`, :math:`G = \frac1m\sum_j \nabla L_j(w + e_j)`,
:math:`e_j = \rho\nabla L_j/\|\nabla L_j\|`, changes :math:`B` by exactly
:math:`-\eta(x\cdot G_x - y\cdot G_y) + \tfrac{\eta^2}{2}(\|G_x\|^2 - \|G_y\|^2)`,
so its rate is measured exactly from the step (:func:`msam_rate`; the test checks
it against sharpkit's :class:`~sharpkit.optim.MSAM` on the same state). The
prediction is :math:`-2\rho\,\overline{|f'_j|}\,B/\sqrt{\|x\|^2+\|y\|^2}`.

- (a) per ``m``: ``slope_m<m>``, the log-log slope over a ``rho`` sweep of the
  residual :math:`\mathrm{mean}|D - \text{predicted}|`, and
  ``rel_residual_m<m>``, the residual over the mean :math:`|\text{predicted}|` at
  the smallest ``rho``;
- (b) ``force_ratio_m<m>``: the measured balancing rate of mSAM over SAM's,
  :math:`\sum_s D_m / \sum_s D_1` over the states, at ``rho_ref`` (the paper's
  OP radius 0.2), the same states and samples; ``jensen_ratio_m<m>``, the
  predicted ratio :math:`\sum \overline{|f'_j|}\,|B|/n \big/ \sum |f'|\,|B|/n`.

**Verdict**, fixed before the run. (a) holds when, for every ``m``, the slope and
its CI over seeds lie in ``[2 - SLOPE_TOL, 2 + SLOPE_TOL]`` and the relative
residual at the smallest radius is below ``REL_TOL``. (b) holds when, for every
``m > 1``, the CI of ``force_ratio`` lies above 1 and the mean ratio does not
decrease with ``m``. Supported when both hold, not supported otherwise.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
import torch

from sharpkit.balance.toys import OPToy, paper_init

from ._core import Experiment, RunResult, Stat, Verdict, check, make_result
from .theorem2 import REL_TOL, SLOPE_TOL, ToyStatesConfig, _balancedness

__all__ = ["EXPERIMENT", "Theorem3Config", "msam_rate", "run"]


@dataclass(frozen=True)
class Theorem3Config(ToyStatesConfig):
    """Config of the Theorem 3 / m-sharpness experiment.

    Attributes:
        noise: noise level ``a`` of the OP toy (> 0: the micro-batches must disagree).
        dim: size of x and y.
        lr: SGD step of the trajectory that supplies the states (and ``eta`` of
            the measured step).
        warmup: SGD steps before the first state.
        states: number of states (one every ``stride`` SGD steps).
        stride: SGD steps between states.
        batch: noise samples per state (the batch that mSAM splits).
        micro: the numbers ``m`` of micro-batches (each divides ``batch``; 1 included).
        rhos: the radii of the residual sweep (> 0, at least 3).
        rho_ref: the radius at which mSAM's force is compared with SAM's.
    """

    batch: int = 8
    micro: tuple[int, ...] = (1, 2, 4, 8)
    rho_ref: float = 0.2

    def validate(self) -> None:
        super().validate()  # the shared sweep fields (ToyStatesConfig)
        check(self.batch >= 1, f"batch: must be >= 1, got {self.batch}")
        check(
            1 in self.micro and len(set(self.micro)) == len(self.micro) >= 2
            and all(m >= 1 and self.batch % m == 0 for m in self.micro),
            f"micro: need distinct m >= 1 dividing batch = {self.batch}, 1 included, got {self.micro}",
        )  # fmt: skip
        check(self.rho_ref > 0, f"rho_ref: must be positive, got {self.rho_ref}")


def msam_rate(
    toy: OPToy,
    x: torch.Tensor,
    y: torch.Tensor,
    targets: torch.Tensor,
    m: int,
    rho: float,
    lr: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Measured and predicted rate of change of ``B`` for one mSAM step on the OP toy.

    ``targets`` has shape ``(S, M)`` (``M`` samples per state, ``m`` divides ``M``),
    ``x`` and ``y`` shape ``(S, d)``; micro-batch ``j`` holds samples
    ``j M/m .. (j+1) M/m - 1`` (contiguous, like :class:`~sharpkit.optim.MSAM`).

    Returns ``(measured, predicted)``, each ``(S,)``:
    ``measured = (B' - B - lr^2/2 (|G_x|^2 - |G_y|^2)) / lr`` from the actual step,
    ``predicted = -2 rho mean_j |f'_j| B / sqrt(|x|^2 + |y|^2)``.
    """
    S, M = targets.shape
    t = targets.reshape(S, m, M // m)
    xs, ys = x[:, None, None, :], y[:, None, None, :]
    gx, gy = toy.grads(xs, ys, t)  # per sample: (S, m, M/m, d)
    gx, gy = gx.mean(2, keepdim=True), gy.mean(2, keepdim=True)  # micro-batch gradients
    norm = torch.sqrt(gx.pow(2).sum(-1, keepdim=True) + gy.pow(2).sum(-1, keepdim=True))
    scale = torch.where(norm > 0, rho / norm, torch.zeros_like(norm))
    px, py = toy.grads(xs + scale * gx, ys + scale * gy, t)
    Gx, Gy = px.mean((1, 2)), py.mean((1, 2))
    x1, y1 = x - lr * Gx, y - lr * Gy
    second = 0.5 * lr**2 * (Gx.pow(2).sum(-1) - Gy.pow(2).sum(-1))
    measured = (_balancedness(x1, y1) - _balancedness(x, y) - second) / lr
    fprime = 2.0 * ((x * y).sum(-1)[:, None, None] - t).mean(-1)  # f'_j, (S, m)
    n = torch.sqrt(x.pow(2).sum(-1) + y.pow(2).sum(-1))
    predicted = -2.0 * rho * fprime.abs().mean(-1) * _balancedness(x, y) / n
    return measured, predicted


def _states(cfg: Theorem3Config, toy: OPToy) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = paper_init(cfg.dim)
    xs, ys = [], []
    for t in range(cfg.warmup + cfg.states * cfg.stride):
        gx, gy = toy.grads(x, y, toy.sample_target())
        x, y = x - cfg.lr * gx, y - cfg.lr * gy
        if t >= cfg.warmup and (t - cfg.warmup) % cfg.stride == 0:
            xs.append(x)
            ys.append(y)
    return torch.stack(xs), torch.stack(ys)


def run(cfg: Theorem3Config) -> RunResult:
    """One seed: states along a noisy SGD trajectory; per m, a rho sweep and the force ratio."""
    cfg.validate()
    t0 = time.perf_counter()
    toy = OPToy(noise=cfg.noise, dim=cfg.dim, generator=torch.Generator().manual_seed(cfg.seed))
    xs, ys = _states(cfg, toy)
    targets = toy.sample_target((len(xs), cfg.batch))  # shared by every m and rho
    summary: dict[str, float] = {}
    series: dict[str, object] = {"rho": list(cfg.rhos), "micro": list(cfg.micro)}
    base_measured, base_predicted = msam_rate(toy, xs, ys, targets, 1, cfg.rho_ref, cfg.lr)
    for m in cfg.micro:
        residuals, scale = [], []
        for rho in cfg.rhos:
            measured, predicted = msam_rate(toy, xs, ys, targets, m, rho, cfg.lr)
            residuals.append(float((measured - predicted).abs().mean()))
            scale.append(float(predicted.abs().mean()))
        slope, _ = np.polyfit(np.log(cfg.rhos), np.log(residuals), 1)
        summary[f"slope_m{m}"] = float(slope)
        summary[f"rel_residual_m{m}"] = residuals[0] / scale[0]
        measured, predicted = msam_rate(toy, xs, ys, targets, m, cfg.rho_ref, cfg.lr)
        if m > 1:
            summary[f"force_ratio_m{m}"] = float(measured.sum() / base_measured.sum())
            summary[f"jensen_ratio_m{m}"] = float(predicted.sum() / base_predicted.sum())
        series[f"residual_m{m}"] = residuals
        series[f"measured_ref_m{m}"] = measured[:200].tolist()
        series[f"predicted_ref_m{m}"] = predicted[:200].tolist()
    return make_result(EXPERIMENT, cfg, series, summary, time.perf_counter() - t0)


def _bounds(s: Stat) -> tuple[float, float]:
    return (s.ci_low, s.ci_high) if s.has_ci else (s.mean, s.mean)


def decide(stats: dict[str, Stat]) -> Verdict:
    ms = sorted(int(k.removeprefix("slope_m")) for k in stats if k.startswith("slope_m"))
    rate_ok = all(
        2 - SLOPE_TOL <= _bounds(stats[f"slope_m{m}"])[0]
        and _bounds(stats[f"slope_m{m}"])[1] <= 2 + SLOPE_TOL
        and stats[f"rel_residual_m{m}"].mean < REL_TOL
        for m in ms
    )
    more = [m for m in ms if m > 1]
    ratios = [stats[f"force_ratio_m{m}"] for m in more]
    above = all(_bounds(r)[0] > 1 for r in ratios)
    monotone = all(b.mean >= a.mean for a, b in itertools.pairwise(ratios))
    holds = bool(rate_ok and above and monotone)
    slopes = ", ".join(f"m = {m}: {stats[f'slope_m{m}'].fmt(4)}" for m in ms)
    rel = max(stats[f"rel_residual_m{m}"].mean for m in ms)
    force = ", ".join(
        f"m = {m}: {stats[f'force_ratio_m{m}'].fmt(3)} (predicted {stats[f'jensen_ratio_m{m}'].mean:.3f})"
        for m in more
    )
    statement = (
        f"(a) Theorem 3's rate {'holds' if rate_ok else 'fails'}: log-log slope of the residual "
        f"over rho {slopes} (2 expected, accepted within {SLOPE_TOL}); largest relative residual "
        f"at the smallest rho {rel:.2e} (threshold {REL_TOL:g}). (b) m-sharpness "
        f"{'strengthens' if above and monotone else 'does not clearly strengthen'} balancing: "
        f"mSAM's measured balancing rate over SAM's {force} (above 1 beyond the CI: "
        f"{'yes' if above else 'no'}; non-decreasing in m: {'yes' if monotone else 'no'})."
    )
    numbers = {f"force_ratio_m{m}": stats[f"force_ratio_m{m}"].mean for m in more}
    numbers |= {f"slope_m{m}": stats[f"slope_m{m}"].mean for m in ms}
    return Verdict(holds=holds, statement=statement, numbers=numbers)


def _setting(cfg: Theorem3Config) -> str:
    return (
        f"OP toy (x, y in R^{cfg.dim}, target 0.5 + a n, a = {cfg.noise:g}, paper's start); "
        f"{cfg.states} states every {cfg.stride} SGD steps (lr {cfg.lr:g}) after {cfg.warmup}; "
        f"per state {cfg.batch} noise samples split into m in {list(cfg.micro)} micro-batches; "
        f"one mSAM step per state for rho in [{min(cfg.rhos):.0e}, {max(cfg.rhos):.0e}] "
        f"({len(cfg.rhos)} values); force ratio at rho = {cfg.rho_ref:g}."
    )


def _plot(report, out_dir):
    from sharpkit.plotting.experiments.theorem3 import plot

    return plot(report, out_dir)


EXPERIMENT = Experiment(
    name="theorem3",
    title="Theorem 3: SAM's balancing rate on OP, strengthened by m-sharpness",
    claim=(
        "On scale-invariant OP problems SAM changes B at rate -2 rho |f'| B / sqrt(|x|^2 + "
        "|y|^2) + O(rho^2 |B|); with m micro-batches |f'| becomes (1/m) sum_j |f'_j| >= |f'|, "
        "so mSAM balances faster than SAM."
    ),
    source="Li, Zhang, He (NeurIPS 2024, arXiv:2410.14802), Theorem 3 and its m-sharpness remark; docs/theory.md.",
    config_cls=Theorem3Config,
    scales={
        "test": Theorem3Config(
            states=64, micro=(1, 2, 8), rhos=tuple(float(r) for r in np.logspace(-3, -1, 5))
        ),
        "small": Theorem3Config(),
        "large": Theorem3Config(
            states=4096,
            stride=2,
            batch=16,
            micro=(1, 2, 4, 8, 16),
            rhos=tuple(float(r) for r in np.logspace(-4, -1, 13)),
        ),
    },
    seeds={"test": 3, "small": 5, "large": 20},
    run=run,
    decide=decide,
    plot=_plot,
    setting=_setting,
)
