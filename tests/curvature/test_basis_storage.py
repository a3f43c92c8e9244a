"""The Lanczos basis held away from the operator's device: in a temporary file, or in
another device's memory. The answer must be the one of a basis on the device (same
arithmetic slice by slice), bad storage is refused before any product, and the file
is released when the call ends (bad values: test_lanczos.py)."""

from __future__ import annotations

import os

import pytest
import torch

from sharpkit.curvature import eigenvalues, lanczos

F64 = torch.float64


def _matrix(eigs: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=F64))
    a = q @ torch.diag(eigs.to(F64)) @ q.T
    return (a + a.T) / 2


class _Float32:
    """A float32 operator (a dense float64 matrix rounded), like a network's products."""

    def __init__(self, a: torch.Tensor) -> None:
        self.a = a.float()
        self.dim, self.dtype, self.device, self.num_matvecs = a.shape[0], torch.float32, "cpu", 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += 1
        return self.a @ v.to(torch.float32)


def _elsewhere(monkeypatch) -> None:
    """Make a basis "on another device" out of the CPU: StackedBasis treats a basis on
    the CPU's memory as held elsewhere, so every product moves panels and rows as it
    does for a CUDA operator whose basis is in host memory."""
    real = lanczos._DeviceRows.__init__

    def init(self, *a, **kw):
        real(self, *a, **kw)
        self.local = False

    monkeypatch.setattr(lanczos._DeviceRows, "__init__", init)
    real_basis = lanczos.StackedBasis.__init__

    def basis_init(self, *a, **kw):
        real_basis(self, *a, **kw)
        self.local = self._store.local

    monkeypatch.setattr(lanczos.StackedBasis, "__init__", basis_init)


def _small_panels(monkeypatch) -> None:
    # slices of 7 columns, panels of at most 3 slices of the rows in use, blocks of 4 rows
    monkeypatch.setattr(lanczos, "_CHUNK_COLUMNS", 7)
    monkeypatch.setattr(lanczos, "_BLOCK_ROWS", 4)
    monkeypatch.setattr(lanczos, "_PANEL_BYTES", 3 * 7 * 8 * 10)


@pytest.mark.parametrize("where", ["memory", "file", "device"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_stacked_basis_matches_dense(monkeypatch, tmp_path, where, dtype) -> None:
    # Q w, Q^T c, Gram-Schmidt, rows and the in-place rotation on a basis on the
    # device, in a file or elsewhere agree with dense float64 arithmetic on the
    # stored rows, over several row blocks, column slices and panels (the last short).
    _small_panels(monkeypatch)
    if where == "device":
        _elsewhere(monkeypatch)
    storage = {"memory": None, "file": tmp_path, "device": torch.device("cpu")}[where]
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(61, 10, generator=g, dtype=F64))
    basis = lanczos.StackedBasis(61, dtype, torch.device("cpu"), capacity=10, storage=storage)
    assert basis.local == (where == "memory")
    for row in q.T:
        stored = basis.append(row)
        torch.testing.assert_close(stored.to(F64), row.to(dtype).to(F64), atol=0, rtol=0)
    assert len(basis) == 10 and basis.allocated_rows == 10
    Q = torch.stack([basis.row(i).to(F64).clone() for i in range(10)])
    torch.testing.assert_close(Q, q.T.to(dtype).to(F64), atol=0, rtol=0)
    w = torch.randn(61, generator=g, dtype=F64)
    c = torch.randn(10, generator=g, dtype=F64)
    atol = 1e-12 if dtype == F64 else 1e-6
    torch.testing.assert_close(basis.coefficients(w), Q @ w, atol=atol, rtol=0)
    torch.testing.assert_close(basis.combine(c), Q.T @ c, atol=atol, rtol=0)
    r = basis.orthogonalise(w.clone())
    torch.testing.assert_close(Q @ r, torch.zeros(10, dtype=F64), atol=atol, rtol=0)
    torch.testing.assert_close(r, w - Q.T @ (Q @ w), atol=atol, rtol=0)
    s, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=F64))
    basis.rotate(s[:, :6])
    assert len(basis) == 6
    got = torch.stack([basis.row(i).to(F64).clone() for i in range(6)])
    torch.testing.assert_close(got, (Q.T @ s[:, :6]).T, atol=atol, rtol=0)
    with pytest.raises(IndexError, match="row 6 of 6"):
        basis.row(6)
    basis.close()
    assert len(basis) == 0


def test_file_basis_holds_a_panel_not_the_basis(monkeypatch, tmp_path) -> None:
    # The buffers in memory: one row and one panel of at most _PANEL_BYTES (at least
    # one slice per row); the rows themselves are in the file.
    monkeypatch.setattr(lanczos, "_CHUNK_COLUMNS", 64)
    monkeypatch.setattr(lanczos, "_PANEL_BYTES", 64 * 4 * 20 * 2)
    dim = 64 * 50
    g = torch.Generator().manual_seed(1)
    basis = lanczos.StackedBasis(dim, torch.float32, torch.device("cpu"), storage=tmp_path)
    for _ in range(20):
        basis.append(torch.randn(dim, generator=g, dtype=F64))
    basis.coefficients(torch.randn(dim, generator=g, dtype=F64))
    store = basis._store
    assert isinstance(store, lanczos._FileRows)
    assert os.fstat(store._file.fileno()).st_size == 20 * dim * 4
    assert store._panel.numel() * 4 <= lanczos._PANEL_BYTES  # 2 slices of 20 rows
    assert basis._narrow.numel() == dim
    basis.close()


@pytest.mark.parametrize("where", ["file", "device"])
@pytest.mark.parametrize(("which", "max_basis"), [("largest", None), ("largest", 12), ("both", 14)])
def test_eigenvalues_with_the_basis_away_are_the_same(
    monkeypatch, tmp_path, where, which, max_basis
) -> None:
    # Same seed, same operator: a basis in a file or elsewhere takes the same steps
    # (thick restarts included) and returns the same pairs as one on the device, to
    # float32 rounding (BLAS may sum a slice in another order for another layout).
    _small_panels(monkeypatch)
    A = _matrix(torch.linspace(-2.0, 3.0, 160) ** 3, 4)
    kw = dict(k=3, which=which, seed=0, max_basis=max_basis, return_eigenvectors=True)
    ref = eigenvalues(_Float32(A), **kw)
    if where == "device":
        _elsewhere(monkeypatch)
    storage = tmp_path if where == "file" else "cpu"
    got = eigenvalues(_Float32(A), basis_storage=storage, **kw)
    assert got.num_matvecs == ref.num_matvecs
    assert got.protocol.extra["thick_restarts"] == ref.protocol.extra["thick_restarts"]
    if max_basis is not None:
        assert ref.protocol.extra["thick_restarts"] >= 1
    torch.testing.assert_close(got.eigenvalues, ref.eigenvalues, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.residuals, ref.residuals, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.eigenvectors, ref.eigenvectors, atol=1e-5, rtol=0)
    assert got.converged
    want = torch.linalg.eigvalsh(A)
    want = torch.cat([want.flip(0)[:3], want[:3]]) if which == "both" else want.flip(0)[:3]
    torch.testing.assert_close(got.eigenvalues, want, atol=1e-4 * 27, rtol=0)
    name = f"file in {tmp_path}" if where == "file" else "memory of cpu"
    assert got.protocol.extra["basis_storage"] == name
    assert list(tmp_path.iterdir()) == []  # the file had no name and is gone


def test_file_basis_is_closed_after_the_call(tmp_path) -> None:
    A = _matrix(torch.linspace(-1.0, 3.0, 80) ** 3, 5)
    before = len(os.listdir("/proc/self/fd"))
    r = eigenvalues(A, k=2, seed=0, basis_storage=tmp_path, max_basis=10)
    assert r.converged and r.protocol.extra["thick_restarts"] >= 1
    assert len(os.listdir("/proc/self/fd")) == before


def test_default_file_basis_follows_the_free_disk_space(monkeypatch, tmp_path) -> None:
    A = _matrix(torch.linspace(-1.0, 3.0, 300) ** 3, 2)

    class Usage:
        free = 300 * 8 * 4 * 12  # a quarter holds 12 float64 rows of 300

    monkeypatch.setattr(lanczos.shutil, "disk_usage", lambda path: Usage)
    r = eigenvalues(A, k=2, seed=0, basis_storage=tmp_path)
    assert r.protocol.extra["max_basis"] == 12 and r.protocol.extra["thick_restarts"] >= 1
    torch.testing.assert_close(
        r.eigenvalues, torch.linalg.eigvalsh(A).flip(0)[:2], atol=1e-6 * 27, rtol=0
    )


def test_the_operators_own_device_is_the_default_storage() -> None:
    A = _matrix(torch.linspace(-1.0, 3.0, 40), 6)
    r = eigenvalues(A, k=1, seed=0, basis_storage=torch.device("cpu", 0))
    assert r.protocol.extra["basis_storage"] == "memory of cpu"


def test_a_file_is_not_a_directory(tmp_path) -> None:
    f = tmp_path / "plain"
    f.write_text("x")
    with pytest.raises(ValueError, match="not an existing directory"):
        eigenvalues(torch.eye(5, dtype=F64), basis_storage=f)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_storage_without_cuda_is_refused() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        eigenvalues(torch.eye(5, dtype=F64), basis_storage="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_operator_with_its_basis_in_host_memory() -> None:
    A = _matrix(torch.linspace(-1.0, 3.0, 200) ** 3, 7)
    ref = eigenvalues(A.cuda(), k=3, seed=0, max_basis=12)
    got = eigenvalues(A.cuda(), k=3, seed=0, max_basis=12, basis_storage="cpu")
    assert got.protocol.extra["basis_storage"] == "memory of cpu"
    torch.testing.assert_close(got.eigenvalues, ref.eigenvalues, atol=1e-12, rtol=0)
