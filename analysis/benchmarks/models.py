"""Small LoRA models for benchmarks, built from code (nothing downloaded).

Both use sharpkit's :class:`~sharpkit.balance.LoRALinear` (frozen base weight,
trainable rank-``r`` factors), the setting of Li, Zhang, He (NeurIPS 2024):

- :func:`lora_mlp`: an MLP (784-512-512-10 by default) with LoRA on every layer;
- :func:`lora_transformer_block`: one pre-LayerNorm transformer block (multi-head
  self-attention with separate q/k/v/o projections and a 4x MLP) on
  ``(batch, seq, dim)`` inputs, mean-pooled into a trainable linear head, with
  LoRA on q, k, v, o, fc1 and fc2 (the LayerNorms are frozen too).

The batch helpers return ``(inputs, targets)`` for cross-entropy.
"""

from __future__ import annotations

import torch
from torch import nn

from sharpkit.balance import add_lora

__all__ = ["TransformerBlock", "lora_mlp", "lora_transformer_block", "mlp_batch", "sequence_batch"]


def lora_mlp(
    *,
    in_features: int = 784,
    hidden: int = 512,
    num_classes: int = 10,
    rank: int = 8,
    alpha: float = 16.0,
    seed: int = 0,
) -> nn.Module:
    """A 3-layer ReLU MLP with LoRA (rank ``rank``) on all three Linear layers."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
    g = torch.Generator().manual_seed(seed + 1)
    add_lora(model, ["0", "2", "4"], rank=rank, alpha=alpha, generator=g)
    _nonzero_b(model, g)
    return model


class TransformerBlock(nn.Module):
    """Pre-LN transformer block + mean pooling + linear head (a small classifier)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, num_classes: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads: must divide dim={dim}, got {heads}")
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape  # (batch, seq, dim)
        h = self.ln1(x)

        def split(z: torch.Tensor) -> torch.Tensor:  # (b, heads, t, d / heads)
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        att = nn.functional.scaled_dot_product_attention(
            split(self.q(h)), split(self.k(h)), split(self.v(h))
        )
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(dim=1))


def lora_transformer_block(
    *,
    dim: int = 256,
    heads: int = 4,
    mlp_ratio: int = 4,
    num_classes: int = 10,
    rank: int = 8,
    alpha: float = 16.0,
    seed: int = 0,
) -> nn.Module:
    """A :class:`TransformerBlock` with LoRA on q, k, v, o, fc1, fc2; the head trains fully."""
    torch.manual_seed(seed)
    model = TransformerBlock(dim, heads, mlp_ratio, num_classes)
    g = torch.Generator().manual_seed(seed + 1)
    add_lora(model, ["q", "k", "v", "o", "fc1", "fc2"], rank=rank, alpha=alpha, generator=g)
    model.head.requires_grad_(True)
    _nonzero_b(model, g)
    return model


def _nonzero_b(model: nn.Module, g: torch.Generator) -> None:
    """Start the B factors small but non-zero (as after some training), so that
    both factors of every pair receive gradients from the first step."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.01, generator=g)


def mlp_batch(
    n: int = 128, *, in_features: int = 784, num_classes: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs ``(n, in_features)`` and labels for :func:`lora_mlp`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, in_features, generator=g), torch.randint(
        0, num_classes, (n,), generator=g
    )


def sequence_batch(
    n: int = 32, *, seq_len: int = 64, dim: int = 256, num_classes: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs ``(n, seq_len, dim)`` and labels for :func:`lora_transformer_block`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, seq_len, dim, generator=g)
    return x, torch.randint(0, num_classes, (n,), generator=g)
