r"""Experiment 7: does delta-SAM approximate the per-instance target better than SAM?

**Claim** (Zhou, Liu, Zhang, Chen, Findings of EMNLP 2022, as reconstructed by
sharpkit, see :mod:`sharpkit.optim.delta_sam`). The ideal per-instance update
:math:`G_{PI} = \frac1n\sum_i \nabla l_i(w + \rho g_i/\|g_i\|)` gives every example
its own worst-case perturbation; SAM shares one. delta-SAM reweights the shared
perturbation towards the examples SAM leaves unguarded and so approximates
:math:`G_{PI}` better, more visibly as label noise makes the examples disagree.
*The paper's* part is the idea (one reweighted perturbation
:math:`e = \rho g_\lambda/\|g_\lambda\|`, :math:`g_\lambda = \sum_i\lambda_i g_i`,
unguarded examples up-weighted); *sharpkit's reconstruction* is the weighting
(:class:`~sharpkit.optim.delta_sam.UnguardednessSoftmax`, ``tau = 1``, the
default), since the paper's formula is not available to this project.

**Setting.** Two arms, the same protocol: a small tanh MLP in float64 trained
for ``warm_epochs`` of SGD on the noisy data, then ``batches`` mini-batches of
``batch_size``. *digits*: scikit-learn's digits (64-``hidden``-10) with a fraction
``p`` of training labels corrupted (:func:`sharpkit.data.load_digits`).
*clusters*: three Gaussian clusters in 20 dimensions (centres
:math:`N(0, 0.3^2 I)`, unit noise, 512 examples, a fraction ``p`` of labels
redrawn uniformly; 20-``hidden``-3), the setting of sharpkit's delta-SAM
benchmark (:func:`gaussian_clusters`). Per batch, with :math:`g` the clean
batch gradient and :math:`G_{PI}` exact
(:func:`~sharpkit.per_example.per_instance_target`), the cosine of the part
of the update the perturbation changes,
:math:`\cos(G - g, G_{PI} - g)` (:func:`~sharpkit.per_example.perturbation_cosine`;
full-gradient cosines are dominated by :math:`g` and say nothing), for

- SAM (uniform weights),
- delta-SAM (exact per-example statistics, ``tau = 1``),
- the **oracle ceiling** (an analysis tool, not a method,
  :func:`oracle_perturbation`): the perturbation in the span of the
  per-example gradients (signs unrestricted) whose first-order effect best
  matches the target, :math:`\min_\lambda \|H\rho g_\lambda/\|g_\lambda\| -
  (G_{PI} - g)\|` with exact Hessian-vector products of the batch loss,
  then evaluated exactly like the others. It bounds what *any* single
  reweighted perturbation could reach, to first order.

*Training* (digits arm only, reported, not judged): SGD, SAM and delta-SAM from
the same start and batches for ``epochs``; clean test accuracy.

**Measured.** ``<arm>_cos_<sam|dsam|oracle>@p`` (means over batches),
``<arm>_gap@p`` = delta-SAM minus SAM (paired per batch),
``<arm>_headroom@p`` = oracle minus SAM; ``acc_<method>@p`` (digits).

**Verdict**, fixed before the run. Per arm: supported when the CI over seeds of
``gap@p`` lies above 0 at every noise level; refuted when it lies below 0 at
any; inconclusive otherwise. Overall: supported when every arm is, not
supported when no arm is supported and one is refuted, and **setting-dependent**
(reported as inconclusive, the statement says which arm went which way) when
one arm is supported and another is not.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from sharpkit.data import load_digits
from sharpkit.optim import SAM, DeltaSAM, UniformWeights
from sharpkit.per_example import (
    per_example_gradients,
    per_instance_target,
    perturbation_cosine,
    perturbed_gradient,
)

from ._core import Experiment, ExperimentConfig, RunResult, Stat, Verdict, check, make_result
from ._train import train_step

__all__ = [
    "ARMS",
    "EXPERIMENT",
    "DeltaSAMApproxConfig",
    "gaussian_clusters",
    "oracle_perturbation",
    "run",
    "sphere_least_squares",
]

#: the two settings: scikit-learn digits and Gaussian clusters
ARMS = ("digits", "clusters")
_CLUSTER_N, _CLUSTER_DIM, _CLUSTER_CLASSES = 512, 20, 3


@dataclass(frozen=True)
class DeltaSAMApproxConfig(ExperimentConfig):
    """Config of the delta-SAM approximation experiment.

    Attributes:
        noises: label-noise fractions ``p`` (each in [0, 1)).
        arms: the settings, a subset of ``("digits", "clusters")``.
        hidden: width of the MLP's hidden layer.
        rho: perturbation radius.
        batch_size: mini-batch size.
        warm_epochs: SGD epochs before the approximation is measured.
        batches: mini-batches the cosines are averaged over (per arm and noise).
        epochs: training epochs per method (digits arm; 0 skips the training part).
        lr: SGD learning rate (all methods).
    """

    noises: tuple[float, ...] = (0.0, 0.2, 0.4)
    arms: tuple[str, ...] = ARMS
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
        check(
            len(self.arms) >= 1 and len(set(self.arms)) == len(self.arms)
            and all(a in ARMS for a in self.arms),
            f"arms: need distinct arms among {ARMS}, got {self.arms}",
        )  # fmt: skip
        check(self.hidden >= 1, f"hidden: must be >= 1, got {self.hidden}")
        check(self.rho > 0, f"rho: must be positive, got {self.rho}")
        check(2 <= self.batch_size <= _CLUSTER_N, f"batch_size: must lie in [2, {_CLUSTER_N}], got {self.batch_size}")  # fmt: skip
        check(self.warm_epochs >= 0, f"warm_epochs: must be >= 0, got {self.warm_epochs}")
        check(self.batches >= 1, f"batches: must be >= 1, got {self.batches}")
        check(self.epochs >= 0, f"epochs: must be >= 0, got {self.epochs}")
        check(self.lr > 0, f"lr: must be positive, got {self.lr}")


def gaussian_clusters(
    seed: int,
    noise: float,
    *,
    n: int = _CLUSTER_N,
    dim: int = _CLUSTER_DIM,
    classes: int = _CLUSTER_CLASSES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters: centres ``N(0, 0.3^2 I)``, unit noise, a fraction ``noise``
    of the labels redrawn uniformly (float64 inputs).

    Example:
        >>> x, y = gaussian_clusters(0, 0.2)
        >>> tuple(x.shape), int(y.max())
        ((512, 20), 2)
    """
    check(0 <= noise < 1, f"noise: must lie in [0, 1), got {noise}")
    g = torch.Generator().manual_seed(seed)
    centres = 0.3 * torch.randn(classes, dim, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, dim, generator=g, dtype=torch.float64)
    flip = torch.rand(n, generator=g) < noise
    return x, torch.where(flip, torch.randint(0, classes, (n,), generator=g), y)


def sphere_least_squares(K: torch.Tensor, r: torch.Tensor, radius: float) -> torch.Tensor:
    r"""The global minimiser of :math:`\|Kz - r\|` over the sphere :math:`\|z\| = \text{radius}`.

    The minimiser is :math:`z(\mu) = (K^\top K + \mu I)^{-1} K^\top r` with the
    unique :math:`\mu > -s_{\min}` (:math:`s_{\min}` the smallest eigenvalue of
    :math:`K^\top K`) at which :math:`\|z(\mu)\| = \text{radius}` (the norm falls
    monotonically in :math:`\mu` there), found by bisection; in the "hard case"
    (the norm stays below the radius as :math:`\mu \to -s_{\min}`) the remainder
    is filled along the eigenvector of :math:`s_{\min}`.

    Args:
        K: ``(D, k)`` matrix.
        r: ``(D,)`` target.
        radius: the sphere's radius (> 0).

    Returns:
        ``z`` of shape ``(k,)``.

    Example:
        >>> K = torch.eye(2, dtype=torch.float64)
        >>> sphere_least_squares(K, torch.tensor([3.0, 4.0], dtype=torch.float64), 1.0)
        tensor([0.6000, 0.8000], dtype=torch.float64)
    """
    check(radius > 0, f"radius: must be positive, got {radius}")
    s, V = torch.linalg.eigh(K.T @ K)
    b = V.T @ (K.T @ r)
    s_min = float(s[0])
    scale = float(s[-1]) + float(b.norm()) / radius + 1.0
    eps = 1e-12 * scale

    def norm_at(mu: float) -> float:
        return float((b / (s + mu)).norm())

    if norm_at(-s_min + eps) <= radius:  # hard case: b has (almost) no part along v_min
        gap = s - s_min
        coef = torch.where(gap > eps, b / gap.clamp_min(eps), torch.zeros_like(b))
        rest = max(radius**2 - float(coef.pow(2).sum()), 0.0) ** 0.5
        coef[0] = rest if float(b[0]) >= 0 else -rest
        return V @ coef
    lo, hi = -s_min + eps, float(b.norm()) / radius - s_min + eps
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if norm_at(mid) > radius:
            lo = mid
        else:
            hi = mid
    return V @ (b / (s + 0.5 * (lo + hi)))


def _hessian_matmat(model: nn.Module, loss_fn: Any, batch: Any, M: torch.Tensor) -> torch.Tensor:
    """``H M`` for the Hessian of the mean of ``loss_fn``'s per-example losses w.r.t. every
    trainable parameter (flattened in ``model.parameters()`` order), ``M`` of shape
    ``(D, k)``: exact forward-over-reverse products, vectorised over the columns."""
    named = [(k, v.detach()) for k, v in model.named_parameters() if v.requires_grad]
    names = [k for k, _ in named]
    params = dict(named)
    sizes = [v.numel() for _, v in named]

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_fn(lambda *a: functional_call(model, p, a), batch).mean()

    def hv(v: torch.Tensor) -> torch.Tensor:
        parts = torch.split(v, sizes)
        tangent = {k: t.reshape(params[k].shape) for k, t in zip(names, parts)}
        out = jvp(grad(loss), (params,), (tangent,))[1]
        return torch.cat([out[k].reshape(-1) for k in names])

    return vmap(hv, in_dims=1, out_dims=1)(M)


def oracle_perturbation(
    model: nn.Module,
    loss_fn: Any,
    batch: Any,
    rho: float,
    grads: Sequence[torch.Tensor],
    target: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    r"""The oracle ceiling of one reweighted perturbation (an analysis tool, not a method).

    Among perturbations :math:`e = \rho g_\lambda/\|g_\lambda\|`,
    :math:`g_\lambda = \sum_i \lambda_i g_i` (signs unrestricted), the one whose
    first-order effect on the gradient best matches ``target`` (meant:
    :math:`G_{PI} - g`):

    .. math::

        \min_{e \in \operatorname{span}\{g_i\},\ \|e\| = \rho} \|H e - t\|,

    with :math:`H` the Hessian of the batch loss (exact Hessian-vector products,
    one per basis vector of the span) and the sphere-constrained least squares
    solved exactly (:func:`sphere_least_squares`) in an orthonormal basis of the
    span.

    Args:
        model: the model (not modified).
        loss_fn: ``loss_fn(model, batch)`` returning one loss per example.
        batch: the batch.
        rho: the radius.
        grads: per-example gradients, per parameter ``(n, *p.shape)``
            (:func:`~sharpkit.optim.delta_sam.per_example_gradients`).
        target: the change to match, one tensor per parameter.

    Returns:
        The perturbation ``e`` (norm ``rho``), one tensor per parameter.

    Example:
        >>> lin = nn.Linear(2, 1, bias=False)
        >>> x = torch.eye(2, dtype=torch.float64)
        >>> lin = lin.double()
        >>> per_ex = lambda m, b: 0.5 * m(b).squeeze(1) ** 2     # H = I / 2
        >>> from sharpkit.per_example import per_example_gradients
        >>> _, grads = per_example_gradients(lin, per_ex, x)
        >>> t = [torch.tensor([[0.0, 0.05]], dtype=torch.float64)]   # = H e for e = (0, 0.1)
        >>> [e.round(decimals=6) for e in oracle_perturbation(lin, per_ex, x, 0.1, grads, t)]
        [tensor([[0.0000, 0.1000]], dtype=torch.float64)]
    """
    check(rho > 0, f"rho: must be positive, got {rho}")
    n = grads[0].shape[0]
    G = torch.cat([t.reshape(n, -1) for t in grads], dim=1)
    U, S, _ = torch.linalg.svd(G.T, full_matrices=False)
    Q = U[:, S > S[0] * 1e-10]  # orthonormal basis of span{g_i}
    K = _hessian_matmat(model, loss_fn, batch, Q)
    r = torch.cat([t.reshape(-1) for t in target])
    e = Q @ sphere_least_squares(K, r, rho)
    shapes = [t.shape[1:] for t in grads]
    return [p.reshape(s) for p, s in zip(torch.split(e, [s.numel() for s in shapes]), shapes)]


def _per_example_ce(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _mean_ce(model: nn.Module, batch) -> torch.Tensor:
    return _per_example_ce(model, batch).mean()


def _mlp(cfg: DeltaSAMApproxConfig, d_in: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, classes)).double()  # fmt: skip


def _batches(n: int, cfg: DeltaSAMApproxConfig, seed: int) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [perm[s : s + cfg.batch_size] for s in range(0, n - cfg.batch_size + 1, cfg.batch_size)]


def _train(model: nn.Module, method: str, x, y, cfg: DeltaSAMApproxConfig, epochs: int) -> None:
    params = list(model.parameters())
    if method == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=cfg.lr)
    elif method == "sam":
        opt = SAM(params, torch.optim.SGD, rho=cfg.rho, lr=cfg.lr)
    else:
        opt = DeltaSAM(params, torch.optim.SGD, rho=cfg.rho, model=model, mode="exact", lr=cfg.lr)
    for epoch in range(epochs):
        for idx in _batches(len(x), cfg, cfg.seed * 1000 + epoch):
            loss_fn = _per_example_ce if method == "dsam" else _mean_ce
            train_step(opt, model, loss_fn, (x[idx], y[idx]))


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


def _arm_data(arm: str, cfg: DeltaSAMApproxConfig, p: float):
    """Training inputs and labels, model sizes, and (digits) the data for the training part."""
    if arm == "digits":
        data = load_digits(seed=cfg.seed, label_noise=p, dtype=torch.float64)
        return data.x_train, data.y_train, data.num_features, data.num_classes, data
    x, y = gaussian_clusters(cfg.seed, p)
    return x, y, _CLUSTER_DIM, _CLUSTER_CLASSES, None


def _approximation(arm: str, p: float, cfg: DeltaSAMApproxConfig, summary: dict) -> None:
    x, y, d_in, classes, data = _arm_data(arm, cfg, p)
    torch.manual_seed(cfg.seed)
    init = _mlp(cfg, d_in, classes)
    net = _mlp(cfg, d_in, classes)
    net.load_state_dict(init.state_dict())
    _train(net, "sgd", x, y, cfg, cfg.warm_epochs)
    cos: dict[str, list[float]] = {"sam": [], "dsam": [], "oracle": []}
    for idx in _batches(len(x), cfg, cfg.seed + 7)[: cfg.batches]:
        batch = (x[idx], y[idx])
        _, grads = per_example_gradients(net, _per_example_ce, batch)
        g_clean = [t.mean(0) for t in grads]
        g_pi = per_instance_target(net, _per_example_ce, batch, rho=cfg.rho)
        cos["sam"].append(_cosine(net, batch, g_pi, g_clean, cfg, weighting=UniformWeights()))
        cos["dsam"].append(_cosine(net, batch, g_pi, g_clean, cfg))
        target = [a - b for a, b in zip(g_pi, g_clean)]
        e = oracle_perturbation(net, _per_example_ce, batch, cfg.rho, grads, target)
        G = perturbed_gradient(net, _per_example_ce, batch, e, cfg.rho)
        cos["oracle"].append(perturbation_cosine(G, g_pi, g_clean))
    for method, values in cos.items():
        summary[f"{arm}_cos_{method}@{p:g}"] = sum(values) / len(values)
    sam = summary[f"{arm}_cos_sam@{p:g}"]
    summary[f"{arm}_gap@{p:g}"] = summary[f"{arm}_cos_dsam@{p:g}"] - sam
    summary[f"{arm}_headroom@{p:g}"] = summary[f"{arm}_cos_oracle@{p:g}"] - sam
    if data is not None and cfg.epochs > 0:
        for method in ("sgd", "sam", "dsam"):
            model = _mlp(cfg, d_in, classes)
            model.load_state_dict(init.state_dict())
            _train(model, method, x, y, cfg, cfg.epochs)
            with torch.no_grad():
                acc = (model(data.x_test).argmax(1) == data.y_test).double().mean()
            summary[f"acc_{method}@{p:g}"] = float(acc)


def run(cfg: DeltaSAMApproxConfig) -> RunResult:
    """One seed: per arm and noise level, the three cosines; digits: short training runs."""
    cfg.validate()
    t0 = time.perf_counter()
    summary: dict[str, float] = {}
    for arm in cfg.arms:
        for p in cfg.noises:
            _approximation(arm, p, cfg, summary)
    series = {"noises": list(cfg.noises), "arms": list(cfg.arms)}
    return make_result(EXPERIMENT, cfg, series, summary, time.perf_counter() - t0)


def _fmt(s: Stat) -> str:
    return f"{s.mean:.3f}" + (f" [{s.ci_low:.3f}, {s.ci_high:.3f}]" if s.has_ci else "")


def _decide_arm(stats: dict[str, Stat], arm: str) -> tuple[bool | None, str]:
    noises = sorted({k.split("@")[1] for k in stats if k.startswith(f"{arm}_gap@")}, key=float)
    verdicts = []
    for p in noises:
        s = stats[f"{arm}_gap@{p}"]
        lo, hi = (s.ci_low, s.ci_high) if s.has_ci else (s.mean, s.mean)
        verdicts.append(True if lo > 0 else False if hi < 0 else None)
    held = (
        True if all(v is True for v in verdicts)
        else False if any(v is False for v in verdicts) else None
    )  # fmt: skip
    parts = []
    for p in noises:
        c = {m: stats[f"{arm}_cos_{m}@{p}"].mean for m in ("sam", "dsam", "oracle")}
        parts.append(
            f"p = {p}: SAM {c['sam']:.3f}, delta-SAM {c['dsam']:.3f} (gap "
            f"{_fmt(stats[f'{arm}_gap@{p}'])}), oracle ceiling {c['oracle']:.3f}"
        )
    return held, "; ".join(parts)


def decide(stats: dict[str, Stat]) -> Verdict:
    """Per arm: gap CI above 0 at every noise level (supported), below 0 at any
    (refuted), else inconclusive; combined as in the module docstring."""
    label = {True: "supported", False: "not supported", None: "inconclusive"}
    arms = [a for a in ARMS if any(k.startswith(f"{a}_gap@") for k in stats)]
    judged = {a: _decide_arm(stats, a) for a in arms}
    held = [h for h, _ in judged.values()]
    holds: bool | None
    if all(h is True for h in held):
        holds, head = True, "Supported in every arm."
    elif any(h is True for h in held):
        holds = None
        head = "Setting-dependent: " + ", ".join(
            f"{label[h]} on {a}" for a, (h, _) in judged.items()
        ) + "."  # fmt: skip
    elif any(h is False for h in held):
        holds, head = False, "Not supported in any arm."
    else:
        holds, head = None, "Inconclusive in every arm."
    body = " ".join(f"{a} ({label[h]}): {text}." for a, (h, text) in judged.items())
    statement = f"{head} cos(G - g, G_PI - g): {body}"
    noises = sorted({k.split("@")[1] for k in stats if k.startswith("acc_sgd@")}, key=float)
    if noises:
        acc = "; ".join(
            f"p = {p}: "
            + ", ".join(f"{m} {stats[f'acc_{m}@{p}'].mean:.3f}" for m in ("sgd", "sam", "dsam"))
            for p in noises
        )
        statement += f" Digits test accuracy (SGD, SAM, delta-SAM; not judged): {acc}."
    return Verdict(
        holds=holds,
        statement=statement,
        numbers={k: s.mean for k, s in stats.items() if "_gap@" in k or "_headroom@" in k},
    )


def _setting(cfg: DeltaSAMApproxConfig) -> str:
    arms = {
        "digits": f"digits (MLP 64-{cfg.hidden}-10)",
        "clusters": f"Gaussian clusters (3 classes, 20-d, 512 examples, MLP 20-{cfg.hidden}-3)",
    }
    train = (
        f"; digits training {cfg.epochs} epochs, lr {cfg.lr:g}" if "digits" in cfg.arms and cfg.epochs else ""
    )  # fmt: skip
    return (
        f"Arms: {', '.join(arms[a] for a in cfg.arms)}; tanh, float64; label noise p in "
        f"{list(cfg.noises)}; rho {cfg.rho:g}, batch {cfg.batch_size}; cosines after "
        f"{cfg.warm_epochs} SGD epochs on {cfg.batches} batches per arm and p (delta-SAM: exact "
        f"statistics, tau = 1; oracle: sphere-constrained least squares in the span of the "
        f"per-example gradients with exact Hessian-vector products){train}."
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
    source="Zhou, Liu, Zhang, Chen (Findings of EMNLP 2022); sharpkit's reconstruction of the weighting and the oracle ceiling; docs/theory.md.",
    config_cls=DeltaSAMApproxConfig,
    scales={
        "test": DeltaSAMApproxConfig(noises=(0.0, 0.4), warm_epochs=2, batches=2, epochs=1),
        "small": DeltaSAMApproxConfig(),
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
