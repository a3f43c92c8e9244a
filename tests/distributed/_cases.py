"""Models, data and single-process references shared by the distributed workers and tests."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

N_EXAMPLES = 53  # not divisible by 2 or 3: uneven shards
BATCH = 8
GLOBAL_BATCH = 24  # SAM steps: divisible by 2 and 3, so DDP's mean of means is the mean
STEPS = 3
KINDS = ("sam", "asam", "bar")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def lora_mlp() -> nn.Module:
    from sharpkit.balance import add_lora

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    add_lora(net, ["0", "2"], rank=2, alpha=2.0, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
    return net.double()


def data(n: int = N_EXAMPLES) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def shard(t: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Contiguous, uneven shards (as many examples as possible, none repeated)."""
    return torch.tensor_split(t, world_size)[rank]


def batches(x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(torch.split(x, BATCH), torch.split(y, BATCH)))


def curvature_estimates(op: Any) -> dict[str, Any]:
    from sharpkit.curvature import eigenvalues, frobenius_norm_sq, spectral_density, trace

    v = torch.linspace(-1.0, 1.0, op.dim, dtype=torch.float64)
    top = eigenvalues(op, k=3, tol=1e-10, seed=0)
    hutch = trace(op, num_samples=30, seed=1)
    hpp = trace(op, method="hutch++", num_samples=30, seed=2)
    fro = frobenius_norm_sq(op, num_samples=10, seed=3)
    slq = spectral_density(op, runs=2, steps=15, seed=4)
    return {
        "hv": op.matvec(v),
        "eigenvalues": top.eigenvalues,
        "converged": torch.tensor(bool(top.converged)),
        "hutchinson": torch.tensor(hutch.estimate),
        "hutchpp": torch.tensor(hpp.estimate),
        "frobenius": torch.tensor(fro.estimate),
        "slq_nodes": slq.nodes,
        "slq_weights": slq.weights,
        "examples": torch.tensor(op.num_examples),
    }


def make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    from sharpkit.optim import BAR, SAM

    if kind == "sam":
        return SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    if kind == "asam":
        return SAM(model.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, lr=0.1)
    if kind == "bar":
        return BAR(
            [p for p in model.parameters() if p.requires_grad],
            torch.optim.SGD,
            variant="nbar",
            mu0=0.5,
            model=model,
            lr=0.1,
        )
    raise ValueError(kind)


def train(kind: str, rank: int = 0, world_size: int = 1, ddp: bool = False) -> dict[str, Any]:
    """``STEPS`` steps of ``kind`` on global batches of ``GLOBAL_BATCH``; each rank sees
    its equal slice. Returns the final parameters and the losses."""
    net = lora_mlp() if kind == "bar" else mlp()
    model: nn.Module = net
    if ddp:
        model = nn.parallel.DistributedDataParallel(net)
    opt = make_optimizer(kind, net)
    x, y = data(GLOBAL_BATCH * STEPS)
    losses = []
    for s in range(STEPS):
        xb = x[s * GLOBAL_BATCH : (s + 1) * GLOBAL_BATCH]
        yb = y[s * GLOBAL_BATCH : (s + 1) * GLOBAL_BATCH]
        xb, yb = shard(xb, rank, world_size), shard(yb, rank, world_size)

        def closure(xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> torch.Tensor:
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        losses.append(opt.step(closure).detach().item())
    return {"params": {n: p.detach().clone() for n, p in net.named_parameters()}, "losses": losses}


LOCAL_MICRO_BATCHES = 2
BATCH_DRIVEN = ("msam-vectorised", "msam-sequential", "deltasam")


def _batch_driven(kind: str, net: nn.Module, model: nn.Module, micro_batches: int):
    from sharpkit.optim import MSAM, DeltaSAM

    if kind.startswith("msam"):
        path = kind.split("-")[1]
        return MSAM(
            net.parameters(),
            torch.optim.SGD,
            rho=0.05,
            micro_batches=micro_batches,
            model=model,
            path=path,
            lr=0.1,
            momentum=0.9,
        )
    return DeltaSAM(net.parameters(), torch.optim.SGD, rho=0.05, model=model, lr=0.1)


def train_batch_driven(kind: str, rank: int = 0, world_size: int = 1, ddp: bool = False):
    """``STEPS`` data-parallel steps (``ddp``) or, in one process, the reference: mSAM with
    ``world_size * LOCAL_MICRO_BATCHES`` micro-batches on the global batch; for delta-SAM
    the example-weighted mean of each shard's own delta-SAM direction."""
    net = mlp()
    x, y = data(GLOBAL_BATCH * STEPS)
    loss_fn = nn.CrossEntropyLoss(reduction="none" if kind == "deltasam" else "mean")
    if ddp:
        opt = _batch_driven(
            kind, net, nn.parallel.DistributedDataParallel(net), LOCAL_MICRO_BATCHES
        )
    elif kind.startswith("msam"):
        opt = _batch_driven(kind, net, net, world_size * LOCAL_MICRO_BATCHES)
    losses = []
    for s in range(STEPS):
        xb = x[s * GLOBAL_BATCH : (s + 1) * GLOBAL_BATCH]
        yb = y[s * GLOBAL_BATCH : (s + 1) * GLOBAL_BATCH]
        if ddp:
            xb, yb = shard(xb, rank, world_size), shard(yb, rank, world_size)
            losses.append(opt.step(loss_fn=loss_fn, batch=(xb, yb)).item())
        elif kind.startswith("msam"):
            losses.append(opt.step(loss_fn=loss_fn, batch=(xb, yb)).item())
        else:
            losses.append(_deltasam_reference_step(net, loss_fn, xb, yb, world_size))
    return {"params": {n: p.detach().clone() for n, p in net.named_parameters()}, "losses": losses}


def _deltasam_reference_step(net, loss_fn, xb, yb, world_size) -> float:
    """One SGD(lr=0.1) step along sum_r (n_r/N) G_r, each G_r delta-SAM's direction on
    shard r alone (read off a unit-lr SGD step of a copy)."""
    import copy

    from sharpkit.optim import DeltaSAM

    direction = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    loss = 0.0
    for r in range(world_size):
        xs, ys = shard(xb, r, world_size), shard(yb, r, world_size)
        twin = copy.deepcopy(net)
        opt = DeltaSAM(twin.parameters(), torch.optim.SGD, rho=0.05, model=twin, lr=1.0)
        loss += opt.step(loss_fn=loss_fn, batch=(xs, ys)).item() * len(xs) / len(xb)
        with torch.no_grad():
            for (n, p), q in zip(net.named_parameters(), twin.parameters()):
                direction[n] += (p - q) * (len(xs) / len(xb))
    with torch.no_grad():
        for n, p in net.named_parameters():
            p -= 0.1 * direction[n]
    return loss


SHARPNESS_METRICS = (
    "lambda_max",
    "trace",
    "worst_case",
    "worst_case_adaptive_inf",
    "average_case_adaptive",
    "pac_bayes",
    "fisher_rao",
    "epsilon_sharpness",
)
SHARPNESS_OPTIONS = {
    "lambda_max": {"tol": 1e-10},
    "trace": {"num_samples": 12},
    "worst_case": {"steps": 6, "restarts": 2, "m": 5},  # random restarts, batches re-split
    "worst_case_adaptive_inf": {"steps": 5},
    "average_case_adaptive": {"samples": 6},
    "pac_bayes": {"samples": 2, "rtol": 0.2, "target": "loss", "max_drop": 0.05},
    "fisher_rao": {"fisher": "model"},  # labels sampled per batch
    "epsilon_sharpness": {"steps": 5, "restarts": 2},
}


def shard_batches(rank: int, world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank ``rank``'s batches: its uneven shard of the 53 examples, in batches of 8."""
    x, y = data()
    return batches(shard(x, rank, world_size), shard(y, rank, world_size))


def sharpness(batch_list: list[Any], process_group: Any = None) -> dict[str, Any]:
    """The report of :data:`SHARPNESS_METRICS` on ``batch_list`` (float64), as tensors."""
    from sharpkit.sharpness import fisher_rao_norm, measure_sharpness

    rep = measure_sharpness(
        mlp(),
        nn.CrossEntropyLoss(),
        batch_list,
        SHARPNESS_METRICS,
        options=SHARPNESS_OPTIONS,
        seed=3,
        process_group=process_group,
    )
    assert not rep.failures, rep.failures
    out: dict[str, Any] = {
        "base": torch.tensor([rep.base["loss"], rep.base["accuracy"]], dtype=torch.float64),
        "examples": torch.tensor(rep.protocol.examples),
        "batches": torch.tensor(rep.protocol.batches),
    }
    for name, r in rep.metrics.items():
        out[name] = torch.tensor(
            [r.value, math.nan if r.stderr is None else r.stderr], dtype=torch.float64
        )
        out[name + ".cost"] = torch.tensor(list(dataclasses.astuple(r.cost)))
    per_batch = rep.metrics["worst_case"].details["per_batch"]
    out["worst_case.per_batch"] = torch.tensor(per_batch, dtype=torch.float64)
    # one metric through its own function: the empirical Fisher-Rao norm
    fr = fisher_rao_norm(mlp(), nn.CrossEntropyLoss(), batch_list, process_group=process_group)
    out["fisher_rao_empirical"] = torch.tensor([fr.value, fr.stderr], dtype=torch.float64)
    return out


# -- robustness under DDP: BatchNorm, non-finite skips, exceptions, resume ---------------
def bn_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3)).double()


def _global_batch(s: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data(GLOBAL_BATCH * STEPS)
    return x[s * GLOBAL_BATCH : (s + 1) * GLOBAL_BATCH], y[
        s * GLOBAL_BATCH : (s + 1) * GLOBAL_BATCH
    ]


def _snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def train_bn(
    rank: int = 0, world_size: int = 1, ddp: bool = False, model_arg: bool = True
) -> dict[str, Any]:
    """SAM on a BatchNorm MLP. Under DDP each rank normalises with its own shard's batch
    statistics and DDP broadcasts rank 0's buffers at every forward. The one-process
    reference ("ghost batches"): the mean of the shards' losses, each shard normalised
    on its own, with the running statistics of shard 0's pass."""
    from sharpkit.optim import SAM

    net = bn_mlp()
    model: nn.Module = nn.parallel.DistributedDataParallel(net) if ddp else net
    opt = SAM(
        net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
        model=model if model_arg else None,
    )  # fmt: skip
    bn = net[1]
    for s in range(STEPS):
        xb, yb = _global_batch(s)
        if ddp:
            xs, ys = shard(xb, rank, world_size), shard(yb, rank, world_size)

            def closure(xs: torch.Tensor = xs, ys: torch.Tensor = ys) -> torch.Tensor:
                loss = nn.functional.cross_entropy(model(xs), ys)
                loss.backward()
                return loss
        else:

            def closure(xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> torch.Tensor:
                losses, after_first = [], None
                for r in range(world_size):
                    xs, ys = shard(xb, r, world_size), shard(yb, r, world_size)
                    losses.append(nn.functional.cross_entropy(net(xs), ys))
                    if r == 0:
                        after_first = [b.clone() for b in bn.buffers()]
                loss = torch.stack(losses).mean()
                loss.backward()
                with torch.no_grad():  # after the backward, which reads the buffers' versions
                    for b, a in zip(bn.buffers(), after_first):
                        b.copy_(a)
                return loss

        opt.step(closure)
    return {"state": _snapshot(net)}


def nonfinite(kind: str, rank: int = 0, world_size: int = 1, ddp: bool = False) -> dict[str, Any]:
    """``STEPS`` steps where rank 1's shard of step 1 holds a NaN (``ddp``); the
    one-process reference takes steps 0 and 2 only (step 1 skipped)."""
    import warnings

    net = mlp()
    if kind == "sam":
        model: nn.Module = nn.parallel.DistributedDataParallel(net) if ddp else net
        opt = make_optimizer("sam", net)
    else:
        model = nn.parallel.DistributedDataParallel(net) if ddp else net
        micro = LOCAL_MICRO_BATCHES if ddp else world_size * LOCAL_MICRO_BATCHES
        opt = _batch_driven(kind, net, model, micro)
    skipped = []
    for s in range(STEPS):
        if not ddp and s == 1:
            continue
        xb, yb = _global_batch(s)
        if ddp:
            xb, yb = shard(xb, rank, world_size).clone(), shard(yb, rank, world_size)
            if s == 1 and rank == 1:
                xb[0, 0] = math.nan
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if kind == "sam":

                def closure(xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> torch.Tensor:
                    loss = nn.functional.cross_entropy(model(xb), yb)
                    loss.backward()
                    return loss

                opt.step(closure)
            else:
                opt.step(loss_fn=nn.CrossEntropyLoss(), batch=(xb, yb))
        skipped.append(any("skipped" in str(w.message) for w in caught))
    return {
        "params": {n: p.detach().clone() for n, p in net.named_parameters()},
        "skipped": torch.tensor(skipped),
    }


RESUME_KINDS = ("sam", "bar", "msam-vectorised")


def _build(kind: str, ddp: bool):
    net = lora_mlp() if kind == "bar" else mlp()
    model: nn.Module = nn.parallel.DistributedDataParallel(net) if ddp else net
    if kind.startswith("msam"):
        return net, model, _batch_driven(kind, net, model, LOCAL_MICRO_BATCHES)
    return net, model, make_optimizer(kind, net)


def _step(kind: str, model: nn.Module, opt: Any, s: int, rank: int, world_size: int) -> None:
    xb, yb = _global_batch(s)
    xs, ys = shard(xb, rank, world_size), shard(yb, rank, world_size)
    if kind.startswith("msam"):
        opt.step(loss_fn=nn.CrossEntropyLoss(), batch=(xs, ys))
        return

    def closure() -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(xs), ys)
        loss.backward()
        return loss

    opt.step(closure)


def resume(kind: str, rank: int, world_size: int) -> dict[str, Any]:
    """Under DDP: ``STEPS`` uninterrupted steps, and a run stopped after step 0 whose
    model and optimizer state dicts (through bytes, as in a file) restart fresh
    objects for the remaining steps."""
    import io

    net, model, opt = _build(kind, ddp=True)
    for s in range(STEPS):
        _step(kind, model, opt, s, rank, world_size)
    straight = {n: p.detach().clone() for n, p in net.named_parameters()}

    net, model, opt = _build(kind, ddp=True)
    _step(kind, model, opt, 0, rank, world_size)
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    del net, model, opt
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    net, model, opt = _build(kind, ddp=False)  # fresh weights, overwritten by the load
    net.load_state_dict(saved["model"])
    model = nn.parallel.DistributedDataParallel(net)
    if kind.startswith("msam"):
        opt = _batch_driven(kind, net, model, LOCAL_MICRO_BATCHES)
    else:
        opt = make_optimizer(kind, net)
    opt.load_state_dict(saved["opt"])
    for s in range(1, STEPS):
        _step(kind, model, opt, s, rank, world_size)
    resumed = {n: p.detach().clone() for n, p in net.named_parameters()}
    return {"straight": straight, "resumed": resumed}


def exception_mid_step(kind: str, rank: int, world_size: int) -> dict[str, Any]:
    """Under DDP: one step of ``kind`` (``"sam"`` or data-parallel ``"msam-vectorised"``),
    then a step that raises on rank 1 (SAM: in the closure at the perturbed pass, while
    the other ranks wait in that pass's gradient all-reduce; mSAM: in its local pass,
    while the others wait in the step's all-reduce). Rank 1 records its state and
    leaves (its process ends, as a failing rank's would); the others' collective then
    fails. Every rank's weights, momentum and flags must be those after the first step."""
    net, model, opt = _build(kind, ddp=True)
    _step(kind, model, opt, 0, rank, world_size)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in net.parameters()]
    xb, yb = _global_batch(1)
    xs, ys = shard(xb, rank, world_size), shard(yb, rank, world_size)
    calls = {"n": 0}
    fail_at = 2 if kind == "sam" else 1

    def loss_of(m: nn.Module, batch: Any) -> torch.Tensor:
        calls["n"] += 1
        if rank == 1 and calls["n"] == fail_at:
            raise RuntimeError("injected failure inside the step")
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    def closure() -> torch.Tensor:
        loss = loss_of(model, (xs, ys))
        loss.backward()
        return loss

    try:
        if kind == "sam":
            opt.step(closure)
        else:
            opt.step(loss_fn=loss_of, batch=(xs, ys))
        error = ""
    except Exception as err:  # rank 1: the injected error; the others: the broken group
        error = f"{type(err).__name__}: {err}"
    return {
        "error": error,
        "restored": torch.tensor(
            all(torch.equal(p, before[n]) for n, p in net.named_parameters())
            and all(
                torch.equal(opt.state[p]["momentum_buffer"], m)
                for p, m in zip(net.parameters(), momentum)
            )
        ),
        "perturbed": torch.tensor(opt.perturbed),
        "_leave": True,
    }


def train_bn_msam(rank: int = 0, world_size: int = 1, ddp: bool = False) -> dict[str, Any]:
    """Data-parallel mSAM (sequential path) on a BatchNorm MLP; in one process the
    reference: mSAM with ``world_size * LOCAL_MICRO_BATCHES`` micro-batches for the
    weights, and the running statistics of rank 0's micro-batches (the DDP convention:
    rank 0's buffers on every rank)."""
    import copy

    from sharpkit.optim import MSAM

    net = bn_mlp()
    model: nn.Module = nn.parallel.DistributedDataParallel(net) if ddp else net
    micro = LOCAL_MICRO_BATCHES if ddp else world_size * LOCAL_MICRO_BATCHES
    opt = MSAM(
        net.parameters(), torch.optim.SGD, rho=0.05, micro_batches=micro, model=model,
        path="sequential", lr=0.1, momentum=0.9,
    )  # fmt: skip
    loss_fn = nn.CrossEntropyLoss()
    for s in range(STEPS):
        xb, yb = _global_batch(s)
        if ddp:
            opt.step(
                loss_fn=loss_fn, batch=(shard(xb, rank, world_size), shard(yb, rank, world_size))
            )
            continue
        twin = copy.deepcopy(net)  # rank 0's clean micro-batch passes, in order, at w
        with torch.no_grad():
            for xm in torch.tensor_split(shard(xb, 0, world_size), LOCAL_MICRO_BATCHES):
                twin(xm)
        opt.step(loss_fn=loss_fn, batch=(xb, yb))
        with torch.no_grad():
            for b, t in zip(net.buffers(), twin.buffers()):
                b.copy_(t)
    return {"state": _snapshot(net)}


class MaskedMSE:
    """A token-mean-like loss: the mean of squared errors over the entries a 0/1 mask
    keeps, with ``batch_weight`` (the kept entries) as its own normalisation."""

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y, m = batch
        return (((model(x) - y) ** 2) * m).sum() / m.sum()

    def batch_weight(self, batch: Any) -> float:
        return float(batch[2].sum())


def masked_data(n: int = N_EXAMPLES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Regression data whose mask keeps an uneven number of the 3 outputs per example."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randn(n, 3, generator=g, dtype=torch.float64)
    m = (torch.rand(n, 3, generator=g) < torch.linspace(0.2, 0.9, n)[:, None]).double()
    m[:, 0] = 1.0  # every example keeps at least one entry
    return x, y, m


def masked_batches(x, y, m) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return list(zip(torch.split(x, BATCH), torch.split(y, BATCH), torch.split(m, BATCH)))
