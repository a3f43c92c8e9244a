"""Means over batches and micro-batches follow the loss's own normalisation.

For a token-mean loss (``sharpkit.hf.HFLoss`` on a causal LM with uneven padding
and ``-100`` labels), every mean over batches, micro-batches or examples in
sharpkit must give the token mean of all the data. References: the same
computation on the concatenated data as ONE batch (where no weighting enters),
and a direct re-derivation of the delta-SAM step with a loop over sequences.
The example-weighted behaviour of other losses is covered by the existing tests.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sharpkit._batch import batch_weight, example_weights, weighting  # noqa: E402
from sharpkit.curvature import HessianOperator  # noqa: E402
from sharpkit.hf import hf_loss, hf_per_example_loss  # noqa: E402
from sharpkit.optim import MSAM, DeltaSAM  # noqa: E402
from sharpkit.sharpness._objective import Objective  # noqa: E402
from sharpkit.testing import dense_hessian  # noqa: E402
from tests.test_hf import V, _gpt2  # noqa: E402

T = 9
# a small block of GPT-2's parameters (a dense Hessian of it is cheap)
BLOCK = ["transformer.ln_f.weight", "transformer.ln_f.bias"]


def _batch(seed: int, lengths: list[int], prompt: int = 0) -> dict:
    """Right-padded sequences of the given lengths; padding and the first ``prompt``
    tokens of each sequence are ignored by the loss (-100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, k in enumerate(lengths):
        mask[i, :k] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _cat(*batches: dict) -> dict:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


A = _batch(0, [9, 2, 5, 1], prompt=2)  # 7 + 0 + 3 + 0 target tokens
B = _batch(1, [3, 9, 7], prompt=1)  # 2 + 8 + 6


def test_batch_weights_are_target_tokens() -> None:
    assert batch_weight(hf_loss, A) == 10.0 and batch_weight(hf_loss, B) == 16.0
    assert example_weights(hf_loss, A).tolist() == [7.0, 0.0, 3.0, 0.0]
    assert weighting(hf_loss, [A, B]) == "tokens"
    # any other loss: examples, as before
    assert batch_weight(torch.nn.MSELoss(), (torch.zeros(3, 1), torch.zeros(3, 1))) == 3
    assert example_weights(lambda m, b: 0.0, A) is None
    assert weighting(lambda m, b: 0.0, [A]) == "examples"


def test_hessian_operator_over_batches_is_the_one_batch_token_mean() -> None:
    model = _gpt2()
    two = HessianOperator(model, hf_loss, [A, B], params=BLOCK)
    one = HessianOperator(model, hf_loss, _cat(A, B), params=BLOCK)
    v = torch.randn(two.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(two.matvec(v), one.matvec(v), rtol=1e-10, atol=1e-13)
    assert torch.allclose(two.gradient(), one.gradient(), rtol=1e-10, atol=1e-14)
    # weighting batches by sequence count would give another operator here
    naive = 0.5 * (
        HessianOperator(model, hf_loss, A, params=BLOCK).matvec(v)
        + HessianOperator(model, hf_loss, B, params=BLOCK).matvec(v)
    )
    assert not torch.allclose(naive, one.matvec(v), rtol=1e-3)
    proto = two.protocol()
    assert proto.weighting == "tokens" and proto.extra["tokens"] == 26.0
    assert proto.examples == 7
    # the dense oracle weighs the same way
    dense_two = dense_hessian(model, hf_loss, [A, B], params=BLOCK)
    dense_one = dense_hessian(model, hf_loss, _cat(A, B), params=BLOCK)
    assert torch.allclose(dense_two, dense_one, rtol=1e-10, atol=1e-13)
    assert torch.allclose(dense_one @ v, one.matvec(v), rtol=1e-8, atol=1e-12)


def test_objective_loss_and_gradient_are_the_token_mean() -> None:
    model = _gpt2()
    obj = Objective(model, hf_loss, [A, B], params=BLOCK)
    ref = Objective(model, hf_loss, _cat(A, B), params=BLOCK)
    assert obj.weights == [10.0, 16.0] and obj.sizes == [4, 3]
    assert obj.mean_loss() == pytest.approx(ref.mean_loss(), rel=1e-12)
    grads = [obj.loss_and_grad(b)[1] for b in obj.batches]
    combined = [sum(w * g[k] for w, g in zip(obj.weights, grads)) / 26.0 for k in range(2)]
    (_, ref_grad) = ref.loss_and_grad(ref.batches[0])
    for a, b in zip(combined, ref_grad):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    proto = obj.protocol("test")
    assert proto.weighting == "tokens" and proto.extra["tokens"] == 26.0
    # m-sharpness re-splits the batches: the pieces are weighted by their own tokens
    split = Objective(model, hf_loss, [A, B], params=BLOCK, m=2)
    assert split.weights == [7.0, 3.0, 10.0, 6.0]
    assert split.mean_loss() == pytest.approx(ref.mean_loss(), rel=1e-12)


def _token_mean_grad(model: torch.nn.Module, batch: dict, at: list[torch.Tensor] | None = None):
    """Gradient of the token-mean loss of ``batch`` (optionally at other weights)."""
    params = list(model.parameters())
    if at is not None:
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, a in zip(params, at):
                p.copy_(a)
    loss = hf_loss(model, batch)
    grads = torch.autograd.grad(loss, params)
    if at is not None:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return loss.detach(), list(grads)


def _norm(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((t**2).sum() for t in ts))


@pytest.mark.parametrize("m", [4, 7])
@pytest.mark.parametrize("path", ["vectorised", "sequential"])
def test_msam_step_is_the_token_weighted_micro_batch_average(path: str, m: int) -> None:
    """G = sum_j (T_j / T) grad L_j(w + rho g_j / ||g_j||), T_j target tokens of piece j;
    m = 7 cuts single sequences, two of them without any target token (T_j = 0)."""
    if m == 4:  # 6 sequences: pieces of 2, 2, 1, 1
        batch, cuts = _cat(A, _batch(2, [9, 4], prompt=3)), [[0, 1], [2, 3], [4], [5]]
    else:
        batch, cuts = _cat(A, B), [[i] for i in range(7)]
    rho, lr = 0.05, 0.1
    model = _gpt2()
    ref_model = copy.deepcopy(model)
    opt = MSAM(model.parameters(), torch.optim.SGD, rho=rho, micro_batches=m, model=model,
               path=path, lr=lr)  # fmt: skip
    loss = opt.step(loss_fn=hf_loss, batch=batch)
    assert opt.last_path == path
    w = [p.detach().clone() for p in ref_model.parameters()]
    pieces = [{k: v[c] for k, v in batch.items()} for c in cuts]
    tokens = [float((p["labels"][:, 1:] != -100).sum()) for p in pieces]
    assert (0.0 in tokens) == (m == 7)
    total = sum(tokens)
    G = [torch.zeros_like(t) for t in w]
    for piece, t_j in zip(pieces, tokens):
        if t_j == 0:
            continue
        _, g = _token_mean_grad(ref_model, piece)
        scale = rho / _norm(g)
        _, gp = _token_mean_grad(ref_model, piece, at=[a + scale * b for a, b in zip(w, g)])
        for acc, x in zip(G, gp):
            acc.add_(x, alpha=t_j / total)
    for p, a, g in zip(model.parameters(), w, G):
        assert torch.allclose(p.detach(), a - lr * g, rtol=1e-9, atol=1e-12)
    assert float(loss) == pytest.approx(float(hf_loss(ref_model, batch).detach()), rel=1e-12)


def test_msam_rho_zero_is_the_full_batch_token_mean_gradient() -> None:
    batch = _cat(A, B)
    model = _gpt2()
    ref_model = copy.deepcopy(model)
    opt = MSAM(model.parameters(), torch.optim.SGD, rho=0.0, micro_batches=3, model=model,
               lr=0.1)  # fmt: skip
    opt.step(loss_fn=hf_loss, batch=batch)
    _, g = _token_mean_grad(ref_model, batch)
    for p, q, gi in zip(model.parameters(), ref_model.parameters(), g):
        assert torch.allclose(p.detach(), q.detach() - 0.1 * gi, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("tau", [0.5, float("inf")])
def test_delta_sam_exact_step_matches_a_direct_rederivation(tau: float) -> None:
    """delta-SAM on a token-mean loss: g = sum_i T_i g_i / T, u_i = 1 - cos(g_i, g),
    lam ∝ T_i softmax(u / tau)_i, e = rho g_lam / ||g_lam||, G = grad of the batch's
    token mean at w + e (T_i: target tokens of sequence i)."""
    batch = _cat(A, B)
    rho, lr = 0.05, 0.1
    model = _gpt2()
    ref_model = copy.deepcopy(model)
    opt = DeltaSAM(model.parameters(), torch.optim.SGD, rho=rho, model=model, mode="exact",
                   tau=tau, lr=lr)  # fmt: skip
    loss = opt.step(loss_fn=hf_per_example_loss, batch=batch)
    w = [p.detach().clone() for p in ref_model.parameters()]
    counts = (batch["labels"][:, 1:] != -100).sum(1).to(torch.float64)
    assert counts.tolist() == [7, 0, 3, 0, 2, 8, 6]
    per = []
    for i in range(7):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        if counts[i] == 0:
            per.append([torch.zeros_like(t) for t in w])
            continue
        per.append(_token_mean_grad(ref_model, one)[1])
    flat = torch.stack([torch.cat([t.reshape(-1) for t in g]) for g in per])  # (n, d)
    g = (counts[:, None] * flat).sum(0) / counts.sum()
    norms = flat.norm(dim=1)
    cos = torch.where(norms > 0, flat @ g / (norms * g.norm()).clamp_min(1e-300), 1.0)
    soft = (
        torch.ones(7, dtype=torch.float64)
        if tau == float("inf")
        else torch.softmax((1 - cos) / tau, 0)
    )
    lam = soft * counts / (soft * counts).sum()
    assert torch.allclose(opt.last_weights, lam, rtol=1e-9, atol=1e-13)
    g_lam = lam @ flat
    e = rho * g_lam / g_lam.norm()
    es = list(torch.split(e, [t.numel() for t in w]))
    moved = [a + b.view_as(a) for a, b in zip(w, es)]
    _, G = _token_mean_grad(ref_model, batch, at=moved)
    for p, a, gi in zip(model.parameters(), w, G):
        assert torch.allclose(p.detach(), a - lr * gi, rtol=1e-9, atol=1e-12)
    assert float(loss) == pytest.approx(float(hf_loss(ref_model, batch).detach()), rel=1e-12)
    if tau == float("inf"):  # uniform weighting is SAM on the token mean: e along g
        assert torch.allclose(g_lam, g, rtol=1e-9, atol=1e-14)


def test_measure_sharpness_reports_the_token_mean_and_says_so() -> None:
    from sharpkit.hf import hf_accuracy
    from sharpkit.sharpness import measure_sharpness

    model = _gpt2()
    report = measure_sharpness(model, hf_loss, [A, B], metrics=["average_case"],
                               accuracy_fn=hf_accuracy, params=BLOCK)  # fmt: skip
    with torch.no_grad():
        assert report.base["loss"] == pytest.approx(float(hf_loss(model, _cat(A, B))), rel=1e-12)
        acc = float(hf_accuracy(model, _cat(A, B)))
    assert report.base["accuracy"] == pytest.approx(acc, rel=1e-12)
    proto = report.metrics["average_case"].protocol
    assert proto.weighting == "tokens" and proto.extra["tokens"] == 26.0
    assert report.to_dict()["metrics"]["average_case"]["protocol"]["weighting"] == "tokens"


@pytest.mark.parametrize("mode", ["exact", "probe", "forward-only"])
def test_delta_sam_uniform_weighting_is_sam_on_the_token_mean(mode: str) -> None:
    from sharpkit.optim import SAM, UniformWeights

    batch = _cat(A, B)
    a = _gpt2()
    b = copy.deepcopy(a)
    delta = DeltaSAM(a.parameters(), torch.optim.SGD, rho=0.05, model=a, mode=mode,
                     weighting=UniformWeights(), lr=0.1)  # fmt: skip
    sam = SAM(b.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)

    def closure() -> torch.Tensor:
        loss = hf_loss(b, batch)
        loss.backward()
        return loss

    la = delta.step(loss_fn=hf_per_example_loss, batch=batch)
    lb = sam.step(closure).detach()
    assert float(la) == pytest.approx(float(lb), rel=1e-12)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-9, atol=1e-12)


def test_per_example_means_are_token_means() -> None:
    from sharpkit.per_example import per_instance_target, perturbed_gradient

    batch = _cat(A, B)
    model = _gpt2()
    _, g = _token_mean_grad(model, batch)
    zero = [torch.zeros_like(p) for p in model.parameters()]
    for got in (
        perturbed_gradient(model, hf_per_example_loss, batch, zero, 0.1),
        per_instance_target(model, hf_per_example_loss, batch, rho=0.0),
    ):
        for x, y in zip(got, g):
            assert torch.allclose(x, y, rtol=1e-9, atol=1e-13)


def test_a_batch_without_target_tokens_has_loss_and_accuracy_zero_and_weight_zero() -> None:
    from sharpkit.hf import hf_accuracy

    model = _gpt2()
    empty = {k: v[[1, 3]] for k, v in A.items()}  # the two sequences of A with no target
    with torch.no_grad():
        assert float(hf_loss(model, empty)) == 0.0 and float(hf_accuracy(model, empty)) == 0.0
    assert batch_weight(hf_loss, empty) == 0.0
    obj = Objective(model, hf_loss, [empty, B], params=BLOCK)
    assert obj.mean_loss() == pytest.approx(Objective(model, hf_loss, B, params=BLOCK).mean_loss())
    with pytest.raises(ValueError, match="no weight in the loss's mean"):
        Objective(model, hf_loss, [empty], params=BLOCK)
