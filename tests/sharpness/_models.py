"""Shared test models: quadratics with known sharpness, small ReLU nets."""

from __future__ import annotations

import torch
from torch import nn


class Quadratic(nn.Module):
    """L(theta) = 0.5 (theta - center)^T A (theta - center), evaluated at theta = center."""

    def __init__(self, A: torch.Tensor, center: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(center.clone())
        self.register_buffer("A", A)
        self.register_buffer("center", center.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.theta - self.center
        return 0.5 * e @ self.A @ e + 0.0 * x.sum()


def quad_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch)


def random_psd(n: int, seed: int, spread: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.linspace(0.1, spread, n, dtype=torch.float64)
    return q @ torch.diag(lam) @ q.T


def relu_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).double()


def rescaled(net: nn.Sequential, alpha: float) -> nn.Sequential:
    """The same function: layer 1 (weights and bias) times alpha, layer 2 weights / alpha."""
    import copy

    out = copy.deepcopy(net)
    with torch.no_grad():
        out[0].weight.mul_(alpha)
        out[0].bias.mul_(alpha)
        out[2].weight.div_(alpha)
    return out


def class_data(seed: int = 0, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )
