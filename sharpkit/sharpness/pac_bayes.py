"""PAC-Bayes flatness and its magnitude-aware version (Jiang et al., 2020).

The largest noise scale ``sigma`` such that perturbing the weights by ``d`` costs at
most ``target`` (an accuracy drop of 0.1 in Jiang et al., or a loss increase):

    plain:            d ~ N(0, sigma^2 I)
    magnitude-aware:  d_i ~ N(0, sigma^2 w_i^2 + eps^2),  eps = 1e-3

found by bisection on ``log sigma``. The reported flatness measure is ``1 / sigma^2``
(large = sharp). The same noise draws ``z`` are reused for every candidate sigma
(common random numbers), which makes the measured drop a smooth function of sigma
and the bisection well posed.

References:
    Jiang, Neyshabur, Mobahi, Krishnan, Bengio. Fantastic generalization measures
    and where to find them. ICLR 2020 (measures "pacbayes.flatness" and
    "pacbayes.mag.flatness", Appendix C).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from sharpkit.sharpness._objective import (
    MetricResult,
    Objective,
    _check_positive,
    make_generator,
    supervised_accuracy,
)

__all__ = ["MAGNITUDE_EPS", "pac_bayes_flatness"]

#: Jiang et al.'s additive noise floor of the magnitude-aware version
MAGNITUDE_EPS = 1e-3
TARGETS = ("accuracy", "loss")


def check_max_drop(target: str, max_drop: float) -> None:
    """An accuracy drops by at most 1: ``max_drop >= 1`` could never be exceeded.

    Example:
        >>> check_max_drop("accuracy", 1.0)
        Traceback (most recent call last):
        ...
        ValueError: max_drop: an accuracy drop lies in [0, 1], so max_drop=1.0 can never be exceeded and the search could not converge; use max_drop < 1 or target='loss'
    """
    if target == "accuracy" and max_drop >= 1:
        raise ValueError(
            f"max_drop: an accuracy drop lies in [0, 1], so max_drop={max_drop!r} can never be "
            "exceeded and the search could not converge; use max_drop < 1 or target='loss'"
        )


def _pac_bayes(
    obj: Objective,
    *,
    target: str,
    max_drop: float,
    magnitude_aware: bool,
    samples: int,
    sigma_init: float,
    rtol: float,
    max_iter: int,
    accuracy_fn: Callable[..., Any] | None,
    seed: int | None,
) -> MetricResult:
    if target not in TARGETS:
        raise ValueError(f"target: expected one of {TARGETS}, got {target!r}")
    _check_positive("max_drop", max_drop)
    check_max_drop(target, max_drop)
    _check_positive("samples", samples, integer=True)
    _check_positive("sigma_init", sigma_init)
    _check_positive("rtol", rtol)
    _check_positive("max_iter", max_iter, integer=True)
    gen, seed_used = make_generator(obj.shared_seed(seed))
    zs = [
        [torch.randn(w.shape, generator=gen, dtype=torch.float64).to(w) for w in obj.w0]
        for _ in range(samples)
    ]
    fn = accuracy_fn or supervised_accuracy

    def measure(d: Sequence[torch.Tensor] | None) -> float:
        if target == "accuracy":
            vals = [obj.metric(fn, b, d) for b in obj.batches]
        else:
            vals = [obj.loss(b, d) for b in obj.batches]
        return obj.weighted_mean(vals)  # over every rank's shard: the same bisection on all

    def drop(sigma: float) -> float:
        out = 0.0
        for z in zs:
            if magnitude_aware:
                d = [
                    zi * torch.sqrt(sigma**2 * w**2 + MAGNITUDE_EPS**2) for zi, w in zip(z, obj.w0)
                ]
            else:
                d = [sigma * zi for zi in z]
            v = measure(d)
            out += (base - v) if target == "accuracy" else (v - base)
        return out / samples

    with obj.metered() as cost:
        base = measure(None)
        evaluations = []
        lo, hi = 0.0, sigma_init
        d_hi = drop(hi)
        evaluations.append((hi, d_hi))
        it = 0
        while d_hi <= max_drop and it < max_iter:  # grow until infeasible
            lo, hi = hi, hi * 2.0
            d_hi = drop(hi)
            evaluations.append((hi, d_hi))
            it += 1
        while lo == 0.0 and it < max_iter:  # shrink until feasible
            hi = hi / 2.0
            d = drop(hi)
            evaluations.append((hi, d))
            if d <= max_drop:
                lo = hi
                hi = hi * 2.0
            it += 1
        while lo > 0.0 and hi / lo > 1.0 + rtol and it < max_iter:
            mid = math.sqrt(lo * hi)
            d = drop(mid)
            evaluations.append((mid, d))
            if d <= max_drop:
                lo = mid
            else:
                hi = mid
            it += 1
        converged = lo > 0.0 and hi / lo <= 1.0 + rtol
        sigma = lo
    obj.set_offset(None)
    return MetricResult(
        name="pac_bayes_mag" if magnitude_aware else "pac_bayes",
        value=(1.0 / sigma**2) if sigma > 0 else math.inf,
        stderr=None,
        details={
            "sigma": sigma,
            "sigma_upper": hi,
            "target": target,
            "max_drop": max_drop,
            "base": base,
            "magnitude_aware": magnitude_aware,
            "converged": converged,
            "evaluations": evaluations,
        },
        cost=cost,
        protocol=obj.protocol("bisection", seed_used, samples=samples, rtol=rtol, iterations=it),
    )


def pac_bayes_flatness(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    target: str = "accuracy",
    max_drop: float = 0.1,
    magnitude_aware: bool = False,
    samples: int = 8,
    sigma_init: float = 0.01,
    rtol: float = 0.05,
    max_iter: int = 40,
    accuracy_fn: Callable[..., Any] | None = None,
    seed: int | None = 0,
    params: Sequence[str] | Callable[[str], bool] | None = None,
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    process_group: Any = None,
) -> MetricResult:
    """PAC-Bayes flatness ``1 / sigma^2`` (Jiang et al., 2020), optionally magnitude-aware.

    Args:
        model: the network (never modified).
        loss_fn: ``loss_fn(model, batch)`` or an nn loss module.
        data: one batch or an iterable of batches.
        target: ``"accuracy"`` (the drop of ``accuracy_fn``, default arg-max accuracy
            on ``(inputs, targets)``) or ``"loss"`` (the loss increase).
        max_drop: the allowed mean drop (Jiang et al.: 0.1 accuracy).
        magnitude_aware: noise std ``sqrt(sigma^2 w_i^2 + eps^2)`` instead of ``sigma``.
        samples: noise draws averaged per candidate sigma (common random numbers).
        sigma_init: first candidate; doubled or halved until bracketed.
        rtol: stop when ``sigma_upper / sigma <= 1 + rtol``.
        max_iter: most candidate evaluations after the first.
        accuracy_fn: ``accuracy_fn(model, batch) -> scalar`` for ``target="accuracy"``.
        seed: seed of the noise.
        params, mode, dtype, device: as in :func:`~sharpkit.sharpness.worst_case_sharpness`.
        process_group: ``data`` is this rank's shard (see
            :class:`~sharpkit.sharpness._objective.Objective`): every rank draws the
            same noise, measures each drop over all the shards and bisects alike.

    Returns:
        A :class:`MetricResult` with ``value = 1/sigma^2`` and ``details["sigma"]`` (the
        largest feasible sigma found), ``sigma_upper`` (smallest infeasible) and every
        ``(sigma, drop)`` evaluated. Cost: ``samples * batches`` forwards per candidate.

    Example:
        >>> model = nn.Linear(1, 1, bias=False)
        >>> loss_fn = lambda m, b: 0.5 * (m(b) ** 2).mean()  # L(w) = w^2 / 2 on x = 1
        >>> with torch.no_grad():
        ...     _ = model.weight.zero_()
        >>> r = pac_bayes_flatness(model, loss_fn, torch.ones(4, 1), target="loss",
        ...                        max_drop=0.5, samples=1, seed=0, rtol=1e-3)
        >>> r.details["converged"]
        True
    """
    obj = Objective(
        model, loss_fn, data, params=params, mode=mode, dtype=dtype, device=device,
        process_group=process_group,
    )  # fmt: skip
    return _pac_bayes(
        obj, target=target, max_drop=max_drop, magnitude_aware=magnitude_aware,
        samples=samples, sigma_init=sigma_init, rtol=rtol, max_iter=max_iter,
        accuracy_fn=accuracy_fn, seed=seed,
    )  # fmt: skip
