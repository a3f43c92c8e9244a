"""sharpkit.hf: losses, per-example losses, accuracies and weights for HF models.

References: the model's own ``.loss`` (Hugging Face's loss code) and a direct
re-derivation with a Python loop over sequences and tokens in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sharpkit.hf import (  # noqa: E402
    BUILTIN_LOSSES,
    HFAccuracy,
    HFLoss,
    batch_weight,
    hf_accuracy,
    hf_loss,
    hf_per_example_loss,
    loss_for,
    task_of,
)

V = 24


def _gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=V, n_positions=16,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def _bert_cfg(**kw: object) -> object:
    return transformers.BertConfig(
        num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
        vocab_size=V, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, **kw,
    )  # fmt: skip


def _padded_lm_batch(seed: int, n: int = 4, t: int = 9, lengths: list[int] | None = None) -> dict:
    """Right-padded sequences of uneven lengths: labels -100 and mask 0 on the padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (n, t), generator=g)
    lengths = lengths or [t, 2, 5, 1][:n]
    mask = torch.zeros(n, t, dtype=torch.long)
    for i, k in enumerate(lengths):
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _manual_causal(model: torch.nn.Module, batch: dict) -> tuple[list[float], list[int]]:
    """Per-sequence token-mean losses and target counts, token by token in float64."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses, counts = [], []
    for i in range(logits.shape[0]):
        total, count = 0.0, 0
        for t in range(logits.shape[1] - 1):
            y = int(batch["labels"][i, t + 1])
            if y == -100:
                continue
            logp = torch.log_softmax(logits[i, t].double(), dim=-1)
            total -= float(logp[y])
            count += 1
        losses.append(total / count if count else 0.0)
        counts.append(count)
    return losses, counts


# -- causal LM ------------------------------------------------------------------------


def test_causal_lm_mean_matches_model_loss_and_manual_with_uneven_padding() -> None:
    model = _gpt2()
    batch = _padded_lm_batch(0)
    losses, counts = _manual_causal(model, batch)
    assert counts == [8, 1, 4, 0]  # one sequence has no target token at all
    manual = sum(ell * c for ell, c in zip(losses, counts)) / sum(counts)
    with torch.no_grad():
        ours = hf_loss(model, batch)
        theirs = model(**batch).loss
    assert ours.dtype == torch.float64
    assert float(ours) == pytest.approx(manual, rel=1e-12)
    # the model's own loss casts logits to float32
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    # the unweighted mean of per-sequence means is a different number here
    nonempty = [ell for ell, c in zip(losses, counts) if c]
    assert abs(sum(nonempty) / len(nonempty) - manual) > 1e-3


def test_causal_lm_per_example_and_weights() -> None:
    model = _gpt2()
    batch = _padded_lm_batch(1)
    losses, counts = _manual_causal(model, batch)
    with torch.no_grad():
        per = hf_per_example_loss(model, batch)
    assert per.shape == (4,)
    assert per.tolist() == pytest.approx(losses, rel=1e-12, abs=1e-15)
    w = hf_loss.example_weights(batch)
    assert w.tolist() == counts
    assert hf_loss.normalisation_of(batch) == "tokens"
    assert HFLoss("causal_lm").normalisation == "tokens"
    with torch.no_grad():
        mean = hf_loss(model, batch)
    assert float((w * per).sum() / w.sum()) == pytest.approx(float(mean), rel=1e-12)


def test_batch_weight_makes_the_mean_over_batches_the_token_mean() -> None:
    model = _gpt2()
    a = _padded_lm_batch(2, lengths=[9, 9, 9, 9])
    b = _padded_lm_batch(3, lengths=[2, 3, 2, 3])
    both = {k: torch.cat([a[k], b[k]]) for k in a}
    with torch.no_grad():
        la, lb, lab = (float(hf_loss(model, x)) for x in (a, b, both))
    wa, wb = batch_weight(hf_loss, a), batch_weight(hf_loss, b)
    assert (wa, wb) == (32.0, 6.0)
    assert (wa * la + wb * lb) / (wa + wb) == pytest.approx(lab, rel=1e-12)
    assert abs((la + lb) / 2 - lab) > 1e-3  # weighting batches by sequences is wrong here
    # any other loss: examples
    assert batch_weight(lambda m, x: 0.0, a) == 4


def test_peft_model_and_task_from_class() -> None:
    peft = pytest.importorskip("peft")
    model = _gpt2()
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    pm = peft.get_peft_model(model, cfg)
    for p in pm.parameters():  # a trained adapter: B != 0
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    assert task_of(pm) == "causal_lm"
    loss = BUILTIN_LOSSES["hf"](pm)
    assert isinstance(loss, HFLoss) and loss.task == "causal_lm" and loss.name == "hf"
    batch = _padded_lm_batch(4)
    losses, counts = _manual_causal(pm, batch)
    manual = sum(ell * c for ell, c in zip(losses, counts)) / sum(counts)
    value = loss(pm, batch)
    assert float(value.detach()) == pytest.approx(manual, rel=1e-12)
    value.backward()  # differentiable through the adapter
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pm.parameters())


# -- token tasks (no shift) -----------------------------------------------------------


def test_masked_lm_token_mean_without_shift() -> None:
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(_bert_cfg()).double().eval()
    assert task_of(model) == "token" and loss_for(model).task == "token"
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, V, (3, 7), generator=g)
    labels = torch.full_like(ids, -100)
    labels[0, [1, 4]] = ids[0, [1, 4]]
    labels[2, 0] = 3
    batch = {"input_ids": ids, "labels": labels}
    loss = loss_for(model)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        ours, theirs = loss(model, batch), model(**batch).loss
        per = loss.per_example(model, batch)
    picks = [(0, 1), (0, 4), (2, 0)]
    nll = [-float(torch.log_softmax(logits[i, t], -1)[labels[i, t]]) for i, t in picks]
    assert float(ours) == pytest.approx(sum(nll) / 3, rel=1e-12)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    assert per.tolist() == pytest.approx([(nll[0] + nll[1]) / 2, 0.0, nll[2]], rel=1e-12)
    assert loss.example_weights(batch).tolist() == [2.0, 0.0, 1.0]
    # "auto" would have shifted these labels: the class decides
    assert hf_loss.normalisation_of(batch) == "tokens"
    with torch.no_grad():
        assert abs(float(hf_loss(model, batch)) - float(ours)) > 1e-3


# -- sequence classification ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["single", "regression", "multi"])
def test_sequence_classification_matches_model_loss(kind: str) -> None:
    torch.manual_seed(0)
    labels_n = {"single": 3, "regression": 1, "multi": 3}[kind]
    problem = {"single": None, "regression": "regression", "multi": "multi_label_classification"}
    cfg = _bert_cfg(num_labels=labels_n, problem_type=problem[kind])
    model = transformers.BertForSequenceClassification(cfg).double().eval()
    assert task_of(model) == "sequence"
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(1, V, (5, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    if kind == "single":
        labels = torch.tensor([0, 2, 1, 1, 0])
    elif kind == "regression":
        labels = torch.randn(5, generator=g, dtype=torch.float64)
    else:
        labels = (torch.rand(5, 3, generator=g) > 0.5).double()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        per = hf_per_example_loss(model, batch)
        ours, theirs = hf_loss(model, batch), model(**batch).loss
    manual = []
    for i in range(5):
        z = logits[i]
        if kind == "single":
            manual.append(-float(torch.log_softmax(z, -1)[labels[i]]))
        elif kind == "regression":
            manual.append(float((z[0] - labels[i]) ** 2))
        else:
            p = torch.sigmoid(z)
            y = labels[i]
            manual.append(float(-(y * p.log() + (1 - y) * (1 - p).log()).mean()))
    assert per.tolist() == pytest.approx(manual, rel=1e-10)
    assert float(ours) == pytest.approx(sum(manual) / 5, rel=1e-10)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    assert hf_loss.example_weights(batch).tolist() == [1.0] * 5
    assert hf_loss.normalisation_of(batch) == "examples"


# -- accuracy -------------------------------------------------------------------------


def test_accuracy_token_level_for_causal_lm() -> None:
    model = _gpt2()
    batch = _padded_lm_batch(7)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
        acc = hf_accuracy(model, batch)
    hits = total = 0
    for i in range(4):
        for t in range(8):
            y = int(batch["labels"][i, t + 1])
            if y != -100:
                total += 1
                hits += int(int(logits[i, t].argmax()) == y)
    assert total == 13
    assert float(acc) == pytest.approx(hits / total, abs=1e-15)
    assert hf_accuracy.batch_weight(batch) == total


def test_accuracy_on_model_output_for_sequence_classification() -> None:
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(_bert_cfg(num_labels=3)).eval()
    ids = torch.randint(1, V, (8, 5), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        pred = model(input_ids=ids).logits.argmax(-1)
    labels = pred.clone()
    labels[:3] = (labels[:3] + 1) % 3  # three wrong
    acc = HFAccuracy("sequence")(model, {"input_ids": ids, "labels": labels})
    assert float(acc) == pytest.approx(5 / 8)


# -- bad input ------------------------------------------------------------------------


def test_bad_input_is_refused_with_the_argument_named() -> None:
    model = _gpt2()
    with pytest.raises(ValueError, match=r"batch: .*dict batch"):
        hf_loss(model, (torch.zeros(2, 3), torch.zeros(2)))
    with pytest.raises(ValueError, match=r"batch: .*'labels'"):
        hf_loss(model, {"input_ids": torch.zeros(2, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="task:"):
        HFLoss("lm")
    with pytest.raises(ValueError, match="reduction:"):
        HFLoss(reduction="sum")
    with pytest.raises(ValueError, match="causal LM loss needs labels of shape"):
        HFLoss("causal_lm").example_weights({"labels": torch.zeros(3, dtype=torch.long)})


def test_sharpkit_consumers_take_the_loss() -> None:
    """The loss drives SAM and HessianOperator; the weights are the loss's own."""
    from sharpkit.curvature import HessianOperator
    from sharpkit.optim import SAM

    model = _gpt2()
    model.config._attn_implementation = "eager"  # second order through attention: see func
    batch = _padded_lm_batch(9)
    names = ["transformer.h.0.mlp.c_proj.weight"]
    op = HessianOperator(model, hf_loss, batch, params=names)
    (w,) = [p for n, p in model.named_parameters() if n in names]
    v = torch.randn(w.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hv = op.matvec(v)

    def grad_at(shift: float) -> torch.Tensor:  # central difference of the gradient
        with torch.no_grad():
            w.add_(shift * v.view_as(w))
        (g,) = torch.autograd.grad(hf_loss(model, batch), [w])
        with torch.no_grad():
            w.sub_(shift * v.view_as(w))
        return g.reshape(-1)

    h = 1e-5
    fd = (grad_at(h) - grad_at(-h)) / (2 * h)
    assert torch.allclose(hv, fd, rtol=1e-5, atol=1e-8 * float(fd.abs().max()))
    opt = SAM([p for p in model.parameters()], torch.optim.SGD, rho=0.01, lr=0.1)
    before = hf_loss(model, batch).item()

    def closure() -> torch.Tensor:
        loss = hf_loss(model, batch)
        loss.backward()
        return loss

    first = opt.step(closure)
    assert math.isclose(first.item(), before, rel_tol=1e-12)
    assert hf_loss(model, batch).item() < before
