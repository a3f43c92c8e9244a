"""Reference solutions to the course's exercises (notebooks 01-05).

Each function is what a student writes in the matching exercise cell, in plain
torch, without sharpkit: the point of an exercise is to build the quantity from its
definition (docs/theory.md). ``tests/test_exercises.py`` checks every solution
against an independent reference (sharpkit's own implementation, a dense float64
computation or a closed form), and :func:`sharpkit.course.check` compares a
student's answer with these.

Example:
    >>> import torch
    >>> e = sam_perturbation([torch.tensor([3.0, 4.0])], rho=0.5)
    >>> e[0].tolist()
    [0.30000001192092896, 0.4000000059604645]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Tensor = torch.Tensor

__all__ = [
    "asam_perturbation",
    "balancedness",
    "filter_normalize",
    "hessian_vector_product",
    "hutchinson_trace",
    "lanczos_quadrature",
    "msam_gradient",
    "nbar_scale",
    "nop_sam_drift",
    "quadratic_sharpness",
    "sam_perturbation",
    "two_cycle_amplitude",
    "unguardedness",
]


# --- 01 · SAM -------------------------------------------------------------------


def sam_perturbation(grads: Sequence[Tensor], rho: float) -> list[Tensor]:
    """Exercise 01.1: SAM's ``e = rho g / ||g||`` with one norm over all tensors.

    A zero (or non-finite) gradient norm gives ``e = 0``.
    """
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    if not torch.isfinite(norm) or norm == 0:
        return [torch.zeros_like(g) for g in grads]
    return [(rho * g / norm).to(g.dtype) for g in grads]


def asam_perturbation(
    params: Sequence[Tensor], grads: Sequence[Tensor], rho: float, xi: float = 0.01
) -> list[Tensor]:
    """Exercise 01.2: ASAM's ``e = rho T^2 g / ||T g||``, ``T = |w| + xi`` on weights only.

    One-dimensional parameters (biases) use ``T = 1``.
    """
    ts = [p.abs() + xi if p.dim() > 1 else torch.ones_like(p) for p in params]
    norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(ts, grads)))
    if norm == 0:
        return [torch.zeros_like(g) for g in grads]
    return [rho * t**2 * g / norm for t, g in zip(ts, grads)]


def two_cycle_amplitude(lam: float, eta: float, rho: float) -> float:
    """Exercise 01.3: ``|w*| = eta lam rho / (2 - eta lam)`` of SAM's 2-cycle in 1-D."""
    return eta * lam * rho / (2 - eta * lam)


# --- 02 · curvature -------------------------------------------------------------


def hessian_vector_product(loss_of_w: Callable[[Tensor], Tensor], w: Tensor, v: Tensor) -> Tensor:
    """Exercise 02.1: ``H v`` by differentiating ``grad L(w) . v`` once more."""
    w = w.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_of_w(w), w, create_graph=True)
    (hv,) = torch.autograd.grad(g @ v, w)
    return hv


def hutchinson_trace(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    num_samples: int,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
) -> tuple[float, float]:
    """Exercise 02.2: Hutchinson's ``tr(H) ~ mean z^T H z`` (Rademacher ``z``), with stderr."""
    samples = []
    for _ in range(num_samples):
        z = torch.randint(0, 2, (dim,), generator=generator).to(dtype) * 2 - 1
        samples.append(float(z @ matvec(z)))
    s = torch.tensor(samples, dtype=torch.float64)
    return float(s.mean()), float(s.std() / num_samples**0.5)


def lanczos_quadrature(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Exercise 02.3: Gauss quadrature nodes and weights of a Lanczos tridiagonal.

    ``alpha`` is the diagonal (length k), ``beta`` the off-diagonal (length k-1).
    The nodes are the eigenvalues of ``T``, the weights the squared first components
    of its eigenvectors.
    """
    T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    nodes, vecs = torch.linalg.eigh(T)
    return nodes, vecs[0] ** 2


# --- 03 · sharpness -------------------------------------------------------------


def quadratic_sharpness(A: Tensor, rho: float) -> tuple[float, float]:
    """Exercise 03.1: worst-case and average-case sharpness of ``0.5 d^T A d`` at its minimum.

    Worst case over ``||d|| <= rho``: ``rho^2 lambda_max(A) / 2`` (``A`` positive
    semi-definite); average over ``d ~ N(0, rho^2 I)``: ``rho^2 tr(A) / 2``.
    """
    lam_max = float(torch.linalg.eigvalsh(A)[-1])
    return 0.5 * rho**2 * lam_max, 0.5 * rho**2 * float(torch.trace(A))


def filter_normalize(direction: Tensor, weight: Tensor) -> Tensor:
    """Exercise 03.2: Li et al.'s filter normalisation of one tensor.

    For ``dim >= 2`` each filter ``direction[j]`` is rescaled to the norm of
    ``weight[j]``; 1-D tensors (biases, norm layers) get zero.
    """
    if weight.dim() < 2:
        return torch.zeros_like(weight)
    d = direction.reshape(direction.shape[0], -1)
    w = weight.reshape(weight.shape[0], -1)
    scale = w.norm(dim=1, keepdim=True) / d.norm(dim=1, keepdim=True)
    return (d * scale).reshape(weight.shape)


# --- 04 · balancedness ----------------------------------------------------------


def balancedness(x: Tensor, y: Tensor) -> float:
    """Exercise 04.1: ``B = (||x||^2 - ||y||^2) / 2`` (Frobenius norms)."""
    return 0.5 * float((x**2).sum() - (y**2).sum())


def nop_sam_drift(G: Tensor, x: Tensor, y: Tensor, rho: float) -> float:
    """Exercise 04.2: the leading term of Theorem 2 for ``f(x y^T)`` with ``G = grad f``.

    ``rho (||g_x||^2 - ||g_y||^2) / sqrt(||g_x||^2 + ||g_y||^2)`` with ``g_x = G y``,
    ``g_y = G^T x``.
    """
    gx, gy = G @ y, G.T @ x
    nx, ny = float((gx**2).sum()), float((gy**2).sum())
    return rho * (nx - ny) / (nx + ny) ** 0.5


def nbar_scale(
    x: Tensor, y: Tensor, gx: Tensor, gy: Tensor, a: float, eta: float
) -> tuple[Tensor, Tensor]:
    """Exercise 04.3: one nBAR rescaling (before the base step).

    ``||g_x|| >= ||g_y||``: ``x (1 + a eta)``, ``y (1 - a eta)``; otherwise swapped.
    """
    s = 1.0 if gx.norm() >= gy.norm() else -1.0
    return x * (1 + s * a * eta), y * (1 - s * a * eta)


# --- 05 · mSAM and delta-SAM ----------------------------------------------------


def msam_gradient(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, tuple[Tensor, Tensor]], Tensor],
    batch: tuple[Tensor, Tensor],
    rho: float,
    m: int,
) -> list[Tensor]:
    """Exercise 05.1: mSAM's ``G = sum_j (n_j/n) grad L_{B_j}(w + e_j)``.

    Micro-batches are ``torch.tensor_split`` pieces of the batch; each has its own
    ``e_j = rho g_j / ||g_j||``. The model's weights are restored.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    n = len(batch[1])
    total = [torch.zeros_like(p) for p in params]
    for xs, ys in zip(torch.tensor_split(batch[0], m), torch.tensor_split(batch[1], m)):
        grads = torch.autograd.grad(loss_fn(model, (xs, ys)), params)
        e = sam_perturbation(grads, rho)
        saved = [p.detach().clone() for p in params]  # (w + e) - e is not w in floating point
        with torch.no_grad():
            for p, d in zip(params, e):
                p.add_(d)
        perturbed = torch.autograd.grad(loss_fn(model, (xs, ys)), params)
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
        for t, g in zip(total, perturbed):
            t.add_(g, alpha=len(ys) / n)
    return total


def unguardedness(per_example_grads: Tensor) -> Tensor:
    """Exercise 05.2: ``u_i = 1 - cos(g_i, g)`` from an ``(n, d)`` matrix of ``g_i``.

    ``g`` is the mean of the rows; an example with a zero gradient gets ``u_i = 1``.
    """
    g = per_example_grads.mean(0)
    norms = per_example_grads.norm(dim=1) * g.norm()
    cos = torch.where(norms > 0, per_example_grads @ g / norms.clamp_min(1e-300), 0.0)
    return 1 - cos
