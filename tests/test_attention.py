"""Second order through attention, at the models' default attention.

torch's fused attention kernels (flash / memory-efficient
``scaled_dot_product_attention``, the native fast path of ``nn.MultiheadAttention``
and ``nn.TransformerEncoderLayer``) have no double backward and no forward-mode
derivative. Every second-order and forward-mode path runs them on the math
backend (sharpkit._functional.second_order_kernels). References: dense float64
Hessians, and an independent plain double backward on the eager-attention twin
of a Hugging Face model (the same weights, attention written out in matmuls).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sharpkit._functional import second_order_kernels
from sharpkit.curvature import HessianOperator
from sharpkit.sharpness import fisher_rao_norm
from sharpkit.sharpness._objective import Objective
from sharpkit.testing import dense_hessian

F64 = torch.float64
ATOL = 1e-10
PATHS = [("rev-rev", True), ("rev-rev", False), ("fwd-rev", False), ("linearize", True)]


class SDPA(nn.Module):
    """One self-attention head pair through ``F.scaled_dot_product_attention``."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(6, 18)
        self.out = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 3).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(a.transpose(1, 2).reshape(b, t, 6)).mean(dim=(1, 2))


class MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.out = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.attn(x, x, x, need_weights=False)[0]).mean(dim=(1, 2))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(6, 2, 8, dropout=0.0, batch_first=True)
        self.out = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.layer(x)).mean(dim=(1, 2))


MODULES = {"sdpa": SDPA, "mha": MHA, "encoder": Encoder}


def _mse(m, b):
    return ((m(b[0]) - b[1]) ** 2).mean()


def _data(n: int = 4, t: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, 6, generator=g), torch.randn(n, generator=g)


def _probe(dim: int, cols: int = 2) -> torch.Tensor:
    return torch.randn(dim, cols, generator=torch.Generator().manual_seed(0), dtype=F64)


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize(("hvp", "cache_graph"), PATHS)
def test_torch_attention_hessian_equals_dense(name: str, hvp: str, cache_graph: bool) -> None:
    torch.manual_seed(0)
    model = MODULES[name]()  # float32, default attention, train mode as built
    data = _data()
    H = dense_hessian(model, _mse, data)
    op = HessianOperator(model, _mse, data, dtype=F64, hvp=hvp, cache_graph=cache_graph)
    V = _probe(op.dim)
    torch.testing.assert_close(op @ V, H @ V, atol=ATOL, rtol=0)
    assert torch.backends.mha.get_fastpath_enabled()  # restored after the products


def test_multi_batch_encoder_hessian_equals_dense() -> None:
    """Several batches (uneven last one) through TransformerEncoderLayer, cached."""
    torch.manual_seed(0)
    model = Encoder()
    x, y = _data(n=7)
    batches = [(x[:3], y[:3]), (x[3:6], y[3:6]), (x[6:], y[6:])]
    H = dense_hessian(model, _mse, (x, y))
    op = HessianOperator(model, _mse, batches, dtype=F64)
    V = _probe(op.dim)
    torch.testing.assert_close(op @ V, H @ V, atol=ATOL, rtol=0)
    assert op.cached_batches == 3


@pytest.mark.parametrize("name", ["mha", "encoder"])
def test_fisher_rao_through_the_eval_fast_path(name: str) -> None:
    """Fisher-Rao's JVP runs without a recorded gradient, where nn.MultiheadAttention
    and nn.TransformerEncoderLayer take their native fast path in eval mode (no
    forward-mode derivative). Reference: <w, grad l_i> per example by plain
    first-order autograd (the fast kernels' first derivative)."""
    torch.manual_seed(0)
    model = MODULES[name]().double().eval()
    x, y = _data()
    x, y = x.double(), y.double()

    def per_example(m, b):
        return (m(b[0]) - b[1]) ** 2

    res = fisher_rao_norm(model, per_example, (x, y))
    params = list(model.parameters())
    inner = []
    for i in range(len(y)):
        g = torch.autograd.grad(per_example(model, (x[i : i + 1], y[i : i + 1])).sum(), params)
        inner.append(sum((p * gi).sum() for p, gi in zip(params, g)))
    expected = torch.stack(inner).detach().pow(2).mean().sqrt()
    assert res.value == pytest.approx(float(expected), rel=1e-10)
    assert not model.training


def test_first_order_keeps_the_fused_kernels() -> None:
    """Only second-order and forward-mode evaluations switch kernels."""
    seen: list[tuple[bool, bool]] = []
    model = SDPA()

    def loss(m, b):
        seen.append(
            (torch.backends.cuda.flash_sdp_enabled(), torch.backends.mha.get_fastpath_enabled())
        )
        return _mse(m, b)

    data = _data()
    op = HessianOperator(model, loss, data)
    seen.clear()
    op.gradient()
    assert seen == [(True, True)]
    seen.clear()
    op.matvec(torch.ones(op.dim))
    assert seen and all(s == (False, False) for s in seen)
    seen.clear()
    obj = Objective(model, loss, data)
    obj.loss_and_grad(obj.batches[0])
    obj.loss(obj.batches[0])
    assert seen == [(True, True), (True, True)]


def test_second_order_kernels_restores_settings_on_error() -> None:
    before = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.mha.get_fastpath_enabled())
    with pytest.raises(KeyError), second_order_kernels():
        assert not torch.backends.mha.get_fastpath_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled()
        raise KeyError("inside")
    after = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.mha.get_fastpath_enabled())
    assert after == before


# ---------------------------------------------------------------------- Hugging Face
transformers = pytest.importorskip("transformers")


def _gpt2(attn: str) -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        attn_implementation=attn,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).double()


def _bert(attn: str) -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=12, max_position_embeddings=8, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=2, attn_implementation=attn,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).double()


def _hf_loss(m, batch):
    if "labels" in batch:  # BERT: its own loss (computed in the model's dtype)
        return m(**batch).loss
    # GPT-2: the causal-LM loss written out, because transformers' built-in one casts
    # the logits to float32 (`logits.float()`), which would cap a float64 check at ~1e-7
    ids = batch["input_ids"]
    logits = m(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _hf_case(kind: str):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 11, (3, 6), generator=g)
    if kind == "gpt2":
        return _gpt2, {"input_ids": ids}, lambda n: ".attn." in n
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0  # padding: the attention mask matters
    labels = torch.randint(0, 2, (3,), generator=g)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return _bert, batch, lambda n: ".attention." in n


def _eager_double_backward(model: nn.Module, batch, names, V: torch.Tensor) -> torch.Tensor:
    """H V by plain autograd (grad with create_graph, then grad of <g, v>)."""
    model.eval()
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    g = torch.autograd.grad(_hf_loss(model, batch), params, create_graph=True)
    flat = torch.cat([t.reshape(-1) for t in g])
    cols = []
    for j in range(V.shape[1]):
        hv = torch.autograd.grad(flat @ V[:, j], params, retain_graph=True)
        cols.append(torch.cat([t.reshape(-1) for t in hv]))
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("kind", [pytest.param("gpt2", marks=pytest.mark.slow), "bert"])
def test_hugging_face_default_attention_hessian(kind: str) -> None:
    """Tiny GPT-2 / BERT at their default (SDPA) attention: every path against the
    dense float64 Hessian, and against a plain double backward on the eager twin."""
    build, batch, select = _hf_case(kind)
    model = build("sdpa")
    assert model.config._attn_implementation == "sdpa"
    eager = build("eager")
    eager.load_state_dict(model.state_dict())
    H = dense_hessian(model, _hf_loss, batch, params=select)
    names = [n for n, _ in model.named_parameters() if select(n)]
    V = _probe(H.shape[0])
    reference = _eager_double_backward(eager, batch, names, V)
    torch.testing.assert_close(H @ V, reference, atol=ATOL, rtol=0)
    paths = PATHS if kind == "gpt2" else PATHS[:3]  # BERT's mask code defeats the tracer
    for hvp, cache_graph in paths:
        op = HessianOperator(model, _hf_loss, batch, params=select, hvp=hvp,
                             cache_graph=cache_graph)  # fmt: skip
        torch.testing.assert_close(op @ V, reference, atol=ATOL, rtol=0, msg=hvp)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_encoder_hessian_equals_dense() -> None:
    """On CUDA (fused flash / memory-efficient kernels in float32 by default)."""
    torch.manual_seed(0)
    model = Encoder()
    data = _data()
    H = dense_hessian(model, _mse, data)
    op = HessianOperator(model.cuda(), _mse, tuple(t.cuda() for t in data))
    V = _probe(op.dim)
    torch.testing.assert_close((op @ V.float().cuda()).double().cpu(), H @ V, atol=1e-4, rtol=1e-3)
