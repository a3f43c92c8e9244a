r"""Experiment 6: mSAM finds flatter minima than SAM, and SAM than SGD (Behdin et al. 2023).

**Claim.** Averaging the perturbed gradients of ``m`` micro-batches, each with
its own SAM perturbation (mSAM), lowers the sharpness of the solution found
further than SAM does, and more so as ``m`` grows: sharpness
SGD > SAM > mSAM(2) > mSAM(4) > mSAM(8).

**Setting.** A small ReLU MLP on scikit-learn's bundled digits
(:func:`sharpkit.data.load_digits`), the same initialisation, minibatch order,
epochs, batch size, learning rate and radius for every method: SGD (the
baseline), sharpkit's :class:`~sharpkit.optim.SAM` and
:class:`~sharpkit.optim.MSAM` with ``m`` in ``micro_batches``, all on a plain
SGD base. At the end, on the full training set (eval mode, float64):
:math:`\lambda_{\max}` by Lanczos (:func:`sharpkit.curvature.eigenvalues`) and
:math:`\mathrm{tr}(H)` by Hutch++ with its standard error
(:func:`sharpkit.curvature.trace`); test accuracy.

**Measured.** Per seed and method ``lambda_max_<m>``, ``trace_<m>`` (and its
standard error), ``acc_<m>``; the Spearman rank correlation between the method's
position in the order SGD, SAM, mSAM(2), mSAM(4), mSAM(8) and its sharpness
(``spearman_lambda``, ``spearman_trace``; -1 = the claimed ordering exactly).

**Verdict.** Supported when the 95% CI over seeds of both Spearman correlations
lies below 0 (sharpness decreases along the claimed order beyond seed noise),
refuted when either CI lies above 0, inconclusive otherwise. The rank
correlation is the claim's own content (an ordering), free of a tuned threshold.
"""

from __future__ import annotations

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

__all__ = ["EXPERIMENT", "MSAMFlatnessConfig", "run"]


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
    """

    hidden: int = 32
    epochs: int = 15
    batch_size: int = 64
    lr: float = 0.1
    rho: float = 0.1
    micro_batches: tuple[int, ...] = (2, 4, 8)
    trace_samples: int = 90

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


def _methods(cfg: MSAMFlatnessConfig) -> list[str]:
    return ["sgd", "sam"] + [f"msam{m}" for m in cfg.micro_batches]


def _mlp(cfg: MSAMFlatnessConfig, d_in: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d_in, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(),
        nn.Linear(cfg.hidden, classes),
    )  # fmt: skip


def run(cfg: MSAMFlatnessConfig) -> RunResult:
    """One seed: train every method from the same start on the same batches, then measure."""
    cfg.validate()
    t0 = time.perf_counter()
    device = torch.device(cfg.device)
    data = load_digits(seed=cfg.seed, device=device)
    torch.manual_seed(cfg.seed)
    init = _mlp(cfg, data.num_features, data.num_classes).to(device)
    ce = nn.CrossEntropyLoss()
    n = len(data.x_train)
    order = [
        torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + e))
        for e in range(cfg.epochs)
    ]
    summary: dict[str, float] = {}
    for method in _methods(cfg):
        model = _mlp(cfg, data.num_features, data.num_classes).to(device)
        model.load_state_dict(init.state_dict())
        if method == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        elif method == "sam":
            opt = SAM(model.parameters(), torch.optim.SGD, rho=cfg.rho, lr=cfg.lr)
        else:
            m = int(method.removeprefix("msam"))
            opt = MSAM(model.parameters(), torch.optim.SGD, rho=cfg.rho, micro_batches=m,
                       model=model, lr=cfg.lr)  # fmt: skip
        for perm in order:
            for start in range(0, n - cfg.batch_size + 1, cfg.batch_size):  # full batches only
                idx = perm[start : start + cfg.batch_size].to(device)
                x, y = data.x_train[idx], data.y_train[idx]
                train_step(opt, model, lambda net, b: ce(net(b[0]), b[1]), (x, y))
        model.eval()
        with torch.no_grad():
            acc = (model(data.x_test).argmax(1) == data.y_test).float().mean()
        op = HessianOperator(model, ce, (data.x_train, data.y_train), dtype=torch.float64)
        lam = eigenvalues(op, k=1, tol=1e-4, seed=cfg.seed)
        tr = trace(op, method="hutch++", num_samples=cfg.trace_samples, seed=cfg.seed)
        summary[f"lambda_max_{method}"] = float(lam.eigenvalues[0])
        summary[f"trace_{method}"] = float(tr.estimate)
        summary[f"trace_stderr_{method}"] = float(tr.stderr)
        summary[f"acc_{method}"] = float(acc)
    positions = np.arange(len(_methods(cfg)))
    for key, name in (("lambda_max", "spearman_lambda"), ("trace", "spearman_trace")):
        values = [summary[f"{key}_{m}"] for m in _methods(cfg)]
        summary[name] = float(spearmanr(positions, values).statistic)
    return make_result(
        EXPERIMENT, cfg, {"methods": _methods(cfg)}, summary, time.perf_counter() - t0
    )


def decide(stats: dict[str, Stat]) -> Verdict:
    parts = {}
    for key in ("spearman_lambda", "spearman_trace"):
        s = stats[key]
        lo, hi = (s.ci_low, s.ci_high) if s.has_ci else (s.mean, s.mean)
        parts[key] = True if hi < 0 else False if lo > 0 else None
    if all(v is True for v in parts.values()):
        holds: bool | None = True
    elif any(v is False for v in parts.values()):
        holds = False
    else:
        holds = None
    methods = [k.removeprefix("lambda_max_") for k in stats if k.startswith("lambda_max_")]

    def row(prefix: str) -> str:
        return ", ".join(f"{m} {stats[f'{prefix}_{m}'].mean:.3g}" for m in methods)

    def ci(key: str) -> str:
        s = stats[key]
        return f"{s.mean:.2f}" + (f" [{s.ci_low:.2f}, {s.ci_high:.2f}]" if s.has_ci else "")

    return Verdict(
        holds=holds,
        statement=(
            f"Spearman correlation of sharpness with the order SGD, SAM, mSAM(m ascending): "
            f"lambda_max {ci('spearman_lambda')}, trace {ci('spearman_trace')} (claim: < 0). "
            f"Mean lambda_max: {row('lambda_max')}; mean tr(H): {row('trace')}; test accuracy: "
            f"{row('acc')}."
        ),
        numbers={
            "spearman_lambda": stats["spearman_lambda"].mean,
            "spearman_trace": stats["spearman_trace"].mean,
        },
    )


def _setting(cfg: MSAMFlatnessConfig) -> str:
    return (
        f"Digits, MLP 64-{cfg.hidden}-{cfg.hidden}-10 (ReLU); {cfg.epochs} epochs, batch "
        f"{cfg.batch_size}, lr {cfg.lr:g}, rho {cfg.rho:g}; SGD, SAM, mSAM m in "
        f"{list(cfg.micro_batches)}; lambda_max (Lanczos) and tr(H) (Hutch++, "
        f"{cfg.trace_samples} products) of the training loss in float64."
    )


def _plot(report, out_dir):
    from sharpkit.plotting.experiments.msam_flatness import plot

    return plot(report, out_dir)


EXPERIMENT = Experiment(
    name="msam_flatness",
    title="mSAM flatness ordering",
    claim="Sharpness of the solution: SGD > SAM > mSAM, decreasing in the number m of micro-batches.",
    source="Behdin et al. (2023), mSAM: Micro-Batch-Averaged Sharpness-Aware Minimization; PAPERS.md section 2.",
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
)
