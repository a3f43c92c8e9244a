r"""Experiment 2: outlier injection, SAM's balancing responds to the data (Li, Zhang, He 2024).

**Claim.** SAM's balancing force on two-factor problems is data-responsive: it
grows with the noise in the data (for NOP, :math:`E[\|g_y\|^2 - \|g_x\|^2]` grows
like :math:`a^2`), so outliers drive balancing; SGD does not respond (it
conserves :math:`B` whatever the data).

For a pair :math:`(x, y)` with :math:`B = (\|x\|^2 - \|y\|^2)/2`, Theorem 2 gives
under SAM (radius :math:`\rho`)

.. math::

    \frac{dB}{dt} = \rho\,\frac{\|g_x\|^2 - \|g_y\|^2}{\sqrt{\|g_x\|^2 + \|g_y\|^2}}
    + O(\rho^2),

while one SGD step of size :math:`\eta` changes :math:`B` by
:math:`\eta^2(\|g_x\|^2 - \|g_y\|^2)/2` (gradient flow conserves :math:`B`
exactly; this is the discretisation error). Per unit time SGD's drift is thus
about :math:`\eta\|g\|/(2\rho)` of SAM's, small when :math:`\eta\|g\| \ll \rho`.

**Setting, toy arms.** The paper's NOP toy :math:`\tfrac12\|xy^\top - (A + aN)\|_F^2`
(:class:`~sharpkit.balance.toys.NOPToy`) and OP toy
:math:`(x^\top y - (0.5 + a n))^2` (:class:`~sharpkit.balance.toys.OPToy`), base
noise ``noise``, in which each step's sample is, with probability ``p``, an
*outlier*: its noise term is scaled by ``k``. SAM (radius 0.1 on NOP, 0.2 on OP,
the paper's) and SGD from the paper's start
(:func:`~sharpkit.balance.toys.simulate`, ``runs`` noise streams), over a grid
of ``p`` and ``k``. On OP, Theorem 3's force
:math:`-2\rho|f'|B/\sqrt{\|x\|^2 + \|y\|^2}` grows with :math:`E|f'|`, which
the outliers raise.

**Setting, LoRA arm (real data).** The MLP 64-``lora_hidden``-``lora_hidden``-5
of :mod:`~sharpkit.experiments.lora_digits` is pretrained on digits 0-4
(scikit-learn's bundled 8x8 digits), frozen, and LoRA adapters
(:func:`~sharpkit.balance.add_lora`, :math:`W = W_0 + \tfrac{\alpha}{r} B A`,
pair :math:`x = B`, :math:`y = A`) on the layers ``lora_targets`` are trained on
digits 5-9 with SAM (around plain SGD) or plain SGD, from the same adapters and
the same fixed minibatches (one fixed partition of the training set, cycled), for
``lora_steps`` steps. Outliers (the main grid; one kind only): a fraction ``p``
of the training examples, chosen once per seed, has its input replaced by
:math:`x + k\,\sigma\,\varepsilon`, :math:`\varepsilon \sim N(0, I)` drawn once
per seed, :math:`\sigma` the pooled standard deviation of the clean training
inputs (:func:`inject_outliers`). The draws are shared by every grid point of a
seed, so the outlier sets are nested in ``p`` and the noise only rescales with
``k`` (common random numbers). Design choices, made for the reasons below:

* *Clear imbalance at the start*: LoRA starts with :math:`B = 0`, so
  :math:`B_0 = -\|A\|^2/2` is small and an adapter crossing :math:`B = 0` makes
  :math:`|B|` grow again; ``A`` is scaled by ``lora_init_scale`` (2) so the pair
  starts clearly unbalanced and is measured over a horizon where it does not
  cross zero.
* *The input layer is adapted* (``lora_targets = ("0",)``, a square 64x64
  layer): input-noise outliers put isotropic noise :math:`k\sigma\varepsilon` in
  the input :math:`h` of exactly this pair. With :math:`G = \delta h^\top`,
  :math:`g_x = G A^\top` and :math:`g_y = B^\top G`, that noise adds
  :math:`k^2\sigma^2 \|\delta\|^2 \|A\|^2` to :math:`E\|g_x\|^2` and
  :math:`k^2\sigma^2 d_{in} \|B^\top\delta\|^2` to :math:`E\|g_y\|^2`, a gap of the
  sign that shrinks :math:`|B|` when :math:`\|A\| \gg \|B\|` (the paper's
  mechanism). Deeper layers see the noise only through the frozen, rectified
  first layer, and a non-square pair (e.g. the 64x5 head) is pushed towards
  :math:`d_{out}\|A\|^2 \approx d_{in}\|B\|^2`, not towards :math:`B = 0`.
* *Small step size*: ``lora_lr`` is chosen so that :math:`\eta\|g\|/(2\rho)`
  (reported as ``lora_sgd_drift_ratio``) is well below 1.

**Per-state measurement (LoRA arm).** End-of-run :math:`|B|` moves by a few
percent and mixes the balancing force with the path each run takes, so the arm
also measures the force itself: from ``lora_drift_states`` common states (the
adapters every ``lora_steps / lora_drift_states`` steps along SAM's run without
outliers, from step 0) and the first ``lora_drift_batches`` minibatches (the same
indices for every ``p``, the outliers' inputs changed), one SAM step and one SGD
step from the same state on the same batch (:func:`one_step_drift`): the extra
decrease of :math:`\log\sum|B|` per unit time that SAM's perturbation causes,
``lora_drift@p`` (at the largest ``k``), paired across ``p`` by state and batch.
A diagnostic, reported and not judged: ``lora_drift_own@p``, the same drift from
states along SAM's own run with outliers (largest ``p`` and ``k``), on the batches
with (``p``) and without (``0``) the outliers: the force where the outlier run
actually is, against the force at the clean run's states.

**Measured.** The balancing rate :math:`\log(|B_0|/|B_T|)/(\eta T)` per unit of
time (independent of the step size): ``rate_<method>@p,k`` on the NOP toy and
``op_rate_<method>@p,k`` on the OP toy (means over runs), ``lora_rate_<method>@p,k``
on the LoRA arm (with :math:`|B| = \sum_\text{layers}|B_l|`); ``p = 0`` is run once
and reported for every ``k``. LoRA, paired per seed: ``lora_gain_<method>`` (rate at
the largest ``p, k`` minus at ``p = 0``), ``lora_gain_sam_minus_sgd``, the per-state
``lora_drift@p`` and ``lora_drift_gain`` (largest ``p`` minus ``p = 0``), and
``lora_sgd_drift_ratio`` :math:`= \eta \max\overline{\|g\|}/(2\rho)` (mean
gradient norm along the SGD runs, largest over the grid).

**Verdict**, fixed before the runs. *Each toy arm* (NOP, OP): supported when (i)
SAM's rate at the largest ``p`` and ``k`` exceeds its rate without outliers
(``p = 0``) by more than the CI of both over seeds, (ii) SAM's mean rate does not
decrease along ``p`` (for every ``k > 1``) nor along ``k`` (for every ``p > 0``),
and (iii) SGD does not respond: its largest absolute rate is below
``SGD_FRACTION`` (0.1) of SAM's largest (a drift, not a balancing force; SGD's
drift at finite step size is ``O(eta)``). *LoRA arm*, on paired differences
only: supported when the CIs over seeds of both ``lora_gain_sam_minus_sgd``
(end of run) and ``lora_drift_gain`` (per state) lie above 0 and SGD's largest
absolute mean rate is below ``SGD_FRACTION`` of SAM's; contradicted when either
CI lies below 0 or SGD's rate is not small; inconclusive otherwise. The
experiment is supported when every arm is, not supported when any is not,
inconclusive otherwise; a report without the OP or LoRA arm's numbers is judged
on the arms it has.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sharpkit.balance import add_lora, balancedness, find_pairs
from sharpkit.balance.toys import NOPToy, OPToy, simulate
from sharpkit.data import load_digits
from sharpkit.optim import SAM

from ._core import Experiment, ExperimentConfig, RunResult, Stat, Verdict, check, make_result
from ._train import train_step
from .lora_digits import LoRADigitsConfig, _mlp, _pretrain

__all__ = [
    "EXPERIMENT",
    "OutlierInjectionConfig",
    "OutlierNOPToy",
    "OutlierOPToy",
    "decide",
    "draw_outliers",
    "inject_outliers",
    "one_step_drift",
    "run",
]

#: SGD "does not respond" when its largest |rate| is below this fraction of SAM's largest
SGD_FRACTION = 0.1
#: the paper's SAM radius on the NOP toy (Appendix A.4)
_RHO = 0.1
#: the paper's SAM radius on the OP toy (Appendix A.4)
_OP_RHO = 0.2
#: the linear layers of the lora_digits MLP that may carry adapters
_LAYERS = ("0", "2", "4")


class _Outliers:
    """Mixin for the toys: each sample is an outlier with probability ``p``, and an
    outlier's noise term is scaled by ``k``."""

    def __init__(self, noise: float, p: float, k: float, *, generator: torch.Generator) -> None:
        super().__init__(noise=noise, generator=generator)  # type: ignore[call-arg]
        self.p, self.k = float(p), float(k)

    def _noise_scale(self, batch_shape: tuple[int, ...]) -> torch.Tensor | None:
        """``k`` for the outlier samples and 1 for the others; ``None`` if none can be."""
        if self.p == 0.0 or self.k == 1.0:
            return None
        gen, dtype = self.generator, self.dtype  # type: ignore[attr-defined]
        outlier = torch.rand(batch_shape, generator=gen, dtype=dtype) < self.p
        return torch.where(outlier, self.k, 1.0)


class OutlierNOPToy(_Outliers, NOPToy):
    """The NOP toy whose samples are outliers with probability ``p``: noise scaled by ``k``."""

    def sample_target(self, batch_shape: tuple[int, ...] = ()) -> torch.Tensor:
        target = super().sample_target(batch_shape)
        scale = self._noise_scale(batch_shape)
        return target if scale is None else self.A + scale[..., None, None] * (target - self.A)


class OutlierOPToy(_Outliers, OPToy):
    """The OP toy whose samples are outliers with probability ``p``: noise scaled by ``k``
    (the target ``0.5 + a n`` becomes ``0.5 + k a n``)."""

    def sample_target(self, batch_shape: tuple[int, ...] = ()) -> torch.Tensor:
        target = super().sample_target(batch_shape)
        scale = self._noise_scale(batch_shape)
        return target if scale is None else 0.5 + scale * (target - 0.5)


def draw_outliers(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The random draws of :func:`inject_outliers`, once per seed: an order of the
    examples (the first ``round(p n)`` become outliers) and standard normal noise
    of the shape of ``x`` (on the CPU)."""
    order = torch.randperm(x.shape[0], generator=generator)
    noise = torch.randn(tuple(x.shape), generator=generator, dtype=x.dtype)
    return order, noise


def inject_outliers(
    x: torch.Tensor, p: float, k: float, order: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Replace a fraction ``p`` of the rows of ``x`` by :math:`x + k\sigma\varepsilon`.

    Args:
        x: inputs ``(n, d)`` (left unchanged).
        p: fraction of outlier rows, in [0, 1]; exactly ``round(p n)`` rows.
        k: outlier strength (> 0), in units of :math:`\sigma`, the pooled standard
            deviation of ``x``.
        order, noise: the draws of :func:`draw_outliers`.

    Returns:
        The new inputs and the ``(n,)`` boolean mask of outlier rows.
    """
    check(0.0 <= p <= 1.0, f"p: must lie in [0, 1], got {p}")
    check(k > 0, f"k: must be positive, got {k}")
    n = x.shape[0]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[: round(p * n)]] = True
    mask = mask.to(x.device)
    sigma = x.std()
    out = torch.where(mask[:, None], x + k * sigma * noise.to(x.device), x)
    return out, mask


@dataclass(frozen=True)
class OutlierInjectionConfig(ExperimentConfig):
    """Config of the outlier-injection experiment.

    Attributes:
        noise: toy arm: base noise level ``a`` of every sample (>= 0).
        fractions: toy arm: outlier probabilities ``p`` (each in [0, 1]; include 0).
        strengths: toy arm: outlier noise multipliers ``k`` (each >= 1; include 1).
        lr: toy arm: step size.
        steps: toy arm: steps per run.
        runs: toy arm: independent noise streams per grid point.
        lora_fractions: LoRA arm: fractions ``p`` of outlier examples (each in
            [0, 1); include 0).
        lora_strengths: LoRA arm: input-noise strengths ``k`` in units of the
            inputs' standard deviation (each > 0).
        lora_hidden: LoRA arm: hidden width of the pretrained MLP.
        lora_pretrain_epochs: LoRA arm: full-batch Adam epochs of pretraining.
        lora_targets: LoRA arm: adapted layers, among "0" (input), "2", "4" (head).
        lora_rank: LoRA rank.
        lora_alpha: LoRA alpha.
        lora_init_scale: the adapters' ``A`` factors are multiplied by this at the
            start (``B`` starts at 0), setting the initial imbalance.
        lora_lr: LoRA arm: step size of SGD (and of SAM's base SGD).
        lora_rho: LoRA arm: SAM radius.
        lora_steps: LoRA arm: steps per run.
        lora_batch_size: LoRA arm: size of the fixed minibatches.
        lora_drift_states: LoRA arm: common states of the per-state measurement
            (evenly spaced along SAM's run without outliers, from step 0).
        lora_drift_batches: LoRA arm: minibatches per state of the per-state
            measurement (the first ones of the fixed partition).
    """

    noise: float = 0.25
    fractions: tuple[float, ...] = (0.0, 0.1, 0.3)
    strengths: tuple[float, ...] = (1.0, 3.0, 10.0)
    lr: float = 1e-3
    steps: int = 1500
    runs: int = 16
    lora_fractions: tuple[float, ...] = (0.0, 0.3)
    lora_strengths: tuple[float, ...] = (2.0, 4.0)
    lora_hidden: int = 64
    lora_pretrain_epochs: int = 300
    lora_targets: tuple[str, ...] = ("0",)
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_init_scale: float = 2.0
    lora_lr: float = 2e-3
    lora_rho: float = 0.05
    lora_steps: int = 1500
    lora_batch_size: int = 64
    lora_drift_states: int = 8
    lora_drift_batches: int = 4

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
        lf, ls = self.lora_fractions, self.lora_strengths
        check(
            all(0 <= p < 1 for p in lf) and 0.0 in lf and len(set(lf)) >= 2,
            f"lora_fractions: need at least two distinct p in [0, 1), 0 included, got {lf}",
        )
        check(
            all(k > 0 and math.isfinite(k) for k in ls) and len(set(ls)) >= 2,
            f"lora_strengths: need at least two distinct finite k > 0, got {ls}",
        )
        check(self.lora_hidden >= 1, f"lora_hidden: must be positive, got {self.lora_hidden}")
        check(
            self.lora_pretrain_epochs >= 1,
            f"lora_pretrain_epochs: must be positive, got {self.lora_pretrain_epochs}",
        )
        check(
            len(self.lora_targets) >= 1
            and len(set(self.lora_targets)) == len(self.lora_targets)
            and all(t in _LAYERS for t in self.lora_targets),
            f"lora_targets: need distinct layers among {_LAYERS}, got {self.lora_targets}",
        )
        check(
            1 <= self.lora_rank <= self.lora_hidden,
            f"lora_rank: need 1 <= lora_rank <= lora_hidden, got {self.lora_rank}",
        )
        check(self.lora_alpha > 0, f"lora_alpha: must be positive, got {self.lora_alpha}")
        check(
            self.lora_init_scale > 0,
            f"lora_init_scale: must be positive, got {self.lora_init_scale}",
        )
        check(self.lora_lr > 0, f"lora_lr: must be positive, got {self.lora_lr}")
        check(self.lora_rho > 0, f"lora_rho: must be positive, got {self.lora_rho}")
        check(self.lora_steps >= 1, f"lora_steps: must be >= 1, got {self.lora_steps}")
        check(
            self.lora_batch_size >= 1,
            f"lora_batch_size: must be positive, got {self.lora_batch_size}",
        )
        check(
            1 <= self.lora_drift_states <= self.lora_steps,
            f"lora_drift_states: need 1 <= lora_drift_states <= lora_steps, got {self.lora_drift_states}",
        )
        check(
            self.lora_drift_batches >= 1,
            f"lora_drift_batches: must be positive, got {self.lora_drift_batches}",
        )


def _key(method: str, p: float, k: float) -> str:
    return f"rate_{method}@{p:g},{k:g}"


#: the toy arms: key prefix, toy class, the paper's SAM radius
_TOYS = (("", OutlierNOPToy, _RHO), ("op_", OutlierOPToy, _OP_RHO))


def _toy_arm(cfg: OutlierInjectionConfig, summary: dict[str, float]) -> None:
    horizon = cfg.lr * cfg.steps
    for prefix, toy_cls, rho in _TOYS:
        gen = torch.Generator().manual_seed(cfg.seed)
        for p, k in itertools.product(cfg.fractions, cfg.strengths):
            for method in ("sam", "sgd"):
                toy = toy_cls(cfg.noise, p, k, generator=gen)
                traj = simulate(
                    toy, method, steps=cfg.steps, lr=cfg.lr, rho=rho, runs=cfg.runs,
                    record_every=cfg.steps,
                ).balancedness  # fmt: skip
                rates = np.log(np.abs(traj[0]) / np.abs(traj[-1])) / horizon
                summary[prefix + _key(method, p, k)] = float(np.mean(rates))


def _lora_cfg(cfg: OutlierInjectionConfig) -> LoRADigitsConfig:
    return LoRADigitsConfig(
        seed=cfg.seed,
        device=cfg.device,
        hidden=cfg.lora_hidden,
        pretrain_epochs=cfg.lora_pretrain_epochs,
        rank=cfg.lora_rank,
        alpha=cfg.lora_alpha,
    )


def _cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _lora_setup(cfg, lcfg, base_state, data, device):
    """The adapted model (the same base and adapters for every run of a seed), its pairs
    and its trainable parameters."""
    model = _mlp(lcfg, data.num_features, data.num_classes)
    model.load_state_dict(base_state)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same adapters everywhere
    add_lora(model, list(cfg.lora_targets), rank=cfg.lora_rank, alpha=cfg.lora_alpha, generator=gen)  # fmt: skip
    pairs = find_pairs(model)
    with torch.no_grad():
        for pair in pairs:
            pair.y.mul_(cfg.lora_init_scale)  # y is the A factor: a clear imbalance, B < 0
    model.to(device)
    return model, pairs, [q for q in model.parameters() if q.requires_grad]


def _lora_opt(cfg, method: str, params) -> torch.optim.Optimizer:
    if method == "sam":
        return SAM(params, torch.optim.SGD, rho=cfg.lora_rho, lr=cfg.lora_lr)
    return torch.optim.SGD(params, lr=cfg.lora_lr)


def _lora_batches(cfg, n: int, device) -> list[torch.Tensor]:
    """One fixed partition of the training set (the same for every run of a seed)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 2)).to(device)
    return [perm[i : i + cfg.lora_batch_size] for i in range(0, n, cfg.lora_batch_size)]


def _abs_b(pairs) -> float:
    return sum(abs(balancedness(pair)) for pair in pairs)


def _lora_run(cfg, lcfg, method, base_state, data, x, device, snapshot_every: int = 0):
    """Adapt with SAM or SGD on inputs ``x``. Returns the rate, the mean gradient norm
    (SGD), the per-layer B at the start and, every ``snapshot_every`` steps from step
    0, copies of the adapters (the common states of the per-state measurement)."""
    model, pairs, params = _lora_setup(cfg, lcfg, base_state, data, device)
    opt = _lora_opt(cfg, method, params)
    batches = _lora_batches(cfg, x.shape[0], device)
    b0 = [balancedness(pair) for pair in pairs]
    norms, snapshots = [], []
    for t in range(cfg.lora_steps):
        if snapshot_every and t % snapshot_every == 0:
            snapshots.append([q.detach().clone() for q in params])
        idx = batches[t % len(batches)]
        train_step(opt, model, _cross_entropy, (x[idx], data.y_train[idx]))
        if method == "sgd" and t % 10 == 0:  # SGD leaves the step's gradient in .grad
            norms.append(float(torch.sqrt(sum(q.grad.pow(2).sum() for q in params))))
    rate = math.log(sum(map(abs, b0)) / _abs_b(pairs)) / (cfg.lora_lr * cfg.lora_steps)
    return rate, (sum(norms) / len(norms) if norms else math.nan), b0, snapshots


def one_step_drift(
    model: nn.Module,
    pairs,
    params: list[torch.Tensor],
    opts: dict[str, torch.optim.Optimizer],
    lr: float,
    state: list[torch.Tensor],
    batch: tuple[torch.Tensor, torch.Tensor],
) -> float:
    r"""The one-step balancing drift of SAM beyond SGD from a common state and batch.

    From the adapters ``state``, one step of ``opts["sam"]`` and, from the same state
    on the same batch, one of ``opts["sgd"]``:

    .. math::

        \beta = \frac{\sum_l |B_l'^{SGD}| - \sum_l |B_l'^{SAM}|}{\eta \sum_l |B_l|},

    the extra decrease of :math:`\log\sum_l|B_l|` per unit time that SAM's
    perturbation causes (the units of the end-of-run rate). The parameters are
    left at ``state``.

    Args:
        model: the adapted model (its frozen base is shared by both steps).
        pairs: its LoRA factor pairs (:func:`~sharpkit.balance.find_pairs`).
        params: the trainable parameters that ``state`` holds values for.
        opts: ``{"sam": ..., "sgd": ...}``, both over ``params`` with step size ``lr``.
        lr: the step size :math:`\eta`.
        state: the values of ``params`` to step from.
        batch: ``(inputs, labels)`` for the cross-entropy loss.

    Returns:
        :math:`\beta` (positive: SAM shrinks :math:`\sum_l|B_l|` more than SGD).

    Example:
        >>> from sharpkit.balance import add_lora, find_pairs
        >>> torch.manual_seed(0) and None
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> _ = add_lora(model, ["0"], rank=2, alpha=4.0)
        >>> pairs = find_pairs(model)
        >>> with torch.no_grad():
        ...     _ = pairs[0].x.normal_()
        >>> params = [q for q in model.parameters() if q.requires_grad]
        >>> opts = {"sam": SAM(params, torch.optim.SGD, rho=0.05, lr=0.01),
        ...         "sgd": torch.optim.SGD(params, lr=0.01)}
        >>> state = [q.detach().clone() for q in params]
        >>> batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
        >>> beta = one_step_drift(model, pairs, params, opts, 0.01, state, batch)
        >>> isinstance(beta, float), all(torch.equal(q, s) for q, s in zip(params, state))
        (True, True)
    """
    with torch.no_grad():
        for q, s in zip(params, state):
            q.copy_(s)
    before = _abs_b(pairs)
    after = {}
    for method in ("sam", "sgd"):
        train_step(opts[method], model, _cross_entropy, batch)
        after[method] = _abs_b(pairs)
        with torch.no_grad():
            for q, s in zip(params, state):
                q.copy_(s)
    return (after["sgd"] - after["sam"]) / (lr * before)


def _per_state(cfg, lcfg, base_state, data, inputs: dict[float, torch.Tensor], states, device):
    """Mean one-step drift (SAM minus SGD) per outlier fraction, over the common states
    and the first ``lora_drift_batches`` minibatches (the same indices for every p)."""
    model, pairs, params = _lora_setup(cfg, lcfg, base_state, data, device)
    opts = {m: _lora_opt(cfg, m, params) for m in ("sam", "sgd")}
    batches = _lora_batches(cfg, data.x_train.shape[0], device)[: cfg.lora_drift_batches]
    out = {}
    for p, x in inputs.items():
        drifts = [
            one_step_drift(model, pairs, params, opts, cfg.lora_lr, state, (x[idx], data.y_train[idx]))
            for state in states
            for idx in batches
        ]  # fmt: skip
        out[p] = sum(drifts) / len(drifts)
    return out


def _lora_arm(cfg: OutlierInjectionConfig, summary: dict[str, float], series: dict) -> None:
    device = torch.device(cfg.device)
    lcfg = _lora_cfg(cfg)
    base_state = _pretrain(lcfg, device)
    data = load_digits(seed=cfg.seed, classes=lcfg.adapt_classes, device=device)
    gen = torch.Generator().manual_seed(cfg.seed)
    order, noise = draw_outliers(data.x_train.cpu(), gen)
    grad_norm, states, own_states = 0.0, [], []
    every = max(1, cfg.lora_steps // cfg.lora_drift_states)
    for p in cfg.lora_fractions:
        # p = 0 has no outliers whatever k: run once, report it for every k
        for k in cfg.lora_strengths if p > 0 else cfg.lora_strengths[:1]:
            x, _ = inject_outliers(data.x_train, p, k, order, noise)
            for method in ("sam", "sgd"):
                # the common states: along SAM's clean run
                top = p == max(cfg.lora_fractions) and k == max(cfg.lora_strengths)
                snap = every if method == "sam" and (p == 0 or top) else 0
                rate, g, b0, snaps = _lora_run(cfg, lcfg, method, base_state, data, x, device, snap)
                if snap and p == 0:
                    states = snaps
                elif snap:
                    own_states = snaps
                for kk in cfg.lora_strengths if p == 0 else (k,):
                    summary["lora_" + _key(method, p, kk)] = rate
                if method == "sgd":
                    grad_norm = max(grad_norm, g)
    series["lora_B0"] = b0
    top_p, top_k = max(cfg.lora_fractions), max(cfg.lora_strengths)
    for method in ("sam", "sgd"):
        summary[f"lora_gain_{method}"] = (
            summary["lora_" + _key(method, top_p, top_k)]
            - summary["lora_" + _key(method, 0.0, top_k)]
        )
    summary["lora_gain_sam_minus_sgd"] = summary["lora_gain_sam"] - summary["lora_gain_sgd"]
    summary["lora_sgd_drift_ratio"] = cfg.lora_lr * grad_norm / (2 * cfg.lora_rho)
    inputs = {p: inject_outliers(data.x_train, p, top_k, order, noise)[0] for p in cfg.lora_fractions}  # fmt: skip
    drift = _per_state(cfg, lcfg, base_state, data, inputs, states, device)
    for p, v in drift.items():
        summary[f"lora_drift@{p:g}"] = v
    summary["lora_drift_gain"] = drift[top_p] - drift[0.0]
    # diagnostic (not judged): the same one-step drift from states along SAM's own run
    # with outliers (p, k largest), with and without the outliers in the batch
    own = _per_state(cfg, lcfg, base_state, data, {0.0: inputs[0.0], top_p: inputs[top_p]}, own_states, device)  # fmt: skip
    summary["lora_drift_own@0"] = own[0.0]
    summary[f"lora_drift_own@{top_p:g}"] = own[top_p]


def run(cfg: OutlierInjectionConfig) -> RunResult:
    """One seed: SAM and SGD on every (p, k) grid point, toy arm and LoRA arm."""
    cfg.validate()
    t0 = time.perf_counter()
    summary: dict[str, float] = {}
    _toy_arm(cfg, summary)
    series: dict[str, object] = {
        "fractions": list(cfg.fractions),
        "strengths": list(cfg.strengths),
        "lora_fractions": list(cfg.lora_fractions),
        "lora_strengths": list(cfg.lora_strengths),
    }
    _lora_arm(cfg, summary, series)
    return make_result(EXPERIMENT, cfg, series, summary, time.perf_counter() - t0)


def _grid(stats: dict[str, Stat], prefix: str = "") -> tuple[list[str], list[str]]:
    pts = [k.split("@")[1].split(",") for k in stats if k.startswith(f"{prefix}rate_sam@")]
    ps = sorted({p for p, _ in pts}, key=float)
    ks = sorted({k for _, k in pts}, key=float)
    return ps, ks


def _decide_toy(stats: dict[str, Stat], prefix: str = "") -> tuple[bool, str, dict[str, float]]:
    ps, ks = _grid(stats, prefix)

    def s(method: str, p: str, k: str) -> Stat:
        return stats[f"{prefix}rate_{method}@{p},{k}"]

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
    statement = (
        f"SAM's balancing rate (log|B| per unit time) at p = {ps[-1]}, k = {ks[-1]}: "
        f"{top.fmt(3)} vs {base.fmt(3)} without outliers; non-decreasing along p: "
        f"{'yes' if along_p else 'no'}, along k: {'yes' if along_k else 'no'}; SGD's largest "
        f"|rate| {sgd_max:.3g} = {sgd_max / sam_max if sam_max > 0 else math.inf:.3f} of SAM's "
        f"largest {sam_max:.3g} (threshold {SGD_FRACTION})."
    )
    numbers = {"sam_top": top.mean, "sam_base": base.mean, "sgd_max": sgd_max}
    return holds, statement, {prefix + k: v for k, v in numbers.items()}


def _sign(s: Stat) -> int:
    """+1 when the CI over seeds (the value, with one seed) lies above 0, -1 below, else 0."""
    lo, hi = (s.ci_low, s.ci_high) if s.has_ci else (s.mean, s.mean)
    return 1 if lo > 0 else -1 if hi < 0 else 0


def _decide_lora(stats: dict[str, Stat]) -> tuple[bool | None, str, dict[str, float]]:
    ps, ks = _grid(stats, "lora_")

    def s(method: str, p: str, k: str) -> Stat:
        return stats[f"lora_rate_{method}@{p},{k}"]

    sam_max = max(abs(s("sam", p, k).mean) for p in ps for k in ks)
    sgd_max = max(abs(s("sgd", p, k).mean) for p in ps for k in ks)
    sgd_flat = sgd_max < SGD_FRACTION * sam_max
    gain, drift = stats["lora_gain_sam_minus_sgd"], stats["lora_drift_gain"]
    signs = (_sign(gain), _sign(drift))
    holds: bool | None
    if not sgd_flat or -1 in signs:
        holds = False
    elif signs == (1, 1):
        holds = True
    else:
        holds = None
    ratio = sgd_max / sam_max if sam_max > 0 else math.inf
    drifts = ", ".join(f"p = {p}: {stats[f'lora_drift@{p}'].fmt(3)}" for p in ps)
    statement = (
        f"paired per seed (same base, adapters, minibatches): end-of-run rate gain "
        f"(p = {ps[-1]}, k = {ks[-1]} minus p = 0) of SAM minus that of SGD {gain.fmt(3)}; "
        f"per-state one-step drift SAM minus SGD at k = {ks[-1]} ({drifts}), gain over p = 0 "
        f"{drift.fmt(3)}; SAM's rate {s('sam', ps[-1], ks[-1]).fmt(3)} vs "
        f"{s('sam', ps[0], ks[-1]).fmt(3)} without outliers; SGD's largest |rate| "
        f"{sgd_max:.3g} = {ratio:.3f} of SAM's largest |rate| {sam_max:.3g} (threshold "
        f"{SGD_FRACTION}); eta|g|/(2 rho) = {stats['lora_sgd_drift_ratio'].fmt(2)}."
    )
    numbers = {
        "lora_gain_sam_minus_sgd": gain.mean,
        "lora_drift_gain": drift.mean,
        "lora_sgd_max": sgd_max,
    }
    return holds, statement, numbers


def decide(stats: dict[str, Stat]) -> Verdict:
    """Supported when every arm in ``stats`` is (NOP toy always; OP toy and LoRA when
    present), not supported when any arm is not, inconclusive otherwise."""
    label = {True: "supported", False: "not supported", None: "inconclusive"}
    arms: list[tuple[str, bool | None, str, dict[str, float]]] = []
    arms.append(("NOP toy", *_decide_toy(stats)))
    if any(k.startswith("op_rate_sam@") for k in stats):
        arms.append(("OP toy", *_decide_toy(stats, "op_")))
    if any(k.startswith("lora_rate_sam@") for k in stats):
        arms.append(("LoRA on digits", *_decide_lora(stats)))
    verdicts = [held for _, held, _, _ in arms]
    holds: bool | None
    if any(v is False for v in verdicts):
        holds = False
    elif all(v is True for v in verdicts):
        holds = True
    else:
        holds = None
    return Verdict(
        holds=holds,
        statement=" ".join(f"{name} ({label[held]}): {text}" for name, held, text, _ in arms),
        numbers={k: v for _, _, _, nums in arms for k, v in nums.items()},
    )


def _setting(cfg: OutlierInjectionConfig) -> str:
    return (
        f"Toy arms: the paper's NOP and OP toys, base noise a = {cfg.noise:g}, outliers with "
        f"probability p in {list(cfg.fractions)} scaling the noise by k in "
        f"{list(cfg.strengths)}; SAM (rho {_RHO:g} on NOP, {_OP_RHO:g} on OP, the paper's) and "
        f"SGD, lr {cfg.lr:g}, {cfg.steps} steps, {cfg.runs} noise streams per point. "
        f"LoRA arm: MLP 64-{cfg.lora_hidden}-{cfg.lora_hidden}-5 pretrained on digits 0-4 "
        f"({cfg.lora_pretrain_epochs} Adam epochs), frozen; LoRA (rank {cfg.lora_rank}, alpha "
        f"{cfg.lora_alpha:g}, A scaled by {cfg.lora_init_scale:g} at the start) on layer(s) "
        f"{list(cfg.lora_targets)}, trained on digits 5-9 whose training inputs have a fraction "
        f"p in {list(cfg.lora_fractions)} of input-noise outliers x + k sigma eps, k in "
        f"{list(cfg.lora_strengths)} (main and only outlier kind; labels clean); SAM (rho "
        f"{cfg.lora_rho:g}, around SGD) and SGD, lr {cfg.lora_lr:g}, {cfg.lora_steps} steps on "
        f"fixed minibatches of {cfg.lora_batch_size}; |B| summed over adapted layers."
    )


def _plot(report, out_dir):
    from sharpkit.plotting.experiments.outlier_injection import plot

    return plot(report, out_dir)


EXPERIMENT = Experiment(
    name="outlier_injection",
    title="Outlier injection: data-responsive balancing",
    claim=(
        "SAM's balancing of two-factor problems speeds up with the fraction p and strength k of "
        "outliers in the data (NOP and OP toys, and LoRA on the digits); SGD does not respond."
    ),
    source="Li, Zhang, He (NeurIPS 2024), data-responsiveness of SAM's implicit regularisation (arXiv:2410.14802); docs/theory.md.",
    config_cls=OutlierInjectionConfig,
    scales={
        "test": OutlierInjectionConfig(
            fractions=(0.0, 0.3),
            strengths=(1.0, 10.0),
            steps=600,
            runs=4,
            lora_fractions=(0.0, 0.3),
            lora_strengths=(2.0, 4.0),
            lora_pretrain_epochs=100,
            lora_steps=200,
            lora_drift_states=2,
            lora_drift_batches=2,
        ),
        "small": OutlierInjectionConfig(),
        "large": OutlierInjectionConfig(
            fractions=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5),
            strengths=(1.0, 2.0, 3.0, 5.0, 10.0),
            lr=1e-4,
            steps=50_000,
            runs=64,
            lora_fractions=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5),
            lora_strengths=(0.5, 1.0, 2.0, 3.0, 4.0, 6.0),
            lora_hidden=256,
            lora_pretrain_epochs=1000,
            lora_lr=5e-4,
            lora_steps=10_000,
        ),
    },
    seeds={"test": 1, "small": 3, "large": 8},
    run=run,
    decide=decide,
    plot=_plot,
    setting=_setting,
)
