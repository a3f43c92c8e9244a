"""The toy two-factor problems of Li, Zhang, He (NeurIPS 2024), Appendix A.4.

- :class:`NOPToy`: ``0.5 ||x y^T - (A + a N)||_F^2`` with ``A = diag(0.5, 0, 0)``,
  ``N = diag(1, 0.8, 0.5) U`` and ``U`` i.i.d. standard normal, drawn afresh for
  every sample. The noise ``a`` is what makes SAM balance: with ``a = 0`` SAM on
  NOP need not balance at all (Li, Zhang, He, NeurIPS 2024; docs/theory.md).
- :class:`OPToy`: ``(x^T y - (0.5 + a n))^2`` with ``n ~ N(0, 1)``.
- :func:`paper_init`: ``x0 = [0.2, -0.1, 0.3]``, ``y0 = -3 x0`` (``B_0 = -0.56``).
- :func:`simulate`: SGD, SAM, nBAR or oBAR on a toy with closed-form gradients,
  many independent runs at once (batched), recording the balancedness.

The paper's settings: ``eta = 1e-4``, ``T = 1e5``, ``rho = 0.1`` (NOP) and
``rho = 0.2`` (OP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sharpkit._progress import progress_bar

from .rules import bar_coefficient, bar_signs, check_schedule

__all__ = ["NOPToy", "OPToy", "ToyRun", "paper_init", "simulate"]

_PAPER_X0 = (0.2, -0.1, 0.3)
_PAPER_NOISE_SCALES = (1.0, 0.8, 0.5)


def _check_noise(noise: Any) -> float:
    if isinstance(noise, bool) or not isinstance(noise, (int, float)):
        raise TypeError(f"noise: expected a real number, got {type(noise).__name__}")
    if not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise: must be finite and >= 0, got {noise}")
    return float(noise)


def _check_dim(dim: Any) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim: expected an int, got {type(dim).__name__}")
    if dim < 1:
        raise ValueError(f"dim: must be >= 1, got {dim}")
    return dim


class _Toy:
    """Shared set-up of the toys: validated noise level, size, generator and dtype."""

    def __init__(
        self,
        noise: float = 0.0,
        dim: int = 3,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.noise = _check_noise(noise)
        self.dim = _check_dim(dim)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator: expected a torch.Generator, got {type(generator).__name__}"
            )
        self.generator = generator
        self.dtype = dtype


class NOPToy(_Toy):
    r"""The NOP toy ``0.5 ||x y^T - (A + a N)||_F^2`` (Li, Zhang, He, NeurIPS 2024, App. A.4).

    ``A = diag(0.5, 0, ..., 0)``; ``N = diag(s) U`` with ``U`` standard normal
    (``dim x dim``) and ``s = (1, 0.8, 0.5)`` for ``dim = 3`` (the paper's
    values; ``linspace(1, 0.5, dim)`` otherwise). Gradients with
    ``R = x y^T - T``: ``g_x = R y``, ``g_y = R^T x``. Since ``E[N] = 0``,
    ``E[loss] = 0.5 ||x y^T - A||^2 + const``, which is :meth:`loss`.

    Batched: ``x`` and ``y`` may carry leading run dimensions (``(..., dim)``).

    Args:
        noise: the noise level ``a >= 0``.
        dim: the size of ``x`` and ``y``.
        generator: random generator for the noise.
        dtype: dtype of the constants (float64 by default).

    Example:
        >>> toy = NOPToy(noise=1.0, generator=torch.Generator().manual_seed(0))
        >>> x0, y0 = paper_init()
        >>> round(toy.loss(x0, y0).item(), 4)
        0.2732
        >>> toy.sample_loss(x0, y0).item() > 0
        True
    """

    kind = "nop"

    def __init__(
        self,
        noise: float = 0.0,
        dim: int = 3,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__(noise, dim, generator=generator, dtype=dtype)
        self.A = torch.zeros(dim, dim, dtype=dtype)
        self.A[0, 0] = 0.5
        if dim == 3:
            self.noise_scales = torch.tensor(_PAPER_NOISE_SCALES, dtype=dtype)
        else:
            self.noise_scales = torch.linspace(1.0, 0.5, dim, dtype=dtype)

    def sample_target(self, batch_shape: tuple[int, ...] = ()) -> torch.Tensor:
        """One draw of ``A + a N`` (shape ``batch_shape + (dim, dim)``)."""
        u = torch.randn(
            (*batch_shape, self.dim, self.dim), generator=self.generator, dtype=self.dtype
        )
        return self.A + self.noise * self.noise_scales[:, None] * u

    def sample_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``0.5 ||x y^T - (A + a N)||^2`` with a fresh ``N`` (differentiable)."""
        target = self.sample_target(tuple(x.shape[:-1])).to(x.dtype)
        return self.loss_at(x, y, target)

    def loss_at(self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``0.5 ||x y^T - target||^2``."""
        r = x[..., :, None] * y[..., None, :] - target
        return 0.5 * (r**2).sum(dim=(-2, -1))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The noise-free loss ``0.5 ||x y^T - A||^2`` (the expected loss up to a constant)."""
        return self.loss_at(x, y, self.A.to(x.dtype))

    def grads(
        self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed-form ``(g_x, g_y) = (R y, R^T x)`` with ``R = x y^T - target``."""
        r = x[..., :, None] * y[..., None, :] - target
        return (r @ y[..., :, None])[..., 0], (r.transpose(-1, -2) @ x[..., :, None])[..., 0]


class OPToy(_Toy):
    r"""The OP toy ``(x^T y - (0.5 + a n))^2``, ``n ~ N(0, 1)`` (Li, Zhang, He, App. A.4).

    Gradients with ``r = x^T y - t``: ``g_x = 2 r y``, ``g_y = 2 r x``;
    ``E[loss] = (x^T y - 0.5)^2 + a^2``, so :meth:`loss` is ``(x^T y - 0.5)^2``.

    Example:
        >>> toy = OPToy(noise=0.5, generator=torch.Generator().manual_seed(0))
        >>> x0, y0 = paper_init()
        >>> round(toy.loss(x0, y0).item(), 4)
        0.8464
    """

    kind = "op"

    def sample_target(self, batch_shape: tuple[int, ...] = ()) -> torch.Tensor:
        """One draw of ``0.5 + a n`` (shape ``batch_shape``)."""
        n = torch.randn(batch_shape, generator=self.generator, dtype=self.dtype)
        return 0.5 + self.noise * n

    def sample_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(x^T y - (0.5 + a n))^2`` with a fresh ``n`` (differentiable)."""
        return self.loss_at(x, y, self.sample_target(tuple(x.shape[:-1])).to(x.dtype))

    def loss_at(self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(x^T y - target)^2``."""
        return ((x * y).sum(-1) - target) ** 2

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The noise-free loss ``(x^T y - 0.5)^2``."""
        return self.loss_at(x, y, torch.tensor(0.5, dtype=x.dtype))

    def grads(
        self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed-form ``(g_x, g_y) = (2 r y, 2 r x)`` with ``r = x^T y - target``."""
        r = 2.0 * ((x * y).sum(-1) - target)
        return r[..., None] * y, r[..., None] * x


def paper_init(
    dim: int = 3, *, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's initialisation ``x0 = [0.2, -0.1, 0.3]``, ``y0 = -3 x0``.

    For ``dim != 3`` the pattern ``0.2, -0.1, 0.3`` is repeated (or cut) to length
    ``dim``. ``B_0 = (1 - 9) ||x0||^2 / 2 = -0.56`` for ``dim = 3``.

    Example:
        >>> x0, y0 = paper_init()
        >>> x0.tolist(), y0.tolist()
        ([0.2, -0.1, 0.3], [-0.6000000000000001, 0.30000000000000004, -0.8999999999999999])
    """
    dim = _check_dim(dim)
    x0 = torch.tensor([_PAPER_X0[i % 3] for i in range(dim)], dtype=dtype)
    return x0, -3.0 * x0


@dataclass
class ToyRun:
    """The result of :func:`simulate`.

    Attributes:
        method: "sgd", "sam", "nbar" or "obar".
        steps: the recorded step indices (0 is the initial point), shape ``(k,)``.
        balancedness: ``B`` per record and run, shape ``(k, runs)``.
        loss: the noise-free loss per record and run, shape ``(k, runs)``.
        x, y: the final factors, shape ``(runs, dim)``.
        config: the settings of the run.
    """

    method: str
    steps: np.ndarray
    balancedness: np.ndarray
    loss: np.ndarray
    x: torch.Tensor
    y: torch.Tensor
    config: dict[str, Any]


_METHODS = ("sgd", "sam", "nbar", "obar")


def simulate(
    toy: NOPToy | OPToy,
    method: str,
    *,
    steps: int,
    lr: float,
    rho: float = 0.1,
    mu0: float = 0.1,
    schedule: str = "constant",
    runs: int = 1,
    x0: torch.Tensor | None = None,
    y0: torch.Tensor | None = None,
    record_every: int = 1,
    progress: bool = False,
) -> ToyRun:
    """Train a toy with SGD, SAM, nBAR or oBAR using closed-form gradients.

    ``runs`` independent runs (independent noise, same start) advance together.
    Each step draws one noise sample per run; SAM evaluates both of its
    gradients on that same sample:

    - sgd: ``w <- w - lr g(w)``;
    - sam: ``u = 1 / sqrt(||g_x||^2 + ||g_y||^2)``, ``g~ = g(x + rho u g_x, y + rho u g_y)``,
      ``w <- w - lr g~`` (Li, Zhang, He, NeurIPS 2024, Eq. (2));
    - nbar / obar: the BAR scaling of :mod:`sharpkit.balance.rules` with
      ``eta_t = lr``, then the SGD step (Algorithms 3 and 2).

    Args:
        toy: a :class:`NOPToy` or :class:`OPToy` (its generator drives the noise).
        method: "sgd", "sam", "nbar" or "obar".
        steps: number of steps (> 0).
        lr: the learning rate ``eta`` (> 0).
        rho: SAM's radius.
        mu0, schedule: BAR's ``a_t`` (the schedule runs over ``steps``).
        runs: number of independent runs.
        x0, y0: the start (default :func:`paper_init`).
        record_every: record ``B`` and the loss every this many steps.
        progress: show a tqdm progress bar.

    Returns:
        A :class:`ToyRun`.

    Example:
        >>> toy = NOPToy(noise=1.0, generator=torch.Generator().manual_seed(0))
        >>> sgd = simulate(toy, "sgd", steps=200, lr=0.01)
        >>> sam = simulate(toy, "sam", steps=200, lr=0.01, rho=0.1)
        >>> bool(abs(sam.balancedness[-1, 0]) < abs(sgd.balancedness[-1, 0]))
        True
    """
    if not isinstance(toy, (NOPToy, OPToy)):
        raise TypeError(f"toy: expected a NOPToy or OPToy, got {type(toy).__name__}")
    if method not in _METHODS:
        raise ValueError(f"method: expected one of {_METHODS}, got {method!r}")
    for name, v in (("steps", steps), ("runs", runs), ("record_every", record_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    for name, v in (("lr", lr), ("rho", rho), ("mu0", mu0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name}: expected a finite real >= 0, got {v!r}")
    check_schedule(schedule, steps)
    if x0 is None or y0 is None:
        px, py = paper_init(toy.dim, dtype=toy.dtype)
        x0 = px if x0 is None else x0
        y0 = py if y0 is None else y0
    x = x0.detach().to(toy.dtype).expand(runs, toy.dim).clone()
    y = y0.detach().to(toy.dtype).expand(runs, toy.dim).clone()

    def record() -> None:
        b = 0.5 * ((x**2).sum(-1) - (y**2).sum(-1))
        bal.append(b.numpy().copy())
        losses.append(toy.loss(x, y).numpy().copy())

    rec_steps, bal, losses = [0], [], []
    record()
    for t in progress_bar(range(steps), f"toy {method}", enabled=progress):
        target = toy.sample_target((runs,))
        gx, gy = toy.grads(x, y, target)
        if method == "sam":
            norm = torch.sqrt((gx**2).sum(-1, keepdim=True) + (gy**2).sum(-1, keepdim=True))
            scale = torch.where(norm > 0, rho / norm, torch.zeros_like(norm))
            gx, gy = toy.grads(x + scale * gx, y + scale * gy, target)
        elif method in ("nbar", "obar"):
            c = bar_coefficient(mu0, schedule, t, steps) * lr
            if method == "nbar":
                first, second = gx.norm(dim=-1), gy.norm(dim=-1)
            else:
                first, second = x.norm(dim=-1), y.norm(dim=-1)
            s = bar_signs(method, first, second)[:, None]
            x = x * (1.0 + s * c)
            y = y * (1.0 - s * c)
        x = x - lr * gx
        y = y - lr * gy
        if (t + 1) % record_every == 0:
            rec_steps.append(t + 1)
            record()
    return ToyRun(
        method=method,
        steps=np.asarray(rec_steps),
        balancedness=np.stack(bal),
        loss=np.stack(losses),
        x=x,
        y=y,
        config={
            "toy": type(toy).__name__,
            "noise": toy.noise,
            "dim": toy.dim,
            "steps": steps,
            "lr": lr,
            "rho": rho,
            "mu0": mu0,
            "schedule": schedule,
            "runs": runs,
        },
    )
