"""torch.optim's step hooks and profiler label on sharpkit optimizers.

A sharpkit optimizer enters its step wrapper's hooks and ``record_function``
label only when something observes them, and skips torch's wrapper around its
base optimizer's step in the same case; these tests check that whatever is
observed still is (hooks, their order, argument replacement, profiler labels,
warning locations) and that both ways take the same step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from sharpkit.balance import LoRALinear
from sharpkit.optim import BAR, SAM


def _net() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(LoRALinear(4, 4, rank=2, alpha=2.0, generator=g))
    nn.init.normal_(net[0].lora_B, std=1.0, generator=g)
    return net


_BUILD: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "BAR": lambda m: BAR(m.parameters(), torch.optim.AdamW, mu0=0.5, model=m, lr=0.01),
    "SAM": lambda m: SAM(m.parameters(), torch.optim.AdamW, rho=0.05, model=m, lr=0.01),
}


def _closure(net: nn.Module) -> Callable[[], torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)

    def closure() -> torch.Tensor:
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        return loss

    return closure


def _run(name: str, register: Callable[[torch.optim.Optimizer], None] | None = None):
    net = _net()
    opt = _BUILD[name](net)
    if register is not None:
        register(opt)
    closure = _closure(net)
    losses = [opt.step(closure) for _ in range(3)]
    return [p.detach().clone() for p in net.parameters()], losses


@pytest.mark.parametrize("name", sorted(_BUILD))
def test_hooks_on_the_wrapper_and_on_the_base_fire_once_per_step(name: str) -> None:
    calls: list[str] = []

    def register(opt: torch.optim.Optimizer) -> None:
        opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
        opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
        opt.base_optimizer.register_step_post_hook(lambda o, a, k: calls.append("base"))

    hooked, hooked_losses = _run(name, register)
    assert calls == ["pre", "base", "post"] * 3
    plain, plain_losses = _run(name)  # the unobserved path takes the same steps
    assert all(torch.equal(a, b) for a, b in zip(hooked, plain))
    assert all(torch.equal(a, b) for a, b in zip(hooked_losses, plain_losses))


def test_a_pre_hook_can_replace_the_step_arguments() -> None:
    net = _net()
    opt = _BUILD["BAR"](net)
    closure = _closure(net)
    seen: list[bool] = []

    def swap(o, args, kwargs):  # type: ignore[no-untyped-def]
        def counted() -> torch.Tensor:
            seen.append(True)
            return closure()

        return (args[0],), {"closure": counted}

    opt.register_step_pre_hook(swap)
    loss = opt.step(None)  # without the hook this is a closure-less step with no gradients
    assert seen == [True] and loss is not None and opt.bar_step == 1


def test_global_hooks_fire_on_the_wrapper_and_the_base() -> None:
    seen: list[str] = []
    handle = register_optimizer_step_post_hook(lambda o, a, k: seen.append(type(o).__name__))
    try:
        _run("BAR")
    finally:
        handle.remove()
    assert seen == ["AdamW", "BAR"] * 3


def test_the_profiler_sees_the_step_labels() -> None:
    net = _net()
    opt = _BUILD["BAR"](net)
    closure = _closure(net)
    opt.step(closure)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step(closure)
    names = {e.name for e in prof.events()}
    assert {"Optimizer.step#BAR.step", "Optimizer.step#AdamW.step"} <= names


def test_a_base_step_decorated_or_replaced_after_torch_wrapped_it_still_runs() -> None:
    class CountedSGD(torch.optim.SGD):
        pass

    net = _net()
    opt = BAR(net.parameters(), CountedSGD, mu0=0.5, model=net, lr=0.1)
    wrapped = CountedSGD.step  # torch's wrapper, installed at construction
    calls: list[str] = []

    @functools.wraps(wrapped)  # copies torch's attributes: it looks like the wrapper
    def decorated(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append("class")
        return wrapped(self, *args, **kwargs)

    CountedSGD.step = decorated  # type: ignore[method-assign]
    closure = _closure(net)
    opt.step(closure)
    base = opt.base_optimizer
    base.step = lambda *a, **k: (calls.append("instance"), decorated(base, *a, **k))[1]
    opt.step(closure)
    assert calls == ["class", "instance", "class"] and opt.bar_step == 2


@pytest.mark.parametrize("hooked", [False, True])
@pytest.mark.parametrize("name", sorted(_BUILD))
def test_a_skipped_step_warns_at_the_caller_with_or_without_hooks(name: str, hooked: bool) -> None:
    net = _net()
    opt = _BUILD[name](net)
    if hooked:
        opt.register_step_post_hook(lambda o, a, k: None)
    calls: list[int] = []

    def closure() -> None:  # BAR: non-finite at w; SAM: finite at w, non-finite at w + e
        calls.append(1)
        scale = float("inf") if name == "BAR" or len(calls) == 2 else 1.0
        (net(torch.ones(2, 4)).sum() * scale).backward()

    w = [p.detach().clone() for p in net.parameters()]
    with pytest.warns(RuntimeWarning, match="non-finite") as record:
        opt.step(closure)
    assert [r.filename for r in record] == [__file__]
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), w))


def test_a_pre_hook_returning_something_else_is_refused() -> None:
    net = _net()
    opt = _BUILD["BAR"](net)
    opt.register_step_pre_hook(lambda o, a, k: "not a pair")
    with pytest.raises(RuntimeError, match="new_args, new_kwargs"):
        opt.step(_closure(net))
