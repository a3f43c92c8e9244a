"""SAMTrainer: a few transformers.Trainer steps equal the same steps by hand.

The reference is sharpkit's own closure form (``SAM.step(closure)``,
``BAR.step(closure)``) on a deep copy of the same PEFT model, in float64, on the
same batch (the data set is one batch, read in order).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from sharpkit.hf import hf_loss  # noqa: E402
from sharpkit.integrations.trainer import (  # noqa: E402
    SAMTrainer,
    optimizer_cls_and_kwargs,
    sharpkit_optimizer,
)
from sharpkit.optim import ASAM, BAR, SAM, DeltaSAM  # noqa: E402

V, N, T, STEPS = 24, 4, 8, 3


def _peft_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=V, n_positions=16, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg).double()
    lora = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], lora_dropout=0.0,
        fan_in_fan_out=True,
    )  # fmt: skip
    pm = peft.get_peft_model(model, lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter (B != 0) so every factor moves
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return pm


def _data() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, V, (N, T), generator=g)
    mask = torch.ones(N, T, dtype=torch.long)
    mask[1, 3:] = 0
    mask[2, 6:] = 0  # uneven padding
    labels = ids.masked_fill(mask == 0, -100)
    return [
        {"input_ids": i, "attention_mask": m, "labels": y} for i, m, y in zip(ids, mask, labels)
    ]


def _batch(data: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([d[k] for d in data]) for k in data[0]}


def _args(tmp_path: Path, **kw: object) -> object:
    base = dict(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=N,
        learning_rate=1e-2, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, logging_strategy="no",
        train_sampling_strategy="sequential", seed=0,
    )  # fmt: skip
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _make(cls: type, model: torch.nn.Module, **kw: object) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cls is BAR:
        return BAR(params, torch.optim.AdamW, model=model, mu0=2.0, lr=1e-2, weight_decay=0.0)
    if cls is torch.optim.AdamW:
        return cls(params, lr=1e-2, weight_decay=0.0)
    return cls(params, torch.optim.AdamW, lr=1e-2, weight_decay=0.0, **kw)


@pytest.mark.parametrize(
    ("cls", "kw"),
    [(SAM, {"rho": 0.05}), (ASAM, {"rho": 0.5}), (BAR, {})],
    ids=["sam", "asam", "bar"],
)
def test_trainer_steps_equal_hand_steps(cls: type, kw: dict, tmp_path: Path) -> None:
    data = _data()
    batch = _batch(data)
    trained = _peft_gpt2()
    by_hand = copy.deepcopy(trained)
    start = _trainable(trained)

    trainer = SAMTrainer(
        model=trained,
        args=_args(tmp_path),
        train_dataset=data,
        loss_fn=hf_loss,
        optimizers=(_make(cls, trained, **kw), None),
    )
    out = trainer.train()
    assert out.global_step == STEPS

    opt = _make(cls, by_hand, **kw)
    by_hand.train()

    def closure() -> torch.Tensor:
        loss = hf_loss(by_hand, batch)
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(STEPS)]
    # the logged loss is the loss at w; Trainer sums it in a float32 accumulator
    assert out.training_loss == pytest.approx(sum(losses) / STEPS, rel=1e-6)

    ours, ref = _trainable(trained), _trainable(by_hand)
    assert ours.keys() == ref.keys() and any("lora_A" in n for n in ours)
    for n in ours:
        assert not torch.equal(ours[n], start[n]), n  # every factor moved
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-12, atol=1e-14, msg=n)


def test_sam_differs_from_plain_adamw_in_the_trainer(tmp_path: Path) -> None:
    """The control: the two passes change the result (rho matters)."""
    data = _data()
    finals = []
    for rho in (0.0, 0.05):
        model = _peft_gpt2()
        opt = _make(SAM, model, rho=rho)
        args = _args(tmp_path / str(rho))
        SAMTrainer(model=model, args=args, train_dataset=data, optimizers=(opt, None)).train()
        finals.append(_trainable(model))
    plain = _peft_gpt2()
    args = _args(tmp_path / "plain")
    transformers.Trainer(
        model=plain,
        args=args,
        train_dataset=data,
        optimizers=(_make(torch.optim.AdamW, plain), None),
    ).train()
    ref = _trainable(plain)
    for n in ref:  # rho = 0 is plain AdamW through the Trainer's own loss
        torch.testing.assert_close(finals[0][n], ref[n], rtol=1e-12, atol=1e-14)
    assert any(not torch.allclose(finals[0][n], finals[1][n], atol=1e-8) for n in ref)


def test_optimizer_cls_and_kwargs_builds_sam_from_trainer_args(tmp_path: Path) -> None:
    data = _data()
    model = _peft_gpt2()
    args = _args(tmp_path, weight_decay=0.01, learning_rate=3e-3)
    trainer = SAMTrainer(
        model=model,
        args=args,
        train_dataset=data,
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, SAM, rho=0.05),
    )
    trainer.train()
    opt = sharpkit_optimizer(trainer.optimizer)
    assert isinstance(opt, SAM) and isinstance(opt.base_optimizer, torch.optim.AdamW)
    assert {g["lr"] for g in opt.param_groups} == {3e-3}
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.01]
    assert not opt.perturbed  # w restored after every step


def test_refusals_name_the_argument(tmp_path: Path) -> None:
    data = _data()
    model = _peft_gpt2()
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        SAMTrainer(
            model=model,
            args=_args(tmp_path, gradient_accumulation_steps=2),
            train_dataset=data,
            optimizers=(_make(SAM, model, rho=0.05), None),
        )
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(TypeError, match="optimizers: DeltaSAM"):
        SAMTrainer(
            model=model,
            args=_args(tmp_path),
            train_dataset=data,
            optimizers=(DeltaSAM(params, torch.optim.SGD, model=model, lr=0.1), None),
        )
    with pytest.raises(TypeError, match="loss_fn"):
        SAMTrainer(model=model, args=_args(tmp_path), train_dataset=data, loss_fn=3)
