"""The optimizers' bad-input catalogue: every hyperparameter checked before any
compute, at construction and when changed later; foreign state dicts refused;
exact restore when a base step raises."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sharpkit.balance import LoRALinear
from sharpkit.optim import ASAM, BAR, MSAM, SAM, DeltaSAM

F64 = torch.float64


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)


def _lora() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(LoRALinear(4, 4, rank=2, alpha=2.0, generator=g)).to(F64)
    with torch.no_grad():
        net[0].lora_B.normal_(0.0, 1.0, generator=g)
    return net


def _batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


def _ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _ce_none(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _mse(model, batch):
    return nn.functional.mse_loss(model(batch[0]), torch.zeros_like(model(batch[0])))


def _snapshot(model: nn.Module, opt) -> tuple[list[torch.Tensor], dict]:
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _unchanged(model: nn.Module, opt, snap) -> None:
    w, sd = snap
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), w)), "weights changed"
    now = opt.state_dict()
    assert now["param_groups"] == sd["param_groups"] or all(
        {k: v for k, v in g.items()} == {k: v for k, v in h.items()}
        for g, h in zip(now["param_groups"], sd["param_groups"])
    )
    for k, s in sd["state"].items():
        for key, v in s.items():
            assert torch.equal(torch.as_tensor(now["state"][k][key]), torch.as_tensor(v)), key


# -- BAR: the factor 1 - a_t eta_t must stay positive -----------------------------------


@pytest.mark.parametrize("mu0", [10.0, 20.0])
def test_bar_refuses_mu0_lr_at_least_one_at_construction(mu0: float) -> None:
    net = _lora()
    with pytest.raises(ValueError, match=r"mu0 \* lr"):
        BAR(net.parameters(), torch.optim.SGD, mu0=mu0, model=net, lr=0.1)
    with pytest.raises(ValueError, match=r"mu0 \* lr"):  # a group of its own, too
        BAR([{"params": list(net.parameters()), "lr": 1.0}], torch.optim.SGD, mu0=1.0,
            model=net, lr=0.1)  # fmt: skip


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
@pytest.mark.parametrize("how", ["param_groups", "scheduler", "load_state_dict"])
def test_bar_refuses_mu0_lr_raised_later_before_any_compute(how: str) -> None:
    net = _lora()
    x = _batch()[0]
    opt = BAR(net.parameters(), torch.optim.SGD, mu0=0.5, model=net, lr=0.1)
    opt.step(loss_fn=_mse, batch=(x,))
    if how == "param_groups":
        opt.param_groups[0]["lr"] = 2.0
    elif how == "scheduler":
        sched = torch.optim.lr_scheduler.MultiplicativeLR(opt, lambda e: 30.0)
        sched.step()  # lr 3.0: mu0 * lr = 1.5
    else:
        sd = opt.state_dict()
        sd["param_groups"][0]["mu0"] = 20.0
        snap = _snapshot(net, opt)
        with pytest.raises(ValueError, match=r"mu0 \* lr"):
            opt.load_state_dict(sd)
        _unchanged(net, opt, snap)
        return
    snap = _snapshot(net, opt)
    calls = {"n": 0}

    def counted(m, b):
        calls["n"] += 1
        return _mse(m, b)

    with pytest.raises(ValueError, match=r"mu0 \* lr"):
        opt.step(loss_fn=counted, batch=(x,))
    assert calls["n"] == 0  # refused before any compute
    w, _ = snap
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), w))


class _StepThenRaise(torch.optim.SGD):
    def step(self, closure=None):  # type: ignore[override]
        super().step(closure)
        raise RuntimeError("boom after the base step")


@pytest.mark.parametrize("mu0", [9.99999, 5.0, 0.3])
def test_bar_base_step_raising_after_scaling_restores_exactly(mu0: float) -> None:
    """mu0 * lr near 1 makes the y factor tiny: a division-based undo would lose
    digits (or divide by zero at 1); the transaction's copy restores bit for bit."""
    net = _lora()
    x = _batch()[0]
    opt = BAR(net.parameters(), _StepThenRaise, mu0=mu0, model=net, lr=0.1, momentum=0.9)
    w = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(loss_fn=_mse, batch=(x,))
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), w))
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert not opt.state and opt.bar_step == 0  # no momentum buffer left behind


# -- every hyperparameter re-checked when changed later --------------------------------


@pytest.mark.parametrize(
    ("key", "value", "exc"),
    [
        ("rho", -0.1, ValueError),
        ("rho", float("nan"), ValueError),
        ("rho", "0.1", TypeError),
        ("xi", -1.0, ValueError),
        ("adaptive", 1, TypeError),
        ("lr", -0.1, ValueError),
        ("lr", float("inf"), ValueError),
    ],
)
def test_sam_group_edits_are_checked_at_step(key: str, value, exc) -> None:
    net = _net()
    opt = ASAM(net.parameters(), torch.optim.SGD, lr=0.1, model=net)
    opt.param_groups[0][key] = value
    w = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(exc, match=key):
        opt.step(loss_fn=_ce, batch=_batch())
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), w))


def test_msam_and_deltasam_group_edits_are_checked_at_step() -> None:
    for cls, loss in ((MSAM, _ce), (DeltaSAM, _ce_none)):
        net = _net()
        opt = cls(net.parameters(), torch.optim.SGD, model=net, lr=0.1)
        opt.param_groups[0]["rho"] = -1.0
        with pytest.raises(ValueError, match="rho"):
            opt.step(loss_fn=loss, batch=_batch())


# -- load_state_dict: other types, plain torch dicts, broken dicts ----------------------


def _sam(net):
    return SAM(net.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, model=net)


@pytest.mark.parametrize(
    ("source", "word"),
    [
        ("plain-sgd", "lacks"),
        ("asam", "saved by ASAM"),
        ("sam-adamw", "base optimizer AdamW"),
        ("msam", "saved by MSAM"),
        ("deltasam", "saved by DeltaSAM"),
        ("no-groups", "'state' and 'param_groups'"),
        ("not-a-dict", "expected an optimizer state dict"),
        ("group-count", "parameter groups"),
        ("bad-rho", "rho"),
    ],
)
def test_sam_load_state_dict_refuses_foreign_dicts(source: str, word: str) -> None:
    net = _net()
    opt = _sam(net)
    opt.step(loss_fn=_ce, batch=_batch())
    other = _net()
    sd = {
        "plain-sgd": lambda: torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9).state_dict(),
        "asam": lambda: ASAM(other.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9).state_dict(),
        "sam-adamw": lambda: SAM(other.parameters(), torch.optim.AdamW, lr=0.1).state_dict(),
        "msam": lambda: MSAM(other.parameters(), torch.optim.SGD, model=other, lr=0.1,
                             momentum=0.9).state_dict(),
        "deltasam": lambda: DeltaSAM(other.parameters(), torch.optim.SGD, model=other, lr=0.1,
                                     momentum=0.9).state_dict(),
        "no-groups": lambda: {"state": {}},
        "not-a-dict": lambda: [1, 2],
        "group-count": lambda: {**opt.state_dict(), "param_groups": []},
        "bad-rho": lambda: {**opt.state_dict(), "param_groups": [
            {**opt.state_dict()["param_groups"][0], "rho": -1.0}]},
    }[source]()  # fmt: skip
    snap = _snapshot(net, opt)
    with pytest.raises(ValueError, match=word):
        opt.load_state_dict(sd)
    _unchanged(net, opt, snap)
    opt.step(loss_fn=_ce, batch=_batch())  # still usable


def test_bar_load_state_dict_refuses_sam_and_bad_counter() -> None:
    net = _lora()
    opt = BAR(net.parameters(), torch.optim.SGD, mu0=0.5, model=net, lr=0.1)
    with pytest.raises(ValueError, match="saved by SAM"):
        opt.load_state_dict(SAM(_lora().parameters(), torch.optim.SGD, lr=0.1).state_dict())
    with pytest.raises(ValueError, match="bar"):
        opt.load_state_dict({**opt.state_dict(), "bar": {"step": -3}})
    with pytest.raises(ValueError, match="lacks"):
        opt.load_state_dict(torch.optim.SGD(_lora().parameters(), lr=0.1).state_dict())


def test_state_dicts_without_the_sharpkit_entry_still_load() -> None:
    """A checkpoint written before the entry existed (same keys otherwise) resumes."""
    net = _net()
    opt = _sam(net)
    opt.step(loss_fn=_ce, batch=_batch())
    sd = opt.state_dict()
    assert sd["sharpkit"] == {"optimizer": "SAM", "base_optimizer": "SGD"}
    old = copy.deepcopy({k: v for k, v in sd.items() if k != "sharpkit"})
    net2 = copy.deepcopy(net)
    opt2 = _sam(net2)
    opt2.load_state_dict(old)
    opt.step(loss_fn=_ce, batch=_batch())
    opt2.step(loss_fn=_ce, batch=_batch())
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters()))


# -- the step's own arguments -------------------------------------------------------------


def test_step_arguments_are_checked_before_compute() -> None:
    net = _net()
    sam = SAM(net.parameters(), torch.optim.SGD, lr=0.1)  # no model
    with pytest.raises(TypeError, match="model"):
        sam.step(loss_fn=_ce, batch=_batch())
    sam = _sam(net)
    with pytest.raises(TypeError, match="not both"):
        sam.step(lambda: None, loss_fn=_ce, batch=_batch())
    with pytest.raises(TypeError, match="batch"):
        sam.step(loss_fn=_ce)
    with pytest.raises(TypeError, match="closure"):
        sam.step(3)
    msam = MSAM(net.parameters(), torch.optim.SGD, model=net, lr=0.1)
    with pytest.raises(TypeError, match="closure is not accepted"):
        msam.step(lambda: _ce(net, _batch()).backward())
    with pytest.raises(ValueError, match="micro_batches"):
        msam.step(loss_fn=_ce, batch=_batch(2))


def test_settings_kept_as_attributes_are_checked_at_step() -> None:
    net = _net()
    cases = [
        (DeltaSAM(net.parameters(), torch.optim.SGD, model=net, lr=0.1), "probes", 0, _ce_none),
        (DeltaSAM(net.parameters(), torch.optim.SGD, model=net, lr=0.1), "mode", "x", _ce_none),
        (MSAM(net.parameters(), torch.optim.SGD, model=net, lr=0.1), "micro_batches", 0, _ce),
        (MSAM(net.parameters(), torch.optim.SGD, model=net, lr=0.1), "path", "fast", _ce),
    ]
    for opt, attr, value, loss in cases:
        setattr(opt, attr, value)
        w = [p.detach().clone() for p in net.parameters()]
        with pytest.raises(ValueError, match=attr):
            opt.step(loss_fn=loss, batch=_batch())
        assert all(torch.equal(a, b) for a, b in zip(net.parameters(), w))
    lora = _lora()
    bar = BAR(lora.parameters(), torch.optim.SGD, mu0=0.5, model=lora, lr=0.1)
    bar.schedule = "exponential"
    with pytest.raises(ValueError, match="schedule"):
        bar.step(loss_fn=_mse, batch=(_batch()[0],))


def test_deltasam_refuses_a_bad_generator_state() -> None:
    net = _net()
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, model=net, mode="probe", lr=0.1)
    opt.step(loss_fn=_ce_none, batch=_batch())
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="delta_sam_generator"):
        opt.load_state_dict({**sd, "delta_sam_generator": torch.zeros(3)})
    opt.load_state_dict(sd)  # the real one loads


class _RebindsStateThenRaises(torch.optim.Optimizer):
    """A base optimizer whose step mutates one state tensor in place, rebinds another
    to a new tensor object, changes a plain value, adds a key and a new parameter's
    state, and then raises: every way a step can change ``state``."""

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})
        self.armed = False

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        ps = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        for p in ps[:-1]:
            s = self.state[p]
            if "acc" not in s:
                s.update(acc=torch.zeros_like(p), other=torch.ones(()), count=0)
            s["acc"].add_(p.grad)  # in place
            s["other"] = s["other"] * 2.0  # a new tensor object
            s["count"] += 1  # a plain value
            p.add_(p.grad, alpha=-self.param_groups[0]["lr"])
        if self.armed:
            self.state[ps[0]]["extra"] = torch.ones(1)
            self.state[ps[-1]]["acc"] = torch.zeros_like(ps[-1])  # a parameter with no state yet
            raise RuntimeError("boom after changing the state")


@pytest.mark.parametrize("make", ["SAM", "BAR"])
def test_a_raising_base_step_restores_every_kind_of_state_change(make: str) -> None:
    net = _lora()
    x = _batch()[0]
    cls = SAM if make == "SAM" else BAR
    kw = {"rho": 0.05} if make == "SAM" else {"mu0": 0.5}
    opt = cls(net.parameters(), _RebindsStateThenRaises, model=net, lr=0.1, **kw)
    for _ in range(2):
        opt.step(loss_fn=_mse, batch=(x,))
    acc_objects = {id(p): s["acc"] for p, s in opt.state.items()}
    before = {
        id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
        for p, s in opt.state.items()
    }
    w = [p.detach().clone() for p in net.parameters()]
    opt.base_optimizer.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(loss_fn=_mse, batch=(x,))
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), w))
    after = {id(p): s for p, s in opt.state.items()}
    assert after.keys() == before.keys()  # the new parameter's state is gone
    for pid, s in before.items():
        assert after[pid].keys() == s.keys()  # the added key is gone
        for k, v in s.items():
            got = after[pid][k]
            assert torch.equal(got, v) if torch.is_tensor(v) else got == v, (k, got, v)
        assert after[pid]["acc"] is acc_objects[pid]  # restored into the same tensor
    opt.base_optimizer.armed = False
    opt.step(loss_fn=_mse, batch=(x,))  # and the optimizer goes on from there
    assert all(s["count"] == 3 for s in opt.state.values())
