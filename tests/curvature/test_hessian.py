"""HessianOperator against dense float64 Hessians (torch.func.hessian) on the oracle cases."""

from __future__ import annotations

import json
from functools import cache

import pytest
import torch
from torch import nn

from sharpkit.curvature import HessianOperator
from sharpkit.protocol import to_jsonable
from sharpkit.testing import ORACLE_CASES, dense_hessian, oracle_cases

F64 = torch.float64
# Float64 products vs float64 dense Hessians: both are exact up to rounding of
# O(dim) terms of size ~1, so 1e-10 (as the issue asks) leaves ~1e5 eps of room.
MATVEC_ATOL = 1e-10


@cache
def _case(name: str):
    case = oracle_cases((name,))[name]
    return case, dense_hessian(case.model, case.loss_fn, case.data)


def _probe(dim: int, seed: int = 0, cols: int = 3) -> torch.Tensor:
    return torch.randn(dim, cols, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("name", ORACLE_CASES)
@pytest.mark.parametrize(
    ("hvp", "cache_graph"),
    [("rev-rev", True), ("rev-rev", False), ("fwd-rev", False), ("linearize", True)],
)
def test_matvec_equals_dense(name: str, hvp: str, cache_graph: bool) -> None:
    case, H = _case(name)
    op = HessianOperator(
        case.model, case.loss_fn, case.data, dtype=F64, hvp=hvp, cache_graph=cache_graph
    )
    assert op.shape == H.shape
    V = _probe(op.dim)
    torch.testing.assert_close(op @ V, H @ V, atol=MATVEC_ATOL, rtol=0)
    assert op.num_matvecs == V.shape[1]


def test_linear_regression_closed_form() -> None:
    case, _ = _case("linear_regression")
    op = HessianOperator(case.model, case.loss_fn, case.data, dtype=F64)
    dense = op @ torch.eye(op.dim, dtype=F64)
    torch.testing.assert_close(dense, case.closed_form, atol=MATVEC_ATOL, rtol=0)


def test_multi_batch_is_example_weighted() -> None:
    case, _ = _case("multi_batch")
    assert [len(b[1]) for b in case.data] == [5, 5, 3]
    H_full = dense_hessian(case.model, case.loss_fn, case.full_batch)  # one batch of 13
    op = HessianOperator(case.model, case.loss_fn, case.data, dtype=F64)
    V = _probe(op.dim)
    torch.testing.assert_close(op @ V, H_full @ V, atol=MATVEC_ATOL, rtol=0)
    # The naive mean of batch Hessians (each batch weighted 1/3) is a different matrix,
    # so the check above can tell the two apart.
    naive = sum(dense_hessian(case.model, case.loss_fn, b) for b in case.data) / 3
    assert (naive @ V - H_full @ V).abs().max() > 1e-3
    assert op.num_examples == 13 and op.num_batches == 3


def test_loader_with_uneven_last_batch() -> None:
    case, _ = _case("multi_batch")
    x, y = case.full_batch
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    H_full = dense_hessian(case.model, case.loss_fn, case.full_batch)
    op = HessianOperator(case.model, case.loss_fn, loader, dtype=F64)
    V = _probe(op.dim)
    torch.testing.assert_close(op @ V, H_full @ V, atol=MATVEC_ATOL, rtol=0)


def test_caller_mode_restored_and_recorded() -> None:
    case, H_eval = _case("batchnorm_eval")
    model = case.model
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    op = HessianOperator(model, case.loss_fn, case.data, dtype=F64)
    V = _probe(op.dim)
    torch.testing.assert_close(op @ V, H_eval @ V, atol=MATVEC_ATOL, rtol=0)
    assert all(m.training for m in model.modules()), "the caller's train mode must survive"
    for k, v in model.state_dict().items():  # weights and running statistics untouched
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    proto = op.protocol()
    assert proto.mode == "eval" and proto.extra["caller_mode"] == "train"
    # Train mode (batch statistics) is a different Hessian, matching the dense one.
    H_train = dense_hessian(model, case.loss_fn, case.data, mode="train")
    for hvp in ("rev-rev", "fwd-rev", "linearize"):
        op_train = HessianOperator(model, case.loss_fn, case.data, dtype=F64, mode="train", hvp=hvp)
        torch.testing.assert_close(op_train @ V, H_train @ V, atol=MATVEC_ATOL, rtol=0)
    assert (H_train - H_eval).abs().max() > 1e-2
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    model.eval()


def test_parameter_subsets_and_blocks() -> None:
    case, H = _case("mlp_tanh")
    names = [n for n, _ in case.model.named_parameters()]
    sizes = [p.numel() for p in case.model.parameters()]
    offsets = torch.tensor([0, *sizes]).cumsum(0).tolist()
    sl = {n: slice(offsets[i], offsets[i + 1]) for i, n in enumerate(names)}

    op = HessianOperator(case.model, case.loss_fn, case.data, dtype=F64, params=["2.weight"])
    E = torch.eye(op.dim, dtype=F64)
    torch.testing.assert_close(op @ E, H[sl["2.weight"], sl["2.weight"]], atol=MATVEC_ATOL, rtol=0)

    op = HessianOperator(
        case.model, case.loss_fn, case.data, dtype=F64, params=lambda n: n.endswith("bias")
    )
    idx = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in (1, 3)])
    E = torch.eye(op.dim, dtype=F64)
    torch.testing.assert_close(op @ E, H[idx][:, idx], atol=MATVEC_ATOL, rtol=0)

    full = HessianOperator(case.model, case.loss_fn, case.data, dtype=F64)
    blocks = full.blocks()
    assert list(blocks) == ["0", "2"]
    for block in blocks.values():
        idx = torch.cat([torch.arange(sl[n].start, sl[n].stop) for n in block.param_names])
        E = torch.eye(block.dim, dtype=F64)
        torch.testing.assert_close(block @ E, H[idx][:, idx], atol=MATVEC_ATOL, rtol=0)
    assert list(full.blocks(by="parameter")) == names


def _lora_blocks_match_dense(model: nn.Module, loss_fn, data, keys: list[str]) -> None:
    """blocks(by='lora'): one block per adapter (A and B together), each the diagonal
    block of the dense float64 Hessian over all trainable parameters."""
    H = dense_hessian(model, loss_fn, data)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    offsets = torch.tensor([0, *sizes]).cumsum(0).tolist()
    at = {n: torch.arange(offsets[i], offsets[i + 1]) for i, n in enumerate(names)}
    op = HessianOperator(model, loss_fn, data, dtype=F64)
    blocks = op.blocks(by="lora")
    assert list(blocks) == keys
    for key, block in blocks.items():
        module = key.rpartition(".")[0] if "lora_A.default" in block.param_names[0] else key
        # the A and the B factor of one layer
        assert [n.removeprefix(module + ".").split(".")[0] for n in block.param_names] == [
            "lora_A",
            "lora_B",
        ]
        idx = torch.cat([at[n] for n in block.param_names])
        E = torch.eye(block.dim, dtype=F64)
        torch.testing.assert_close(block @ E, H[idx][:, idx], atol=MATVEC_ATOL, rtol=0)
        assert H[idx][:, idx].abs().max() > 0  # B != 0: a block that is not trivially 0


def test_blocks_by_lora_adapter_sharpkit_lora() -> None:
    from sharpkit.balance import add_lora

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2), nn.Tanh(), nn.Linear(2, 2))
    add_lora(net, ["0", "2"], rank=2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(generator=torch.Generator().manual_seed(2))
    net[4].weight.requires_grad_(True)  # a trainable parameter outside every adapter
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(6, 3, generator=g), torch.randint(0, 2, (6,), generator=g))] * 2
    _lora_blocks_match_dense(net.double(), nn.CrossEntropyLoss(), data, ["0", "2"])


def test_blocks_by_lora_adapter_peft() -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from sharpkit.hf import hf_loss

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    lora = peft.LoraConfig(r=1, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    model = peft.get_peft_model(transformers.GPT2LMHeadModel(cfg), lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(generator=torch.Generator().manual_seed(4))
    ids = torch.randint(0, 16, (3, 6), generator=torch.Generator().manual_seed(5))
    batch = {"input_ids": ids, "labels": ids}
    prefix = "base_model.model.transformer.h.0."
    keys = [prefix + "attn.c_attn.default", prefix + "mlp.c_fc.default"]
    _lora_blocks_match_dense(model.double(), hf_loss, batch, keys)


def test_blocks_by_lora_without_adapters_is_refused() -> None:
    case, _ = _case("mlp_tanh")
    op = HessianOperator(case.model, case.loss_fn, case.data)
    with pytest.raises(ValueError, match="by: 'lora' found no LoRA factor"):
        op.blocks(by="lora")
    with pytest.raises(ValueError, match="by: expected one of"):
        op.blocks(by="layer")


def test_flatten_unflatten_roundtrip() -> None:
    case, _ = _case("cnn")
    op = HessianOperator(case.model, case.loss_fn, case.data)
    v = torch.arange(op.dim, dtype=op.dtype)
    parts = op.unflatten(v)
    assert [p.shape for p in parts] == [p.shape for p in case.model.parameters()]
    assert torch.equal(op.flatten(parts), v)


def test_float32_close_to_float64() -> None:
    case, H = _case("attention")
    op = HessianOperator(case.model, case.loss_fn, case.data)
    assert op.dtype == torch.float32
    V = _probe(op.dim).float()
    # float32 rounding of O(dim)-term sums: relative 1e-5 of the product's scale.
    scale = (H @ V.double()).abs().max()
    torch.testing.assert_close((op @ V).double(), H @ V.double(), atol=1e-5 * scale, rtol=0)


def test_frozen_parameters_are_skipped_and_gradient() -> None:
    case, _ = _case("lora_pair")
    op = HessianOperator(case.model, case.loss_fn, case.data, dtype=F64)
    assert op.param_names == ["lora_A", "lora_B"]
    g = op.gradient()
    model = case.model.double()
    loss = case.loss_fn(model, tuple(t.double() for t in case.data))
    ref = torch.autograd.grad(loss, [model.lora_A, model.lora_B])
    torch.testing.assert_close(g, torch.cat([r.reshape(-1) for r in ref]))
    model.float()


def test_protocol_is_json() -> None:
    case, _ = _case("mlp_relu")
    op = HessianOperator(case.model, case.loss_fn, case.data, dtype=F64)
    op.matvec(torch.zeros(op.dim, dtype=F64))
    d = to_jsonable(op.protocol())
    json.dumps(d)
    assert d["examples"] == 12 and d["matvecs"] == 1 and d["dtype"] == "torch.float64"


def test_bad_input_errors() -> None:
    case, _ = _case("mlp_tanh")
    m, lf, data = case.model, case.loss_fn, case.data

    def per_example(model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y, reduction="none")

    op = HessianOperator(m, per_example, data)
    with pytest.raises(ValueError, match="loss_fn: must return a scalar"):
        op.matvec(torch.zeros(op.dim))
    with pytest.raises(ValueError, match="data: no batches"):
        HessianOperator(m, lf, [])
    with pytest.raises(ValueError, match=r"params: .*no parameter named"):
        HessianOperator(m, lf, data, params=["nope"])
    frozen = oracle_cases(("lora_pair",))["lora_pair"]
    with pytest.raises(ValueError, match="requires_grad=False"):
        HessianOperator(frozen.model, frozen.loss_fn, frozen.data, params=["base"])
    all_frozen = nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        HessianOperator(all_frozen, nn.MSELoss(), (torch.zeros(3, 2), torch.zeros(3, 1)))
    with pytest.raises(ValueError, match="mode"):
        HessianOperator(m, lf, data, mode="training")
    with pytest.raises(ValueError, match="hvp"):
        HessianOperator(m, lf, data, hvp="finite-differences")
    op = HessianOperator(m, lf, data)
    with pytest.raises(ValueError, match="v: expected a flat vector"):
        op.matvec(torch.zeros(op.dim + 1))

    def nan_loss(model, batch):
        return lf(model, batch) * torch.tensor(float("nan"))

    with pytest.raises(ValueError, match="not finite"):
        HessianOperator(m, nan_loss, data).matvec(torch.ones(op.dim))


def test_unused_parameter_has_zero_rows() -> None:
    model = nn.ModuleDict({"used": nn.Linear(3, 1), "unused": nn.Linear(3, 1)})

    def loss_fn(mod, batch):
        return (mod.used(batch) ** 2).mean()

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, x):
            return self.m["used"](x)

    wrap = Wrap()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    op = HessianOperator(wrap, lambda mod, b: (mod(b) ** 2).mean(), x, dtype=F64)
    H = dense_hessian(wrap, lambda mod, b: (mod(b) ** 2).mean(), x)
    E = torch.eye(op.dim, dtype=F64)
    torch.testing.assert_close(op @ E, H, atol=MATVEC_ATOL, rtol=0)
    assert H[4:].abs().max() == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    case, H = _case("cnn")
    for hvp in ("rev-rev", "fwd-rev", "linearize"):
        op = HessianOperator(case.model, case.loss_fn, case.data, dtype=F64, device="cuda", hvp=hvp)
        V = _probe(op.dim)
        out = op @ V.cuda()
        assert out.device.type == "cuda"
        torch.testing.assert_close(out.cpu(), H @ V, atol=MATVEC_ATOL, rtol=0)


class _MutatesCapturedTensor(nn.Module):
    """Counts its calls in a plain tensor attribute: torch.func cannot trace that."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.calls = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return torch.tanh(self.lin(x))


def test_auto_is_the_cached_rev_rev_and_linearize_caches() -> None:
    case, _ = _case("mlp_tanh")
    op = HessianOperator(case.model, case.loss_fn, case.data)
    assert op.hvp == "rev-rev" and op.cache_graph
    multi, _ = _case("multi_batch")
    op = HessianOperator(multi.model, multi.loss_fn, multi.data)
    # several batches: cached within the default memory budget (tiny graphs: all of them)
    assert op.hvp == "rev-rev" and op.cache_graph and op.cache_budget > 0
    op.matvec(torch.zeros(op.dim))
    assert op.cached_batches == 3 and op.cache_bytes > 0
    op = HessianOperator(multi.model, multi.loss_fn, multi.data, hvp="linearize", dtype=F64)
    assert op.cache_graph  # one trace per batch, reused by every product
    H_full = dense_hessian(multi.model, multi.loss_fn, multi.full_batch)
    V = _probe(op.dim)
    torch.testing.assert_close(op @ V, H_full @ V, atol=MATVEC_ATOL, rtol=0)


def test_linearize_reports_a_model_it_cannot_trace() -> None:
    torch.manual_seed(0)
    model = _MutatesCapturedTensor().double()
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(12, 3, generator=g, dtype=F64), torch.randint(0, 2, (12,), generator=g))
    # the same function without the counter (which torch.func cannot trace either)
    twin = nn.Sequential()
    twin.lin = model.lin
    twin.act = nn.Tanh()
    H = dense_hessian(twin, nn.CrossEntropyLoss(), data)
    V = _probe(sum(p.numel() for p in model.parameters()))
    forced = HessianOperator(model, nn.CrossEntropyLoss(), data, hvp="linearize")
    with pytest.raises(RuntimeError, match=r"could not trace this model.*use hvp='rev-rev'"):
        forced.matvec(V[:, 0])
    op = HessianOperator(model, nn.CrossEntropyLoss(), data)  # the default handles it
    torch.testing.assert_close(op @ V, H @ V, atol=MATVEC_ATOL, rtol=0)


def test_linearize_refuses_cache_graph_false() -> None:
    case, _ = _case("mlp_tanh")
    with pytest.raises(ValueError, match="always caches"):
        HessianOperator(case.model, case.loss_fn, case.data, hvp="linearize", cache_graph=False)
    with pytest.raises(ValueError, match="cache per-batch work"):
        HessianOperator(case.model, case.loss_fn, case.data, hvp="fwd-rev", cache_graph=True)


def test_linearize_refuses_mse_loss_module() -> None:
    # tracing nn.MSELoss's second derivative segfaults torch 2.13: refused before any trace
    model = nn.Linear(3, 2)
    data = (torch.randn(8, 3), torch.randn(8, 2))
    with pytest.raises(ValueError, match=r"nn\.MSELoss"):
        HessianOperator(model, nn.MSELoss(), data, hvp="linearize")

    # the same loss written out traces fine and gives the default's products
    def written_out(m, b):
        return ((m(b[0]) - b[1]) ** 2).mean()

    v = torch.randn(8)
    lin = HessianOperator(model, written_out, data, hvp="linearize").matvec(v)
    torch.testing.assert_close(lin, HessianOperator(model, nn.MSELoss(), data).matvec(v))


@pytest.mark.parametrize(
    ("hvp", "cache_graph"),
    [("rev-rev", True), ("rev-rev", False), ("fwd-rev", False), ("linearize", True)],
)
def test_train_mode_dropout_is_one_fixed_realisation(hvp: str, cache_graph: bool) -> None:
    """Dropout in training mode: the operator replays the random state it was built in
    at every evaluation, so it is the Hessian of the loss under one fixed draw of the
    masks. Reference: the dense float64 Hessian of one evaluation from that state.
    Without the replay, two products with the same vector differ by about 60%."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).to(F64)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(12, 4, generator=g, dtype=F64), torch.randint(0, 3, (12,), generator=g))
    state = torch.get_rng_state()
    op = HessianOperator(model, nn.CrossEntropyLoss(), batch, mode="train", hvp=hvp,
                         cache_graph=cache_graph)  # fmt: skip
    torch.manual_seed(123)  # whatever the global state is now, the operator replays its own
    dense = torch.stack([op.matvec(e) for e in torch.eye(op.dim, dtype=F64)], dim=1)
    torch.set_rng_state(state)
    reference = dense_hessian(model, nn.CrossEntropyLoss(), batch, mode="train")
    torch.testing.assert_close(dense, reference, rtol=0, atol=MATVEC_ATOL)
    assert model.training  # the caller's mode is untouched


def test_train_mode_dropout_blocks_are_blocks_of_the_same_matrix() -> None:
    """Blocks replay their parent's random state: with dropout in training mode each
    block equals the matching diagonal block of the parent's (fixed-mask) matrix."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 2)).to(F64)
    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(10, 3, generator=g, dtype=F64), torch.randint(0, 2, (10,), generator=g))
    op = HessianOperator(model, nn.CrossEntropyLoss(), batch, mode="train", cache_graph=False)
    full = torch.stack([op.matvec(e) for e in torch.eye(op.dim, dtype=F64)], dim=1)
    torch.manual_seed(99)  # blocks made under another global state still share op's
    blocks = op.blocks()
    start = 0
    for block in blocks.values():
        torch.manual_seed(start)  # and so does every product
        dense = torch.stack([block.matvec(e) for e in torch.eye(block.dim, dtype=F64)], dim=1)
        stop = start + block.dim
        torch.testing.assert_close(dense, full[start:stop, start:stop], rtol=0, atol=MATVEC_ATOL)
        start = stop
    assert start == op.dim


@pytest.mark.parametrize(
    ("hvp", "cache_graph"),
    [("rev-rev", None), ("rev-rev", True), ("rev-rev", False), ("fwd-rev", None),
     ("fwd-rev", False), ("linearize", None), ("linearize", True)],
)  # fmt: skip
def test_multi_batch_cache_forms_equal_dense(hvp: str, cache_graph: bool | None) -> None:
    """Every caching form over several batches (uneven last batch) is the dense float64
    Hessian of the example-weighted loss (one batch of all 13 examples)."""
    case, _ = _case("multi_batch")
    H_full = dense_hessian(case.model, case.loss_fn, case.full_batch)
    op = HessianOperator(case.model, case.loss_fn, case.data, dtype=F64, hvp=hvp,
                         cache_graph=cache_graph)  # fmt: skip
    V = _probe(op.dim)
    torch.testing.assert_close(op @ V, H_full @ V, atol=MATVEC_ATOL, rtol=0)
    expected = {"fwd-rev": 0, "linearize": 3}.get(hvp, 0 if cache_graph is False else 3)
    assert op.cached_batches == expected
    assert op.protocol().extra["cached_batches"] == expected


def test_cache_budget_decides_how_many_batches_are_cached() -> None:
    """Graphs are cached in batch order while they fit the budget (always the first);
    the rest are recomputed per product. Every split gives the dense Hessian."""
    case, _ = _case("multi_batch")
    H_full = dense_hessian(case.model, case.loss_fn, case.full_batch)
    V = _probe(sum(p.numel() for p in case.model.parameters()))
    everything = HessianOperator(case.model, case.loss_fn, case.data, dtype=F64,
                                 cache_budget=1 << 40)  # fmt: skip
    everything.matvec(V[:, 0])
    total = everything.cache_bytes
    assert everything.cached_batches == 3
    for budget, cached in [(0, 1), (total - 1, 2), (total, 3)]:
        op = HessianOperator(case.model, case.loss_fn, case.data, dtype=F64, cache_budget=budget)
        torch.testing.assert_close(op @ V, H_full @ V, atol=MATVEC_ATOL, rtol=0)
        assert op.cached_batches == cached, budget
        assert op.cache_bytes <= budget or cached == 1
    # the measured graph size grows with the batch: 10x the examples, more bytes
    x, y = case.full_batch
    big = HessianOperator(case.model, case.loss_fn, (x.repeat(10, 1), y.repeat(10)), dtype=F64)
    big.matvec(V[:, 0])
    assert big.cache_bytes > total


def test_cache_budget_bad_input() -> None:
    case, _ = _case("multi_batch")
    with pytest.raises(ValueError, match="cache_budget: expected a number of bytes"):
        HessianOperator(case.model, case.loss_fn, case.data, cache_budget=-1)
    with pytest.raises(ValueError, match="cache_budget: applies to cache_graph=None"):
        HessianOperator(case.model, case.loss_fn, case.data, cache_graph=True, cache_budget=10)
    with pytest.raises(TypeError, match="cache_graph: expected True, False or None"):
        HessianOperator(case.model, case.loss_fn, case.data, cache_graph="yes")


def test_no_private_constructor_arguments() -> None:
    import inspect

    names = list(inspect.signature(HessianOperator).parameters)
    assert not [n for n in names if n.startswith("_")], names
    assert "random_state" in names and "cache_budget" in names


class _UnusedAndLinear(nn.Module):
    """A tanh MLP, a module the forward never calls and a parameter the loss is linear in
    (its gradient is a constant: no second derivative flows through it)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        self.unused = nn.Linear(2, 2)
        self.shift = nn.Parameter(torch.randn(3))
        self.register_buffer("c", torch.randn(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.body(x), (self.shift * self.c).sum()


def _linear_term_loss(model, batch):
    logits, linear = model(batch[0])
    return nn.functional.cross_entropy(logits, batch[1]) + linear


def _unused_case(batches: str):
    model = _UnusedAndLinear().to(F64)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(13, 4, generator=g, dtype=F64), torch.randint(0, 3, (13,), generator=g)
    full = (x, y)
    data = full if batches == "one" else [(x[:6], y[:6]), (x[6:10], y[6:10]), (x[10:], y[10:])]
    return model, data, full


def _offsets(model: nn.Module) -> dict[str, slice]:
    out, start = {}, 0
    for n, p in model.named_parameters():
        out[n] = slice(start, start + p.numel())
        start += p.numel()
    return out


@pytest.mark.parametrize("batches", ["one", "uneven"])
@pytest.mark.parametrize(
    ("hvp", "cache"),
    [("rev-rev", True), ("rev-rev", False), ("rev-rev", "first only"), ("fwd-rev", False),
     ("linearize", True)],
)  # fmt: skip
def test_products_with_unused_and_linear_parameters_equal_dense(
    batches: str, hvp: str, cache: bool | str
) -> None:
    """Products over one batch or three uneven ones (6, 4, 3 examples), with a parameter
    the loss never uses and one it is linear in, cached, uncached, or the first batch
    cached and the rest recomputed (budget 0): the dense float64 Hessian of the full
    batch times v, zero rows included; the same for every block of blocks(), and the
    gradient equals autograd's on the full batch."""
    model, data, full = _unused_case(batches)
    H = dense_hessian(model, _linear_term_loss, full)
    kw = (
        {"cache_graph": None, "cache_budget": 0}
        if cache == "first only"
        else {"cache_graph": cache}
    )
    op = HessianOperator(model, _linear_term_loss, data, dtype=F64, hvp=hvp, **kw)
    V = _probe(op.dim)
    torch.testing.assert_close(op @ V, H @ V, atol=MATVEC_ATOL, rtol=0)
    sl = _offsets(model)
    for name in ("unused.weight", "unused.bias", "shift"):
        assert H[sl[name]].abs().max() == 0 and (op @ V)[sl[name]].abs().max() == 0
    if hvp == "rev-rev":
        n_batches = 1 if batches == "one" else 3
        expected = {True: n_batches, False: 0, "first only": 1}[cache]
        assert op.cached_batches == expected
    for key, block in op.blocks().items():
        idx = torch.cat([torch.arange(sl[n].start, sl[n].stop) for n in block.param_names])
        E = torch.eye(block.dim, dtype=F64)
        torch.testing.assert_close(block @ E, H[idx][:, idx], atol=MATVEC_ATOL, rtol=0, msg=key)
    params = list(model.parameters())
    reference = torch.autograd.grad(_linear_term_loss(model, full), params, allow_unused=True)
    reference = torch.cat(
        [
            (r if r is not None else torch.zeros_like(p)).reshape(-1)
            for r, p in zip(reference, params)
        ]
    )
    torch.testing.assert_close(op.gradient(), reference, atol=1e-12, rtol=0)


@pytest.mark.parametrize("cache_graph", [True, False])
def test_products_leave_no_gradients_behind(cache_graph: bool) -> None:
    """Products accumulate in autograd's .grad fields of the operator's own leaves: the
    caller's .grad fields (set or None) and v stay as they were, the leaves hold no
    .grad afterwards, and two different vectors in a row give H v1 and H v2 (not a
    sum); repeating v1 gives the first result exactly."""
    model, data, full = _unused_case("uneven")
    g = torch.Generator().manual_seed(4)
    for name, p in model.named_parameters():
        if name != "body.0.bias":  # one parameter keeps .grad None
            p.grad = torch.randn(p.shape, generator=g, dtype=F64)
    grads = {n: (p.grad, None if p.grad is None else p.grad.clone())
             for n, p in model.named_parameters()}  # fmt: skip
    H = dense_hessian(model, _linear_term_loss, full)
    op = HessianOperator(model, _linear_term_loss, data, dtype=F64, cache_graph=cache_graph)
    v1, v2 = _probe(op.dim, seed=1, cols=2).T
    v1_before = v1.clone()
    first, second, again = op.matvec(v1), op.matvec(v2), op.matvec(v1)
    op.gradient()
    torch.testing.assert_close(first, H @ v1, atol=MATVEC_ATOL, rtol=0)
    torch.testing.assert_close(second, H @ v2, atol=MATVEC_ATOL, rtol=0)
    assert torch.equal(again, first)
    assert torch.equal(v1, v1_before)
    for leaves, _ in op._graphs or []:
        assert all(leaf.grad is None for leaf in leaves)
    for name, p in model.named_parameters():
        obj, value = grads[name]
        assert p.grad is obj, name
        assert value is None or torch.equal(p.grad, value), name
