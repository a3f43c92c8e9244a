"""Worst-case sharpness (m-sharpness) and Keskar's epsilon-sharpness.

With ``c = |w|`` (adaptive) or ``c = 1`` (plain) and ``p`` in ``{2, inf}``:

    S_max(rho) = E_B [ max_{||d / c||_p <= rho} L_B(w + d) - L_B(w) ]

The inner maximum is solved by projected gradient ascent in ``u = d / c`` with
auto-PGD's step-size control (Croce and Hein, 2020): momentum 0.75, step size
starting at ``2 rho``, halved at checkpoints where fewer than 75% of the steps
since the last checkpoint increased the loss or the best value did not improve,
restarting from the best point. The result is the best *evaluated* point, so it is
always a feasible lower bound on the true maximum.

References:
    Keskar, Mudigere, Nocedal, Smelyanskiy, Tang. On large-batch training for deep
    learning: generalization gap and sharp minima. ICLR 2017.
    Foret, Kleiner, Mobahi, Neyshabur. Sharpness-aware minimization. ICLR 2021.
    Andriushchenko, Croce, Mueller, Hein, Flammarion. A modern look at the
    relationship between sharpness and generalization. ICML 2023.
    Croce and Hein. Reliable evaluation of adversarial robustness with an ensemble
    of diverse parameter-free attacks. ICML 2020.
"""

from __future__ import annotations

import math
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
    weighted_mean_stderr,
)

__all__ = ["epsilon_sharpness", "project", "worst_case_sharpness"]

#: auto-PGD momentum (Croce and Hein, 2020)
APGD_MOMENTUM = 0.75
#: auto-PGD: halve the step when fewer than this fraction of steps increased the loss
APGD_SUCCESS_RATE = 0.75
#: Keskar et al.'s box: |d_i| <= epsilon (|w_i| + KESKAR_OFFSET)
KESKAR_OFFSET = 1.0


def _norm(u: Sequence[torch.Tensor], p: float) -> float:
    if p == 2:
        return math.sqrt(sum(float((x.double() ** 2).sum()) for x in u))
    return max(float(x.abs().max()) if x.numel() else 0.0 for x in u)


def project(u: Sequence[torch.Tensor], rho: float, p: float) -> list[torch.Tensor]:
    """Euclidean projection of ``u`` (a list of tensors, one vector) onto ``||u||_p <= rho``.

    ``p = 2``: rescale onto the sphere when outside; ``p = inf``: clip each entry.

    Example:
        >>> [t.tolist() for t in project([torch.tensor([3.0, 4.0])], 1.0, 2)]
        [[0.6000000238418579, 0.800000011920929]]
        >>> [t.tolist() for t in project([torch.tensor([3.0, -0.5])], 1.0, float("inf"))]
        [[1.0, -0.5]]
    """
    if p == 2:
        n = _norm(u, 2)
        if n <= rho:
            return [x.clone() for x in u]
        return [x * (rho / n) for x in u]
    if p == math.inf:
        return [x.clamp(-rho, rho) for x in u]
    raise ValueError(f"p: expected 2 or inf, got {p!r}")


def _direction(g: Sequence[torch.Tensor], p: float) -> list[torch.Tensor] | None:
    if p == 2:
        n = _norm(g, 2)
        return None if n == 0.0 else [x / n for x in g]
    s = [x.sign() for x in g]
    return None if all(not bool(x.any()) for x in s) else s


def _random_point(shapes: Sequence[torch.Tensor], rho: float, p: float, gen: torch.Generator):
    if p == 2:
        z = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in shapes]
        n = math.sqrt(sum(float((t**2).sum()) for t in z))
        return [(t * (rho / n)).to(x) for t, x in zip(z, shapes)]
    return [
        ((torch.rand(x.shape, generator=gen, dtype=torch.float64) * 2 - 1) * rho).to(x)
        for x in shapes
    ]


def _checkpoints(steps: int) -> set[int]:
    ps = [0.0, 0.22]
    while ps[-1] < 1.0:
        ps.append(ps[-1] + max(ps[-1] - ps[-2] - 0.03, 0.06))
    return {math.ceil(q * steps) for q in ps[1:] if math.ceil(q * steps) < steps}


def _pgd(
    obj: Objective,
    batches: Sequence[Any],
    weights: Sequence[float],
    c: Sequence[torch.Tensor],
    rho: float,
    p: float,
    steps: int,
    restarts: int,
    gen: torch.Generator,
    joint: bool = False,
) -> tuple[float, float, list[torch.Tensor]]:
    """Maximise sum_b weights_b L_b(w0 + c u) over ||u||_p <= rho.

    ``joint``: the batches are this rank's share of one objective over every rank's
    batches (losses and gradients summed over the ranks, so every rank takes the
    same steps); otherwise they are maximised on their own.

    Returns (best objective, objective at u=0, best u).
    """
    total = float(sum(weights))
    if joint:
        (total,) = obj.reduce(total)
    wts = [w / total for w in weights]

    def fg(u: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
        d = [ci * ui for ci, ui in zip(c, u)]
        f = 0.0
        grad = [torch.zeros_like(x) for x in u]
        for b, wb in zip(batches, wts):
            lb, gb = obj.loss_and_grad(b, d)
            f += wb * lb
            for acc, gi, ci in zip(grad, gb, c):
                acc.add_(gi * ci, alpha=wb)
        if joint:
            f, *grad = obj.reduce(f, *grad)
        return f, grad

    zero = [torch.zeros_like(x) for x in c]
    base = None
    best_f, best_u = -math.inf, zero
    marks = _checkpoints(steps)
    for r in range(restarts):
        x = zero if r == 0 else _random_point(c, rho, p, gen)
        f, g = fg(x)
        if r == 0:
            base = f
        if f > best_f:
            best_f, best_u = f, x
        if steps == 1:
            continue
        eta = 2.0 * rho
        direction = _direction(g, p)
        if direction is None:  # a stationary start: step in a random direction
            direction = _direction(_random_point(c, 1.0, p, gen), p)
        x_prev, x = x, project([xi + eta * di for xi, di in zip(x, direction)], rho, p)
        f_prev = f
        f, g = fg(x)
        successes, last_mark, eta_at_mark, best_at_mark = int(f > f_prev), 0, eta, best_f
        if f > best_f:
            best_f, best_u = f, x
        for k in range(2, steps):
            direction = _direction(g, p)
            if direction is None:
                break
            z = project([xi + eta * di for xi, di in zip(x, direction)], rho, p)
            a = APGD_MOMENTUM
            x_new = project(
                [xi + a * (zi - xi) + (1 - a) * (xi - xp) for xi, zi, xp in zip(x, z, x_prev)],
                rho,
                p,
            )
            f_new, g_new = fg(x_new)
            successes += int(f_new > f)
            x_prev, x, f, g = x, x_new, f_new, g_new
            if f > best_f:
                best_f, best_u = f, x
            if k in marks:
                too_few = successes < APGD_SUCCESS_RATE * (k - last_mark)
                stalled = eta == eta_at_mark and best_f <= best_at_mark
                if too_few or stalled:
                    eta /= 2.0
                    x_prev, x = best_u, best_u
                    f, g = fg(x)
                successes, last_mark, eta_at_mark, best_at_mark = 0, k, eta, best_f
    assert base is not None
    return best_f, base, best_u


def _check_p(p: Any) -> float:
    if p in (2, 2.0):
        return 2.0
    if p in (math.inf, "inf"):
        return math.inf
    raise ValueError(f"p: expected 2 or inf, got {p!r}")


def _worst_case(
    obj: Objective,
    rho: float,
    *,
    p: float,
    adaptive: bool,
    steps: int,
    restarts: int,
    seed: int | torch.Generator | None,
    progress: bool,
    name: str = "worst_case",
) -> MetricResult:
    _check_positive("rho", rho)
    _check_positive("steps", steps, integer=True)
    _check_positive("restarts", restarts, integer=True)
    p = _check_p(p)
    gen, seed_used = make_generator(obj.shared_seed(seed))
    gens = obj.batch_generators(gen, seed_used)  # a batch's random starts do not depend on its rank
    c = obj.scale(adaptive)
    if adaptive:  # c = |w| does not move a zero factor: a fresh adapter measures 0
        warn_zero_factors(obj.frozen.model, name, stacklevel=4)
    increases, bases, norms, abs_norms = [], [], [], []
    with obj.metered() as cost:
        for b, g in zip(progress_bar(obj.batches, name, progress), gens):
            best, base, u = _pgd(obj, [b], [1.0], c, rho, p, steps, restarts, g)
            increases.append(best - base)
            bases.append(base)
            norms.append(_norm(u, p))
            abs_norms.append(_norm([ci * ui for ci, ui in zip(c, u)], 2))
    # every rank's batches, in global batch order
    increases, bases, norms, abs_norms, sizes, weights = (
        obj.gather(v) for v in (increases, bases, norms, abs_norms, obj.sizes, obj.weights)
    )
    value, stderr = weighted_mean_stderr(increases, weights)
    obj.set_offset(None)
    return MetricResult(
        name=name,
        value=value,
        stderr=stderr,
        details={
            "rho": rho,
            "p": "inf" if p == math.inf else 2,
            "adaptive": adaptive,
            "m": int(max(sizes)),
            "base_loss": weighted_mean_stderr(bases, weights)[0],
            "perturbation_norm": weighted_mean_stderr(norms, weights)[0],
            "perturbation_l2": weighted_mean_stderr(abs_norms, weights)[0],
            "per_batch": increases,
        },
        cost=cost,
        protocol=obj.protocol(
            "apgd", seed_used, steps=steps, restarts=restarts, rho=rho, adaptive=adaptive
        ),
    )


def worst_case_sharpness(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    rho: float,
    *,
    p: float | str = 2,
    adaptive: bool = False,
    m: int | None = None,
    steps: int = 20,
    restarts: int = 1,
    seed: int | torch.Generator | None = 0,
    params: Sequence[str] | Callable[[str], bool] | None = None,
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    process_group: Any = None,
) -> MetricResult:
    """Worst-case (m-)sharpness ``E_B max_{||d/c||_p <= rho} L_B(w+d) - L_B(w)``.

    Each batch gets its own maximiser (that is m-sharpness with ``m`` the batch
    size); the value is the weighted mean over batches (``Objective.weights``) and ``stderr`` its
    standard error over batches.

    Args:
        model: the network (never modified).
        loss_fn: ``loss_fn(model, batch)`` or an nn loss module.
        data: one batch or an iterable of batches.
        rho: radius of the ball (in units of ``c``).
        p: ``2`` or ``inf`` (``"inf"``).
        adaptive: ``c = |w|`` (adaptive, invariant to ReLU layer rescaling) instead
            of ``c = 1``.
        m: re-split the data into batches of at most ``m`` examples; ``None`` keeps
            the batches as given (Andriushchenko et al. use ``m = 128``).
        steps: gradient evaluations per restart and batch (auto-PGD uses 20).
        restarts: the first starts at ``w``, the others at random points of the ball.
        seed: seed or generator for the random starts.
        params: ``None`` (all trainable), a list of names or a predicate.
        mode: module mode (``"eval"``/``"train"``).
        dtype, device: computation dtype and device (a private copy of the model).
        progress: tqdm bar over batches.
        process_group: ``data`` is this rank's shard (see
            :class:`~sharpkit.sharpness._objective.Objective`): each rank maximises
            on its own batches (a batch's random starts do not depend on its rank)
            and every rank returns the mean over all the shards' batches.

    Returns:
        A :class:`MetricResult`; ``details`` holds the base loss, the achieved
        ``||d/c||_p`` (``perturbation_norm``) and ``||d||_2`` and the per-batch values.
        Cost: ``steps * restarts`` gradient evaluations per batch (plus at most one
        per step-size halving).

    Example:
        >>> model = nn.Linear(3, 2)
        >>> g = torch.Generator().manual_seed(0)
        >>> data = (torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g))
        >>> r = worst_case_sharpness(model, nn.CrossEntropyLoss(), data, rho=0.05)
        >>> r.value > 0 and r.details["perturbation_norm"] <= 0.05 + 1e-7
        True
    """
    obj = Objective(
        model, loss_fn, data, params=params, mode=mode, dtype=dtype, device=device, m=m,
        process_group=process_group,
    )  # fmt: skip
    return _worst_case(
        obj, rho, p=p, adaptive=adaptive, steps=steps, restarts=restarts, seed=seed,
        progress=progress,
        name="worst_case" + ("_adaptive" if adaptive else "") + ("_inf" if _check_p(p) == math.inf else ""),
    )  # fmt: skip


def _epsilon(
    obj: Objective,
    epsilon: float,
    *,
    steps: int,
    restarts: int,
    seed: int | torch.Generator | None,
) -> MetricResult:
    _check_positive("epsilon", epsilon)
    _check_positive("steps", steps, integer=True)
    _check_positive("restarts", restarts, integer=True)
    gen, seed_used = make_generator(obj.shared_seed(seed))
    c = obj.scale(True, KESKAR_OFFSET)
    with obj.metered() as cost:
        best, base, u = _pgd(
            obj, obj.batches, obj.weights, c, epsilon, math.inf, steps, restarts, gen, joint=True
        )
    obj.set_offset(None)
    return MetricResult(
        name="epsilon_sharpness",
        value=100.0 * (best - base) / (1.0 + base),
        stderr=None,
        details={
            "epsilon": epsilon,
            "base_loss": base,
            "max_loss": best,
            "perturbation_norm": _norm(u, math.inf),
        },
        cost=cost,
        protocol=obj.protocol("apgd-box", seed_used, steps=steps, restarts=restarts),
    )


def epsilon_sharpness(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    epsilon: float = 1e-3,
    *,
    steps: int = 20,
    restarts: int = 1,
    seed: int | torch.Generator | None = 0,
    params: Sequence[str] | Callable[[str], bool] | None = None,
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    process_group: Any = None,
) -> MetricResult:
    """Keskar et al.'s epsilon-sharpness in the full parameter space.

        phi(w, eps) = 100 * (max_{|d_i| <= eps (|w_i| + 1)} L(w + d) - L(w)) / (1 + L(w))

    with ``L`` the weighted loss over *all* the data (one maximiser, unlike
    :func:`worst_case_sharpness`). Keskar et al. solve the box-constrained maximum
    with L-BFGS-B; here it is auto-PGD in the box (a feasible lower bound). With a
    ``process_group``, ``data`` is this rank's shard and every step's loss and
    gradient are summed over the ranks (see
    :class:`~sharpkit.sharpness._objective.Objective`).

    Example:
        >>> model = nn.Linear(3, 2)
        >>> g = torch.Generator().manual_seed(0)
        >>> data = (torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g))
        >>> epsilon_sharpness(model, nn.CrossEntropyLoss(), data, 1e-2).value > 0
        True
    """
    obj = Objective(
        model, loss_fn, data, params=params, mode=mode, dtype=dtype, device=device,
        process_group=process_group,
    )  # fmt: skip
    return _epsilon(obj, epsilon, steps=steps, restarts=restarts, seed=seed)
