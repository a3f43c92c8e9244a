r"""Experiment 4: per-layer balancing with many LoRA layers (Li, Zhang, He, NeurIPS 2024).

**Claim.** With :math:`D` LoRA factor pairs trained together, SAM's per-layer
balancing force is shared out across the layers: its perturbation is normalised
by the *total* gradient norm :math:`\sqrt{\sum_l \|g_{x_l}\|^2 + \|g_{y_l}\|^2}`,
so each layer's drift

.. math::

    \dot B_l = \rho\,\frac{\|g_{x_l}\|^2 - \|g_{y_l}\|^2}
    {\sqrt{\sum_k \|g_{x_k}\|^2 + \|g_{y_k}\|^2}}

is up to :math:`D` times weaker than with one layer (Theorem 5). nBAR scales each
pair on its own and does not slow down with :math:`D`.

**Setting.** A deep linear network of :math:`D` :class:`~sharpkit.balance.LoRALinear`
layers (frozen identity base, width ``width``, rank ``rank``, ``alpha = rank``)
regresses a teacher :math:`y = W^\star x + \sigma\varepsilon` with fresh Gaussian
minibatches each step, :math:`W^\star = I + s\,M/\sqrt{w}` (``teacher_scale``
:math:`s = 1`, :math:`M` standard normal): the adapters have a task to learn,
and the label noise :math:`\sigma` drives SAM's balancing force. LoRA starts as
usual (``lora_B = 0``) with ``lora_A`` scaled by ``init_scale``, so every layer
starts unbalanced, :math:`B_l(0) = -\|A_l\|^2/2`. The same initialisation and
the same minibatches are used for SGD (baseline), SAM and nBAR (all with an SGD
base and the same learning rate).

**Measured.** Per layer, the relative drop of :math:`|B_l|` after ``steps`` steps,
:math:`1 - |B_l(T)|/|B_l(0)|`; the *balancing rate* of an optimizer at depth
:math:`D` is its layer-averaged drop minus SGD's (SGD conserves :math:`B` up to
:math:`O(\eta^2)`; subtracting it removes that finite-step drift), per step. The
effect size is the ratio ``rate(D) / rate(1)`` for SAM and for nBAR.

**Decision rule** (fixed before the runs). Three parts, each decided by the 95% CI
over seeds at the largest depth :math:`D_{\max}`:

- SAM slows down: ``ratio_sam_dmax`` below ``SLOW_RATIO`` (0.75). For layers with
  comparable gradients the slowdown is about :math:`\sqrt{D}` (ratio 0.35 at
  :math:`D = 8`, 0.5 at :math:`D = 4`); 0.75 sits halfway between "no slowdown"
  and :math:`1/\sqrt 4`.
- Within Theorem 5's bound: the slowdown is at most :math:`D`-fold,
  ``ratio_sam_dmax`` :math:`\ge 1/D_{\max}`. This part can fail if SAM's per-layer
  balancing collapses faster than the theory allows.
- nBAR keeps up: ``ratio_nbar_dmax`` at least ``SLOW_RATIO``. With no task to
  learn (``teacher_scale = 0``, ``lora_B`` near zero) nBAR's rule shrinks
  ``lora_A`` by :math:`1 - \mu_0\eta` per step at every depth, so its ratio is 1
  by construction; with a teacher the adapters learn a share of it that shrinks
  with :math:`D`, nBAR's change of :math:`B` scales with
  :math:`\|x\|^2 + \|y\|^2`, and its ratio can fall below the threshold: the
  comparison can fail.

Supported when all three hold; not supported when any CI lies on the wrong
side; inconclusive otherwise.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from sharpkit.balance import LoRALinear, balancedness, find_pairs
from sharpkit.optim import BAR, SAM

from ._core import Experiment, ExperimentConfig, RunResult, Stat, Verdict, check, make_result
from ._train import train_step

__all__ = ["EXPERIMENT", "SLOW_RATIO", "ManyLayersConfig", "decide", "run"]

#: threshold on rate(D_max) / rate(1), justified in the module docstring
SLOW_RATIO = 0.75

OPTIMIZERS = ("sgd", "sam", "nbar")


@dataclass(frozen=True)
class ManyLayersConfig(ExperimentConfig):
    r"""Config of the many-layers experiment.

    Attributes:
        depths: the numbers of stacked LoRA layers :math:`D` (must include 1).
        width: width of every layer (input = output = width).
        rank: LoRA rank.
        init_scale: factor on ``lora_A``'s default initialisation (sets :math:`|B_l(0)|`).
        teacher_scale: the teacher is :math:`I + s\,M/\sqrt{w}` with :math:`M` standard
            normal; with ``s = 0`` the frozen base already fits the mean and the adapters
            see only the noise (where nBAR's ratio is 1 by construction).
        noise: standard deviation of the target noise.
        batch_size: examples per step (fresh each step).
        steps: optimizer steps per run.
        lr: learning rate (SGD base for all three optimizers).
        rho: SAM radius.
        mu0: nBAR coefficient (constant schedule).
        record_every: steps between recorded values of :math:`B_l` (for the figure).
    """

    depths: tuple[int, ...] = (1, 2, 4, 8)
    width: int = 8
    rank: int = 2
    init_scale: float = 3.0
    teacher_scale: float = 1.0
    noise: float = 1.0
    batch_size: int = 32
    steps: int = 300
    lr: float = 0.01
    rho: float = 0.1
    mu0: float = 0.05
    record_every: int = 10

    def validate(self) -> None:
        super().validate()
        check(len(self.depths) >= 2, f"depths: need at least two depths, got {self.depths}")
        check(
            all(isinstance(d, int) and d >= 1 for d in self.depths),
            f"depths: each must be a positive integer, got {self.depths}",
        )
        check(1 in self.depths, f"depths: must include 1 (the reference), got {self.depths}")
        check(len(set(self.depths)) == len(self.depths), f"depths: duplicates in {self.depths}")
        check(self.width >= 1, f"width: must be positive, got {self.width}")
        check(
            1 <= self.rank <= self.width,
            f"rank: need 1 <= rank <= width, got rank={self.rank}, width={self.width}",
        )
        check(self.init_scale > 0, f"init_scale: must be positive, got {self.init_scale}")
        check(
            self.teacher_scale >= 0,
            f"teacher_scale: must be non-negative, got {self.teacher_scale}",
        )
        check(self.noise >= 0, f"noise: must be non-negative, got {self.noise}")
        check(self.batch_size >= 1, f"batch_size: must be positive, got {self.batch_size}")
        check(self.steps >= 1, f"steps: must be positive, got {self.steps}")
        check(self.lr > 0, f"lr: must be positive, got {self.lr}")
        check(self.rho > 0, f"rho: must be positive, got {self.rho}")
        check(self.mu0 > 0, f"mu0: must be positive, got {self.mu0}")
        check(
            1 <= self.record_every <= self.steps,
            f"record_every: need 1 <= record_every <= steps, got {self.record_every}",
        )


def _build(cfg: ManyLayersConfig, depth: int, gen: torch.Generator, device) -> nn.Sequential:
    layers = []
    for _ in range(depth):
        base = nn.Linear(cfg.width, cfg.width, bias=False, device=device)
        with torch.no_grad():
            base.weight.copy_(torch.eye(cfg.width, device=device))
        layer = LoRALinear(
            cfg.width,
            cfg.width,
            rank=cfg.rank,
            alpha=float(cfg.rank),
            bias=False,
            base=base,
            generator=gen,
            device=device,
        )
        with torch.no_grad():
            layer.lora_A.mul_(cfg.init_scale)
        layers.append(layer)
    return nn.Sequential(*layers)


def _train(cfg: ManyLayersConfig, depth: int, opt_name: str) -> tuple[list[list[float]], float]:
    """Train one model; return B_l at every recorded step (rows) and seconds per step."""
    device = torch.device(cfg.device)
    # the same init, teacher and minibatches for every optimizer at this depth
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + depth)
    teacher = torch.eye(cfg.width) + cfg.teacher_scale * torch.randn(
        cfg.width, cfg.width, generator=gen
    ) / math.sqrt(cfg.width)
    model = _build(cfg, depth, gen, "cpu").to(device)
    pairs = find_pairs(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if opt_name == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr)
    elif opt_name == "sam":
        opt = SAM(params, torch.optim.SGD, rho=cfg.rho, lr=cfg.lr)
    else:
        opt = BAR(params, torch.optim.SGD, variant="nbar", mu0=cfg.mu0, model=model, lr=cfg.lr)
    data_gen = torch.Generator().manual_seed(cfg.seed * 1000 + depth + 500)
    history = [[balancedness(p) for p in pairs]]
    t0 = time.perf_counter()
    for t in range(cfg.steps):
        x = torch.randn(cfg.batch_size, cfg.width, generator=data_gen)
        y = x @ teacher.T + cfg.noise * torch.randn(cfg.batch_size, cfg.width, generator=data_gen)
        train_step(opt, model, _half_squared_error, (x.to(device), y.to(device)))
        if (t + 1) % cfg.record_every == 0 or t + 1 == cfg.steps:
            history.append([balancedness(p) for p in pairs])
    return history, (time.perf_counter() - t0) / cfg.steps


def _half_squared_error(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum(1).mean()


def _drop(history: list[list[float]]) -> float:
    """Layer-averaged relative drop of |B_l| from the first to the last record."""
    first, last = history[0], history[-1]
    return sum(1 - abs(b) / abs(a) for a, b in zip(first, last)) / len(first)


def run(cfg: ManyLayersConfig) -> RunResult:
    """One seed: every depth, SGD / SAM / nBAR on the same data."""
    cfg.validate()
    t0 = time.perf_counter()
    series: dict[str, object] = {"depths": list(cfg.depths)}
    summary: dict[str, float] = {}
    rates: dict[str, dict[int, float]] = {"sam": {}, "nbar": {}}
    for depth in cfg.depths:
        drops = {}
        for name in OPTIMIZERS:
            hist, sec = _train(cfg, depth, name)
            drops[name] = _drop(hist)
            # mean |B_l| / |B_l(0)| over layers, at every record (for the figure)
            series[f"{name}@{depth}"] = [
                sum(abs(b) / abs(a) for a, b in zip(hist[0], row)) / depth for row in hist
            ]
            summary[f"drop_{name}@{depth}"] = drops[name]
            summary[f"sec_per_step_{name}@{depth}"] = sec
        for name in ("sam", "nbar"):
            rates[name][depth] = (drops[name] - drops["sgd"]) / cfg.steps
            summary[f"rate_{name}@{depth}"] = rates[name][depth]
    d_max = max(cfg.depths)
    for name in ("sam", "nbar"):
        for depth in cfg.depths:
            summary[f"ratio_{name}@{depth}"] = rates[name][depth] / rates[name][1]
        summary[f"ratio_{name}_dmax"] = rates[name][d_max] / rates[name][1]
    summary["d_max"] = float(d_max)
    series["record_every"] = cfg.record_every
    return make_result(EXPERIMENT, cfg, series, summary, time.perf_counter() - t0)


def _side(stat: Stat, threshold: float) -> int:
    """+1 if clearly above the threshold, -1 if clearly below, 0 if the CI straddles it."""
    lo, hi = (stat.ci_low, stat.ci_high) if stat.has_ci else (stat.mean, stat.mean)
    if lo >= threshold:
        return 1
    if hi < threshold:
        return -1
    return 0


def decide(stats: dict[str, Stat]) -> Verdict:
    sam, nbar = stats["ratio_sam_dmax"], stats["ratio_nbar_dmax"]
    d_max = stats["d_max"].mean
    slow = -_side(sam, SLOW_RATIO)  # +1: SAM clearly slows down
    bound = _side(sam, 1 / d_max)  # +1: within Theorem 5's D-fold bound
    keeps = _side(nbar, SLOW_RATIO)  # +1: nBAR clearly keeps up
    parts = {"SAM slows down": slow, "within 1/D": bound, "nBAR keeps up": keeps}
    if -1 in parts.values():
        holds: bool | None = False
    elif all(v == 1 for v in parts.values()):
        holds = True
    else:
        holds = None
    word = {1: "yes", -1: "no", 0: "undecided"}
    return Verdict(
        holds=holds,
        statement=(
            f"per-layer balancing rate at D = {d_max:g} relative to D = 1: SAM {sam.fmt()} "
            f"(slows down, below {SLOW_RATIO}: {word[slow]}; within Theorem 5's bound "
            f"1/D = {1 / d_max:.3g}: {word[bound]}), nBAR {nbar.fmt()} (keeps up, at least "
            f"{SLOW_RATIO}: {word[keeps]})."
        ),
        numbers={"ratio_sam_dmax": sam.mean, "ratio_nbar_dmax": nbar.mean},
    )


def _setting(cfg: ManyLayersConfig) -> str:
    return (
        f"Deep linear network of D in {list(cfg.depths)} LoRA layers (frozen identity base, "
        f"width {cfg.width}, rank {cfg.rank}, lora_A x {cfg.init_scale:g}), teacher regression "
        f"(teacher I + {cfg.teacher_scale:g} M / sqrt(width)) with noise {cfg.noise:g}, batch {cfg.batch_size}, {cfg.steps} steps of SGD / SAM "
        f"(rho = {cfg.rho:g}) / nBAR (mu0 = {cfg.mu0:g}), lr {cfg.lr:g}; rate = drop of |B_l| "
        f"minus SGD's."
    )


def _plot(report, out_dir):
    from sharpkit.plotting.experiments.many_layers import plot

    return plot(report, out_dir)


EXPERIMENT = Experiment(
    name="many_layers",
    title="Per-layer balancing with many LoRA layers",
    claim=(
        "With D LoRA layers, SAM's per-layer balancing slows down with D, at most D-fold; "
        "nBAR, acting on each layer separately, does not slow down."
    ),
    source="Li, Zhang, He (NeurIPS 2024), Implicit Regularization of SAM for Scale-Invariant "
    "Problems, Theorem 5.",
    config_cls=ManyLayersConfig,
    scales={
        "test": ManyLayersConfig(depths=(1, 4), width=6, steps=120, record_every=20),
        "small": ManyLayersConfig(),
        "large": ManyLayersConfig(
            depths=(1, 2, 4, 8, 16, 32), width=64, rank=8, steps=3000, lr=0.002, record_every=50
        ),
    },
    seeds={"test": 2, "small": 5, "large": 10},
    run=run,
    decide=decide,
    plot=_plot,
    setting=_setting,
    bounds={"drop_*": (-math.inf, 1.0), "sec_per_step_*": (0.0, math.inf)},
)
