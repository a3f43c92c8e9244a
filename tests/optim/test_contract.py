"""The contract every sharpkit optimizer obeys (run over the whole registry)."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from .registry import OptimizerSpec, all_specs

SPECS = all_specs()
F64 = torch.float64


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def buffers_of(model: nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for b in model.buffers()]


def assert_equal_lists(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


def test_registry_is_populated() -> None:
    names = {s.name for s in SPECS}
    assert {"SAM", "ASAM"} <= names


@pytest.fixture(params=SPECS, ids=str)
def spec(request: pytest.FixtureRequest) -> OptimizerSpec:
    return request.param


# -- neutral hyperparameters reproduce the base optimizer bit for bit -----------


@pytest.mark.parametrize(
    ("base", "base_kwargs"),
    [
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}),
        (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 1e-2}),
    ],
    ids=["sgd-momentum", "adamw"],
)
def test_neutral_reproduces_base_bit_for_bit(spec: OptimizerSpec, base, base_kwargs) -> None:
    model = spec.make_model(F64)
    ref = copy.deepcopy(model)
    batch = spec.make_batch(F64)
    opt = spec.build(model.parameters(), base, model, spec.neutral, **base_kwargs)
    ref_opt = base(ref.parameters(), **base_kwargs)
    for _ in range(5):
        loss = spec.step(opt, model, spec.loss_fn, batch)
        ref_opt.zero_grad()
        ref_loss = spec.loss_fn(ref, batch)
        ref_loss.backward()
        ref_opt.step()
        assert torch.equal(torch.as_tensor(loss), ref_loss.detach())
    assert_equal_lists(params_of(model), params_of(ref))
    assert_equal_lists(buffers_of(model), buffers_of(ref))


# -- the step returns the loss at w, and changes the weights ---------------------


def test_step_returns_loss_at_w_and_moves(spec: OptimizerSpec) -> None:
    model = spec.make_model(F64)
    batch = spec.make_batch(F64)
    opt = spec.build(model.parameters(), torch.optim.SGD, model, lr=0.1)
    before = params_of(model)
    with torch.no_grad():
        expected = spec.loss_fn(copy.deepcopy(model), batch)
    loss = spec.step(opt, model, spec.loss_fn, batch)
    assert torch.allclose(torch.as_tensor(loss).detach(), expected, rtol=0, atol=1e-12)
    assert any(not torch.equal(a, b) for a, b in zip(before, params_of(model)))


# -- LR schedulers and state_dict resume -----------------------------------------


def test_lr_scheduler_reaches_base_optimizer(spec: OptimizerSpec) -> None:
    model = spec.make_model(F64)
    opt = spec.build(model.parameters(), torch.optim.SGD, model, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    spec.step(opt, model, spec.loss_fn, spec.make_batch(F64))
    sched.step()
    base = opt.base_optimizer  # type: ignore[attr-defined]
    assert base.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize(
    ("base", "base_kwargs"),
    [
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
        (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 1e-2}),
    ],
    ids=["sgd-momentum", "adamw"],
)
def test_state_dict_resume_is_exact(spec: OptimizerSpec, base, base_kwargs) -> None:
    batch = spec.make_batch(F64)

    def build(model: nn.Module):
        opt = spec.build(model.parameters(), base, model, **base_kwargs)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
        return opt, sched

    def run(model, opt, sched, steps):
        for _ in range(steps):
            spec.step(opt, model, spec.loss_fn, batch)
            sched.step()

    model = spec.make_model(F64)
    opt, sched = build(model)
    run(model, opt, sched, 3)
    blob = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, blob
    )
    run(model, opt, sched, 4)
    uninterrupted = params_of(model)

    blob.seek(0)
    ckpt = torch.load(blob, weights_only=True)
    model2 = spec.make_model(F64)
    model2.load_state_dict(ckpt["model"])
    opt2, sched2 = build(model2)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    # the shared groups are re-linked after loading
    assert opt2.param_groups is opt2.base_optimizer.param_groups  # type: ignore[attr-defined]
    run(model2, opt2, sched2, 4)
    assert_equal_lists(params_of(model2), uninterrupted)


# -- BatchNorm statistics come from the clean pass only -------------------------


def test_buffers_come_from_clean_pass_only(spec: OptimizerSpec) -> None:
    model = spec.make_model(F64)
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        pytest.skip("spec model has no BatchNorm")
    ref = copy.deepcopy(model)
    batch = spec.make_batch(F64)
    opt = spec.build(model.parameters(), torch.optim.SGD, model, lr=0.1)
    spec.step(opt, model, spec.loss_fn, batch)
    spec.clean_pass(ref, spec.loss_fn, batch)
    for (name, b), b_ref in zip(model.named_buffers(), ref.buffers()):
        assert torch.equal(b, b_ref), name


# -- exception safety ----------------------------------------------------------


def test_exception_in_perturbed_pass_restores_weights(spec: OptimizerSpec) -> None:
    if spec.fail_call is None:
        pytest.skip("single-pass method")
    model = spec.make_model(F64)
    batch = spec.make_batch(F64)
    opt = spec.build(model.parameters(), torch.optim.SGD, model, lr=0.1, momentum=0.9)
    spec.step(opt, model, spec.loss_fn, batch)  # some optimizer state first
    before, bufs = params_of(model), buffers_of(model)
    calls = {"n": 0}

    def failing(m, b):
        calls["n"] += 1
        if calls["n"] == spec.fail_call:
            raise KeyError("boom in the perturbed pass")
        return spec.loss_fn(m, b)

    with pytest.raises(KeyError, match="boom"):
        spec.step(opt, model, failing, batch)
    assert calls["n"] == spec.fail_call
    assert_equal_lists(params_of(model), before)
    assert_equal_lists(buffers_of(model), bufs)
    # and the optimizer is usable afterwards
    spec.step(opt, model, spec.loss_fn, batch)


# -- zero and non-finite gradients -----------------------------------------------


def test_zero_gradient_gives_no_perturbation(spec: OptimizerSpec) -> None:
    model = spec.make_model(F64)
    batch = spec.make_batch(F64)
    opt = spec.build(model.parameters(), torch.optim.SGD, model, lr=0.1)
    w = params_of(model)
    seen: list[list[torch.Tensor]] = []

    def zero_loss(m, b):
        out = spec.loss_fn(m, b)
        seen.append(params_of(model))
        return out * 0.0

    spec.step(opt, model, zero_loss, batch)
    for snapshot in seen:  # every evaluation happened at w (e = 0) ...
        assert_equal_lists(snapshot, w)
    after = params_of(model)  # ... and the zero gradient moved nothing
    assert all(torch.isfinite(p).all() for p in after)
    assert_equal_lists(after, w)


def test_nonfinite_gradient_skips_step(spec: OptimizerSpec) -> None:
    model = spec.make_model(F64)
    batch = spec.make_batch(F64)
    opt = spec.build(model.parameters(), torch.optim.SGD, model, lr=0.1, momentum=0.9)
    w, bufs = params_of(model), buffers_of(model)

    def nan_loss(m, b):
        return spec.loss_fn(m, b) * float("nan")

    with pytest.warns(RuntimeWarning, match="non-finite"):
        spec.step(opt, model, nan_loss, batch)
    assert_equal_lists(params_of(model), w)
    assert_equal_lists(buffers_of(model), bufs)  # a skipped step changes nothing
    # a later healthy step works and stays finite
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        spec.step(opt, model, spec.loss_fn, batch)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- bad input -------------------------------------------------------------------


def test_bad_hyperparameters_name_the_argument(spec: OptimizerSpec) -> None:
    assert spec.bad, "every spec lists invalid hyperparameters"
    for overrides, exc, word in spec.bad:
        model = spec.make_model(F64)
        hyper = {**spec.hyper, **overrides}
        with pytest.raises(exc, match=word):
            spec.build(model.parameters(), torch.optim.SGD, model, hyper, lr=0.1)


def test_bad_base_optimizer_is_refused(spec: OptimizerSpec) -> None:
    model = spec.make_model(F64)
    instance = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="base_optimizer"):
        spec.build(model.parameters(), instance, model, lr=0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="base_optimizer"):
        spec.build(model.parameters(), "SGD", model, lr=0.1)  # type: ignore[arg-type]


def test_step_without_closure_names_closure(spec: OptimizerSpec) -> None:
    if spec.step is not _closure_step_ref():
        pytest.skip("optimizer is not driven by a closure")
    model = spec.make_model(F64)
    opt = spec.build(model.parameters(), torch.optim.SGD, model, lr=0.1)
    with pytest.raises(TypeError, match="closure"):
        opt.step()


def _closure_step_ref():
    from .registry import closure_step

    return closure_step


# -- frozen parameters, several groups, dtypes -------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_groups_frozen_params_and_dtype(spec: OptimizerSpec, dtype: torch.dtype) -> None:
    model = spec.make_model(dtype)
    batch = spec.make_batch(dtype)
    params = list(model.parameters())
    frozen = params[0]
    frozen.requires_grad_(False)
    groups = [
        {"params": params[1 : len(params) // 2 + 1]},
        {"params": params[len(params) // 2 + 1 :], "lr": 0.01},
    ]
    opt = spec.build(groups, torch.optim.SGD, model, lr=0.1, momentum=0.9)
    frozen_before = frozen.detach().clone()
    before = params_of(model)
    for _ in range(2):
        spec.step(opt, model, spec.loss_fn, batch)
    assert torch.equal(frozen, frozen_before)
    assert all(p.dtype == dtype for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    changed = [not torch.equal(a, b) for a, b in zip(before, params_of(model))]
    assert any(changed[1:])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda(spec: OptimizerSpec) -> None:
    dev = torch.device("cuda")
    model = spec.make_model(torch.float32).to(dev)
    batch = tuple(t.to(dev) for t in spec.make_batch(torch.float32))
    cpu_model = spec.make_model(torch.float32)
    opt = spec.build(model.parameters(), torch.optim.SGD, model, lr=0.1)
    cpu_opt = spec.build(cpu_model.parameters(), torch.optim.SGD, cpu_model, lr=0.1)
    for _ in range(3):
        spec.step(opt, model, spec.loss_fn, batch)
        spec.step(cpu_opt, cpu_model, spec.loss_fn, spec.make_batch(torch.float32))
    for a, b in zip(model.parameters(), cpu_model.parameters()):
        assert torch.allclose(a.cpu(), b, atol=1e-4)
