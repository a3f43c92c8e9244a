"""Extreme eigenvalues of a symmetric operator by Lanczos with full reorthogonalisation.

Lanczos builds an orthonormal basis ``Q_m = [q_1 ... q_m]`` of the Krylov space
``span{v, H v, ..., H^{m-1} v}`` and the tridiagonal ``T_m = Q_m^T H Q_m``
(diagonal ``alpha``, off-diagonal ``beta``). Its eigenpairs ``(theta_i, s_i)`` give
Ritz pairs ``(theta_i, y_i = Q_m s_i)`` whose residual is, in exact arithmetic,

    ||H y_i - theta_i y_i|| = beta_{m+1} |s_i[m]|   (the last entry of s_i).

Every new ``q`` is orthogonalised against *all* previous ones (twice, classical
Gram-Schmidt), which keeps ``Q_m`` orthonormal to rounding and this residual
formula accurate; it also removes the spurious copies of converged eigenvalues
that plain Lanczos produces. ``T_m`` is diagonalised with LAPACK's symmetric
tridiagonal solver (``scipy.linalg.eigh_tridiagonal``).

Both ends of the spectrum converge together, so ``which="smallest"`` finds
negative eigenvalues however small their magnitude is relative to ``lambda_max``
(power iteration with a shift cannot tell them from the bulk near zero).

References:
    Lanczos. An iteration method for the solution of the eigenvalue problem, 1950.
    Golub, Van Loan. Matrix Computations, 4th ed., sections 10.1-10.3.
    Ghorbani, Krishnan, Xiao. An investigation into neural net optimization via
    Hessian eigenvalue density. ICML 2019.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.linalg
import torch
from tqdm.auto import tqdm

from sharpkit.curvature._linop import as_operator, gaussian, make_generator, operator_protocol
from sharpkit.io.results import MeasurementProtocol, to_jsonable

__all__ = ["EigenResult", "eigenvalues", "lanczos_tridiagonal"]

_WHICH = ("largest", "smallest", "both")

# A Lanczos step whose new residual norm beta falls below
# _BREAKDOWN_FACTOR * eps(dtype) * sqrt(dim) * (largest |alpha| or beta seen so far)
# has found an invariant subspace (beta is rounding noise); the iteration restarts.
_BREAKDOWN_FACTOR = 10.0
# Rows of the Lanczos basis allocated up front (then doubled as needed).
_INITIAL_ROWS = 32


@dataclasses.dataclass
class LanczosState:
    """Output of :func:`lanczos_tridiagonal`."""

    alpha: np.ndarray  # (m,) diagonal of T
    beta: np.ndarray  # (m,) beta[i] couples q_i and q_{i+1}; beta[-1] is the residual norm
    basis: torch.Tensor  # (m, dim) orthonormal rows q_1..q_m
    restarts: int
    matvecs: int


def _tridiag_eigh(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(alpha) == 1:
        return alpha.copy(), np.ones((1, 1))
    return scipy.linalg.eigh_tridiagonal(alpha, beta[: len(alpha) - 1], lapack_driver="stev")


def _orthogonalise(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    # Classical Gram-Schmidt, twice ("twice is enough", Kahan/Parlett).
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


def lanczos_tridiagonal(
    op: Any,
    v0: torch.Tensor,
    max_steps: int,
    *,
    gen: torch.Generator | None = None,
    stop: Callable[[np.ndarray, np.ndarray], bool] | None = None,
    restart_on_breakdown: bool = True,
    min_block_steps: int = 1,
    progress: bool = False,
    desc: str = "lanczos",
) -> LanczosState:
    """Run up to ``max_steps`` Lanczos steps with full reorthogonalisation from ``v0``.

    ``stop(alpha, beta)`` is called after each step (with the current coefficients)
    and ends the iteration when it returns True. On breakdown (an invariant
    subspace, ``beta`` ~ 0) the iteration either stops (``restart_on_breakdown=False``,
    as SLQ wants: its quadrature is then exact) or continues from a random vector
    orthogonal to the basis (``beta`` is set to 0, so ``T`` is block diagonal); the
    stopping rule is then consulted only once the new block has ``min_block_steps``
    steps.
    """
    dim = op.dim
    dtype, device = op.dtype, op.device
    max_steps = min(max_steps, dim)
    eps = torch.finfo(dtype).eps
    # The basis grows in doubling chunks: memory follows the steps actually taken
    # (steps x dim values), not max_steps x dim.
    basis = torch.empty(min(max_steps, _INITIAL_ROWS), dim, dtype=dtype, device=device)
    q = v0.to(dtype=dtype, device=device)
    q = q / torch.linalg.vector_norm(q)
    alphas: list[float] = []
    betas: list[float] = []
    restarts = 0
    matvecs = 0
    block_start = 0
    scale = 0.0
    bar = tqdm(total=max_steps, desc=desc, disable=not progress, leave=False)
    for j in range(max_steps):
        if j == basis.shape[0]:
            grown = torch.empty(min(max_steps, 2 * j), dim, dtype=dtype, device=device)
            grown[:j] = basis
            basis = grown
        basis[j] = q
        w = op.matvec(q)
        matvecs += 1
        a = float(torch.dot(w, q))
        alphas.append(a)
        w = _orthogonalise(w, basis[: j + 1])
        b = float(torch.linalg.vector_norm(w))
        scale = max(scale, abs(a), b)
        betas.append(b)
        bar.update(1)
        if j + 1 == max_steps:
            break
        broke = b <= _BREAKDOWN_FACTOR * eps * max(scale, np.finfo(float).tiny) * np.sqrt(dim)
        if broke:
            betas[-1] = 0.0
            if not restart_on_breakdown:
                break
            # An invariant subspace is exact but may miss eigenvalues (e.g. a second copy
            # of a repeated one): continue from a fresh direction and let the new block
            # grow for min_block_steps before the stopping rule is consulted again.
            if gen is None:
                raise ValueError("gen: a generator is needed to restart after breakdown")
            w = _orthogonalise(gaussian(dim, gen, dtype, device), basis[: j + 1])
            restarts += 1
            block_start = j + 1
            q = w / torch.linalg.vector_norm(w)
            continue
        if (
            stop is not None
            and j + 1 - block_start >= min(min_block_steps, dim - block_start)
            and stop(np.asarray(alphas), np.asarray(betas))
        ):
            break
        q = w / b
    bar.close()
    m = len(alphas)
    return LanczosState(np.asarray(alphas), np.asarray(betas), basis[:m], restarts, matvecs)


@dataclasses.dataclass
class EigenResult:
    """Extreme eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: float64 tensor: descending for ``"largest"``, ascending for
            ``"smallest"``; for ``"both"`` the k largest (descending) followed by the
            k smallest (ascending), so ``eigenvalues[0]`` is ``lambda_max`` and
            ``eigenvalues[k]`` is ``lambda_min``.
        eigenvectors: ``(dim, n)`` unit columns matching ``eigenvalues``, or ``None``.
        residuals: Ritz residual norms ``||H y - theta y||`` (float64), same order.
        num_matvecs: operator products this call used.
        converged: whether every reported residual met the stopping rule.
        protocol: how it was measured.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    residuals: torch.Tensor
    num_matvecs: int
    converged: bool
    protocol: MeasurementProtocol

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (eigenvectors are left out: they are as large as the model)."""
        return to_jsonable(
            {
                "eigenvalues": self.eigenvalues,
                "residuals": self.residuals,
                "num_matvecs": self.num_matvecs,
                "converged": self.converged,
                "protocol": self.protocol,
            }
        )


def _wanted(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices into ascending ``theta`` of the wanted Ritz values, in result order."""
    n = len(theta)
    top = np.arange(n - 1, n - 1 - min(k, n), -1)
    bottom = np.arange(min(k, n))
    if which == "largest":
        return top
    if which == "smallest":
        return bottom
    return np.concatenate([top, bottom])


def eigenvalues(
    op: Any,
    k: int = 1,
    *,
    which: str = "largest",
    tol: float = 1e-6,
    max_iter: int | None = None,
    seed: int | torch.Generator | None = None,
    return_eigenvectors: bool = False,
    progress: bool = False,
) -> EigenResult:
    """The k largest and/or smallest eigenvalues of a symmetric operator (Lanczos).

    Lanczos with full reorthogonalisation from a Gaussian start vector. After each
    step the tridiagonal ``T_m`` is diagonalised and the iteration stops when every
    wanted Ritz pair satisfies

        ||H y_i - theta_i y_i|| = beta_{m+1} |s_i[m]|  <=  tol * max_j |theta_j|,

    i.e. a residual tolerance relative to the largest Ritz magnitude (an estimate of
    ``||H||_2``), never a relative change between iterations. Since
    ``|theta_i - lambda| <= ||r_i||`` for some eigenvalue ``lambda``, a converged
    value is within ``tol * ||H||`` of the spectrum (and much closer, ``~ r^2/gap``,
    when it is well separated). On an invariant subspace the iteration continues
    from a fresh random vector orthogonal to the basis.

    Args:
        op: a :class:`~sharpkit.curvature.HessianOperator`, any object with
            ``matvec``/``dim``/``dtype``/``device``, or a dense symmetric tensor.
        k: how many eigenvalues at each requested end (``1 <= k <= dim``; for
            ``"both"``, ``2k <= dim``).
        which: ``"largest"``, ``"smallest"`` (algebraic: the most negative first) or
            ``"both"``.
        tol: relative residual tolerance of the stopping rule above.
        max_iter: maximum Lanczos steps (= matvecs, plus restarts); default
            ``min(dim, max(200, 20 * n_wanted))``.
        seed: int, ``torch.Generator`` or ``None`` (a fresh seed, recorded).
        return_eigenvectors: also return the Ritz vectors (``dim x n`` columns).
        progress: show a tqdm bar over Lanczos steps.

    Returns:
        An :class:`EigenResult`. ``converged=False`` (with a ``RuntimeWarning``) when
        ``max_iter`` ran out first.

    Raises:
        ValueError: ``k`` out of range, unknown ``which``, non-positive ``tol``.

    Note:
        Memory: the basis holds one vector per step (``steps x dim`` values, in the
        operator's dtype and on its device), besides the operator's own needs.

        Single-vector Lanczos sees one direction per eigenspace: an eigenvalue of
        multiplicity > 1 is reported once (its copies only appear through restarts
        and rounding). Hessians of networks rarely have exactly repeated top
        eigenvalues, but a test matrix might.

    Example:
        >>> A = torch.diag(torch.tensor([5.0, 3.0, 1.0, -0.01], dtype=torch.float64))
        >>> r = eigenvalues(A, k=2, seed=0)
        >>> r.eigenvalues.tolist(), r.converged
        ([5.0, 3.0], True)
        >>> eigenvalues(A, k=1, which="smallest", seed=0).eigenvalues.tolist()
        [-0.01]
    """
    op = as_operator(op)
    if which not in _WHICH:
        raise ValueError(f"which: expected one of {_WHICH}, got {which!r}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k: expected a positive integer, got {k!r}")
    n_wanted = 2 * k if which == "both" else k
    if n_wanted > op.dim:
        raise ValueError(
            f"k: asked for {n_wanted} eigenvalues ({which}) of an operator of dimension {op.dim}"
        )
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol: expected a positive number, got {tol!r}")
    if max_iter is None:
        max_iter = min(op.dim, max(200, 20 * n_wanted))
    if not isinstance(max_iter, int) or max_iter < n_wanted:
        raise ValueError(f"max_iter: expected an integer >= {n_wanted}, got {max_iter!r}")
    gen, seed_used = make_generator(seed)
    v0 = gaussian(op.dim, gen, op.dtype, op.device)

    def stop(alpha: np.ndarray, beta: np.ndarray) -> bool:
        if len(alpha) < n_wanted:
            return False
        theta, s = _tridiag_eigh(alpha, beta)
        idx = _wanted(theta, k, which)
        res = np.abs(beta[-1] * s[-1, idx])
        return bool(np.all(res <= tol * np.max(np.abs(theta))))

    state = lanczos_tridiagonal(
        op,
        v0,
        max_iter,
        gen=gen,
        stop=stop,
        min_block_steps=n_wanted,
        progress=progress,
        desc="lanczos",
    )
    theta, s = _tridiag_eigh(state.alpha, state.beta)
    idx = _wanted(theta, k, which)
    res = np.abs(state.beta[-1] * s[-1, idx])
    if len(state.alpha) == op.dim:
        res = np.zeros_like(res)  # a complete basis: T is similar to H, Ritz values are exact
    converged = bool(np.all(res <= tol * np.max(np.abs(theta))))
    if not converged:
        warnings.warn(
            f"eigenvalues: Lanczos did not reach tol={tol} within max_iter={max_iter} "
            f"(largest relative residual {np.max(res) / np.max(np.abs(theta)):.2e})",
            RuntimeWarning,
            stacklevel=2,
        )
    vectors = None
    if return_eigenvectors:
        coeffs = torch.as_tensor(s[:, idx], dtype=op.dtype, device=op.device)
        vectors = state.basis.T @ coeffs
    proto = operator_protocol(op)
    proto = dataclasses.replace(
        proto,
        estimator="lanczos",
        seed=seed_used,
        matvecs=state.matvecs,
        extra={
            **proto.extra,
            "k": k,
            "which": which,
            "tol": tol,
            "max_iter": max_iter,
            "steps": len(state.alpha),
            "restarts": state.restarts,
            "stopping_rule": "||H y - theta y|| <= tol * max|theta| for every wanted Ritz pair",
            "reorthogonalisation": "full",
        },
    )
    return EigenResult(
        eigenvalues=torch.as_tensor(theta[idx], dtype=torch.float64),
        eigenvectors=vectors,
        residuals=torch.as_tensor(res, dtype=torch.float64),
        num_matvecs=state.matvecs,
        converged=converged,
        protocol=proto,
    )
