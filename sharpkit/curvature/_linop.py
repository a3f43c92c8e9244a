"""Linear-operator plumbing shared by the curvature estimators.

Estimators (Lanczos, Hutchinson, SLQ) only need ``matvec``, ``dim``, ``dtype``,
``device`` and a matvec counter. :class:`DenseOperator` wraps a dense symmetric
tensor with that interface, so every estimator is tested on small matrices with
known answers and used unchanged on a network's Hessian (the curvlinops split of
operator and estimator).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from sharpkit.protocol import MeasurementProtocol

__all__ = ["DenseOperator", "LinearOperator", "as_operator", "make_generator", "rademacher"]

# Relative asymmetry ||A - A^T||_max / ||A||_max above which a dense matrix is rejected.
_SYMMETRY_RTOL = 1e-8


@runtime_checkable
class LinearOperator(Protocol):
    """A symmetric linear map ``R^dim -> R^dim`` applied through ``matvec``."""

    dim: int
    dtype: torch.dtype
    device: torch.device
    num_matvecs: int

    def matvec(self, v: torch.Tensor) -> torch.Tensor: ...

    def protocol(self) -> MeasurementProtocol: ...


class DenseOperator:
    """A dense symmetric matrix seen as a linear operator (for tests and teaching).

    Args:
        matrix: a square symmetric 2-D tensor.

    Example:
        >>> op = DenseOperator(torch.diag(torch.tensor([3.0, 1.0])))
        >>> op.matvec(torch.tensor([1.0, 1.0])).tolist(), op.num_matvecs
        ([3.0, 1.0], 1)
    """

    def __init__(self, matrix: torch.Tensor) -> None:
        if not isinstance(matrix, torch.Tensor):
            raise TypeError(f"op: expected an operator or a tensor, got {type(matrix).__name__}")
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(
                f"op: a dense operator must be a square matrix, got {tuple(matrix.shape)}"
            )
        if not matrix.is_floating_point():
            raise TypeError(f"op: expected a floating-point matrix, got {matrix.dtype}")
        if matrix.shape[0] == 0:
            raise ValueError("op: the matrix is empty")
        scale = matrix.abs().max()
        if scale > 0 and (matrix - matrix.T).abs().max() > _SYMMETRY_RTOL * scale:
            raise ValueError("op: the matrix is not symmetric (these estimators need H = H^T)")
        self.matrix = matrix
        self.dim = int(matrix.shape[0])
        self.shape = (self.dim, self.dim)
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.num_matvecs = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return ``A v`` for a flat vector ``v`` of length ``dim``."""
        if v.shape != (self.dim,):
            raise ValueError(f"v: expected shape ({self.dim},), got {tuple(v.shape)}")
        self.num_matvecs += 1
        return self.matrix @ v.to(dtype=self.dtype, device=self.device)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    def protocol(self) -> MeasurementProtocol:
        """The protocol of the operator itself (a dense matrix: no data)."""
        return MeasurementProtocol(
            estimator="dense",
            dtype=str(self.dtype),
            device=str(self.device),
            matvecs=self.num_matvecs,
            extra={"dim": self.dim},
        )


def as_operator(op: Any) -> Any:
    """Return ``op`` if it has a ``matvec``; wrap a dense tensor in :class:`DenseOperator`."""
    if isinstance(op, torch.Tensor):
        return DenseOperator(op)
    if not (hasattr(op, "matvec") and hasattr(op, "dim")):
        raise TypeError(
            f"op: expected a HessianOperator, a linear operator with matvec/dim or a dense "
            f"symmetric tensor, got {type(op).__name__}"
        )
    return op


def make_generator(seed: int | torch.Generator | None) -> tuple[torch.Generator, int]:
    """A CPU generator and the integer seed that reproduces it.

    ``None`` draws a fresh seed from torch's global generator (and records it), an
    ``int`` seeds a new generator, a ``torch.Generator`` is used as is (its
    ``initial_seed`` is recorded).
    """
    if isinstance(seed, torch.Generator):
        if seed.device.type != "cpu":
            raise ValueError(
                "seed: pass a CPU torch.Generator (random vectors are drawn on the CPU)"
            )
        return seed, int(seed.initial_seed())
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(
            f"seed: expected an int, a torch.Generator or None, got {type(seed).__name__}"
        )
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen, seed


def rademacher(
    n: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A vector of ``n`` independent +-1 entries (drawn on the CPU, then moved)."""
    z = torch.randint(0, 2, (n,), generator=gen).to(dtype) * 2 - 1
    return z.to(device)


def gaussian(
    n: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A standard normal vector of length ``n`` (drawn on the CPU in float64, then cast)."""
    return torch.randn(n, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def operator_protocol(op: Any) -> MeasurementProtocol:
    """The operator's protocol, or a minimal one for foreign operators."""
    if hasattr(op, "protocol"):
        return op.protocol()
    return MeasurementProtocol(
        estimator=type(op).__name__, dtype=str(op.dtype), device=str(op.device)
    )
