r"""Experiment 7: does delta-SAM approximate the per-instance target better than SAM?

**Claim** (Zhou, Liu, Zhang, Chen, Findings of EMNLP 2022, as reconstructed by
sharpkit, see :mod:`sharpkit.optim.delta_sam`). The ideal per-instance update
:math:`G_{PI} = \frac1n\sum_i \nabla l_i(w + \rho g_i/\|g_i\|)` gives every example
its own worst-case perturbation; SAM shares one. delta-SAM reweights the shared
perturbation towards the examples SAM leaves unguarded and so approximates
:math:`G_{PI}` better, more visibly as label noise makes the examples disagree;
this should help under label noise.

**Setting.** Scikit-learn's digits with a fraction ``p`` of training labels
corrupted (:func:`sharpkit.data.load_digits`), a small tanh MLP in float64.
(a) *Approximation*: after ``warm_epochs`` of SGD on the noisy data, on
``batches`` mini-batches: :math:`\cos(G - g, G_{PI} - g)` (:func:`~sharpkit.per_example.perturbation_cosine`;
the part of the update the perturbation changes, :math:`g` the clean gradient)
for SAM (uniform weights) and delta-SAM (exact statistics, default temperature),
:math:`G_{PI}` exact (:func:`~sharpkit.per_example.per_instance_target`).
(b) *Training*: SGD, SAM and delta-SAM from the same start and batches for
``epochs``; test accuracy (clean test labels).

**Measured.** ``cos_sam@p``, ``cos_dsam@p`` and their paired difference
``gap@p`` (mean over batches); ``acc_<method>@p``.

**Verdict.** Supported when the CI over seeds of ``gap@p`` lies above 0 at every
noise level; refuted when it lies below 0 at any; inconclusive otherwise.
Accuracy is reported beside it, not judged: the paper's accuracy gains are on
large language models, not reproducible at this scale.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from sharpkit.data import load_digits
from sharpkit.optim import SAM, DeltaSAM, UniformWeights
from sharpkit.per_example import (
    per_example_gradients,
    per_instance_target,
    perturbation_cosine,
)

from ._core import Experiment, ExperimentConfig, RunResult, Stat, Verdict, check, make_result
from ._train import train_step

__all__ = ["EXPERIMENT", "DeltaSAMApproxConfig", "run"]


@dataclass(frozen=True)
class DeltaSAMApproxConfig(ExperimentConfig):
    """Config of the delta-SAM approximation experiment.

    Attributes:
        noises: label-noise fractions ``p`` (each in [0, 1)).
        hidden: width of the MLP's hidden layer.
        rho: perturbation radius.
        batch_size: mini-batch size.
        warm_epochs: SGD epochs before the approximation is measured.
        batches: mini-batches the cosines are averaged over.
        epochs: training epochs per method in part (b).
        lr: SGD learning rate (all methods).
    """

    noises: tuple[float, ...] = (0.0, 0.2, 0.4)
    hidden: int = 32
    rho: float = 0.05
    batch_size: int = 64
    warm_epochs: int = 5
    batches: int = 8
    epochs: int = 10
    lr: float = 0.1

    def validate(self) -> None:
        super().validate()
        check(len(self.noises) >= 1, "noises: need at least one level")
        check(all(0 <= p < 1 for p in self.noises), f"noises: each must lie in [0, 1), got {self.noises}")  # fmt: skip
        check(self.hidden >= 1, f"hidden: must be >= 1, got {self.hidden}")
        check(self.rho > 0, f"rho: must be positive, got {self.rho}")
        check(self.batch_size >= 2, f"batch_size: must be >= 2, got {self.batch_size}")
        check(self.warm_epochs >= 0, f"warm_epochs: must be >= 0, got {self.warm_epochs}")
        check(self.batches >= 1, f"batches: must be >= 1, got {self.batches}")
        check(self.epochs >= 1, f"epochs: must be >= 1, got {self.epochs}")
        check(self.lr > 0, f"lr: must be positive, got {self.lr}")


def _per_example_ce(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _mean_ce(model: nn.Module, batch) -> torch.Tensor:
    return _per_example_ce(model, batch).mean()


def _mlp(cfg: DeltaSAMApproxConfig, d_in: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, classes)).double()  # fmt: skip


def _batches(n: int, cfg: DeltaSAMApproxConfig, seed: int) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [perm[s : s + cfg.batch_size] for s in range(0, n - cfg.batch_size + 1, cfg.batch_size)]


def _train(model: nn.Module, method: str, data, cfg: DeltaSAMApproxConfig, epochs: int) -> None:
    params = list(model.parameters())
    if method == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=cfg.lr)
    elif method == "sam":
        opt = SAM(params, torch.optim.SGD, rho=cfg.rho, lr=cfg.lr)
    else:
        opt = DeltaSAM(params, torch.optim.SGD, rho=cfg.rho, model=model, mode="exact", lr=cfg.lr)
    for epoch in range(epochs):
        for idx in _batches(len(data.x_train), cfg, cfg.seed * 1000 + epoch):
            batch = (data.x_train[idx], data.y_train[idx])
            loss_fn = _per_example_ce if method == "dsam" else _mean_ce
            train_step(opt, model, loss_fn, batch)


def _cosine(model: nn.Module, batch, g_pi, g_clean, cfg, **kw) -> float:
    saved = [p.detach().clone() for p in model.parameters()]
    opt = DeltaSAM(model.parameters(), torch.optim.SGD, rho=cfg.rho, model=model, mode="exact",
                   lr=0.0, **kw)  # fmt: skip
    opt.step(loss_fn=_per_example_ce, batch=batch)  # lr = 0: weights stay, G is left in .grad
    cos = perturbation_cosine([p.grad for p in model.parameters()], g_pi, g_clean)
    with torch.no_grad():
        for p, s in zip(model.parameters(), saved):
            p.copy_(s)
            p.grad = None
    return cos


def run(cfg: DeltaSAMApproxConfig) -> RunResult:
    """One seed: per noise level, the approximation cosines and short training runs."""
    cfg.validate()
    t0 = time.perf_counter()
    summary: dict[str, float] = {}
    for p in cfg.noises:
        data = load_digits(seed=cfg.seed, label_noise=p, dtype=torch.float64)
        torch.manual_seed(cfg.seed)
        init = _mlp(cfg, data.num_features, data.num_classes)
        net = _mlp(cfg, data.num_features, data.num_classes)
        net.load_state_dict(init.state_dict())
        _train(net, "sgd", data, cfg, cfg.warm_epochs)
        cs, cd = [], []
        for idx in _batches(len(data.x_train), cfg, cfg.seed + 7)[: cfg.batches]:
            batch = (data.x_train[idx], data.y_train[idx])
            _, grads = per_example_gradients(net, _per_example_ce, batch)
            g_clean = [t.mean(0) for t in grads]
            g_pi = per_instance_target(net, _per_example_ce, batch, rho=cfg.rho)
            cs.append(_cosine(net, batch, g_pi, g_clean, cfg, weighting=UniformWeights()))
            cd.append(_cosine(net, batch, g_pi, g_clean, cfg))
        summary[f"cos_sam@{p:g}"] = sum(cs) / len(cs)
        summary[f"cos_dsam@{p:g}"] = sum(cd) / len(cd)
        summary[f"gap@{p:g}"] = summary[f"cos_dsam@{p:g}"] - summary[f"cos_sam@{p:g}"]
        for method in ("sgd", "sam", "dsam"):
            model = _mlp(cfg, data.num_features, data.num_classes)
            model.load_state_dict(init.state_dict())
            _train(model, method, data, cfg, cfg.epochs)
            with torch.no_grad():
                acc = (model(data.x_test).argmax(1) == data.y_test).double().mean()
            summary[f"acc_{method}@{p:g}"] = float(acc)
    return make_result(EXPERIMENT, cfg, {"noises": list(cfg.noises)}, summary, time.perf_counter() - t0)  # fmt: skip


def decide(stats: dict[str, Stat]) -> Verdict:
    noises = sorted({k.split("@")[1] for k in stats if k.startswith("gap@")}, key=float)
    verdicts = []
    for p in noises:
        s = stats[f"gap@{p}"]
        lo, hi = (s.ci_low, s.ci_high) if s.has_ci else (s.mean, s.mean)
        verdicts.append(True if lo > 0 else False if hi < 0 else None)
    if all(v is True for v in verdicts):
        holds: bool | None = True
    elif any(v is False for v in verdicts):
        holds = False
    else:
        holds = None

    def fmt(key: str) -> str:
        s = stats[key]
        return f"{s.mean:.3f}" + (f" [{s.ci_low:.3f}, {s.ci_high:.3f}]" if s.has_ci else "")

    cos = "; ".join(
        f"p = {p}: SAM {stats[f'cos_sam@{p}'].mean:.3f}, delta-SAM {stats[f'cos_dsam@{p}'].mean:.3f}, "
        f"gap {fmt(f'gap@{p}')}"
        for p in noises
    )
    acc = "; ".join(
        f"p = {p}: "
        + ", ".join(f"{m} {stats[f'acc_{m}@{p}'].mean:.3f}" for m in ("sgd", "sam", "dsam"))
        for p in noises
    )
    return Verdict(
        holds=holds,
        statement=f"cos(G - g, G_PI - g): {cos}. Test accuracy (SGD, SAM, delta-SAM): {acc}.",
        numbers={f"gap@{p}": stats[f"gap@{p}"].mean for p in noises},
    )


def _setting(cfg: DeltaSAMApproxConfig) -> str:
    return (
        f"Digits with label noise p in {list(cfg.noises)}, MLP 64-{cfg.hidden}-10 (tanh, float64), "
        f"rho {cfg.rho:g}, batch {cfg.batch_size}; cosines after {cfg.warm_epochs} SGD epochs on "
        f"{cfg.batches} batches (delta-SAM: exact statistics, default tau); training {cfg.epochs} "
        f"epochs, lr {cfg.lr:g}."
    )


def _plot(report, out_dir):
    from sharpkit.plotting.experiments.delta_sam_approx import plot

    return plot(report, out_dir)


EXPERIMENT = Experiment(
    name="delta_sam_approx",
    title="delta-SAM vs SAM: approximating the per-instance update",
    claim=(
        "delta-SAM's reweighted perturbation approximates the per-instance update G_PI better "
        "than SAM's shared one, as label noise grows."
    ),
    source="Zhou, Liu, Zhang, Chen (Findings of EMNLP 2022); sharpkit's reconstruction of the weighting; PAPERS.md section 3.",
    config_cls=DeltaSAMApproxConfig,
    scales={
        "test": DeltaSAMApproxConfig(noises=(0.0, 0.4), warm_epochs=2, batches=3, epochs=2),
        "small": DeltaSAMApproxConfig(batches=16),
        "large": DeltaSAMApproxConfig(
            noises=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5), hidden=128, batches=32, epochs=40
        ),
    },
    seeds={"test": 1, "small": 5, "large": 10},
    run=run,
    decide=decide,
    plot=_plot,
    setting=_setting,
)
