"""MSAM's vectorised path and DeltaSAM's exact statistics on Hugging Face models.

Tiny GPT-2 (causal LM) and BERT (sequence classification) built from configs, at
their default attention (SDPA), with padded batches and attention masks, in
float64. References: MSAM's sequential path (a loop of SAM steps on the module)
and per-example gradients from the Jacobian of the loss vector (ordinary
batched backward passes, no ``vmap`` over the model). Where ``vmap`` cannot run
a model, the fallback is decided at the first step and warned about once.
"""

from __future__ import annotations

import copy
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sharpkit._functional import vmap_safe_masks  # noqa: E402
from sharpkit.hf import hf_loss, hf_per_example_loss  # noqa: E402
from sharpkit.optim import MSAM, DeltaSAM  # noqa: E402
from sharpkit.optim.msam import VectorisationFallbackWarning  # noqa: E402
from sharpkit.per_example import per_example_gradients  # noqa: E402
from tests.optim.test_msam import DataDependent, ce, data, params_of  # noqa: E402
from tests.test_hf import V, _bert_cfg, _gpt2  # noqa: E402


def _bert() -> torch.nn.Module:
    torch.manual_seed(1)
    return transformers.BertForSequenceClassification(_bert_cfg(num_labels=3)).double().eval()


def _padded(n: int, seed: int, *, lm: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (n, 8), generator=g)
    lengths = torch.randint(2, 9, (n,), generator=g)
    lengths[0] = 8  # one full sequence, one short one at least
    lengths[1] = 2
    mask = (torch.arange(8)[None, :] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100) if lm else torch.randint(0, 3, (n,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


CASES = {"gpt2": (_gpt2, True), "bert": (_bert, False)}


def test_vmap_safe_masks_answers_no_and_restores() -> None:
    import transformers.masking_utils  # noqa: F401  (a model's module imports it)

    masks = sys.modules["transformers.masking_utils"]
    before = masks._ignore_causal_mask_sdpa, masks._ignore_bidirectional_mask_sdpa
    with vmap_safe_masks():
        assert masks._ignore_causal_mask_sdpa(None, 4, 4, 0) is False
        assert masks._ignore_bidirectional_mask_sdpa(None, 4) is False
    assert (masks._ignore_causal_mask_sdpa, masks._ignore_bidirectional_mask_sdpa) == before
    # outside the block the shortcut is transformers' own again (no padding: skip the mask)
    assert masks._ignore_bidirectional_mask_sdpa(None, 4) is True


@pytest.mark.parametrize("name", sorted(CASES))
def test_msam_runs_vectorised_and_matches_sequential(name: str) -> None:
    build, lm = CASES[name]
    batches = [_padded(10, s, lm=lm) for s in (0, 1)]
    a = build()
    b = copy.deepcopy(a)
    vec = MSAM(a.parameters(), torch.optim.SGD, rho=0.05, micro_batches=3, model=a, lr=0.1)
    seq = MSAM(b.parameters(), torch.optim.SGD, rho=0.05, micro_batches=3, model=b, lr=0.1,
               path="sequential")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no per-slice attention kernels
        for batch in batches:
            la = vec.step(loss_fn=hf_loss, batch=batch)
            assert vec.last_path == "vectorised" and vec.fallback_reason is None
            lb = seq.step(loss_fn=hf_loss, batch=batch)
            assert float(la) == pytest.approx(float(lb), rel=1e-12)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-13)
    moved = max(float((p - q).abs().max()) for p, q in zip(params_of(a), params_of(build())))
    assert moved > 1e-4  # the steps did something


@pytest.mark.parametrize("name", sorted(CASES))
def test_delta_sam_exact_vectorises_and_per_example_gradients_match(name: str) -> None:
    build, lm = CASES[name]
    batch = _padded(6, 2, lm=lm)
    model = build()
    params = [p for p in model.parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lv, gv = per_example_gradients(model, hf_per_example_loss, batch, coupled=False)
    lj, gj = per_example_gradients(model, hf_per_example_loss, batch, coupled=True)
    assert torch.allclose(lv, lj, rtol=1e-12, atol=1e-14)
    for a, b, p in zip(gv, gj, params):
        assert a.shape == (6, *p.shape)
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    opt = DeltaSAM(params, torch.optim.SGD, rho=0.05, model=model, mode="exact", lr=0.1)
    probe = DeltaSAM(params, torch.optim.SGD, rho=0.05, model=model, mode="probe", lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            opt.step(loss_fn=hf_per_example_loss, batch=batch)
        probe.step(loss_fn=hf_per_example_loss, batch=batch)  # probes as one vmap
    assert opt.exact_fallback is None
    assert getattr(probe, "_probe_fallback", None) is None


def _fallback_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, VectorisationFallbackWarning)]


def test_delta_sam_exact_falls_back_once_naming_cause_and_remedy() -> None:
    model = DataDependent()
    x, y = data(8)
    opt = DeltaSAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, lr=0.1)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.step(loss_fn=loss_fn, batch=(x, y))
    (message,) = _fallback_warnings(record)
    assert "Cause: RuntimeError: vmap" in message and "Remedy:" in message
    assert "mode='probe'" in message
    assert opt.exact_fallback is not None and opt.exact_fallback.startswith("RuntimeError")
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_msam_falls_back_once_naming_cause_and_remedy() -> None:
    model = DataDependent()
    opt = MSAM(model.parameters(), torch.optim.SGD, micro_batches=3, model=model, lr=0.1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.step(loss_fn=ce, batch=data(12))
            assert opt.last_path == "sequential"
    (message,) = _fallback_warnings(record)
    assert "Cause: RuntimeError: vmap" in message and "path='sequential'" in message
