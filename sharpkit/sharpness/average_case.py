"""Average-case sharpness under Gaussian or uniform weight noise.

With ``c = |w|`` (adaptive) or ``c = 1`` (plain):

    S_avg(rho) = E_B E_{d} [ L_B(w + d) ] - L_B(w),
        gaussian: d ~ N(0, rho^2 diag(c^2)),   uniform: d = c * rho * U[-1, 1]^n

For a quadratic ``L(w + d) = L(w) + g^T d + d^T A d / 2`` it is exactly
``(rho^2 / 2) sum_i A_ii c_i^2`` (Gaussian) or a third of that (uniform).

References:
    Andriushchenko, Croce, Mueller, Hein, Flammarion. A modern look at the
    relationship between sharpness and generalization. ICML 2023.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from sharpkit._progress import progress_bar
from sharpkit.balance.degenerate import warn_zero_factors
from sharpkit.sharpness._objective import (
    MetricResult,
    Objective,
    _check_positive,
    make_generator,
)

__all__ = ["average_case_sharpness", "sample_noise"]

NOISES = ("gaussian", "uniform")


def sample_noise(
    c: Sequence[torch.Tensor], scale: float, noise: str, gen: torch.Generator
) -> list[torch.Tensor]:
    """One draw of ``d``: ``c * scale * z`` with ``z`` standard Gaussian or U[-1, 1].

    Example:
        >>> d = sample_noise([torch.ones(3)], 0.0, "gaussian", torch.Generator().manual_seed(0))
        >>> d[0].tolist()
        [0.0, 0.0, 0.0]
    """
    if noise not in NOISES:
        raise ValueError(f"noise: expected one of {NOISES}, got {noise!r}")
    out = []
    for ci in c:
        if noise == "gaussian":
            z = torch.randn(ci.shape, generator=gen, dtype=torch.float64)
        else:
            z = torch.rand(ci.shape, generator=gen, dtype=torch.float64) * 2 - 1
        out.append(ci * (scale * z).to(ci))
    return out


def _average_case(
    obj: Objective,
    rho: float,
    *,
    noise: str,
    adaptive: bool,
    samples: int,
    seed: int | torch.Generator | None,
    progress: bool,
    name: str = "average_case",
) -> MetricResult:
    _check_positive("rho", rho)
    _check_positive("samples", samples, integer=True)
    if noise not in NOISES:
        raise ValueError(f"noise: expected one of {NOISES}, got {noise!r}")
    gen, seed_used = make_generator(obj.shared_seed(seed))
    c = obj.scale(adaptive)
    if adaptive:  # c = |w| does not move a zero factor: a fresh adapter measures 0
        warn_zero_factors(obj.frozen.model, name, stacklevel=4)
    with obj.metered() as cost:
        bases = [obj.loss(b) for b in obj.batches]
        base = obj.weighted_sum(bases)
        # one noise draw is shared by all batches: the sample is the full-data increase
        per_sample = []
        for _ in progress_bar(range(samples), name, progress):
            d = sample_noise(c, rho, noise, gen)
            per_sample.append(
                obj.weighted_sum([obj.loss(b, d) - lb for b, lb in zip(obj.batches, bases)])
            )
        # sums over the ranks' shards (every rank drew the same noise), one all-reduce
        base, sums = obj.reduce(base, torch.tensor(per_sample, dtype=torch.float64))
        base = base / obj.total_weight
    t = sums.double() / obj.total_weight
    stderr = float(t.std(unbiased=True) / samples**0.5) if samples > 1 else None
    obj.set_offset(None)
    return MetricResult(
        name=name,
        value=float(t.mean()),
        stderr=stderr,
        details={"rho": rho, "noise": noise, "adaptive": adaptive, "base_loss": base},
        cost=cost,
        protocol=obj.protocol("monte-carlo", seed_used, samples=samples, noise=noise),
    )


def average_case_sharpness(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    rho: float,
    *,
    noise: str = "gaussian",
    adaptive: bool = False,
    samples: int = 32,
    seed: int | torch.Generator | None = 0,
    params: Sequence[str] | Callable[[str], bool] | None = None,
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    process_group: Any = None,
) -> MetricResult:
    """Average-case sharpness ``E_d L(w + d) - L(w)`` by Monte Carlo.

    Each noise draw perturbs the weights once and is evaluated on every batch
    (weighted by :func:`sharpkit._batch.batch_weight`), so ``stderr`` is the standard error over the ``samples``
    draws of the full-data loss increase.

    Args:
        model: the network (never modified).
        loss_fn: ``loss_fn(model, batch)`` or an nn loss module.
        data: one batch or an iterable of batches.
        rho: noise scale (standard deviation for Gaussian, half-width for uniform),
            in units of ``c``.
        noise: ``"gaussian"`` or ``"uniform"``.
        adaptive: ``c = |w|`` instead of ``c = 1``.
        samples: number of noise draws.
        seed: seed or generator of the noise.
        params, mode, dtype, device: as in :func:`~sharpkit.sharpness.worst_case_sharpness`.
        progress: tqdm bar over draws.
        process_group: ``data`` is this rank's shard of the group's data (see
            :class:`~sharpkit.sharpness._objective.Objective`): every rank draws the
            same noise and returns the value over all the shards.

    Returns:
        A :class:`MetricResult`; cost ``(samples + 1) * batches`` forward evaluations.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> g = torch.Generator().manual_seed(0)
        >>> data = (torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g))
        >>> r = average_case_sharpness(model, nn.CrossEntropyLoss(), data, rho=0.1, samples=8)
        >>> r.cost.forward
        9
    """
    obj = Objective(
        model, loss_fn, data, params=params, mode=mode, dtype=dtype, device=device,
        process_group=process_group,
    )  # fmt: skip
    return _average_case(
        obj, rho, noise=noise, adaptive=adaptive, samples=samples, seed=seed, progress=progress,
        name="average_case" + ("_adaptive" if adaptive else ""),
    )  # fmt: skip
