"""Extreme eigenvalues of a symmetric operator by Lanczos with full reorthogonalisation.

Lanczos builds an orthonormal basis ``Q_m = [q_1 ... q_m]`` of the Krylov space
``span{v, H v, ..., H^{m-1} v}`` and the tridiagonal ``T_m = Q_m^T H Q_m``
(diagonal ``alpha``, off-diagonal ``beta``). Its eigenpairs ``(theta_i, s_i)`` give
Ritz pairs ``(theta_i, y_i = Q_m s_i)`` whose residual is, in exact arithmetic,

    ||H y_i - theta_i y_i|| = beta_{m+1} |s_i[m]|   (the last entry of s_i).

Every new ``q`` is orthogonalised against *all* previous ones (block classical
Gram-Schmidt on the stacked basis, a second pass when the first removes much),
which keeps ``Q_m`` orthonormal to rounding and removes the spurious copies of
converged eigenvalues that plain Lanczos produces. The products ``H q`` are taken
in the operator's dtype; the scalars, the recurrence and the reorthogonalisation
are float64, since float32 inner products over millions of entries are too
inexact for the residual formula to hold. Because that formula is still only an
estimate, :func:`eigenvalues` decides convergence on the explicit residual of the
vectors it returns. ``T_m`` is diagonalised with LAPACK's symmetric tridiagonal
solver (``scipy.linalg.eigh_tridiagonal``).

The basis costs one stored vector per step. With ``max_basis`` (by default what a
quarter of the available memory holds) :func:`eigenvalues` thick-restarts when the
basis is full: it keeps the Ritz vectors nearest the wanted end and continues from
the last residual (Wu and Simon 2000), so memory stays bounded at the price of more
products. With ``basis_storage`` the basis lives elsewhere: in host memory for a
CUDA operator, or in an unnamed temporary file, read a panel at a time, so the
process holds the operator's needs, one float64 work vector and one row.
:func:`lanczos_tridiagonal` with ``reorthogonalize=False`` runs the plain
recurrence on two vectors, which is all the spectral density needs.

Both ends of the spectrum converge together, so ``which="smallest"`` finds
negative eigenvalues however small their magnitude is relative to ``lambda_max``
(power iteration with a shift cannot tell them from the bulk near zero).

References:
    Lanczos. An iteration method for the solution of the eigenvalue problem, 1950.
    Golub, Van Loan. Matrix Computations, 4th ed., sections 10.1-10.3.
    Ghorbani, Krishnan, Xiao. An investigation into neural net optimization via
    Hessian eigenvalue density. ICML 2019.
    Wu, Simon. Thick-restart Lanczos method for large symmetric eigenvalue
    problems. SIAM J. Matrix Anal. Appl. 22(2), 2000.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch

from sharpkit._device import available_memory, resolve_device
from sharpkit._progress import progress_bar
from sharpkit.curvature._linop import as_operator, gaussian, make_generator, operator_protocol
from sharpkit.protocol import MeasurementProtocol, to_jsonable

__all__ = ["EigenResult", "basis_storage_from_text", "eigenvalues", "lanczos_tridiagonal"]

_WHICH = ("largest", "smallest", "both")

# A Lanczos step whose new residual norm beta falls below
# _BREAKDOWN_FACTOR * eps(dtype) * sqrt(dim) * (largest |alpha| or beta seen so far)
# has found an invariant subspace (beta is rounding noise); the iteration restarts.
_BREAKDOWN_FACTOR = 10.0
# The basis is stored in blocks of this many rows, each allocated when the first of
# its rows is written: memory follows the steps taken, and nothing is ever copied.
_BLOCK_ROWS = 32
# Default tolerance: _DEFAULT_TOL, or _DEFAULT_TOL_EPS machine epsilons of the
# operator's dtype when that is larger (the products' own rounding floor).
_DEFAULT_TOL = 1e-6
_DEFAULT_TOL_EPS = 100.0
# Block products are taken this many columns at a time, each slice in the storage
# dtype's BLAS and the slices summed in float64 (see StackedBasis).
_CHUNK_COLUMNS = 2**15
# Daniel-Gragg-Kaufman-Stewart: a second Gram-Schmidt pass is needed only when the
# first one shrinks the vector below this fraction of its norm.
_DGKS = 1.0 / np.sqrt(2.0)


# A basis held away from the compute device (in another device's memory or in a
# file) is moved a panel at a time: whole _CHUNK_COLUMNS slices of every row, at
# most this many bytes of stored rows per panel (at least one slice).
_PANEL_BYTES = 8 << 20


class _DeviceRows:
    """Basis rows in ``[_BLOCK_ROWS, dim]`` blocks in the memory of device ``where``,
    each block allocated when the first of its rows is written. Panels are views
    when ``where`` is the compute device, copies moved to it otherwise."""

    def __init__(
        self,
        dim: int,
        dtype: torch.dtype,
        where: torch.device,
        compute: torch.device,
        capacity: int | None,
    ) -> None:
        self.dim, self.dtype, self.where, self.compute = dim, dtype, where, compute
        self.capacity = capacity
        self.local = where == compute
        self.blocks: list[torch.Tensor] = []

    @property
    def allocated_rows(self) -> int:
        return sum(b.shape[0] for b in self.blocks)

    def write(self, i: int, row: torch.Tensor) -> torch.Tensor:
        b, r = divmod(i, _BLOCK_ROWS)
        if b == len(self.blocks):
            size = _BLOCK_ROWS
            if self.capacity is not None:
                size = min(size, self.capacity - b * _BLOCK_ROWS)
            self.blocks.append(torch.empty(size, self.dim, dtype=self.dtype, device=self.where))
        stored = self.blocks[b][r]
        stored.copy_(row)
        return stored

    def read(self, i: int, out: torch.Tensor | None) -> torch.Tensor:
        stored = self.blocks[i // _BLOCK_ROWS][i % _BLOCK_ROWS]
        return stored if out is None else out.copy_(stored)

    def panels(self, rows: int, width: int) -> Iterator[tuple[int, list[tuple[int, torch.Tensor]]]]:
        for a in range(0, self.dim, width):
            parts = []
            for bi, block in enumerate(self.blocks):
                used = min(block.shape[0], rows - bi * _BLOCK_ROWS)
                if used <= 0:
                    break  # blocks beyond the rows in use (kept after a rotation)
                panel = block[:used, a : a + width]
                parts.append((bi * _BLOCK_ROWS, panel if self.local else panel.to(self.compute)))
            yield a, parts

    def put(self, a: int, new: torch.Tensor) -> None:
        for bi, block in enumerate(self.blocks):
            r0 = bi * _BLOCK_ROWS
            if r0 >= new.shape[0]:
                break
            m = min(block.shape[0], new.shape[0] - r0)
            block[:m, a : a + new.shape[1]].copy_(new[r0 : r0 + m])

    def close(self) -> None:
        self.blocks = []


def _canonical(device: Any) -> torch.device:
    """``device`` with its index made explicit ("cuda" is the current CUDA device, and
    every CPU index is the one CPU), so that equal memories compare equal."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if d.type == "cpu" else d


def _as_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor (shared, writable)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class _FileRows:
    """Basis rows in an unnamed temporary file in ``directory`` (row after row),
    written and read with ``pwrite``/``pread`` through buffers in memory: the
    process holds one panel, not the basis. The operating system keeps the file in
    its page cache while memory allows and on disk when it does not; the file has
    no name, so it disappears when it is closed or the process ends."""

    def __init__(
        self,
        dim: int,
        dtype: torch.dtype,
        directory: Path,
        compute: torch.device,
        capacity: int | None,
    ) -> None:
        self.dim, self.dtype, self.compute = dim, dtype, compute
        self.itemsize = torch.finfo(dtype).bits // 8
        self._file = tempfile.TemporaryFile(dir=directory, prefix="sharpkit-basis-")
        self.allocated_rows = 0
        self._panel: torch.Tensor | None = None  # reused read buffer (CPU)
        self._stage: torch.Tensor | None = None  # a CPU row, for a non-CPU compute device

    def _offset(self, row: int, column: int) -> int:
        return (row * self.dim + column) * self.itemsize

    def _pwrite(self, t: torch.Tensor, offset: int) -> None:
        view = _as_bytes(t.to("cpu").contiguous())
        done = 0
        while done < len(view):
            done += os.pwrite(self._file.fileno(), view[done:], offset + done)

    def _pread(self, t: torch.Tensor, offset: int) -> None:
        view = _as_bytes(t)
        done = 0
        while done < len(view):
            got = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            if got == 0:
                raise RuntimeError("StackedBasis: the basis file ended early (truncated?)")
            done += got

    def write(self, i: int, row: torch.Tensor) -> torch.Tensor:
        self._pwrite(row, self._offset(i, 0))
        self.allocated_rows = max(self.allocated_rows, i + 1)
        return row

    def read(self, i: int, out: torch.Tensor | None) -> torch.Tensor:
        assert out is not None
        if out.device.type == "cpu":
            self._pread(out, self._offset(i, 0))
            return out
        if self._stage is None:
            self._stage = torch.empty(self.dim, dtype=self.dtype)
        self._pread(self._stage, self._offset(i, 0))
        return out.copy_(self._stage)

    def panels(self, rows: int, width: int) -> Iterator[tuple[int, list[tuple[int, torch.Tensor]]]]:
        if self._panel is None or self._panel.numel() < rows * width:
            self._panel = None  # release the old buffer first
            self._panel = torch.empty(rows * width, dtype=self.dtype)
        for a in range(0, self.dim, width):
            w = min(width, self.dim - a)
            panel = self._panel[: rows * w].view(rows, w)
            for r in range(rows):
                self._pread(panel[r], self._offset(r, a))
            if self.compute.type != "cpu":
                panel = panel.to(self.compute)
            # in groups of _BLOCK_ROWS rows, as a basis in memory sums them
            yield a, [(r0, panel[r0 : r0 + _BLOCK_ROWS]) for r0 in range(0, rows, _BLOCK_ROWS)]

    def put(self, a: int, new: torch.Tensor) -> None:
        for r in range(new.shape[0]):
            self._pwrite(new[r].to(self.dtype), self._offset(r, a))

    def close(self) -> None:
        self._file.close()
        self._panel = self._stage = None


class StackedBasis:
    """Orthonormal rows ``q_1 .. q_m`` of length ``dim``, with accurate block products.

    Rows are kept in the operator's dtype (a float32 model's basis takes float32
    memory). By default they live on the compute device in preallocated
    ``[_BLOCK_ROWS, dim]`` blocks, so memory follows the steps taken and nothing is
    copied as the basis grows. The two products that reorthogonalisation and Ritz
    vectors need, ``Q w`` and ``Q^T c``, are block matrix products (BLAS-2 on whole
    blocks, no loop over vectors), taken a slice of ``_CHUNK_COLUMNS`` columns at a
    time with the slices summed in float64: a float32 inner product accumulated
    over ~1e7 entries in one go carries a relative error near 1e-5, which breaks
    the orthogonality the Lanczos residual formula relies on, while slices of 32768
    stay near 1e-9 at the price of a float32 one.

    ``storage`` can hold the rows elsewhere: in the memory of another device (a
    CUDA operator's basis in host memory) or in an unnamed temporary file in a
    directory. The products then move the rows to the compute device a panel at a
    time (at most ``_PANEL_BYTES`` of rows), slice by slice as on the compute
    device, so the results agree with a basis there to rounding (a BLAS kernel may
    sum a slice in another order for another memory layout). The process holds a
    panel and one row buffer instead of the basis, and every step reads the whole
    basis once or twice (the time this costs is that of moving it).

    Args:
        dim: row length.
        dtype: storage dtype (the operator's).
        device: the compute device (the operator's).
        capacity: the most rows ever held (``None``: no limit).
        storage: ``None`` (the compute device's memory), a device whose memory holds
            the rows, or a :class:`pathlib.Path` directory for a temporary file.
    """

    def __init__(
        self,
        dim: int,
        dtype: torch.dtype,
        device: torch.device,
        capacity: int | None = None,
        storage: torch.device | Path | None = None,
    ) -> None:
        self.dim, self.dtype, self.device = dim, dtype, _canonical(device)
        self.capacity = capacity
        self.rows = 0
        self._store: _DeviceRows | _FileRows
        if isinstance(storage, Path):
            self._store = _FileRows(dim, dtype, storage, self.device, capacity)
        else:
            where = self.device if storage is None else _canonical(storage)
            self._store = _DeviceRows(dim, dtype, where, self.device, capacity)
        self.local = isinstance(self._store, _DeviceRows) and self._store.local
        # A row-long vector in the storage dtype on the compute device, reused (a fresh
        # large allocation page-faults on every use): w rounded for Q w and, for a basis
        # held elsewhere, the row being written or read.
        self._narrow: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.rows

    @property
    def allocated_rows(self) -> int:
        """Rows of storage allocated so far (blocks in memory, rows of the file)."""
        return self._store.allocated_rows

    def _buffer(self) -> torch.Tensor:
        if self._narrow is None:
            self._narrow = torch.empty(self.dim, dtype=self.dtype, device=self.device)
        return self._narrow

    def append(self, q: torch.Tensor) -> torch.Tensor:
        """Store ``q`` (cast to the storage dtype) as the next row; return the stored row
        on the compute device (for a basis held elsewhere, a buffer that the next
        basis operation overwrites)."""
        if self.capacity is not None and self.rows >= self.capacity:
            raise RuntimeError(f"StackedBasis: full ({self.capacity} rows)")
        if self.local:
            row = self._store.write(self.rows, q)
        else:
            row = self._buffer().copy_(q)
            self._store.write(self.rows, row)
        self.rows += 1
        return row

    def row(self, i: int) -> torch.Tensor:
        """Row ``i`` in the storage dtype on the compute device: a view of the basis or,
        for a basis held elsewhere, a buffer that the next basis operation overwrites."""
        if not 0 <= i < self.rows:
            raise IndexError(f"StackedBasis: row {i} of {self.rows}")
        return self._store.read(i, None if self.local else self._buffer())

    def _width(self) -> int:
        """Columns per panel: one slice on the compute device, else as many whole
        slices as ``_PANEL_BYTES`` of rows hold (at least one)."""
        if self.local:
            return _CHUNK_COLUMNS
        row_slice = max(self.rows, 1) * _CHUNK_COLUMNS * torch.finfo(self.dtype).bits // 8
        return max(1, _PANEL_BYTES // row_slice) * _CHUNK_COLUMNS

    def _slices(self) -> Iterator[tuple[int, torch.Tensor, int]]:
        """``(first row, rows x slice, first column)`` over the slices of every panel."""
        for a, parts in self._store.panels(self.rows, self._width()):
            for r0, panel in parts:
                for s in range(0, panel.shape[1], _CHUNK_COLUMNS):
                    yield r0, panel[:, s : s + _CHUNK_COLUMNS], a + s

    def rotate(self, coeffs: np.ndarray | torch.Tensor) -> None:
        """Replace the rows by the ``l`` combinations ``Q^T coeffs`` (``coeffs``: rows x l).

        The thick restart of :func:`eigenvalues` keeps its Ritz vectors this way. It
        works in place a panel of columns at a time (each slice of the new rows
        depends only on the same slice of the old ones), in float64, so it needs no
        second copy of the basis.
        """
        c = torch.as_tensor(coeffs, dtype=torch.float64, device=self.device)
        if c.dim() != 2 or c.shape[0] != self.rows or c.shape[1] > self.rows:
            raise ValueError(f"rotate: expected ({self.rows}, l <= {self.rows}) coefficients")
        ct = c.T.contiguous()
        for a, parts in self._store.panels(self.rows, self._width()):
            old = parts[0][1] if len(parts) == 1 else torch.cat([p for _, p in parts])
            self._store.put(a, ct @ old.double())
        self.rows = ct.shape[0]

    def coefficients(self, w: torch.Tensor) -> torch.Tensor:
        """``Q w`` (float64) for a float64 vector ``w``."""
        narrow = self._buffer().copy_(w) if self.dtype != torch.float64 else w
        c = torch.zeros(self.rows, dtype=torch.float64, device=self.device)
        for r0, blk, a in self._slices():
            c[r0 : r0 + blk.shape[0]] += blk @ narrow[a : a + blk.shape[1]]
        return c

    def combine(self, c: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``out - Q^T c`` (in place, float64) or, without ``out``, ``Q^T c``."""
        sign = -1.0 if out is not None else 1.0
        if out is None:
            out = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        c = c.to(dtype=self.dtype, device=self.device)
        for r0, blk, a in self._slices():
            out[a : a + blk.shape[1]].add_(blk.T @ c[r0 : r0 + blk.shape[0]], alpha=sign)
        return out

    def orthogonalise(self, w: torch.Tensor) -> torch.Tensor:
        """Remove from float64 ``w`` (in place) its components along the rows.

        Classical Gram-Schmidt ``w <- w - Q^T (Q w)`` as two block products, with a
        second pass when the first shrinks ``w`` below ``1/sqrt(2)`` of its norm (the
        criterion of Daniel, Gragg, Kaufman, Stewart 1976; "twice is enough").
        """
        if self.rows == 0:
            return w
        before = torch.linalg.vector_norm(w)
        self.combine(self.coefficients(w), out=w)
        if torch.linalg.vector_norm(w) < _DGKS * before:
            self.combine(self.coefficients(w), out=w)
        return w

    def close(self) -> None:
        """Release the storage (the file, or the blocks); the basis is empty after."""
        self._store.close()
        self._narrow = None
        self.rows = 0


def _dot64(a: torch.Tensor, b: torch.Tensor, exact: bool = False) -> float:
    """``a . b`` accumulated in float64 without a float64 copy of either vector.

    Two float64 vectors: one dot. Mixed dtypes, or ``exact``: ``_CHUNK_COLUMNS``-long
    slices cast to float64 (the float64 dot of the stored values, what a Rayleigh
    quotient needs). Otherwise (the same narrower dtype): dots of the slices in that
    dtype (one batched product, faster), summed in float64 (as in StackedBasis).
    """
    if a.dtype == b.dtype == torch.float64:
        return float(torch.dot(a, b))
    n = a.numel()
    if exact or a.dtype != b.dtype:
        acc = torch.zeros((), dtype=torch.float64, device=a.device)
        for s in range(0, n, _CHUNK_COLUMNS):
            acc += torch.dot(a[s : s + _CHUNK_COLUMNS].double(), b[s : s + _CHUNK_COLUMNS].double())
        return float(acc)
    rows = n // _CHUNK_COLUMNS
    cut = rows * _CHUNK_COLUMNS
    total = 0.0
    if rows:
        parts = torch.bmm(
            a[:cut].view(rows, 1, _CHUNK_COLUMNS), b[:cut].view(rows, _CHUNK_COLUMNS, 1)
        )
        total = float(parts.sum(dtype=torch.float64))
    if cut < n:
        total += float(torch.dot(a[cut:], b[cut:]))
    return total


def _add_scaled(w: torch.Tensor, x: torch.Tensor, alpha: float) -> None:
    """``w += alpha x`` in place. For a CPU ``x`` of another dtype, slice by slice:
    torch's full-length mixed-dtype add on the CPU is several times slower than the
    same add over ``_CHUNK_COLUMNS``-long slices (seen with 1e7 float32 entries
    into float64, one thread)."""
    if x.dtype == w.dtype or w.device.type != "cpu":
        w.add_(x, alpha=alpha)
        return
    for s in range(0, w.numel(), _CHUNK_COLUMNS):
        w[s : s + _CHUNK_COLUMNS].add_(x[s : s + _CHUNK_COLUMNS], alpha=alpha)


def _residual_norm(hy: torch.Tensor, y: torch.Tensor, rho: float) -> float:
    """``||hy - rho y||`` accumulated in float64 slice by slice (no full-length copy)."""
    acc = torch.zeros((), dtype=torch.float64, device=y.device)
    for s in range(0, y.numel(), _CHUNK_COLUMNS):
        d = hy[s : s + _CHUNK_COLUMNS].double() - rho * y[s : s + _CHUNK_COLUMNS].double()
        acc += torch.dot(d, d)
    return math.sqrt(float(acc))


class _ReorthogonalisedStep:
    """One Lanczos step with full reorthogonalisation: the engine of
    :func:`lanczos_tridiagonal` and of the thick restart in :func:`eigenvalues`.

    Holds one float64 work vector ``w`` (reused: fresh large allocations
    page-fault every step): between steps the next unit vector, during a step its
    residual. A step stores ``w`` as the next basis row and applies the operator to
    the stored (rounded) row ``q``, on which the recurrence is computed:
    ``alpha = q^T H q`` (accumulated in float64), ``w = H q - alpha q - beta_prev
    q_prev`` in float64, orthogonalised against the whole basis, ``beta = ||w||``.
    """

    def __init__(
        self, op: Any, basis: StackedBasis, v0: torch.Tensor, consume: bool = False
    ) -> None:
        self.op, self.basis = op, basis
        # consume: a float64 v0 on the device becomes the work vector (no copy)
        self.w = v0.to(dtype=torch.float64, device=basis.device, copy=not consume)
        self.w /= torch.linalg.vector_norm(self.w)

    def __call__(self, beta_prev: float) -> tuple[float, float]:
        """The step; ``beta_prev`` couples the new row to the previous one (0: none)."""
        basis, w = self.basis, self.w
        j = len(basis)
        q = basis.append(w)
        w.copy_(self.op.matvec(q))
        a = _dot64(q, w)
        _add_scaled(w, q, -a)
        if j > 0 and beta_prev > 0:
            _add_scaled(w, basis.row(j - 1), -beta_prev)
        basis.orthogonalise(w)
        return a, float(torch.linalg.vector_norm(w))

    def advance(self, beta: float) -> None:
        """The next vector is the residual over its norm."""
        self.w.div_(beta)

    def fresh(self, gen: torch.Generator) -> None:
        """The next vector is random, orthogonal to the basis (after a breakdown)."""
        self.w.copy_(gaussian(self.basis.dim, gen, torch.float64, self.basis.device))
        self.basis.orthogonalise(self.w)
        self.w /= torch.linalg.vector_norm(self.w)


def _broke(beta: float, scale: float, dtype: torch.dtype, dim: int) -> bool:
    """Whether ``beta`` is rounding noise: an invariant subspace has been found."""
    eps = torch.finfo(dtype).eps
    return beta <= _BREAKDOWN_FACTOR * eps * max(scale, np.finfo(float).tiny) * np.sqrt(dim)


@dataclasses.dataclass
class LanczosState:
    """Output of :func:`lanczos_tridiagonal`."""

    alpha: np.ndarray  # (m,) diagonal of T
    beta: np.ndarray  # (m,) beta[i] couples q_i and q_{i+1}; beta[-1] is the residual norm
    basis: StackedBasis | None  # rows q_1..q_m (None without reorthogonalisation)
    restarts: int
    matvecs: int


def _tridiag_eigh(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(alpha) == 1:
        return alpha.copy(), np.ones((1, 1))
    return scipy.linalg.eigh_tridiagonal(alpha, beta[: len(alpha) - 1], lapack_driver="stev")


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
    reorthogonalize: bool = True,
    basis_storage: torch.device | Path | None = None,
    consume_v0: bool = False,
) -> LanczosState:
    """Run up to ``max_steps`` Lanczos steps with full reorthogonalisation from ``v0``.

    Each step applies the operator in its own dtype to the stored ``q_j``; the
    three-term recurrence ``w = H q_j - alpha_j q_j - beta_{j-1} q_{j-1}``, the
    scalars ``alpha_j = q_j^T H q_j`` and ``beta_j = ||w||`` and the
    reorthogonalisation of ``w`` against the whole basis (:class:`StackedBasis`) are
    float64.

    ``stop(alpha, beta)`` is called after each step (with the current coefficients)
    and ends the iteration when it returns True. On breakdown (an invariant
    subspace, ``beta`` ~ 0) the iteration either stops (``restart_on_breakdown=False``,
    as SLQ wants: its quadrature is then exact) or continues from a random vector
    orthogonal to the basis (``beta`` is set to 0, so ``T`` is block diagonal); the
    stopping rule is then consulted only once the new block has ``min_block_steps``
    steps.

    ``reorthogonalize=False`` runs the plain three-term recurrence on vectors in
    the operator's dtype, keeping only the last two (no basis, no Ritz vectors), with
    the inner products accumulated in float64 slice by slice: the bookkeeping of a
    step is a few passes over one vector instead of two over all ``j`` stored ones.
    The vectors then lose orthogonality as Ritz values converge and ``T`` acquires
    copies ("ghosts") of them, but its Gauss quadrature of smooth functions stays
    accurate (Meurant and Strakos, Acta Numerica 2006): what SLQ needs, not what
    eigenvectors need. It cannot restart on breakdown.

    ``basis_storage`` says where the basis rows live (:class:`StackedBasis`):
    ``None`` on the operator's device, or another device or a file directory
    (checked by :func:`eigenvalues`). ``consume_v0=True`` lets a float64 ``v0`` on
    the operator's device become the work vector (it is overwritten), which saves
    one vector of memory.
    """
    if not reorthogonalize:
        if restart_on_breakdown:
            raise ValueError(
                "restart_on_breakdown: a restart needs the basis, so it needs reorthogonalize=True"
            )
        return _plain_tridiagonal(op, v0, max_steps, stop, progress, desc)
    dim = op.dim
    max_steps = min(max_steps, dim)
    basis = StackedBasis(dim, op.dtype, op.device, storage=basis_storage)
    step = _ReorthogonalisedStep(op, basis, v0, consume=consume_v0)
    alphas: list[float] = []
    betas: list[float] = []
    restarts = 0
    block_start = 0
    scale = 0.0
    bar = progress_bar(None, desc, enabled=progress, total=max_steps)
    for j in range(max_steps):
        a, b = step(betas[-1] if betas else 0.0)
        alphas.append(a)
        scale = max(scale, abs(a), b)
        betas.append(b)
        bar.update(1)
        if j + 1 == max_steps:
            break
        if _broke(b, scale, op.dtype, dim):
            betas[-1] = 0.0
            if not restart_on_breakdown:
                break
            # An invariant subspace is exact but may miss eigenvalues (e.g. a second copy
            # of a repeated one): continue from a fresh direction and let the new block
            # grow for min_block_steps before the stopping rule is consulted again.
            if gen is None:
                raise ValueError("gen: a generator is needed to restart after breakdown")
            step.fresh(gen)
            restarts += 1
            block_start = j + 1
            continue
        if (
            stop is not None
            and j + 1 - block_start >= min(min_block_steps, dim - block_start)
            and stop(np.asarray(alphas), np.asarray(betas))
        ):
            break
        step.advance(b)
    bar.close()
    return LanczosState(np.asarray(alphas), np.asarray(betas), basis, restarts, len(alphas))


def _plain_tridiagonal(
    op: Any,
    v0: torch.Tensor,
    max_steps: int,
    stop: Callable[[np.ndarray, np.ndarray], bool] | None,
    progress: bool,
    desc: str,
) -> LanczosState:
    """The three-term recurrence alone (``reorthogonalize=False``): two vectors in the
    operator's dtype, float64 scalars; stops on breakdown."""
    dim, dtype = op.dim, op.dtype
    max_steps = min(max_steps, dim)
    q = v0.to(device=op.device, dtype=torch.float64)
    q = (q / torch.linalg.vector_norm(q)).to(dtype)
    prev, r = torch.zeros_like(q), torch.empty_like(q)
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    bar = progress_bar(None, desc, enabled=progress, total=max_steps)
    for j in range(max_steps):
        hq = op.matvec(q).to(dtype)
        a = _dot64(q, hq)
        torch.add(hq, q, alpha=-a, out=r)  # the operator's output is left as it was
        del hq
        if j > 0:
            r.add_(prev, alpha=-betas[-1])
        b = math.sqrt(max(_dot64(r, r), 0.0))
        alphas.append(a)
        betas.append(b)
        scale = max(scale, abs(a), b)
        bar.update(1)
        if j + 1 == max_steps:
            break
        if _broke(b, scale, dtype, dim):
            betas[-1] = 0.0
            break
        if stop is not None and stop(np.asarray(alphas), np.asarray(betas)):
            break
        torch.div(r, b, out=prev)
        q, prev = prev, q
    bar.close()
    return LanczosState(np.asarray(alphas), np.asarray(betas), None, 0, len(alphas))


@dataclasses.dataclass
class _Ritz:
    """What the eigenvalue drivers hand to :func:`eigenvalues`."""

    theta: np.ndarray  # ascending Ritz values of the projected matrix
    coeffs: np.ndarray  # (rows, n_wanted): the wanted Ritz vectors on the basis
    idx: np.ndarray  # indices of the wanted values into theta, result order
    ritz_res: np.ndarray  # Lanczos residual estimates of the wanted pairs
    basis: StackedBasis
    matvecs: int
    restarts: int  # continuations after an invariant subspace
    cycles: int  # thick restarts (0 without a basis budget)


def _keep_count(n_wanted: int, max_basis: int) -> int:
    """Ritz vectors kept at a thick restart: the wanted ones and half the free rows."""
    return n_wanted + max(1, (max_basis - n_wanted) // 2)


def _kept(theta: np.ndarray, keep: int, k: int, which: str) -> np.ndarray:
    """Indices of the Ritz values kept at a restart: the ``keep`` nearest the wanted end
    (for ``"both"``, split between the ends, each end at least its ``k``)."""
    n = len(theta)
    if which == "largest":
        return np.arange(n - keep, n)
    if which == "smallest":
        return np.arange(keep)
    top = keep // 2
    return np.concatenate([np.arange(keep - top), np.arange(n - top, n)])


def _thick_restart(
    op: Any,
    v0: torch.Tensor,
    *,
    k: int,
    which: str,
    tol: float,
    max_iter: int,
    max_basis: int,
    gen: torch.Generator,
    progress: bool,
    storage: torch.device | Path | None,
) -> _Ritz:
    """Thick-restart Lanczos (Wu and Simon 2000) on a basis of at most ``max_basis`` rows.

    While the basis has room this is :func:`lanczos_tridiagonal`. When it is full,
    the ``l`` Ritz vectors nearest the wanted end replace it (:meth:`StackedBasis.rotate`)
    and the last residual ``r = beta q_{m+1}`` becomes row ``l + 1``. The projected
    matrix is then ``diag(theta_kept)`` bordered by the arrow ``s_i = beta s_i[m]``
    (the Lanczos relation ``H Y = Y diag(theta) + r s^T`` of the kept pairs), followed
    by the usual tridiagonal rows; the first step after a restart has its components
    on the kept vectors removed by the full reorthogonalisation. Ritz residual
    estimates keep their form ``beta |s_i[last]|``. The stopping rule is that of
    :func:`eigenvalues`.
    """
    dim = op.dim
    n_wanted = 2 * k if which == "both" else k
    basis = StackedBasis(dim, op.dtype, op.device, capacity=max_basis, storage=storage)
    step = _ReorthogonalisedStep(op, basis, v0, consume=True)
    T = np.zeros((max_basis, max_basis))
    keep = _keep_count(n_wanted, max_basis)
    kept = 0  # leading rows that are kept Ritz vectors (coupled through the arrow)
    steps = restarts = cycles = block_start = 0
    beta_prev = scale = 0.0
    bar = progress_bar(None, "lanczos", enabled=progress, total=max_iter)
    while True:
        j = len(basis)
        a, b = step(beta_prev if j > kept else 0.0)
        steps += 1
        bar.update(1)
        T[j, j] = a
        n = j + 1
        scale = max(scale, abs(a), b)
        broke = _broke(b, scale, op.dtype, dim)
        if broke:
            b = 0.0
        theta, S = np.linalg.eigh(T[:n, :n])
        idx = _wanted(theta, k, which)
        res = np.abs(b * S[n - 1, idx])
        if steps >= max_iter:
            break
        if (
            not broke
            and n >= n_wanted
            and steps - block_start >= n_wanted
            and np.all(res <= tol * np.max(np.abs(theta)))
        ):
            break
        if n == max_basis:  # full: keep the best Ritz vectors, continue from the residual
            sel = _kept(theta, keep, k, which)
            basis.rotate(S[:, sel])
            T.fill(0.0)
            T[np.arange(keep), np.arange(keep)] = theta[sel]
            T[keep, :keep] = T[:keep, keep] = b * S[n - 1, sel]
            kept = keep
            cycles += 1
        else:
            T[j, j + 1] = T[j + 1, j] = b
        if broke:  # an invariant subspace: continue from a fresh direction
            step.fresh(gen)
            restarts += 1
            block_start = steps
            beta_prev = 0.0
        else:
            step.advance(b)
            beta_prev = b
    bar.close()
    return _Ritz(theta, S[:, idx], idx, res, basis, steps, restarts, cycles)


@dataclasses.dataclass
class EigenResult:
    """Extreme eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: float64 tensor of the Rayleigh quotients ``y^T H y`` of the
            returned unit vectors ``y``: descending for ``"largest"``, ascending for
            ``"smallest"``; for ``"both"`` the k largest (descending) followed by the
            k smallest (ascending), so ``eigenvalues[0]`` is ``lambda_max`` and
            ``eigenvalues[k]`` is ``lambda_min``.
        eigenvectors: ``(dim, n)`` unit columns matching ``eigenvalues``, or ``None``.
        residuals: explicit residual norms ``||H y - rho y||`` of the returned
            vectors (one product each, differences in float64), same order.
        num_matvecs: operator products this call used (Lanczos steps plus one per
            returned eigenvalue for its explicit residual).
        converged: whether every explicit residual met the tolerance.
        ritz_values: the Ritz values ``theta`` of the tridiagonal matrix.
        ritz_residuals: the Lanczos estimates ``beta_{m+1} |s_i[m]|`` that the
            stopping rule used (they equal ``residuals`` in exact arithmetic).
        protocol: how it was measured.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    residuals: torch.Tensor
    num_matvecs: int
    converged: bool
    ritz_values: torch.Tensor
    ritz_residuals: torch.Tensor
    protocol: MeasurementProtocol

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (eigenvectors are left out: they are as large as the model)."""
        return to_jsonable(
            {
                "eigenvalues": self.eigenvalues,
                "residuals": self.residuals,
                "num_matvecs": self.num_matvecs,
                "converged": self.converged,
                "ritz_values": self.ritz_values,
                "ritz_residuals": self.ritz_residuals,
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
    tol: float | None = None,
    max_iter: int | None = None,
    seed: int | torch.Generator | None = None,
    return_eigenvectors: bool = False,
    progress: bool = False,
    max_basis: int | None = None,
    basis_storage: str | torch.device | os.PathLike[str] | None = None,
) -> EigenResult:
    """The k largest and/or smallest eigenvalues of a symmetric operator (Lanczos).

    Lanczos with full reorthogonalisation from a Gaussian start vector, products in
    the operator's dtype, scalars and basis arithmetic in float64. After each step
    the tridiagonal ``T_m`` is diagonalised and the iteration stops when every wanted
    Ritz pair ``(theta_i, y_i = Q_m s_i)`` has a Lanczos residual estimate

        beta_{m+1} |s_i[m]|  <=  tol * max_j |theta_j|

    (a residual tolerance relative to the largest Ritz magnitude, an estimate of
    ``||H||_2``; never a relative change between iterations). That estimate equals
    ``||H y_i - theta_i y_i||`` only in exact arithmetic: in float32 at millions of
    parameters it can claim 1e-14 for a vector whose true residual is 1e-4. So each
    returned unit vector ``y`` then costs one more product: its Rayleigh quotient
    ``rho = y^T H y`` is the reported eigenvalue and the explicit residual

        r = ||H y - rho y||   (float64 differences of the operator's products)

    is the reported residual; ``converged`` is True only when every ``r`` is at most
    ``tol * max_j |theta_j|``. Since ``|rho - lambda| <= r`` for some eigenvalue
    ``lambda`` (and ``~ r^2 / gap`` when it is separated), a converged value is
    within ``tol * ||H||`` of the spectrum. On an invariant subspace the iteration
    continues from a fresh random vector orthogonal to the basis.

    Args:
        op: a :class:`~sharpkit.curvature.HessianOperator`, any object with
            ``matvec``/``dim``/``dtype``/``device``, or a dense symmetric tensor.
        k: how many eigenvalues at each requested end (``1 <= k <= dim``; for
            ``"both"``, ``2k <= dim``).
        which: ``"largest"``, ``"smallest"`` (algebraic: the most negative first) or
            ``"both"``.
        tol: relative residual tolerance (above); default ``max(1e-6, 100 eps)`` for
            the operator dtype's machine epsilon (``1e-6`` in float64, ``1.2e-5`` in
            float32: a single float32 product of a network carries a relative error
            near 1e-6, so a tighter explicit residual is rarely reachable).
        max_iter: maximum Lanczos steps (= products, plus restarts); default
            ``min(dim, max(200, 20 * n_wanted))``. The explicit residuals add one
            product per returned eigenvalue.
        seed: int, ``torch.Generator`` or ``None`` (a fresh seed, recorded).
        return_eigenvectors: also return the unit vectors (``dim x n`` columns).
        progress: show a tqdm bar over Lanczos steps.
        max_basis: the most Lanczos vectors held at once (at least ``n_wanted + 3``).
            A basis that would outgrow it is thick-restarted (Wu and Simon 2000): the
            Ritz vectors nearest the wanted end are kept, the rest dropped, and the
            iteration continues from the last residual, so memory stays at
            ``max_basis`` vectors for more products (a few more from about
            ``2 n_wanted + 2`` vectors up; near the minimum, many). Default: as
            many vectors as a quarter (:data:`BASIS_SHARE`) of the memory now
            available on the operator's device holds (at least ``2 n_wanted + 8``),
            which for most models means no restart.
        basis_storage: where the basis lives. ``None`` (default): the operator's
            device. A device (``"cpu"``, ``torch.device``): that device's memory, e.g.
            host memory for a CUDA operator. A directory (a :class:`pathlib.Path`): an
            unnamed temporary file there, removed when the call ends. Away from the
            operator's device the rows are moved to it a panel of at most
            ``_PANEL_BYTES`` at a time, with the same arithmetic slice by slice, so
            the result agrees to rounding; the process then holds a panel and one
            row instead of the basis, and each step moves the basis once or twice
            (``max_basis`` rows at most), which costs time. The default ``max_basis`` is then a
            quarter of that device's available memory or of the disk's free space.

    Returns:
        An :class:`EigenResult`. ``converged=False`` comes with a ``RuntimeWarning``
        saying whether ``max_iter`` ran out or the products' precision (e.g. float32)
        cannot resolve ``tol``.

    Raises:
        ValueError: ``k`` out of range, unknown ``which``, non-positive ``tol``.

    Note:
        Memory: the basis holds one vector per step, up to ``max_basis``
        (``dim`` values each in the operator's dtype, where ``basis_storage``
        says), besides the operator's own needs, one float64 work vector and one
        row-long buffer in the operator's dtype; the returned eigenvectors, when
        asked for, add ``dim`` values each.

        Single-vector Lanczos sees one direction per eigenspace: an eigenvalue of
        multiplicity > 1 is reported once (its copies only appear through restarts
        and rounding). Hessians of networks rarely have exactly repeated top
        eigenvalues, but a test matrix might.

    Example:
        >>> A = torch.diag(torch.tensor([5.0, 3.0, 1.0, -0.01], dtype=torch.float64))
        >>> r = eigenvalues(A, k=2, seed=0)
        >>> [round(v, 12) for v in r.eigenvalues.tolist()], r.converged
        ([5.0, 3.0], True)
        >>> round(eigenvalues(A, k=1, which="smallest", seed=0).eigenvalues.item(), 12)
        -0.01

    References:
        Lanczos. An iteration method for the solution of the eigenvalue problem of
        linear differential and integral operators. J. Res. NBS, 1950.
        Parlett. The Symmetric Eigenvalue Problem, 1998 (residual bounds, sections
        4.5 and 13.2; reorthogonalisation, chapter 13).
        Wu, Simon. Thick-restart Lanczos method for large symmetric eigenvalue
        problems. SIAM J. Matrix Anal. Appl. 22(2), 2000.
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
    if tol is None:
        tol = max(_DEFAULT_TOL, _DEFAULT_TOL_EPS * torch.finfo(op.dtype).eps)
    if not (isinstance(tol, (int, float)) and not isinstance(tol, bool) and tol > 0):
        raise ValueError(f"tol: expected None or a positive number, got {tol!r}")
    if max_iter is None:
        max_iter = min(op.dim, max(200, 20 * n_wanted))
    if not isinstance(max_iter, int) or max_iter < n_wanted:
        raise ValueError(f"max_iter: expected an integer >= {n_wanted}, got {max_iter!r}")
    storage = _check_basis_storage(basis_storage, op.device)
    max_basis = _check_max_basis(max_basis, op, max_iter, n_wanted, storage)
    gen, seed_used = make_generator(seed)
    # the start vector, in float64: the drivers use it as their work vector (no copy)
    v0 = gaussian(op.dim, gen, op.dtype, op.device).to(torch.float64)
    if max_basis < min(max_iter, op.dim):
        ritz = _thick_restart(
            op, v0, k=k, which=which, tol=tol, max_iter=max_iter, max_basis=max_basis,
            gen=gen, progress=progress, storage=storage,
        )  # fmt: skip
    else:
        ritz = _unrestarted(op, v0, k=k, which=which, tol=tol, max_iter=max_iter, gen=gen,
                            progress=progress, storage=storage)  # fmt: skip
    del v0  # the drivers' work vector
    theta, idx, ritz_res = ritz.theta, ritz.idx, ritz.ritz_res
    threshold = tol * float(np.max(np.abs(theta)))
    rho, res, vectors = _explicit_pairs(op, ritz.basis, ritz.coeffs, return_eigenvectors)
    ritz.basis.close()
    converged = bool(np.all(res <= threshold))
    if not converged:
        worst = float(np.max(res)) / float(np.max(np.abs(theta)))
        if np.all(ritz_res <= threshold):
            why = (
                f"the Lanczos estimates met tol but the explicit residual ||Hy - rho y|| of "
                f"the returned vectors is {worst:.2e} (relative): the operator's "
                f"{str(op.dtype).removeprefix('torch.')} products do not resolve this tol; "
                f"use a larger tol or a float64 operator"
            )
        else:
            why = f"max_iter={max_iter} ran out (largest relative residual {worst:.2e})"
        warnings.warn(
            f"eigenvalues: Lanczos did not reach tol={tol}: {why}", RuntimeWarning, stacklevel=2
        )
    proto = operator_protocol(op)
    proto = dataclasses.replace(
        proto,
        estimator="lanczos",
        seed=seed_used,
        matvecs=ritz.matvecs + len(idx),
        extra={
            **proto.extra,
            "k": k,
            "which": which,
            "tol": tol,
            "max_iter": max_iter,
            "steps": ritz.matvecs,
            "restarts": ritz.restarts,
            "max_basis": max_basis,
            "basis_storage": _storage_name(storage, op.device),
            "thick_restarts": ritz.cycles,
            "stopping_rule": (
                "Lanczos estimate beta|s_m| <= tol * max|theta| for every wanted Ritz pair; "
                "converged if the explicit ||H y - rho y|| <= tol * max|theta|"
            ),
            "reorthogonalisation": "full (block classical Gram-Schmidt, float64, DGKS)",
        },
    )
    return EigenResult(
        eigenvalues=torch.as_tensor(rho, dtype=torch.float64),
        eigenvectors=vectors,
        residuals=torch.as_tensor(res, dtype=torch.float64),
        num_matvecs=ritz.matvecs + len(idx),
        converged=converged,
        ritz_values=torch.as_tensor(theta[idx].copy(), dtype=torch.float64),
        ritz_residuals=torch.as_tensor(ritz_res, dtype=torch.float64),
        protocol=proto,
    )


def _unrestarted(
    op: Any,
    v0: torch.Tensor,
    *,
    k: int,
    which: str,
    tol: float,
    max_iter: int,
    gen: torch.Generator,
    progress: bool,
    storage: torch.device | Path | None,
) -> _Ritz:
    """Lanczos on a basis that holds every step (:func:`lanczos_tridiagonal`)."""
    n_wanted = 2 * k if which == "both" else k

    def ritz_residuals(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, ...]:
        theta, s = _tridiag_eigh(alpha, beta)
        idx = _wanted(theta, k, which)
        res = np.abs(beta[-1] * s[-1, idx])
        if len(alpha) == op.dim:
            res = np.zeros_like(res)  # a complete basis: T is similar to H
        return theta, s, idx, res

    def stop(alpha: np.ndarray, beta: np.ndarray) -> bool:
        if len(alpha) < n_wanted:
            return False
        theta, _, _, res = ritz_residuals(alpha, beta)
        return bool(np.all(res <= tol * np.max(np.abs(theta))))

    state = lanczos_tridiagonal(
        op, v0, max_iter, gen=gen, stop=stop, min_block_steps=n_wanted, progress=progress,
        desc="lanczos", basis_storage=storage, consume_v0=True,
    )  # fmt: skip
    theta, s, idx, res = ritz_residuals(state.alpha, state.beta)
    assert state.basis is not None
    return _Ritz(theta, s[:, idx], idx, res, state.basis, state.matvecs, state.restarts, 0)


#: The share of the device's available memory the default Lanczos basis may use.
BASIS_SHARE = 0.25


def basis_storage_from_text(text: str | None) -> str | Path | None:
    """A command line's ``basis_storage``: ``None``/``"none"`` (the operator's device),
    a device name (``"cpu"``, ``"cuda"``, ``"cuda:1"``), or else a directory.

    Example:
        >>> basis_storage_from_text("cpu"), basis_storage_from_text("/scratch")
        ('cpu', PosixPath('/scratch'))
    """
    if text is None or text == "none":
        return None
    if text == "cpu" or text == "cuda" or text.startswith("cuda:"):
        return text
    return Path(text)


def _check_basis_storage(storage: Any, device: Any) -> torch.device | Path | None:
    """``basis_storage`` checked: ``None`` (the operator's device), a device (its
    memory; ``None`` when it is ``device`` itself), or an existing writable
    directory (given as a path object)."""
    if storage is None:
        return None
    if isinstance(storage, os.PathLike):
        path = Path(storage)
        if not path.is_dir():
            raise ValueError(f"basis_storage: {str(path)!r} is not an existing directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"basis_storage: the directory {str(path)!r} is not writable")
        return path
    if isinstance(storage, (str, torch.device)):
        try:
            where = resolve_device(storage)
        except ValueError as err:
            raise ValueError(
                f"basis_storage: {storage!r} is not a device here ({err}); a directory for a "
                "basis file is given as a pathlib.Path"
            ) from None
        if where.type not in ("cpu", "cuda"):
            raise ValueError(f"basis_storage: expected a CPU or CUDA device, got {storage!r}")
        where = _canonical(where)
        return None if device is not None and where == _canonical(device) else where
    raise TypeError(
        "basis_storage: expected None, a device (str or torch.device) or a directory "
        f"(pathlib.Path), got {type(storage).__name__}"
    )


def _storage_name(storage: torch.device | Path | None, device: Any) -> str:
    if storage is None:
        return f"memory of {torch.device(device)}"
    if isinstance(storage, Path):
        return f"file in {storage}"
    return f"memory of {storage}"


def _check_max_basis(
    max_basis: Any, op: Any, max_iter: int, n_wanted: int, storage: torch.device | Path | None
) -> int:
    """``max_basis`` checked, or its default: the rows that a quarter (:data:`BASIS_SHARE`)
    of the available memory of the storage device (or free space of the basis file's
    disk) holds, at least ``2 n_wanted + 8``, at most ``max_iter``."""
    least = min(n_wanted + 3, op.dim)
    if max_basis is None:
        row = op.dim * torch.finfo(op.dtype).bits // 8
        if isinstance(storage, Path):
            room = shutil.disk_usage(storage).free
        else:
            room = available_memory(op.device if storage is None else storage)
        fits = int(room * BASIS_SHARE) // max(row, 1)
        return min(max_iter, op.dim, max(fits, 2 * n_wanted + 8))
    if isinstance(max_basis, bool) or not isinstance(max_basis, int) or max_basis < least:
        raise ValueError(
            f"max_basis: expected None or an integer >= {least} (the {n_wanted} wanted "
            f"vectors and room to grow), got {max_basis!r}"
        )
    return min(max_basis, op.dim)


def _explicit_pairs(
    op: Any, basis: StackedBasis, coeffs: np.ndarray, keep: bool
) -> tuple[np.ndarray, np.ndarray, torch.Tensor | None]:
    """Rayleigh quotients and explicit residuals of the Ritz vectors ``Q^T s_i``.

    Each vector is formed in float64, normalised, rounded to the operator's dtype
    (the vector that is returned) and multiplied once by the operator; for the
    rounded ``y``, ``rho = y^T H y / y^T y`` and ``||H y - rho y|| / ||y||`` are
    accumulated in float64 slice by slice, so only ``y`` and its product are held.
    Vectors are kept (in the operator's dtype) only if asked.
    """
    rho = np.empty(coeffs.shape[1])
    res = np.empty(coeffs.shape[1])
    kept = []
    for i in range(coeffs.shape[1]):
        y64 = basis.combine(torch.as_tensor(coeffs[:, i]))
        y64 /= torch.linalg.vector_norm(y64)
        y = y64.to(op.dtype)  # the vector returned (y64 itself for a float64 operator)
        del y64
        hy = op.matvec(y)
        norm2 = _dot64(y, y, exact=True)
        rho[i] = _dot64(y, hy, exact=True) / norm2
        res[i] = _residual_norm(hy, y, float(rho[i])) / math.sqrt(norm2)
        del hy
        if keep:
            kept.append(y)
    return rho, res, torch.stack(kept, dim=1) if keep else None
