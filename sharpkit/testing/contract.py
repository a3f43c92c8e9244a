"""A public contract checker for SAM-family optimizers (like scikit-learn's ``check_estimator``).

Describe an optimizer with an :class:`OptimizerSpec` (how to build it, which
hyperparameters make it its base optimizer, which are invalid, and capability
flags saying how it is driven and what it does) and call
:func:`check_optimizer`; it runs every check the flags make applicable and
raises :class:`ContractError` naming each one that fails:

- ``neutral_is_base``: the neutral hyperparameters (``rho = 0``) reproduce the
  base optimizer bit for bit (weights, buffers, returned loss), with SGD
  (momentum, weight decay) and AdamW;
- ``returns_loss_at_w``: ``step`` returns the mean loss at ``w`` and moves the weights;
- ``closure_equals_batch``: ``step(closure)`` and ``step(loss_fn=..., batch=...)``
  take the same steps (optimizers driven both ways);
- ``lr_scheduler_acts``: a scheduler's learning rate reaches the update;
- ``state_dict_resume``: a run resumed from ``state_dict()`` (through
  ``torch.save``/``torch.load(weights_only=True)``) steps exactly as an
  uninterrupted one;
- ``load_foreign_state_dict``: a plain ``torch.optim`` state dict, or one of
  another optimizer type, is refused with ``ValueError``;
- ``buffers_from_clean_pass``: BatchNorm running statistics come from the
  clean forward passes only;
- ``exception_restores``: an exception in the perturbed pass, or in a base step
  that raises after changing the weights, leaves weights, buffers and optimizer
  state exactly as before the step;
- ``nonfinite_skips``: a non-finite loss skips the step (``RuntimeWarning``),
  changing nothing;
- ``zero_gradient``: a zero gradient gives ``e = 0`` (every evaluation at ``w``)
  and no move;
- ``bad_hyperparameters``: invalid hyperparameters raise the declared error
  naming the argument, at construction and (for ``lr`` and ``bad_later``) when
  set later in ``param_groups``, before any compute;
- ``dtype_preserved``: float32 and float64 runs with two groups and a frozen
  parameter keep every dtype and leave the frozen parameter alone.

Example:
    >>> import torch
    >>> from sharpkit.optim import SAM
    >>> from sharpkit.testing.contract import OptimizerSpec, check_optimizer
    >>> spec = OptimizerSpec(name="SAM", factory=SAM, hyper={"rho": 0.05},
    ...                      neutral={"rho": 0.0},
    ...                      bad=[({"rho": -1.0}, ValueError, "rho")], two_phase=True)
    >>> report = check_optimizer(spec)
    >>> report["neutral_is_base"], report["exception_restores"]
    ('passed', 'passed')
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

__all__ = [
    "ContractError",
    "OptimizerSpec",
    "check_optimizer",
    "contract_checks",
    "default_batch",
    "default_loss",
    "default_model",
]

F64 = torch.float64


def default_model(dtype: torch.dtype) -> nn.Module:
    """A small MLP with BatchNorm (so buffer handling is exercised)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)).to(
        dtype
    )


def default_batch(dtype: torch.dtype, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """32 examples of 6 features and 3 classes, seeded."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def default_loss(model: Callable[..., Any], batch: Any) -> torch.Tensor:
    """Mean cross-entropy of ``(inputs, targets)``."""
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _per_example_loss(model: Callable[..., Any], batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def _full_batch_clean_pass(model: nn.Module, loss_fn: Callable[..., Any], batch: Any) -> None:
    with torch.no_grad():
        loss_fn(model, batch)


@dataclass(frozen=True)
class OptimizerSpec:
    """How the contract builds and drives one optimizer, and what it can do.

    Attributes:
        name: a label for reports and test ids.
        factory: ``factory(params, base_optimizer, *, model, **kwargs)`` builds
            the optimizer; ``kwargs`` holds its hyperparameters and the base's.
        hyper: typical hyperparameters of the method.
        neutral: hyperparameters with which it must equal its base optimizer
            (``None``: no such setting, the check is skipped).
        bad: ``(overrides, exception type, word of the message)`` for the
            constructor.
        bad_later: ``(group key, value, exception type, word)`` set in
            ``param_groups`` after construction; ``step`` must refuse them
            before any compute (``lr = -1`` is always tried).
        closure_driven: ``step(closure)`` is accepted.
        batch_driven: ``step(loss_fn=..., batch=...)`` is accepted (with ``model=``).
        per_example_loss: ``loss_fn`` returns one loss per example.
        perturbs: the loss is evaluated at perturbed weights (SAM family).
        two_phase: ``first_step()``/``second_step()`` exist (checked to equal ``step``).
        handles_batchnorm: BatchNorm statistics must come from the clean pass.
        fail_call: 1-based index of the first ``loss_fn`` call at perturbed weights.
        make_model: builds the test model in a dtype.
        make_batch: builds the test batch in a dtype.
        loss_fn: the batch loss (default: mean cross-entropy, or per example).
        clean_pass: reproduces the forward passes whose buffers a step keeps.
    """

    name: str
    factory: Callable[..., Optimizer]
    hyper: dict[str, Any]
    neutral: dict[str, Any] | None
    bad: Sequence[tuple[dict[str, Any], type[Exception], str]] = ()
    bad_later: Sequence[tuple[str, Any, type[Exception], str]] = ()
    closure_driven: bool = True
    batch_driven: bool = True
    per_example_loss: bool = False
    perturbs: bool = True
    two_phase: bool = False
    handles_batchnorm: bool = True
    fail_call: int | None = 2
    make_model: Callable[[torch.dtype], nn.Module] = default_model
    make_batch: Callable[[torch.dtype], Any] = default_batch
    loss_fn: Callable[..., torch.Tensor] | None = None
    clean_pass: Callable[[nn.Module, Callable[..., Any], Any], None] = _full_batch_clean_pass
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.closure_driven or self.batch_driven):
            raise ValueError("closure_driven, batch_driven: an optimizer must accept one of them")

    @property
    def loss(self) -> Callable[..., torch.Tensor]:
        """The batch loss the checks use."""
        if self.loss_fn is not None:
            return self.loss_fn
        return _per_example_loss if self.per_example_loss else default_loss

    def build(
        self,
        params: Any,
        base: type[Optimizer],
        model: nn.Module,
        hyper: dict[str, Any] | None = None,
        **base_kwargs: Any,
    ) -> Optimizer:
        """The optimizer with ``hyper`` (default :attr:`hyper`) and ``base_kwargs``."""
        kw = dict(self.hyper if hyper is None else hyper)
        kw.update(base_kwargs)
        return self.factory(params, base, model=model, **kw)

    def step(self, opt: Optimizer, model: nn.Module, loss_fn: Any, batch: Any) -> Any:
        """One step, batch-driven where the optimizer is, else by a closure."""
        if self.batch_driven:
            return opt.step(loss_fn=loss_fn, batch=batch)
        return opt.step(self.closure(model, loss_fn, batch))

    def closure(self, model: nn.Module, loss_fn: Any, batch: Any) -> Callable[[], Any]:
        """torch.optim's closure for ``loss_fn`` (the mean of per-example losses)."""

        def closure() -> torch.Tensor:
            loss = loss_fn(model, batch)
            loss = loss.mean() if loss.dim() else loss
            loss.backward()
            return loss

        return closure

    def __str__(self) -> str:  # pytest ids
        return self.name


class ContractError(AssertionError):
    """One or more contract checks failed; the message names each with its reason."""


class _Skip(Exception):
    pass


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for b in model.buffers()]


def _state(opt: Optimizer) -> list[tuple[Any, str, Any]]:
    out = []
    for i, s in enumerate(opt.state.values()):
        for k, v in s.items():
            out.append((i, k, v.detach().clone() if isinstance(v, torch.Tensor) else v))
    return out


def _same(a: list[Any], b: list[Any], what: str) -> None:
    assert len(a) == len(b), f"{what}: {len(a)} entries, expected {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if isinstance(x, tuple):
            assert x[:2] == y[:2], f"{what}: entry {i} is {x[:2]}, expected {y[:2]}"
            x, y = x[2], y[2]
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f"{what}: entry {i} differs by {(x - y).abs().max()}"
        else:
            assert x == y, f"{what}: entry {i} is {x!r}, expected {y!r}"


def _reference_loss(spec: OptimizerSpec, model: nn.Module, batch: Any) -> torch.Tensor:
    loss = spec.loss(model, batch)
    return loss.mean() if loss.dim() else loss


class _ExplodingSGD(torch.optim.SGD):
    """SGD that, when armed, takes its step (weights and momentum change) and then raises."""

    armed = False

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        out = super().step(closure)
        if self.armed:
            raise KeyError("boom in the base step")
        return out


# ----------------------------------------------------------------------------
# the checks
# ----------------------------------------------------------------------------


def check_neutral_is_base(spec: OptimizerSpec) -> None:
    if spec.neutral is None:
        raise _Skip("no neutral hyperparameters")
    for base, kw in (
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}),
        (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 1e-2}),
    ):
        model = spec.make_model(F64)
        ref = copy.deepcopy(model)
        batch = spec.make_batch(F64)
        opt = spec.build(model.parameters(), base, model, spec.neutral, **kw)
        ref_opt = base(ref.parameters(), **kw)
        for i in range(5):
            loss = spec.step(opt, model, spec.loss, batch)
            ref_opt.zero_grad()
            ref_loss = _reference_loss(spec, ref, batch)
            ref_loss.backward()
            ref_opt.step()
            assert torch.equal(torch.as_tensor(loss).detach(), ref_loss.detach()), (
                f"{base.__name__}: step {i} returned {loss}, the base optimizer's loss is "
                f"{ref_loss.item()}"
            )
        _same(_params(model), _params(ref), f"{base.__name__}: weights after 5 steps")
        _same(_buffers(model), _buffers(ref), f"{base.__name__}: buffers after 5 steps")


def check_returns_loss_at_w(spec: OptimizerSpec) -> None:
    model = spec.make_model(F64)
    batch = spec.make_batch(F64)
    opt = spec.build(model.parameters(), torch.optim.SGD, model, lr=0.1)
    before = _params(model)
    with torch.no_grad():
        expected = _reference_loss(spec, copy.deepcopy(model), batch)
    loss = spec.step(opt, model, spec.loss, batch)
    got = torch.as_tensor(loss).detach()
    assert got.shape == (), f"step returned shape {tuple(got.shape)}, expected a scalar"
    assert torch.allclose(got, expected, rtol=0, atol=1e-12), f"loss {got} != loss at w {expected}"
    assert any(not torch.equal(a, b) for a, b in zip(before, _params(model))), "no weight moved"


def check_closure_equals_batch(spec: OptimizerSpec) -> None:
    if not (spec.closure_driven and spec.batch_driven):
        raise _Skip("driven one way only")
    a, b = spec.make_model(F64), spec.make_model(F64)
    batch = spec.make_batch(F64)
    oa = spec.build(a.parameters(), torch.optim.SGD, a, lr=0.1, momentum=0.9)
    ob = spec.build(b.parameters(), torch.optim.SGD, b, lr=0.1, momentum=0.9)
    for _ in range(3):
        la = oa.step(loss_fn=spec.loss, batch=batch)
        lb = ob.step(spec.closure(b, spec.loss, batch))
        assert torch.equal(torch.as_tensor(la).detach(), torch.as_tensor(lb).detach()), "losses"
    _same(_params(a), _params(b), "weights: loss_fn/batch vs closure")
    if spec.two_phase:
        c = spec.make_model(F64)
        oc = spec.build(c.parameters(), torch.optim.SGD, c, lr=0.1, momentum=0.9)
        for _ in range(3):
            oc.zero_grad()
            _reference_loss(spec, c, batch).backward()
            oc.first_step(zero_grad=True)
            _reference_loss(spec, c, batch).backward()
            oc.second_step(zero_grad=True)
        _same(_params(c), _params(b), "weights: first_step/second_step vs step")


def check_lr_scheduler_acts(spec: OptimizerSpec) -> None:
    model = spec.make_model(F64)
    batch = spec.make_batch(F64)
    opt = spec.build(model.parameters(), torch.optim.SGD, model, lr=0.1)
    sched = torch.optim.lr_scheduler.MultiplicativeLR(opt, lambda epoch: 0.5)
    spec.step(opt, model, spec.loss, batch)
    sched.step()
    base = getattr(opt, "base_optimizer", opt)
    for o in (opt, base):
        lr = o.param_groups[0]["lr"]
        assert abs(lr - 0.05) < 1e-15, f"lr after the scheduler is {lr}, expected 0.05"
    zero = torch.optim.lr_scheduler.MultiplicativeLR(opt, lambda epoch: 0.0)
    zero.step()
    before = _params(model)
    spec.step(opt, model, spec.loss, batch)
    _same(_params(model), before, "weights after a step at the scheduler's lr = 0")


def check_state_dict_resume(spec: OptimizerSpec) -> None:
    batch = spec.make_batch(F64)
    for base, kw in (
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
        (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 1e-2}),
    ):

        def build(model: nn.Module, base: Any = base, kw: Any = kw) -> tuple[Optimizer, Any]:
            opt = spec.build(model.parameters(), base, model, **kw)
            return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)

        def run(model: nn.Module, opt: Optimizer, sched: Any, steps: int) -> None:
            for _ in range(steps):
                spec.step(opt, model, spec.loss, batch)
                sched.step()

        model = spec.make_model(F64)
        opt, sched = build(model)
        run(model, opt, sched, 3)
        blob = io.BytesIO()
        torch.save({"m": model.state_dict(), "o": opt.state_dict(), "s": sched.state_dict()}, blob)
        run(model, opt, sched, 4)
        uninterrupted = _params(model)
        blob.seek(0)
        ckpt = torch.load(blob, weights_only=True)
        model2 = spec.make_model(F64)
        model2.load_state_dict(ckpt["m"])
        opt2, sched2 = build(model2)
        opt2.load_state_dict(ckpt["o"])
        sched2.load_state_dict(ckpt["s"])
        run(model2, opt2, sched2, 4)
        _same(_params(model2), uninterrupted, f"{base.__name__}: weights of the resumed run")


def check_load_foreign_state_dict(spec: OptimizerSpec) -> None:
    model = spec.make_model(F64)
    opt = spec.build(model.parameters(), torch.optim.SGD, model, lr=0.1)
    spec.step(opt, model, spec.loss, spec.make_batch(F64))
    before = _state(opt)
    groups = copy.deepcopy(
        [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    )
    plain = torch.optim.SGD(spec.make_model(F64).parameters(), lr=0.1).state_dict()
    own = opt.state_dict()
    foreign = dict(own)
    meta = foreign.get("sharpkit")
    foreign["sharpkit"] = {**(meta if isinstance(meta, dict) else {}), "optimizer": "OtherSAM"}
    for label, sd in (("a plain torch.optim.SGD state dict", plain), ("another type's", foreign)):
        try:
            opt.load_state_dict(sd)
        except ValueError:
            pass
        except Exception as err:
            raise AssertionError(
                f"loading {label} raised {type(err).__name__}: {err}, not ValueError"
            ) from err
        else:
            raise AssertionError(f"loading {label} was accepted")
        _same(_state(opt), before, f"optimizer state after refusing {label}")
        now = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        assert now == groups, f"param_groups changed after refusing {label}"


def check_buffers_from_clean_pass(spec: OptimizerSpec) -> None:
    model = spec.make_model(F64)
    if not spec.handles_batchnorm:
        raise _Skip("handles_batchnorm=False")
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise _Skip("the spec's model has no BatchNorm")
    ref = copy.deepcopy(model)
    batch = spec.make_batch(F64)
    opt = spec.build(model.parameters(), torch.optim.SGD, model, lr=0.1)
    spec.step(opt, model, spec.loss, batch)
    spec.clean_pass(ref, spec.loss, batch)
    _same(_buffers(model), _buffers(ref), "buffers after one step vs the clean pass alone")


def check_exception_restores(spec: OptimizerSpec) -> None:
    model = spec.make_model(F64)
    batch = spec.make_batch(F64)
    opt = spec.build(model.parameters(), _ExplodingSGD, model, lr=0.1, momentum=0.9)
    spec.step(opt, model, spec.loss, batch)  # some optimizer state first
    before, bufs, state = _params(model), _buffers(model), _state(opt)
    fail_at = spec.fail_call if spec.perturbs and spec.fail_call is not None else 1
    calls = {"n": 0}

    def failing(m: Any, b: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise KeyError("boom in the loss")
        return spec.loss(m, b)

    for where in ("the loss", "the base step"):
        base = getattr(opt, "base_optimizer", opt)
        base.armed = where == "the base step"
        try:
            spec.step(opt, model, failing if where == "the loss" else spec.loss, batch)
        except KeyError:
            pass
        else:
            raise AssertionError(f"an exception in {where} did not propagate")
        finally:
            base.armed = False
        _same(_params(model), before, f"weights after an exception in {where}")
        _same(_buffers(model), bufs, f"buffers after an exception in {where}")
        _same(_state(opt), state, f"optimizer state after an exception in {where}")
    spec.step(opt, model, spec.loss, batch)  # and the optimizer is usable afterwards
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def check_nonfinite_skips(spec: OptimizerSpec) -> None:
    model = spec.make_model(F64)
    batch = spec.make_batch(F64)
    opt = spec.build(model.parameters(), torch.optim.SGD, model, lr=0.1, momentum=0.9)
    spec.step(opt, model, spec.loss, batch)
    w, bufs, state = _params(model), _buffers(model), _state(opt)

    def nan_loss(m: Any, b: Any) -> torch.Tensor:
        return spec.loss(m, b) * float("nan")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec.step(opt, model, nan_loss, batch)
    assert any(
        issubclass(c.category, RuntimeWarning) and "non-finite" in str(c.message) for c in caught
    ), "a non-finite loss gave no RuntimeWarning mentioning 'non-finite'"
    _same(_params(model), w, "weights after a non-finite step")
    _same(_buffers(model), bufs, "buffers after a non-finite step")
    _same(_state(opt), state, "optimizer state after a non-finite step")


def check_zero_gradient(spec: OptimizerSpec) -> None:
    model = spec.make_model(F64)
    batch = spec.make_batch(F64)
    opt = spec.build(model.parameters(), torch.optim.SGD, model, lr=0.1)
    w = _params(model)
    seen: list[list[torch.Tensor]] = []

    def zero_loss(m: Any, b: Any) -> torch.Tensor:
        out = spec.loss(m, b)
        seen.append(_params(model))
        return out * 0.0

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        spec.step(opt, model, zero_loss, batch)
    for snapshot in seen:
        _same(snapshot, w, "weights the loss was evaluated at (e must be 0)")
    _same(_params(model), w, "weights after a zero-gradient step")


def check_bad_hyperparameters(spec: OptimizerSpec) -> None:
    if not spec.bad:
        raise AssertionError("the spec lists no invalid hyperparameters (bad=...)")
    for overrides, exc, word in spec.bad:
        model = spec.make_model(F64)
        try:
            spec.build(
                model.parameters(), torch.optim.SGD, model, {**spec.hyper, **overrides}, lr=0.1
            )
        except exc as err:
            assert word in str(err), f"{overrides}: the message {str(err)!r} does not name {word!r}"
        else:
            raise AssertionError(f"{overrides} was accepted (expected {exc.__name__})")
    later = [("lr", -1.0, ValueError, "lr"), ("lr", float("nan"), ValueError, "lr")]
    for key, value, exc, word in [*later, *spec.bad_later]:
        model = spec.make_model(F64)
        batch = spec.make_batch(F64)
        opt = spec.build(model.parameters(), torch.optim.SGD, model, lr=0.1)
        spec.step(opt, model, spec.loss, batch)
        opt.param_groups[0][key] = value
        w, state, calls = _params(model), _state(opt), {"n": 0}

        def counted(m: Any, b: Any, calls: dict[str, int] = calls) -> torch.Tensor:
            calls["n"] += 1
            return spec.loss(m, b)

        try:
            spec.step(opt, model, counted, batch)
        except exc as err:
            assert word in str(err), f"{key}={value}: the message {str(err)!r} lacks {word!r}"
        else:
            raise AssertionError(f"param_groups[0][{key!r}] = {value} was accepted by step()")
        assert calls["n"] == 0, f"{key}={value}: the loss was evaluated before the refusal"
        _same(_params(model), w, f"weights after refusing {key}={value}")
        _same(_state(opt), state, f"optimizer state after refusing {key}={value}")


def check_dtype_preserved(spec: OptimizerSpec) -> None:
    for dtype in (torch.float32, torch.float64):
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
        before = _params(model)
        for _ in range(2):
            spec.step(opt, model, spec.loss, batch)
        assert torch.equal(frozen, frozen_before), f"{dtype}: a frozen parameter moved"
        for p in model.parameters():
            assert p.dtype == dtype, f"a parameter became {p.dtype} in a {dtype} run"
            assert bool(torch.isfinite(p).all()), f"{dtype}: non-finite weights"
        for s in opt.state.values():
            for k, v in s.items():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    assert v.dtype == dtype, f"state {k!r} is {v.dtype} in a {dtype} run"
        moved = [not torch.equal(a, b) for a, b in zip(before, _params(model))]
        assert any(moved[1:]), f"{dtype}: no trainable weight moved"


_CHECKS: dict[str, Callable[[OptimizerSpec], None]] = {
    "neutral_is_base": check_neutral_is_base,
    "returns_loss_at_w": check_returns_loss_at_w,
    "closure_equals_batch": check_closure_equals_batch,
    "lr_scheduler_acts": check_lr_scheduler_acts,
    "state_dict_resume": check_state_dict_resume,
    "load_foreign_state_dict": check_load_foreign_state_dict,
    "buffers_from_clean_pass": check_buffers_from_clean_pass,
    "exception_restores": check_exception_restores,
    "nonfinite_skips": check_nonfinite_skips,
    "zero_gradient": check_zero_gradient,
    "bad_hyperparameters": check_bad_hyperparameters,
    "dtype_preserved": check_dtype_preserved,
}


def contract_checks(spec: OptimizerSpec) -> Iterator[tuple[str, Callable[[], str]]]:
    """``(name, run)`` for every check; ``run()`` returns ``"passed"`` or
    ``"skipped: <reason>"`` and raises ``AssertionError`` on failure (for a test
    framework to parametrize over)."""
    for name, check in _CHECKS.items():

        def run(check: Callable[[OptimizerSpec], None] = check) -> str:
            try:
                check(spec)
            except _Skip as skip:
                return f"skipped: {skip}"
            return "passed"

        yield name, run


def check_optimizer(spec: OptimizerSpec, checks: Sequence[str] | None = None) -> dict[str, str]:
    """Run the contract on the optimizer ``spec`` describes.

    Args:
        spec: the optimizer and its capabilities.
        checks: names of the checks to run (default: all; see the module docstring).

    Returns:
        ``{check: "passed" | "skipped: <reason>"}``.

    Raises:
        ContractError: naming every failed check and why.
        ValueError: for an unknown check name.
    """
    if checks is not None:
        unknown = sorted(set(checks) - set(_CHECKS))
        if unknown:
            raise ValueError(f"checks: unknown {unknown}; known: {sorted(_CHECKS)}")
    report: dict[str, str] = {}
    failures: list[str] = []
    for name, run in contract_checks(spec):
        if checks is not None and name not in checks:
            continue
        try:
            report[name] = run()
        except AssertionError as err:
            failures.append(f"{name}: {err}")
    if failures:
        raise ContractError(f"{spec.name} fails the optimizer contract:\n" + "\n".join(failures))
    return report
