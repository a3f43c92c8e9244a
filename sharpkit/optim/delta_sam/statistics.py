r"""delta-SAM's statistics modes: what a weighting sees, exactly or from probes.

- ``'exact'``: per-example gradients :math:`g_i` (:func:`sharpkit.per_example.per_example_gradients`),
  then :math:`\|g_i\|^2` and :math:`\cos(g_i, g)` directly (:func:`exact_statistics`).
- ``'probe'`` and ``'forward-only'``: ``K`` random forward probes
  :math:`a_{ik} = (l_i(w + s z_k) - l_i(w))/s`, :math:`z_k \sim N(0, I)`, estimate
  :math:`\|g_i\|^2 = E[(g_i \cdot z)^2]` by :math:`\frac1K \sum_k a_{ik}^2`; the
  alignment comes from one more forward along :math:`\hat g` (probe) or from the
  probes alone (forward-only) (:func:`probe_points`, :func:`probe_statistics`).

The batch gradient :math:`g` is the gradient of the loss's own batch mean: with
example weights :math:`w_i` (:func:`sharpkit._batch.example_weights`, the target
tokens of a sequence for a token-mean loss),
:math:`g = \sum_i w_i g_i / \sum_i w_i`; :math:`g = \frac1n \sum_i g_i` otherwise.
"""

from __future__ import annotations

import math

import torch

from .._base import global_norm
from .weighting import ExampleStats

__all__ = ["MODES", "alignment", "exact_statistics", "probe_points", "probe_statistics"]

#: the statistics modes of :class:`~sharpkit.optim.DeltaSAM`
MODES = ("exact", "probe", "forward-only")


def alignment(dots: torch.Tensor, sq_norms: torch.Tensor, batch_sq: torch.Tensor) -> torch.Tensor:
    """``dots / (||g_i|| ||g||)`` clamped to [-1, 1], with the conventions of
    :class:`ExampleStats` where a norm is zero (exact zero tests, no epsilon)."""
    den = sq_norms.clamp_min(0).sqrt() * batch_sq.clamp_min(0).sqrt()
    safe = torch.where(den > 0, den, torch.ones_like(den))
    cos = torch.where(den > 0, dots / safe, torch.zeros_like(dots))
    cos = torch.where(sq_norms > 0, cos, torch.ones_like(cos))
    return cos.clamp(-1.0, 1.0)


def exact_statistics(
    losses: torch.Tensor, grads: list[torch.Tensor], weights: torch.Tensor | None = None
) -> ExampleStats:
    """:class:`ExampleStats` from per-example losses ``(n,)`` and gradients ``(n, *p.shape)``
    (``weights``: the example weights of the batch mean, ``None`` for equal ones)."""
    n = losses.shape[0]
    flat = [g.reshape(n, -1) for g in grads]
    if weights is None:
        g_mean = [f.mean(0) for f in flat]
    else:
        wn = weights / weights.sum()
        g_mean = [wn.to(f) @ f for f in flat]
    sq = torch.stack([torch.linalg.vector_norm(f, dim=1) for f in flat]).square().sum(0)
    dots = torch.stack([f @ gm for f, gm in zip(flat, g_mean)]).sum(0)
    batch_sq = global_norm(g_mean).square()
    return ExampleStats(losses, sq, alignment(dots, sq, batch_sq), "exact", weights=weights)


@torch.no_grad()
def probe_points(
    params: list[torch.Tensor],
    probes: int,
    probe_radius: float,
    generator: torch.Generator,
    grads: list[torch.Tensor] | None,
) -> tuple[list[torch.Tensor], float, float | None]:
    """The probe points ``w + s z_k`` (``k < K``) and, given the batch gradient
    (probe mode), one more point ``w + t g`` at distance ``probe_radius``.

    Returns ``(stacked, s, t)``: per parameter a ``(K, *p.shape)`` or
    ``(K + 1, *p.shape)`` tensor, the probe step ``s = r / sqrt(d)`` and ``t``
    (``None`` without ``grads``; 0 when ``g`` is zero or not finite, and the last
    point is then unusable)."""
    d = sum(p.numel() for p in params)
    s = probe_radius / math.sqrt(d)
    t: float | None = None
    stacked = []
    for p in params:
        z = torch.randn(
            (probes, *p.shape), generator=generator, device=generator.device, dtype=p.dtype
        )
        stacked.append(torch.add(p.detach().unsqueeze(0), z.to(p.device), alpha=s))
    if grads is not None:  # one more point along g / ||g||, at distance probe_radius
        gnorm = float(global_norm(grads))
        t = probe_radius / gnorm if math.isfinite(gnorm) and gnorm > 0 else 0.0
        stacked = [
            torch.cat([st, (p.detach() + t * g).unsqueeze(0)])
            for st, p, g in zip(stacked, params, grads)
        ]
    return stacked, s, t


@torch.no_grad()
def probe_statistics(
    L: torch.Tensor,
    l0: torch.Tensor,
    s: float,
    t: float | None,
    probes: int,
    probe_radius: float,
    mode: str,
    weights: torch.Tensor | None = None,
) -> ExampleStats:
    """:class:`ExampleStats` from the probe losses ``L`` and the losses ``l0`` at ``w``
    (``weights``: the example weights of the batch mean, ``None`` for equal ones)."""
    K = probes
    A = (L[:K] - l0) / s  # (K, n): a_ik ~ g_i . z_k
    sq = A.pow(2).mean(0)
    if t is None:  # forward-only
        # b_k ~ g . z_k, g the (weighted) batch mean of the g_i
        b = A.mean(1) if weights is None else A @ (weights / weights.sum()).to(A)
        dots = (A * b[:, None]).mean(0)
        align = alignment(dots, sq, b.pow(2).mean())
    elif t > 0:
        along = (L[K] - l0) / probe_radius  # g_i . g / ||g||
        sq_safe = torch.where(sq > 0, sq, torch.ones_like(sq))
        align = torch.where(sq > 0, along / sq_safe.sqrt(), torch.ones_like(sq))
        align = align.clamp(-1.0, 1.0)
    else:  # g = 0: no direction to align with
        align = torch.where(sq > 0, torch.zeros_like(sq), torch.ones_like(sq))
    return ExampleStats(l0, sq, align, mode, probes=K, weights=weights)
