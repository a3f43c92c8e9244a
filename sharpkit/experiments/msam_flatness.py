r"""Experiment 6: mSAM's flatness and accuracy against SAM (Behdin et al. 2023).

**Claim.** Averaging the perturbed gradients of ``m`` micro-batches, each with
its own SAM perturbation (mSAM), (a) reaches flatter minima than SAM, flatness
growing with ``m``, and (b) generalises better than SAM. The two parts are judged
on their own.

**Setting.** A small ReLU MLP on scikit-learn's bundled digits
(:func:`sharpkit.data.load_digits`) with a fraction ``label_noise`` of the
training labels corrupted (a setting where SAM is expected to help: Foret et al.
report SAM's robustness to label noise). The same initialisation, minibatch
order, epochs, batch size, learning rate and radius for every method: SGD (the
reference for "SAM helps"), sharpkit's :class:`~sharpkit.optim.SAM` and
:class:`~sharpkit.optim.MSAM` with ``m`` in ``micro_batches``, all on a plain SGD
base. Every ``check_every`` steps the full training loss is evaluated and the
weights are kept.

**Measured.** (a) Sharpness *at equal training loss*: the level
:math:`L^\star` is the highest final training loss among the methods (the level
every method reaches); each method is measured at its first checkpoint with
training loss :math:`\le L^\star` (``loss_at_<m>`` records it):
:math:`\lambda_{\max}` by Lanczos (:func:`sharpkit.curvature.eigenvalues`) and
:math:`\mathrm{tr}(H)` by Hutch++ (:func:`sharpkit.curvature.trace`) of the
training loss (eval mode, float64). The Spearman rank correlation between the
position in the order SAM, mSAM(m ascending) and the sharpness, *without SGD*
(``spearman_lambda``, ``spearman_trace``; -1 = the claimed ordering exactly).
(b) Test accuracy after the full budget, ``acc_<m>``; the paired differences
``acc_sam_minus_sgd`` (the positive control) and ``acc_msam_minus_sam`` (mSAM
averaged over the values of ``m``, minus SAM; one contrast fixed in advance).

**Decision rule** (fixed before the runs; 95% CIs over seeds).
Flatness: supported when both Spearman CIs lie below 0, not supported when either
lies above 0, inconclusive otherwise. Accuracy: only judged where SAM helps at all
(CI of ``acc_sam_minus_sgd`` above 0; otherwise inconclusive, "no setting where
SAM helps"); then supported when the CI of ``acc_msam_minus_sam`` lies above 0,
not supported when below 0, inconclusive otherwise.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from sharpkit.curvature import HessianOperator, eigenvalues, trace
from sharpkit.data import load_digits
from sharpkit.optim import MSAM, SAM

from ._core import Experiment, ExperimentConfig, RunResult, Stat, Verdict, check, make_result
from ._train import train_step

__all__ = ["EXPERIMENT", "MSAMFlatnessConfig", "decide", "run"]


@dataclass(frozen=True)
class MSAMFlatnessConfig(ExperimentConfig):
    """Config of the mSAM flatness experiment.

    Attributes:
        hidden: width of the MLP's two hidden layers.
        epochs: passes over the training set per method.
        batch_size: mini-batch size (each mSAM micro-batch holds ``batch_size / m``).
        lr: SGD learning rate.
        rho: SAM/mSAM radius.
        micro_batches: the values of ``m`` for mSAM (each >= 2, <= batch_size).
        trace_samples: Hutch++ budget (Hessian-vector products).
        label_noise: fraction of corrupted training labels.
        check_every: steps between checkpoints of the training loss.
    """

    hidden: int = 32
    epochs: int = 15
    batch_size: int = 64
    lr: float = 0.1
    rho: float = 0.1
    micro_batches: tuple[int, ...] = (2, 4, 8)
    trace_samples: int = 90
    label_noise: float = 0.2
    check_every: int = 5

    def validate(self) -> None:
        super().validate()
        check(self.hidden >= 1, f"hidden: must be >= 1, got {self.hidden}")
        check(self.epochs >= 1, f"epochs: must be >= 1, got {self.epochs}")
        check(self.batch_size >= 2, f"batch_size: must be >= 2, got {self.batch_size}")
        check(self.lr > 0, f"lr: must be positive, got {self.lr}")
        check(self.rho > 0, f"rho: must be positive, got {self.rho}")
        check(len(self.micro_batches) >= 1, "micro_batches: need at least one value")
        check(
            all(2 <= m <= self.batch_size for m in self.micro_batches),
            f"micro_batches: each must lie in [2, batch_size], got {self.micro_batches}",
        )
        check(self.trace_samples >= 9, f"trace_samples: need >= 9, got {self.trace_samples}")
        check(0 <= self.label_noise < 1, f"label_noise: must lie in [0, 1), got {self.label_noise}")
        check(self.check_every >= 1, f"check_every: must be >= 1, got {self.check_every}")


def _methods(cfg: MSAMFlatnessConfig) -> list[str]:
    return ["sgd", "sam"] + [f"msam{m}" for m in cfg.micro_batches]


def _mlp(cfg: MSAMFlatnessConfig, d_in: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d_in, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(),
        nn.Linear(cfg.hidden, classes),
    )  # fmt: skip


def _optimizer(cfg: MSAMFlatnessConfig, method: str, model: nn.Module):
    if method == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr)
    if method == "sam":
        return SAM(model.parameters(), torch.optim.SGD, rho=cfg.rho, lr=cfg.lr)
    m = int(method.removeprefix("msam"))
    return MSAM(model.parameters(), torch.optim.SGD, rho=cfg.rho, micro_batches=m,
                model=model, lr=cfg.lr)  # fmt: skip


def run(cfg: MSAMFlatnessConfig) -> RunResult:
    """One seed: train every method from the same start on the same batches, keep
    checkpoints, then measure sharpness at equal training loss and accuracy at the end."""
    cfg.validate()
    t0 = time.perf_counter()
    device = torch.device(cfg.device)
    data = load_digits(seed=cfg.seed, label_noise=cfg.label_noise, device=device)
    torch.manual_seed(cfg.seed)
    init = _mlp(cfg, data.num_features, data.num_classes).to(device)
    ce = nn.CrossEntropyLoss()
    n = len(data.x_train)
    order = [
        torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + e))
        for e in range(cfg.epochs)
    ]
    methods = _methods(cfg)
    models, checkpoints = {}, {}
    summary: dict[str, float] = {}
    for method in methods:
        model = _mlp(cfg, data.num_features, data.num_classes).to(device)
        model.load_state_dict(init.state_dict())
        opt = _optimizer(cfg, method, model)
        kept: list[tuple[float, dict]] = []
        step = 0
        for perm in order:
            for start in range(0, n - cfg.batch_size + 1, cfg.batch_size):  # full batches only
                idx = perm[start : start + cfg.batch_size].to(device)
                x, y = data.x_train[idx], data.y_train[idx]
                train_step(opt, model, lambda net, b: ce(net(b[0]), b[1]), (x, y))
                step += 1
                if step % cfg.check_every == 0:
                    with torch.no_grad():
                        loss = float(ce(model(data.x_train), data.y_train))
                    kept.append((loss, {k: v.clone() for k, v in model.state_dict().items()}))
        with torch.no_grad():
            final = float(ce(model(data.x_train), data.y_train))
            acc = (model(data.x_test).argmax(1) == data.y_test).float().mean()
        kept.append((final, {k: v.clone() for k, v in model.state_dict().items()}))
        models[method], checkpoints[method] = model, kept
        summary[f"acc_{method}"] = float(acc)
        summary[f"final_loss_{method}"] = final
    level = max(summary[f"final_loss_{m}"] for m in methods)  # every method reaches it
    summary["loss_level"] = level
    for method in methods:
        loss, state = next(c for c in checkpoints[method] if c[0] <= level)
        model = models[method]
        model.load_state_dict(state)
        model.eval()
        op = HessianOperator(model, ce, (data.x_train, data.y_train), dtype=torch.float64)
        lam = eigenvalues(op, k=1, tol=1e-4, seed=cfg.seed)
        tr = trace(op, method="hutch++", num_samples=cfg.trace_samples, seed=cfg.seed)
        summary[f"loss_at_{method}"] = loss
        summary[f"lambda_max_{method}"] = float(lam.eigenvalues[0])
        summary[f"trace_{method}"] = float(tr.estimate)
        summary[f"trace_stderr_{method}"] = float(tr.stderr)
    family = [m for m in methods if m != "sgd"]  # SAM, mSAM(m ascending)
    positions = np.arange(len(family))
    for key, name in (("lambda_max", "spearman_lambda"), ("trace", "spearman_trace")):
        values = [summary[f"{key}_{m}"] for m in family]
        rho = spearmanr(positions, values).statistic if len(family) > 2 else np.sign(
            values[1] - values[0]
        )  # fmt: skip
        summary[name] = float(rho)
    summary["lambda_ratio_sam_sgd"] = summary["lambda_max_sam"] / summary["lambda_max_sgd"]
    summary["acc_sam_minus_sgd"] = summary["acc_sam"] - summary["acc_sgd"]
    msam = [m for m in family if m != "sam"]
    summary["acc_msam_minus_sam"] = (
        sum(summary[f"acc_{m}"] for m in msam) / len(msam) - summary["acc_sam"]
    )
    return make_result(EXPERIMENT, cfg, {"methods": methods}, summary, time.perf_counter() - t0)


def _side(s: Stat) -> bool | None:
    """True if the CI lies above 0, False if below, None if it contains 0."""
    lo, hi = (s.ci_low, s.ci_high) if s.has_ci else (s.mean, s.mean)
    return True if lo > 0 else False if hi < 0 else None


def decide(stats: dict[str, Stat]) -> Verdict:
    below = {k: _side(stats[k]) for k in ("spearman_lambda", "spearman_trace")}
    flat = {k: (None if v is None else not v) for k, v in below.items()}  # claim: < 0
    flatness = Verdict.combine(flat)
    helps = _side(stats["acc_sam_minus_sgd"])
    accuracy = _side(stats["acc_msam_minus_sam"]) if helps else None
    methods = [k.removeprefix("lambda_max_") for k in stats if k.startswith("lambda_max_")]

    def row(prefix: str) -> str:
        return ", ".join(f"{m} {stats[f'{prefix}_{m}'].mean:.3g}" for m in methods)

    sam_helps = {True: "yes", False: "no, SAM is worse", None: "not resolved"}[helps]
    parts = {"flatness": flatness, "accuracy": accuracy}
    return Verdict(
        holds=Verdict.combine(parts),
        statement=(
            f"Flatness at equal training loss (level {stats['loss_level'].fmt()}): Spearman "
            f"correlation of sharpness with the order SAM, mSAM(m ascending), without SGD: "
            f"lambda_max {stats['spearman_lambda'].fmt(2)}, trace "
            f"{stats['spearman_trace'].fmt(2)} (claim: < 0); mean lambda_max: "
            f"{row('lambda_max')}; mean tr(H): {row('trace')}. Accuracy: SAM - SGD "
            f"{stats['acc_sam_minus_sgd'].fmt()} (SAM helps: {sam_helps}); mSAM (mean over m) "
            f"- SAM {stats['acc_msam_minus_sam'].fmt()} (claim: > 0); test accuracy: "
            f"{row('acc')}."
        ),
        numbers={
            "spearman_lambda": stats["spearman_lambda"].mean,
            "spearman_trace": stats["spearman_trace"].mean,
            "acc_sam_minus_sgd": stats["acc_sam_minus_sgd"].mean,
            "acc_msam_minus_sam": stats["acc_msam_minus_sam"].mean,
        },
        parts=parts,
    )


def _setting(cfg: MSAMFlatnessConfig) -> str:
    return (
        f"Digits with {cfg.label_noise:.0%} label noise, MLP 64-{cfg.hidden}-{cfg.hidden}-10 "
        f"(ReLU); {cfg.epochs} epochs, batch "
        f"{cfg.batch_size}, lr {cfg.lr:g}, rho {cfg.rho:g}; SGD, SAM, mSAM m in "
        f"{list(cfg.micro_batches)}; lambda_max (Lanczos) and tr(H) (Hutch++, "
        f"{cfg.trace_samples} products) of the training loss in float64, each method at its "
        f"first checkpoint (every {cfg.check_every} steps) at or below the highest final "
        f"training loss among the methods; test accuracy after the full budget."
    )


def _plot(report, out_dir):
    from sharpkit.plotting.experiments.msam_flatness import plot

    return plot(report, out_dir)


EXPERIMENT = Experiment(
    name="msam_flatness",
    title="mSAM vs SAM: flatness and accuracy",
    claim=(
        "mSAM reaches flatter minima than SAM, flatter as the number m of micro-batches "
        "grows; and it generalises better than SAM."
    ),
    source="Behdin et al. (2023), mSAM: Micro-Batch-Averaged Sharpness-Aware Minimization.",
    config_cls=MSAMFlatnessConfig,
    scales={
        "test": MSAMFlatnessConfig(epochs=3, micro_batches=(4,), trace_samples=30),
        "small": MSAMFlatnessConfig(epochs=30),
        "large": MSAMFlatnessConfig(hidden=256, epochs=60, micro_batches=(2, 4, 8, 16)),
    },
    seeds={"test": 1, "small": 5, "large": 10},
    run=run,
    decide=decide,
    plot=_plot,
    setting=_setting,
    bounds={  # first match wins: the differences before the accuracies
        "acc_*_minus_*": (-1.0, 1.0),
        "acc_*": (0.0, 1.0),
        "spearman_*": (-1.0, 1.0),
        "*loss*": (0.0, math.inf),
        "trace_stderr_*": (0.0, math.inf),
    },
)
