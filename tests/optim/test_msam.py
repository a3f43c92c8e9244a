"""mSAM against independent references: SAM, per-example SAM, an explicit
size-weighted re-derivation, and its own two execution paths."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from sharpkit.optim import SAM
from sharpkit.optim.msam import MSAM, VectorisationFallbackWarning

F64 = torch.float64


def mlp(seed: int = 0, norm: type[nn.Module] | None = None) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(5, 12)]
    if norm is not None:
        layers.append(norm(12))
    layers += [nn.Tanh(), nn.Linear(12, 3)]
    return nn.Sequential(*layers).to(F64)


def data(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


def ce(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def reference_msam_step(model: nn.Module, pieces, rho: float, lr: float) -> None:
    """One mSAM step with SGD, re-derived with plain autograd on a copy per piece.

    G = sum_j (n_j / n) grad L_j(w + rho g_j / ||g_j||), w <- w - lr G.
    """
    n = sum(len(p[1]) for p in pieces)
    w = params_of(model)
    G = [torch.zeros_like(t) for t in w]
    for xb, yb in pieces:
        m = copy.deepcopy(model)
        g = torch.autograd.grad(ce(m, (xb, yb)), list(m.parameters()))
        norm = torch.sqrt(sum((t**2).sum() for t in g))
        with torch.no_grad():
            for p, gi in zip(m.parameters(), g):
                p.add_(rho * gi / norm)
        gp = torch.autograd.grad(ce(m, (xb, yb)), list(m.parameters()))
        for acc, t in zip(G, gp):
            acc.add_(t, alpha=len(yb) / n)
    with torch.no_grad():
        for p, gi in zip(model.parameters(), G):
            p.sub_(lr * gi)


# -- m = 1 is SAM, bit for bit ---------------------------------------------------------


@pytest.mark.parametrize("path", ["auto", "vectorised", "sequential"])
def test_one_micro_batch_is_sam_exactly(path: str) -> None:
    a, b = mlp(), mlp()
    batch = data(24)
    kw = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}
    opt = MSAM(a.parameters(), torch.optim.SGD, rho=0.07, micro_batches=1, model=a, path=path, **kw)
    ref = SAM(b.parameters(), torch.optim.SGD, rho=0.07, **kw)

    def closure():
        loss = ce(b, batch)
        loss.backward()
        return loss

    for _ in range(4):
        assert torch.equal(opt.step(loss_fn=ce, batch=batch), ref.step(closure).detach())
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# -- m = n is per-example SAM -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["vectorised", "sequential"])
def test_micro_batches_of_one_example_are_per_example_sam(path: str) -> None:
    n, rho, lr = 8, 0.1, 0.2
    a, ref = mlp(), mlp()
    x, y = data(n)
    opt = MSAM(a.parameters(), torch.optim.SGD, rho=rho, micro_batches=n, model=a, path=path, lr=lr)
    for _ in range(3):
        opt.step(loss_fn=ce, batch=(x, y))
        reference_msam_step(ref, [(x[i : i + 1], y[i : i + 1]) for i in range(n)], rho, lr)
    for p, q in zip(a.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


# -- a batch not divisible by m ----------------------------------------------------------------


@pytest.mark.parametrize("path", ["vectorised", "sequential"])
def test_non_divisible_batch_is_size_weighted(path: str) -> None:
    """n = 10, m = 4: torch.tensor_split sizes 3, 3, 2, 2, weights n_j / n."""
    a, ref = mlp(), mlp()
    x, y = data(10)
    opt = MSAM(
        a.parameters(), torch.optim.SGD, rho=0.1, micro_batches=4, model=a, path=path, lr=0.2
    )
    bounds = [(0, 3), (3, 6), (6, 8), (8, 10)]
    loss = opt.step(loss_fn=ce, batch=(x, y))
    with torch.no_grad():
        expected_loss = sum((e - s) / 10 * ce(ref, (x[s:e], y[s:e])) for s, e in bounds)
    reference_msam_step(ref, [(x[s:e], y[s:e]) for s, e in bounds], 0.1, 0.2)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-14)
    for p, q in zip(a.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("path", ["vectorised", "sequential"])
def test_rho_zero_gives_the_full_batch_gradient(path: str) -> None:
    """The size weighting makes rho = 0 the full-batch gradient of a per-example loss."""
    a, ref = mlp(), mlp()
    batch = data(11)
    opt = MSAM(
        a.parameters(), torch.optim.SGD, rho=0.0, micro_batches=3, model=a, path=path, lr=0.3
    )
    opt.step(loss_fn=ce, batch=batch)
    g = torch.autograd.grad(ce(ref, batch), list(ref.parameters()))
    for p, q, gi in zip(a.parameters(), ref.parameters(), g):
        torch.testing.assert_close(p, q.detach() - 0.3 * gi, rtol=0, atol=1e-14)


def test_more_micro_batches_than_examples_raises() -> None:
    model = mlp()
    opt = MSAM(model.parameters(), torch.optim.SGD, micro_batches=9, model=model, lr=0.1)
    with pytest.raises(ValueError, match="micro_batches"):
        opt.step(loss_fn=ce, batch=data(8))


# -- the two paths agree ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [24, 22], ids=["divisible", "not-divisible"])
def test_vectorised_equals_sequential(n: int) -> None:
    """float64, 1e-8: momentum, two groups with their own rho, a frozen parameter,
    a dict batch with a non-tensor leaf."""
    a, b = mlp(), mlp()
    for model in (a, b):
        model[0].bias.requires_grad_(False)

    def groups(model):
        return [
            {"params": [model[0].weight]},
            {"params": list(model[2].parameters()), "rho": 0.2, "lr": 0.05},
        ]

    x, y = data(n)
    batch = {"x": x, "y": y, "temperature": 2.0}

    def loss_fn(model, batch):
        return nn.functional.cross_entropy(model(batch["x"]) / batch["temperature"], batch["y"])

    kw = {"lr": 0.1, "momentum": 0.9}
    va = MSAM(
        groups(a), torch.optim.SGD, rho=0.1, micro_batches=4, model=a, path="vectorised", **kw
    )
    sb = MSAM(
        groups(b), torch.optim.SGD, rho=0.1, micro_batches=4, model=b, path="sequential", **kw
    )
    for _ in range(5):
        la, lb = va.step(loss_fn=loss_fn, batch=batch), sb.step(loss_fn=loss_fn, batch=batch)
        torch.testing.assert_close(la, lb, rtol=0, atol=1e-8)
    assert va.last_path == "vectorised" and sb.last_path == "sequential"
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-8)
    assert torch.equal(a[0].bias, mlp()[0].bias)  # frozen


def test_tied_weights_move_together_on_both_paths() -> None:
    """One weight under two names (an autoencoder-style tie): the vectorised path
    must perturb both uses of it, as the sequential path and the reference do."""

    def tied(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)
        )
        model[2].weight = model[0].weight
        return model.to(F64)

    a, b, ref = tied(), tied(), tied()
    assert len(list(a.parameters())) == len(list(a.named_parameters(remove_duplicate=False))) - 1
    batch = data(12)
    va = MSAM(a.parameters(), torch.optim.SGD, rho=0.1, micro_batches=3, model=a,
              path="vectorised", lr=0.1)  # fmt: skip
    sb = MSAM(b.parameters(), torch.optim.SGD, rho=0.1, micro_batches=3, model=b,
              path="sequential", lr=0.1)  # fmt: skip
    for _ in range(3):
        va.step(loss_fn=ce, batch=batch)
        sb.step(loss_fn=ce, batch=batch)
        pieces = list(zip(batch[0].tensor_split(3), batch[1].tensor_split(3)))
        reference_msam_step(ref, pieces, rho=0.1, lr=0.1)
    assert va.last_path == "vectorised"
    for p, q, r in zip(a.parameters(), b.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)
        torch.testing.assert_close(p, r, rtol=0, atol=1e-10)
    assert a[2].weight is a[0].weight


def test_vectorised_is_the_default() -> None:
    model = mlp(norm=nn.LayerNorm)
    opt = MSAM(model.parameters(), torch.optim.SGD, micro_batches=4, model=model, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(loss_fn=ce, batch=data(16))
    assert opt.last_path == "vectorised" and opt.fallback_reason is None


# -- falling back, and forcing a path ---------------------------------------------------------------


def test_batchnorm_falls_back_once_with_reason() -> None:
    a, b = mlp(norm=nn.BatchNorm1d), mlp(norm=nn.BatchNorm1d)
    batch = data(16)
    auto = MSAM(a.parameters(), torch.optim.SGD, rho=0.1, micro_batches=4, model=a, lr=0.1)
    seq = MSAM(b.parameters(), torch.optim.SGD, rho=0.1, micro_batches=4, model=b, lr=0.1,
               path="sequential")  # fmt: skip
    with pytest.warns(VectorisationFallbackWarning, match="BatchNorm"):
        auto.step(loss_fn=ce, batch=batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        auto.step(loss_fn=ce, batch=batch)
    seq.step(loss_fn=ce, batch=batch)
    seq.step(loss_fn=ce, batch=batch)
    assert auto.last_path == "sequential"
    for p, q in zip([*a.parameters(), *a.buffers()], [*b.parameters(), *b.buffers()]):
        assert torch.equal(p, q)


def test_batchnorm_statistics_come_from_the_clean_micro_batch_forwards() -> None:
    """Distinct micro-batches (the contract suite uses a repeated block): the running
    statistics after a step are those of the 4 clean forwards, in order."""
    model = mlp(norm=nn.BatchNorm1d)
    ref = copy.deepcopy(model)
    x, y = data(16)
    opt = MSAM(model.parameters(), torch.optim.SGD, rho=0.5, micro_batches=4, model=model,
               lr=0.1, momentum=0.9, path="sequential")  # fmt: skip
    opt.step(loss_fn=ce, batch=(x, y))
    with torch.no_grad():
        for xs in torch.tensor_split(x, 4):
            ref(xs)
    for (name, b), r in zip(model.named_buffers(), ref.buffers()):
        assert torch.equal(b, r), name


def test_forcing_vectorised_on_batchnorm_names_path() -> None:
    model = mlp(norm=nn.BatchNorm1d)
    opt = MSAM(model.parameters(), torch.optim.SGD, micro_batches=2, model=model,
               path="vectorised", lr=0.1)  # fmt: skip
    with pytest.raises(ValueError, match="path"):
        opt.step(loss_fn=ce, batch=data(8))


class DataDependent(nn.Module):
    """Python control flow on a tensor value: vmap cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(5, 3).to(F64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x)
        if out.sum() > 0:
            return out * 2
        return out


def test_vmap_failure_falls_back_to_sequential() -> None:
    a, b = DataDependent(), DataDependent()
    batch = data(12)
    auto = MSAM(a.parameters(), torch.optim.SGD, micro_batches=3, model=a, lr=0.1)
    seq = MSAM(b.parameters(), torch.optim.SGD, micro_batches=3, model=b, lr=0.1,
               path="sequential")  # fmt: skip
    with pytest.warns(VectorisationFallbackWarning, match="vmap"):
        auto.step(loss_fn=ce, batch=batch)
    seq.step(loss_fn=ce, batch=batch)
    assert auto.fallback_reason is not None and auto.last_path == "sequential"
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    c = DataDependent()
    forced = MSAM(c.parameters(), torch.optim.SGD, micro_batches=3, model=c, path="vectorised",
                  lr=0.1)  # fmt: skip
    before = params_of(c)
    with pytest.raises(RuntimeError):
        forced.step(loss_fn=ce, batch=batch)
    for p, q in zip(c.parameters(), before):
        assert torch.equal(p, q)


def test_dropout_runs_vectorised() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.Dropout(0.2), nn.Tanh(), nn.Linear(12, 3)).to(F64)
    opt = MSAM(model.parameters(), torch.optim.SGD, micro_batches=4, model=model, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(loss_fn=ce, batch=data(16))
    assert opt.last_path == "vectorised"


# -- bad input ------------------------------------------------------------------------------------------


def test_bad_input_names_the_argument() -> None:
    model = mlp()
    with pytest.raises(TypeError, match="model"):
        MSAM(model.parameters(), torch.optim.SGD, micro_batches=2, model=None, lr=0.1)  # type: ignore[arg-type]
    opt = MSAM(model.parameters(), torch.optim.SGD, micro_batches=2, model=model, lr=0.1)
    with pytest.raises(TypeError, match="loss_fn"):
        opt.step()
    with pytest.raises(TypeError, match="step"):
        opt.first_step()

    def per_example(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")

    for path in ("vectorised", "sequential"):
        opt = MSAM(model.parameters(), torch.optim.SGD, micro_batches=2, model=model, lr=0.1,
                   path=path)  # fmt: skip
        before = params_of(model)
        with pytest.raises(ValueError, match="loss_fn"):
            opt.step(loss_fn=per_example, batch=data(8))
        for p, q in zip(model.parameters(), before):
            assert torch.equal(p, q)
