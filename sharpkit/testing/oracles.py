"""The curvature engine's correctness-oracle problems: tiny models with dense Hessians.

Each :class:`OracleCase` is small enough for :func:`sharpkit.testing.dense_hessian`
(tens of parameters) yet exercises one thing that breaks Hessian code in practice:
smooth and piecewise-linear activations, convolutions, attention (softmax of
products of parameters), BatchNorm's running statistics in eval mode, LayerNorm
(whose second derivative ``torch.func.hessian`` gets wrong in torch 2.13), a two-factor
(LoRA-style) product with its indefinite cross-curvature, a quadratic with a
closed-form Hessian, and example weighting across an uneven last batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["ORACLE_CASES", "OracleCase", "TinyAttention", "TwoFactorLinear", "oracle_cases"]


@dataclasses.dataclass
class OracleCase:
    """One oracle problem.

    Attributes:
        name: short identifier.
        model: the network (float32, as a user would build it).
        loss_fn: ``loss_fn(model, batch)`` returning the mean loss.
        data: one batch or a list of batches.
        closed_form: the exact float64 Hessian where one is known, else ``None``.
        full_batch: for multi-batch data, the same examples as one batch (its mean
            loss is the example-weighted average), else ``None``.
        mode: the module mode the case is meant for.
    """

    name: str
    model: nn.Module
    loss_fn: Callable[[Any, Any], torch.Tensor]
    data: Any
    closed_form: torch.Tensor | None = None
    full_batch: Any = None
    mode: str = "eval"


class TwoFactorLinear(nn.Module):
    """``y = x W0^T + x A^T B^T``: a frozen base plus a trainable rank-r product ``B A``.

    A plain two-factor (LoRA-style) layer defined here so the oracle does not depend
    on :mod:`sharpkit.balance`.
    """

    def __init__(self, n_in: int, n_out: int, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        self.base = nn.Parameter(
            torch.randn(n_out, n_in, generator=generator) / math.sqrt(n_in), requires_grad=False
        )
        self.lora_A = nn.Parameter(torch.randn(rank, n_in, generator=generator) / math.sqrt(n_in))
        self.lora_B = nn.Parameter(torch.randn(n_out, rank, generator=generator) / math.sqrt(rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.base.T + (x @ self.lora_A.T) @ self.lora_B.T


class TinyAttention(nn.Module):
    """Single-head self-attention, mean-pooled, then a linear head."""

    def __init__(self, d: int, n_classes: int) -> None:
        super().__init__()
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.head = nn.Linear(d, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, tokens, d)
        scores = self.q(x) @ self.k(x).transpose(1, 2) / math.sqrt(x.shape[-1])
        h = torch.softmax(scores, dim=-1) @ self.v(x)  # (batch, tokens, d)
        return self.head(h.mean(dim=1))


def _ce(model: Any, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _half_mse(model: Any, batch: Any) -> torch.Tensor:
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum(-1).mean()


def _init(module: nn.Module, gen: torch.Generator) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
    return module


def _mlp(act: type[nn.Module], gen: torch.Generator) -> OracleCase:
    model = _init(nn.Sequential(nn.Linear(4, 5), act(), nn.Linear(5, 3)), gen)
    x = torch.randn(12, 4, generator=gen)
    y = torch.randint(0, 3, (12,), generator=gen)
    return OracleCase(f"mlp_{act.__name__.lower()}", model, _ce, (x, y))


def _cnn(gen: torch.Generator) -> OracleCase:
    model = _init(
        nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2, 3)
        ),
        gen,
    )
    x = torch.randn(8, 1, 5, 5, generator=gen)
    y = torch.randint(0, 3, (8,), generator=gen)
    return OracleCase("cnn", model, _ce, (x, y))


def _attention(gen: torch.Generator) -> OracleCase:
    model = _init(TinyAttention(4, 2), gen)
    x = torch.randn(6, 3, 4, generator=gen)
    y = torch.randint(0, 2, (6,), generator=gen)
    return OracleCase("attention", model, _ce, (x, y))


def _batchnorm(gen: torch.Generator) -> OracleCase:
    model = _init(
        nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)), gen
    )
    bn = model[1]
    with torch.no_grad():  # non-trivial running statistics, so eval mode differs from train
        bn.running_mean.copy_(torch.randn(5, generator=gen))
        bn.running_var.copy_(torch.rand(5, generator=gen) + 0.5)
    x = torch.randn(10, 4, generator=gen)
    y = torch.randint(0, 3, (10,), generator=gen)
    return OracleCase("batchnorm_eval", model, _ce, (x, y))


def _layernorm(gen: torch.Generator) -> OracleCase:
    model = _init(nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)), gen)
    x = torch.randn(10, 4, generator=gen)
    y = torch.randint(0, 3, (10,), generator=gen)
    return OracleCase("layernorm", model, _ce, (x, y))


def _lora(gen: torch.Generator) -> OracleCase:
    model = TwoFactorLinear(4, 3, 2, gen)
    x = torch.randn(9, 4, generator=gen)
    y = torch.randn(9, 3, generator=gen)
    return OracleCase("lora_pair", model, _half_mse, (x, y))


def _linreg(gen: torch.Generator) -> OracleCase:
    model = _init(nn.Linear(5, 1, bias=False), gen)
    x = torch.randn(20, 5, generator=gen)
    y = torch.randn(20, 1, generator=gen)
    x64 = x.double()
    return OracleCase("linear_regression", model, _half_mse, (x, y), closed_form=x64.T @ x64 / 20)


def _multibatch(gen: torch.Generator) -> OracleCase:
    case = _mlp(nn.Tanh, gen)
    x = torch.randn(13, 4, generator=gen)
    y = torch.randint(0, 3, (13,), generator=gen)
    batches = [(x[i : i + 5], y[i : i + 5]) for i in range(0, 13, 5)]  # sizes 5, 5, 3
    return OracleCase("multi_batch", case.model, _ce, batches, full_batch=(x, y))


_BUILDERS: dict[str, Callable[[torch.Generator], OracleCase]] = {
    "mlp_tanh": lambda g: _mlp(nn.Tanh, g),
    "mlp_relu": lambda g: _mlp(nn.ReLU, g),
    "cnn": _cnn,
    "attention": _attention,
    "batchnorm_eval": _batchnorm,
    "layernorm": _layernorm,
    "lora_pair": _lora,
    "linear_regression": _linreg,
    "multi_batch": _multibatch,
}

#: Names of the oracle cases, in a fixed order.
ORACLE_CASES = tuple(_BUILDERS)


def oracle_cases(names: tuple[str, ...] | None = None, *, seed: int = 0) -> dict[str, OracleCase]:
    """Build the oracle cases (each from its own generator seeded by ``seed``).

    Example:
        >>> cases = oracle_cases(("linear_regression",))
        >>> cases["linear_regression"].closed_form.shape
        torch.Size([5, 5])
    """
    names = ORACLE_CASES if names is None else names
    out = {}
    for n in names:
        if n not in _BUILDERS:
            raise ValueError(f"names: unknown oracle case {n!r}; known: {ORACLE_CASES}")
        out[n] = _BUILDERS[n](torch.Generator().manual_seed(seed))
    return out
