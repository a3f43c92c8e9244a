"""Directions: filter normalisation, Hessian eigenvectors (vs a dense Hessian), PCA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpkit.landscape import (
    filter_normalized_direction,
    hessian_directions,
    pca_directions,
    project_onto,
)
from sharpkit.testing import dense_hessian


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )


def test_filter_normalisation() -> None:
    net = _convnet()
    d = filter_normalized_direction(net, seed=3)
    assert set(d) == {n for n, _ in net.named_parameters()}
    for name, w in net.named_parameters():
        if w.dim() <= 1:  # biases and BatchNorm weight/bias are zeroed
            assert not d[name].any(), name
        else:
            wn = w.detach().reshape(w.shape[0], -1).norm(dim=1)
            dn = d[name].reshape(w.shape[0], -1).norm(dim=1)
            torch.testing.assert_close(dn, wn)
    again = filter_normalized_direction(net, seed=3)
    other = filter_normalized_direction(net, seed=4)
    assert all(torch.equal(d[k], again[k]) for k in d)
    assert not torch.equal(d["0.weight"], other["0.weight"])


def test_hessian_directions_match_dense_eigenvectors() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(0)
    data = (
        torch.randn(20, 3, generator=g, dtype=torch.float64),
        torch.randint(0, 2, (20,), generator=g),
    )
    dirs, lams = hessian_directions(net, nn.CrossEntropyLoss(), data, k=2, tol=1e-10)
    H = dense_hessian(net, nn.CrossEntropyLoss(), data)
    evals, evecs = torch.linalg.eigh(H)
    torch.testing.assert_close(
        torch.tensor(lams, dtype=torch.float64), evals.flip(0)[:2], rtol=1e-7, atol=1e-9
    )
    names = [n for n, _ in net.named_parameters()]
    for j, d in enumerate(dirs):
        v = torch.cat([d[n].reshape(-1) for n in names])
        assert abs(float(v @ evecs[:, -1 - j])) == pytest.approx(1.0, abs=1e-6)


def test_pca_recovers_a_planar_trajectory() -> None:
    g = torch.Generator().manual_seed(0)
    u, v = (
        torch.randn(10, generator=g, dtype=torch.float64),
        torch.randn(10, generator=g, dtype=torch.float64),
    )
    end = torch.randn(10, generator=g, dtype=torch.float64)
    ts = torch.linspace(0, 1, 8, dtype=torch.float64)
    traj = [{"w": end + (1 - t) * 3 * u + torch.sin(4 * t) * v} for t in ts]
    traj.append({"w": end.clone()})
    dirs, coords, explained = pca_directions(traj)
    assert sum(explained) == pytest.approx(1.0, abs=1e-12)  # the path spans two dimensions
    D = torch.stack([dirs[0]["w"], dirs[1]["w"]], dim=1)
    torch.testing.assert_close(D.T @ D, torch.eye(2, dtype=torch.float64))
    recon = torch.stack([end + D @ c for c in coords])
    torch.testing.assert_close(recon, torch.stack([s["w"] for s in traj]))
    torch.testing.assert_close(coords[-1], torch.zeros(2, dtype=torch.float64))
    # project_onto on the same directions gives the same coordinates
    torch.testing.assert_close(project_onto(traj, traj[-1], dirs), coords)


def test_pca_needs_three_snapshots() -> None:
    with pytest.raises(ValueError, match="trajectory"):
        pca_directions([{"w": torch.zeros(2)}] * 2)
