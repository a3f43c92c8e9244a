"""Spectral density by stochastic Lanczos quadrature (SLQ).

The spectral density ``phi(t) = (1/n) sum_i delta(t - lambda_i)`` of an
``n x n`` symmetric ``H`` is approximated, for a unit random vector ``v``, by the
Gauss quadrature of ``v^T delta(t - H) v`` that ``m`` Lanczos steps from ``v``
provide: nodes ``theta_j`` are the eigenvalues of the tridiagonal ``T_m`` and
weights ``w_j = s_j[0]^2`` the squared first components of its eigenvectors
(``sum_j w_j = 1``; LAPACK's symmetric tridiagonal solver). Averaging over
``runs`` Rademacher start vectors and smoothing each node with a Gaussian of
width ``sigma`` gives

    phi_sigma(t) = (1/runs) sum_r sum_j w_j^(r) N(t; theta_j^(r), sigma^2).

The quadrature is exact for polynomials of degree ``< 2m``, so for ``m >= 2`` its
first two moments are ``v^T H v`` and ``v^T H^2 v`` exactly: unbiased estimates of
``tr(H)/n`` and ``tr(H^2)/n``.

Each run is, by default, the plain three-term Lanczos recurrence of
:mod:`sharpkit.curvature.lanczos`: two vectors in the operator's dtype, inner
products accumulated in float64, so a step costs a few passes over one vector
besides its product, whatever the model's size. In finite precision the vectors
lose orthogonality once Ritz values converge and ``T_m`` acquires near-copies
("ghosts") of them, but the quadrature is still that of a larger matrix whose
eigenvalues lie in tiny intervals around ``H``'s, with the weight of each
eigenvalue shared among its copies (Greenbaum 1989; Meurant and Strakos 2006): the
smoothed density and the moments agree with the reorthogonalised ones to rounding,
only individual nodes repeat. ``reorthogonalize=True``
orthogonalises every vector against all previous ones (float64 block products on
the stored basis: ``steps`` vectors of memory and two passes over ``j`` of them at
step ``j``), which gives ghost-free nodes and, with ``steps = n``, the exact
spectrum.

Reference:
    Ghorbani, Krishnan, Xiao. An investigation into neural net optimization via
    Hessian eigenvalue density. ICML 2019. arXiv:1901.10159
    Lin, Saad, Yang. Approximating spectral densities of large matrices. SIAM
    Review, 2016.
    Greenbaum. Behavior of slightly perturbed Lanczos and conjugate-gradient
    recurrences. Linear Algebra Appl. 113, 1989.
    Meurant, Strakos. The Lanczos and conjugate gradient algorithms in finite
    precision arithmetic. Acta Numerica, 2006 (why the quadrature survives the
    loss of orthogonality).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from sharpkit._progress import progress_bar
from sharpkit.curvature._linop import as_operator, make_generator, operator_protocol, rademacher
from sharpkit.curvature.lanczos import _tridiag_eigh, lanczos_tridiagonal
from sharpkit.protocol import MeasurementProtocol, to_jsonable

__all__ = ["DensityResult", "spectral_density"]

# Default smoothing width as a fraction of the spread of the nodes (max - min).
_SIGMA_FRACTION = 0.01
# The grid extends this many sigmas beyond the extreme nodes, so every Gaussian's
# mass lies (to ~1e-6) on the grid and the density integrates to 1.
_GRID_PAD_SIGMAS = 5.0


@dataclasses.dataclass
class DensityResult:
    """A smoothed spectral density and the raw quadrature behind it.

    Attributes:
        grid: evaluation points (float64 tensor, ascending).
        density: ``phi_sigma`` on ``grid`` (integrates to ~1).
        nodes: ``(runs, steps)`` Ritz values per run (NaN-padded if a run stopped
            early on an invariant subspace).
        weights: matching quadrature weights (each row sums to 1; 0 where padded).
        sigma: the Gaussian width used.
        num_matvecs: operator products used.
        protocol: how it was measured.
    """

    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    sigma: float
    num_matvecs: int
    protocol: MeasurementProtocol

    def moment(self, p: int) -> float:
        """The quadrature's p-th moment ``mean_r sum_j w_j theta_j^p`` (~ tr(H^p)/n)."""
        nodes = torch.nan_to_num(self.nodes, nan=0.0)
        return float((self.weights * nodes**p).sum(dim=1).mean())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return to_jsonable(dataclasses.asdict(self) | {"protocol": self.protocol})


def spectral_density(
    op: Any,
    *,
    runs: int = 10,
    steps: int = 80,
    num_points: int = 1000,
    sigma: float | None = None,
    seed: int | torch.Generator | None = None,
    progress: bool = False,
    reorthogonalize: bool = False,
) -> DensityResult:
    """Estimate the spectral density of a symmetric operator by SLQ.

    Args:
        op: a :class:`~sharpkit.curvature.HessianOperator`, a linear operator or a
            dense symmetric tensor.
        runs: independent Rademacher start vectors (the density is their average).
        steps: Lanczos steps per run (capped at the dimension); ``runs * steps``
            products in all (fewer if a run finds an invariant subspace, where its
            quadrature is exact).
        num_points: grid size.
        sigma: Gaussian smoothing width; default 1% of ``max(nodes) - min(nodes)``.
        seed: int, ``torch.Generator`` or ``None`` (fresh seed, recorded).
        progress: tqdm bar over runs.
        reorthogonalize: ``False`` (default): the plain three-term recurrence, two
            vectors of memory and a few passes over one vector per step; lost
            orthogonality puts near-copies of converged Ritz values among the nodes,
            which share their weight, so the smoothed density and the moments stay
            accurate (module docstring). ``True``: full reorthogonalisation against
            every previous vector (``steps`` vectors of memory, bookkeeping growing
            with the step), for ghost-free nodes or the exact spectrum of a small
            matrix.

    Returns:
        A :class:`DensityResult`.

    Example:
        >>> A = torch.diag(torch.linspace(-1.0, 4.0, 30, dtype=torch.float64))
        >>> d = spectral_density(A, runs=4, steps=30, num_points=400, seed=0)
        >>> round(float(torch.trapezoid(d.density, d.grid)), 3), round(d.moment(1), 6)
        (1.0, 1.5)
    """
    op = as_operator(op)
    for name, val, low in (("runs", runs, 1), ("steps", steps, 1), ("num_points", num_points, 2)):
        if not isinstance(val, int) or isinstance(val, bool) or val < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {val!r}")
    if not isinstance(reorthogonalize, bool):
        raise TypeError(f"reorthogonalize: expected a bool, got {type(reorthogonalize).__name__}")
    if sigma is not None and not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"sigma: expected None or a positive number, got {sigma!r}")
    gen, seed_used = make_generator(seed)
    steps = min(steps, op.dim)
    nodes = np.full((runs, steps), np.nan)
    weights = np.zeros((runs, steps))
    matvecs = 0
    for r in progress_bar(range(runs), "SLQ", enabled=progress):
        v = rademacher(op.dim, gen, op.dtype, op.device)
        state = lanczos_tridiagonal(
            op, v, steps, restart_on_breakdown=False, reorthogonalize=reorthogonalize
        )
        matvecs += state.matvecs
        theta, s = _tridiag_eigh(state.alpha, state.beta)
        nodes[r, : len(theta)] = theta
        weights[r, : len(theta)] = s[0] ** 2
    finite = nodes[np.isfinite(nodes)]
    lo, hi = float(finite.min()), float(finite.max())
    if sigma is None:
        spread = hi - lo
        sigma = _SIGMA_FRACTION * spread if spread > 0 else _SIGMA_FRACTION * max(abs(hi), 1.0)
    pad = _GRID_PAD_SIGMAS * sigma
    grid = np.linspace(lo - pad, hi + pad, num_points)
    ok = np.isfinite(nodes)
    t, w = nodes[ok], weights[ok] / runs
    density = np.zeros(num_points)
    for theta_j, w_j in zip(t, w):  # nodes are few (runs * steps); grid is the long axis
        density += w_j * np.exp(-0.5 * ((grid - theta_j) / sigma) ** 2)
    density /= sigma * math.sqrt(2 * math.pi)
    proto = operator_protocol(op)
    proto = dataclasses.replace(
        proto,
        estimator="slq",
        seed=seed_used,
        matvecs=matvecs,
        extra={
            **proto.extra,
            "runs": runs,
            "steps": steps,
            "reorthogonalize": reorthogonalize,
            "sigma": sigma,
            "num_points": num_points,
        },
    )
    return DensityResult(
        grid=torch.as_tensor(grid),
        density=torch.as_tensor(density),
        nodes=torch.as_tensor(nodes),
        weights=torch.as_tensor(weights),
        sigma=float(sigma),
        num_matvecs=matvecs,
        protocol=proto,
    )
