"""Directions in weight space for loss-landscape plots.

- :func:`filter_normalized_direction`: Li et al. (2018): a Gaussian direction whose
  every filter (slice along dim 0 of a weight of dimension >= 2) is rescaled to the
  norm of the matching filter of ``w``; biases and normalisation parameters (all
  1-D parameters) are zeroed, so the plot is comparable across scale-invariant nets.
- :func:`hessian_directions`: the top Hessian eigenvectors (Lanczos).
- :func:`pca_directions`: the two principal directions of a training trajectory
  ``w_i - w_final`` and the trajectory's coordinates in them (Li et al., Sec. 7).

A direction is a dict ``{parameter name: tensor}`` over the trainable parameters.

References:
    Li, Xu, Taylor, Studer, Goldstein. Visualizing the loss landscape of neural
    nets. NeurIPS 2018.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sharpkit._functional import select_parameters

__all__ = [
    "Direction",
    "filter_normalized_direction",
    "hessian_directions",
    "pca_directions",
    "project_onto",
]

Direction = dict[str, torch.Tensor]

#: keeps filter normalisation finite for an all-zero filter of w (its direction is zero)
_ZERO_FILTER = 0.0


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    return {n: named[n].detach() for n in select_parameters(model, None)}


def filter_normalized_direction(
    model: nn.Module, *, generator: torch.Generator | None = None, seed: int | None = None
) -> Direction:
    """A random filter-normalised direction (Li et al., 2018).

    For a weight ``W`` of dimension >= 2 with filters ``W_j = W[j]`` the direction is
    ``D_j = Z_j / ||Z_j|| * ||W_j||`` with ``Z`` standard Gaussian; 1-D parameters
    (biases, BatchNorm/LayerNorm weights) get ``D = 0``.

    A LoRA factor that is exactly zero (a fresh adapter's ``lora_B``) gets
    ``D = 0``, and moving ``A`` alone leaves ``B A = 0``: the loss along the
    adapter is exactly flat. That case warns
    (:class:`~sharpkit.balance.ZeroFactorWarning`, see
    :mod:`sharpkit.balance.degenerate`): measure after training, take a random
    direction instead, or plot the merged model (PEFT's ``merge_and_unload()``).

    Args:
        model: the network (only read).
        generator: CPU generator of the Gaussian draws (or give ``seed``).
        seed: seed when no generator is given (default 0).

    Example:
        >>> m = nn.Linear(3, 2)
        >>> d = filter_normalized_direction(m, seed=0)
        >>> torch.allclose(d["weight"].norm(dim=1), m.weight.detach().norm(dim=1)), d["bias"].abs().sum().item()
        (True, 0.0)
    """
    from sharpkit.balance.degenerate import warn_zero_factors

    warn_zero_factors(model, "filter-normalised direction", stacklevel=3)
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    out: Direction = {}
    for name, w in _trainable(model).items():
        if w.dim() <= 1:
            out[name] = torch.zeros_like(w)
            continue
        z = torch.randn(w.shape, generator=generator, dtype=torch.float64)
        zf = z.reshape(w.shape[0], -1)
        wf = w.detach().double().reshape(w.shape[0], -1)
        zn = zf.norm(dim=1, keepdim=True)
        scale = torch.where(zn > 0, wf.norm(dim=1, keepdim=True) / zn, _ZERO_FILTER)
        out[name] = (zf * scale).reshape(w.shape).to(w)
    return out


def hessian_directions(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    k: int = 2,
    *,
    seed: int = 0,
    tol: float = 1e-4,
    mode: str = "eval",
    progress: bool = False,
) -> tuple[list[Direction], list[float]]:
    """The top-``k`` Hessian eigenvectors as directions, with their eigenvalues.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> data = (torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g))
        >>> dirs, lams = hessian_directions(nn.Linear(3, 2), nn.CrossEntropyLoss(), data, k=1)
        >>> sorted(dirs[0]), lams[0] > 0
        (['bias', 'weight'], True)
    """
    from sharpkit.curvature import HessianOperator, eigenvalues

    op = HessianOperator(model, loss_fn, data, mode=mode)
    res = eigenvalues(op, k=k, seed=seed, tol=tol, return_eigenvectors=True, progress=progress)
    assert res.eigenvectors is not None
    dirs = []
    for j in range(res.eigenvectors.shape[1]):
        parts = op.unflatten(res.eigenvectors[:, j])
        dirs.append({n: t.detach().clone() for n, t in zip(op.param_names, parts)})
    return dirs, [float(x) for x in res.eigenvalues]


def _flat(state: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    return torch.cat([state[n].detach().double().reshape(-1) for n in names])


def _unflat(v: torch.Tensor, ref: Mapping[str, torch.Tensor], names: Sequence[str]) -> Direction:
    out, i = {}, 0
    for n in names:
        t = ref[n]
        out[n] = v[i : i + t.numel()].reshape(t.shape).to(t)
        i += t.numel()
    return out


def project_onto(
    states: Sequence[Mapping[str, torch.Tensor]],
    origin: Mapping[str, torch.Tensor],
    directions: Sequence[Mapping[str, torch.Tensor]],
) -> torch.Tensor:
    """Least-squares coordinates of ``states - origin`` in the span of ``directions``.

    Returns a ``(len(states), len(directions))`` float64 tensor.
    """
    names = list(directions[0])
    D = torch.stack([_flat(d, names) for d in directions], dim=1)
    o = _flat(origin, names)
    X = torch.stack([_flat(s, names) - o for s in states], dim=1)
    return torch.linalg.lstsq(D, X).solution.T


def pca_directions(
    trajectory: Sequence[Mapping[str, torch.Tensor]],
    *,
    names: Sequence[str] | Callable[[str], bool] | None = None,
) -> tuple[list[Direction], torch.Tensor, list[float]]:
    """PCA directions of a trajectory around its final point (Li et al., 2018, Sec. 7).

    Args:
        trajectory: state dicts (or parameter dicts) in training order; the last is
            the origin.
        names: the entries to use (default: every floating entry of the last state
            that is not a BatchNorm statistic).

    Returns:
        ``(directions, coords, explained)``: two unit directions, the ``(n, 2)``
        coordinates of every snapshot in them, and the explained variance ratios.

    Example:
        >>> traj = [{"w": torch.tensor([float(i), 2.0 * i, 0.1 * (-1) ** i])} for i in range(5)]
        >>> dirs, coords, explained = pca_directions(traj)
        >>> coords.shape, explained[0] > 0.99
        (torch.Size([5, 2]), True)
    """
    if len(trajectory) < 3:
        raise ValueError(f"trajectory: need at least 3 snapshots, got {len(trajectory)}")
    last = trajectory[-1]
    if names is None:
        sel = [
            n
            for n, t in last.items()
            if t.is_floating_point() and not n.endswith(("running_mean", "running_var"))
        ]
    elif callable(names):
        sel = [n for n in last if names(n)]
    else:
        sel = list(names)
    o = _flat(last, sel)
    M = torch.stack([_flat(s, sel) - o for s in trajectory[:-1]])  # (n-1, dim)
    _, S, Vh = torch.linalg.svd(M, full_matrices=False)
    total = float((S**2).sum())
    explained = [float(s**2) / total for s in S[:2]] if total > 0 else [0.0, 0.0]
    dirs = [_unflat(Vh[j], last, sel) for j in range(min(2, Vh.shape[0]))]
    coords = torch.stack([_flat(s, sel) - o for s in trajectory]) @ Vh[:2].T
    return dirs, coords, explained
