"""Loss surfaces along directions, and linear interpolation between checkpoints.

    1-D:  f(a)    = L(w + a d)
    2-D:  f(a, b) = L(w + a d1 + b d2)
    interpolation: f(t) = L((1 - t) w_A + t w_B), every floating entry of the state
    dict interpolated (BatchNorm running statistics included)

Each grid point is evaluated over all the data (weighted mean of the batch
losses, the batches materialised once on the compute device) on a private copy of
the model, with a tqdm bar over the grid.

References:
    Goodfellow, Vinyals, Saxe. Qualitatively characterizing neural network
    optimization problems. ICLR 2015 (interpolation).
    Li, Xu, Taylor, Studer, Goldstein. Visualizing the loss landscape of neural
    nets. NeurIPS 2018 (filter-normalised surfaces).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sharpkit._progress import progress_bar
from sharpkit.protocol import MeasurementProtocol, to_jsonable
from sharpkit.sharpness._objective import Objective, supervised_accuracy

__all__ = ["Surface", "interpolate_checkpoints", "loss_surface_1d", "loss_surface_2d"]


@dataclasses.dataclass
class Surface:
    """Loss (and accuracy) on a 1-D or 2-D grid.

    Attributes:
        coords: one float64 tensor per axis (the grid coordinates).
        loss: ``(len(x),)`` or ``(len(x), len(y))`` float64 losses (``loss[i, j]`` at
            ``(x[i], y[j])``).
        accuracy: the same shape, or ``None`` when no accuracy applies.
        kind: ``"direction"``, ``"plane"`` or ``"interpolation"``.
        protocol: how it was measured.
    """

    coords: list[torch.Tensor]
    loss: torch.Tensor
    accuracy: torch.Tensor | None
    kind: str
    protocol: MeasurementProtocol

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON form."""
        return to_jsonable(dataclasses.asdict(self) | {"protocol": self.protocol})


def _grid(span: tuple[float, float], steps: int, name: str) -> torch.Tensor:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        raise ValueError(f"{name}: expected an integer >= 2, got {steps!r}")
    lo, hi = span
    if not lo < hi:
        raise ValueError(f"span: expected (low, high) with low < high, got {span!r}")
    return torch.linspace(float(lo), float(hi), steps, dtype=torch.float64)


def _evaluate(
    obj: Objective, d: Sequence[torch.Tensor] | None, acc_fn: Callable | None
) -> tuple[float, float | None]:
    loss = obj.mean_loss(d)
    if acc_fn is None:
        return loss, None
    return loss, obj.weighted_mean([obj.metric(acc_fn, b, d) for b in obj.batches])


def _accuracy(obj: Objective, accuracy_fn: Callable | None) -> Callable | None:
    if accuracy_fn is not None:
        return accuracy_fn
    try:
        with torch.no_grad(), obj.replayed():  # a probe, not counted as a cost
            supervised_accuracy(obj.at(), obj.batches[0])
    except (ValueError, RuntimeError, IndexError):
        return None
    return supervised_accuracy


def _as_list(
    obj: Objective, direction: Mapping[str, torch.Tensor], name: str
) -> list[torch.Tensor]:
    unknown = [k for k in direction if k not in obj.names]
    if unknown:
        raise ValueError(f"{name}: entries that are not measured parameters: {unknown}")
    out = []
    for n, w in zip(obj.names, obj.w0):
        t = direction.get(n)
        if t is None:
            out.append(torch.zeros_like(w))
        elif tuple(t.shape) != tuple(w.shape):
            raise ValueError(
                f"{name}: {n} has shape {tuple(t.shape)}, the parameter {tuple(w.shape)}"
            )
        else:
            out.append(t.to(w))
    return out


def loss_surface_1d(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    direction: Mapping[str, torch.Tensor],
    *,
    steps: int = 41,
    span: tuple[float, float] = (-1.0, 1.0),
    accuracy_fn: Callable[..., Any] | None = None,
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Surface:
    """``L(w + a d)`` for ``a`` on ``steps`` points of ``span``.

    Args:
        model: the network (never modified).
        loss_fn: ``loss_fn(model, batch)`` or an nn loss module.
        data: one batch or an iterable of batches.
        direction: ``{parameter name: tensor}`` (missing names: zero).
        steps, span: the grid.
        accuracy_fn: also record ``accuracy_fn(model, batch)`` (default: arg-max
            accuracy when batches are ``(inputs, targets)`` classification data).
        mode, dtype, device: module mode, compute dtype and device.
        progress: tqdm bar over the grid.

    Example:
        >>> from sharpkit.landscape import filter_normalized_direction
        >>> m = nn.Linear(3, 2)
        >>> g = torch.Generator().manual_seed(0)
        >>> data = (torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g))
        >>> s = loss_surface_1d(m, nn.CrossEntropyLoss(), data, filter_normalized_direction(m), steps=5)
        >>> s.loss.shape, bool(s.loss[2] == s.loss.new_tensor(nn.CrossEntropyLoss()(m(data[0]), data[1]).item()))
        (torch.Size([5]), True)
    """
    xs = _grid(span, steps, "steps")
    obj = Objective(model, loss_fn, data, mode=mode, dtype=dtype, device=device)
    d = _as_list(obj, direction, "direction")
    acc_fn = _accuracy(obj, accuracy_fn)
    loss = torch.empty(steps, dtype=torch.float64)
    acc = torch.empty(steps, dtype=torch.float64) if acc_fn else None
    for i, a in enumerate(progress_bar(xs.tolist(), "1-D surface", enabled=progress)):
        loss[i], ai = _evaluate(obj, [float(a) * t for t in d], acc_fn)
        if acc is not None:
            acc[i] = ai
    obj.set_offset(None)
    return Surface(
        [xs], loss, acc, "direction", obj.protocol("grid", None, steps=steps, span=list(span))
    )


def loss_surface_2d(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    directions: Sequence[Mapping[str, torch.Tensor]],
    *,
    steps: int | tuple[int, int] = 21,
    span: tuple[float, float] | tuple[tuple[float, float], tuple[float, float]] = (-1.0, 1.0),
    accuracy_fn: Callable[..., Any] | None = None,
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Surface:
    """``L(w + a d1 + b d2)`` on a grid (``loss[i, j]`` at ``(x[i], y[j])``).

    ``steps`` and ``span`` may differ per axis (pairs). Otherwise as
    :func:`loss_surface_1d`.

    Example:
        >>> from sharpkit.landscape import filter_normalized_direction
        >>> m = nn.Linear(3, 2)
        >>> g = torch.Generator().manual_seed(0)
        >>> data = (torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g))
        >>> dirs = [filter_normalized_direction(m, seed=s) for s in (0, 1)]
        >>> loss_surface_2d(m, nn.CrossEntropyLoss(), data, dirs, steps=(3, 4)).loss.shape
        torch.Size([3, 4])
    """
    if len(directions) != 2:
        raise ValueError(f"directions: expected two directions, got {len(directions)}")
    nx, ny = steps if isinstance(steps, tuple) else (steps, steps)
    sx, sy = span if isinstance(span[0], tuple) else (span, span)  # type: ignore[misc]
    xs, ys = _grid(sx, nx, "steps"), _grid(sy, ny, "steps")  # type: ignore[arg-type]
    obj = Objective(model, loss_fn, data, mode=mode, dtype=dtype, device=device)
    d1, d2 = (_as_list(obj, d, f"directions[{i}]") for i, d in enumerate(directions))
    acc_fn = _accuracy(obj, accuracy_fn)
    loss = torch.empty(nx, ny, dtype=torch.float64)
    acc = torch.empty(nx, ny, dtype=torch.float64) if acc_fn else None
    points = [(i, j) for i in range(nx) for j in range(ny)]
    for i, j in progress_bar(points, "2-D surface", enabled=progress):
        a, b = float(xs[i]), float(ys[j])
        loss[i, j], aij = _evaluate(obj, [a * t1 + b * t2 for t1, t2 in zip(d1, d2)], acc_fn)
        if acc is not None:
            acc[i, j] = aij
    obj.set_offset(None)
    return Surface(
        [xs, ys], loss, acc, "plane",
        obj.protocol("grid", None, steps=[nx, ny], span=[list(sx), list(sy)]),
    )  # fmt: skip


def interpolate_checkpoints(
    model: nn.Module,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    loss_fn: Any,
    data: Any,
    *,
    steps: int = 21,
    span: tuple[float, float] = (0.0, 1.0),
    accuracy_fn: Callable[..., Any] | None = None,
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Surface:
    """``L((1 - t) A + t B)`` with every floating state entry interpolated.

    Parameters *and* floating buffers (BatchNorm running mean/var) are interpolated;
    integer buffers (``num_batches_tracked``) are taken from ``A`` for ``t < 0.5`` and
    from ``B`` otherwise. ``span`` beyond ``[0, 1]`` extrapolates.

    Example:
        >>> a, b = nn.Linear(2, 1), nn.Linear(2, 1)
        >>> x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
        >>> loss_fn = lambda m, x: (m(x) ** 2).mean()
        >>> s = interpolate_checkpoints(a, a.state_dict(), b.state_dict(), loss_fn, x, steps=3)
        >>> bool(torch.isclose(s.loss[-1], torch.tensor(loss_fn(b, x).item(), dtype=torch.float64)))
        True
    """
    ts = _grid(span, steps, "steps")
    ka, kb = set(state_a), set(state_b)
    if ka != kb:
        raise ValueError(
            f"state_b: keys differ from state_a: only in A {sorted(ka - kb)}, only in B {sorted(kb - ka)}"
        )
    obj = Objective(model, loss_fn, data, mode=mode, dtype=dtype, device=device)
    acc_fn = _accuracy(obj, accuracy_fn)
    loss = torch.empty(steps, dtype=torch.float64)
    acc = torch.empty(steps, dtype=torch.float64) if acc_fn else None
    for i, t in enumerate(progress_bar(ts.tolist(), "interpolation", enabled=progress)):
        state = {}
        for k, va in state_a.items():
            vb = state_b[k]
            if va.is_floating_point():
                state[k] = (1 - t) * va.double() + t * vb.double()
            else:
                state[k] = va if t < 0.5 else vb
        obj.frozen.load_state(state)  # parameters and buffers, in the compute dtype
        obj.w0 = list(obj.frozen.values.values())
        obj.set_offset(None)
        loss[i], ai = _evaluate(obj, None, acc_fn)
        if acc is not None:
            acc[i] = ai
    return Surface(
        [ts],
        loss,
        acc,
        "interpolation",
        obj.protocol("interpolation", None, steps=steps, span=list(span)),
    )
