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

from typing import Any

import torch
from torch import nn

from sharpkit.balance import add_lora

__all__ = [
    "ResNet18",
    "SmallCNN",
    "TinyGPT",
    "TransformerBlock",
    "lora_mlp",
    "lora_transformer_block",
    "mlp_batch",
    "scale_model",
    "sequence_batch",
]


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


# ---------------------------------------------------------------- scale models (issue 19)
class SmallCNN(nn.Module):
    """S: four 3x3 convolutions (32-64-128-224 channels, two max-pools), global average
    pooling and a linear head, on 3 x 32 x 32 images (~0.35M parameters)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(128, 224, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(224, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.short(x))


class ResNet18(nn.Module):
    """M: ResNet-18 (He et al., 2016) in its CIFAR form (3x3 stem, no max-pool):
    four stages of two basic blocks (64-128-256-512 channels), 11.2M parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


class _CausalBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (b, heads, t, d_head)
        scores = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        att = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """L: a GPT-style decoder (token and learned position embeddings, 6 pre-LN causal
    blocks of width 256 with 4 heads, untied output head, vocabulary 1024; ~5.3M
    parameters). Returns next-token logits flattened to ``(batch * seq, vocab)``."""

    def __init__(
        self, vocab: int = 1024, d: int = 256, layers: int = 6, heads: int = 4, seq: int = 64
    ) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*[_CausalBlock(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        h = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        logits = self.head(self.ln(self.blocks(h)))
        return logits.reshape(-1, logits.shape[-1])


def scale_model(size: str, seed: int = 0) -> tuple[nn.Module, Any]:
    """``"S"``, ``"M"`` or ``"L"``: the model (seeded init) and a function
    ``batch(n, seed) -> (inputs, targets)`` of synthetic data for it."""
    torch.manual_seed(seed)
    if size == "L":
        model: nn.Module = TinyGPT()

        def batch(n: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
            g = torch.Generator().manual_seed(s)
            idx = torch.randint(0, 1024, (n, 65), generator=g)
            return idx[:, :-1].contiguous(), idx[:, 1:].reshape(-1)

        return model, batch
    model = SmallCNN() if size == "S" else ResNet18()

    def batch(n: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(s)
        return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)

    return model, batch
