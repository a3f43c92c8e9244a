"""The functional layer: selection, frozen evaluation, BatchNorm policy, batch trees, replay."""

from __future__ import annotations

import collections
from collections import UserDict

import pytest
import torch
from torch import nn

from sharpkit._batch import batch_size, move_batch, split_batch
from sharpkit._functional import (
    FrozenModel,
    FunctionalView,
    NotVectorisable,
    RandomState,
    batch_leaves,
    select_parameters,
    train_mode_batchnorm,
    tree_flatten,
)
from sharpkit.curvature import HessianOperator
from sharpkit.sharpness._objective import Objective

F64 = torch.float64
Pair = collections.namedtuple("Pair", ["x", "y"])


class Encoding(UserDict):
    """A Mapping that is not a dict (like transformers' BatchEncoding)."""


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))


# ---------------------------------------------------------------- selection
def test_select_parameters_forms_and_errors() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    model[1].bias.requires_grad_(False)
    assert select_parameters(model, None) == ["0.weight", "0.bias", "1.weight"]
    assert select_parameters(model, ["1.weight", "0.bias"]) == ["1.weight", "0.bias"]
    assert select_parameters(model, lambda n: n.startswith("0.")) == ["0.weight", "0.bias"]
    assert select_parameters(model, ["1.bias"], allow_frozen=True) == ["1.bias"]
    cases = [
        (["1.bias"], ValueError, "requires_grad=False"),
        (["nope"], ValueError, "no parameter named 'nope'"),
        (["0.bias", "0.bias"], ValueError, "listed twice"),
        ([], ValueError, "list of parameter names is empty"),
        (lambda n: False, ValueError, "predicate selected no parameter"),
        ([3], TypeError, "expected parameter names"),
        ("0.bias", TypeError, "expected None, a list"),
    ]
    for params, err, msg in cases:
        with pytest.raises(err, match=msg):
            select_parameters(model, params)
    frozen = nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        select_parameters(frozen, None)


def test_train_mode_batchnorm() -> None:
    model = _bn_model()
    assert train_mode_batchnorm(model) == "1"
    assert train_mode_batchnorm(model.eval()) is None
    no_stats = nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False))
    assert train_mode_batchnorm(no_stats) is None
    assert train_mode_batchnorm(nn.BatchNorm1d(3)) == "BatchNorm1d"  # the root module


# ---------------------------------------------------------------- batch trees
def test_tree_flatten_keeps_container_types() -> None:
    batch = Encoding(
        input_ids=torch.zeros(4, 3), meta=Pair(torch.ones(4), "tag"), extra=[torch.ones(2), 7]
    )
    leaves, rebuild = tree_flatten(batch)
    assert [type(x).__name__ for x in leaves] == ["Tensor", "Tensor", "str", "Tensor", "int"]
    again = rebuild(leaves)
    assert type(again) is Encoding and type(again["meta"]) is Pair
    assert again["meta"].y == "tag" and again["extra"][1] == 7


def test_batch_helpers_on_mapping_and_named_tuple() -> None:
    batch = Encoding(x=torch.arange(10.0).view(5, 2), y=Pair(torch.arange(5), "t"))
    assert batch_size(batch) == 5
    moved = move_batch(batch, dtype=F64)
    assert type(moved) is Encoding and moved["x"].dtype == F64 and moved["y"].x.dtype == torch.long
    parts = split_batch(batch, 2)
    assert [batch_size(p) for p in parts] == [3, 2]
    assert type(parts[1]) is Encoding and parts[1]["y"].y == "t"
    torch.testing.assert_close(parts[1]["x"], batch["x"][3:])
    leaves, rebuild = batch_leaves(batch, 5)
    assert len(leaves) == 2  # x and y.x; the string is kept
    small = rebuild([t[:1] for t in leaves])
    assert type(small) is Encoding and small["y"].y == "t" and small["x"].shape == (1, 2)


# ---------------------------------------------------------------- FunctionalView
def test_functional_view_tied_frozen_and_foreign() -> None:
    emb = nn.Embedding(5, 3)
    model = nn.Sequential(emb, nn.Linear(3, 5, bias=False), nn.Linear(5, 2))
    model[1].weight = emb.weight  # tied
    model[2].bias.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    view = FunctionalView(model, opt.param_groups)
    assert view.names == ["0.weight", "2.weight"] and view.tied
    zero = {n: torch.zeros_like(p) for n, p in zip(view.names, view.params)}
    x = torch.tensor([1, 2])
    out = view.caller(zero)(x)  # the tied weight is replaced under both names
    torch.testing.assert_close(out, model[2].bias.detach().expand(2, 2))
    assert not FunctionalView(nn.Linear(2, 2), [{"params": []}]).tied
    with pytest.raises(NotVectorisable, match="not a parameter of `model`"):
        FunctionalView(model, [{"params": [nn.Parameter(torch.zeros(2))]}])


# ---------------------------------------------------------------- FrozenModel
def test_frozen_model_never_touches_the_module() -> None:
    model = _bn_model()  # train mode: BatchNorm would update its running statistics
    model[3].eval()  # mixed modes are restored per submodule
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = FrozenModel(model, mode="train", dtype=F64)
    x = torch.randn(6, 3, dtype=F64)
    for _ in range(2):
        with frozen.evaluating():
            out = frozen.caller()(x)
    assert out.dtype == F64
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in frozen.buffers.items():  # the copies do not accumulate either
        assert torch.equal(v, before[k].to(v.dtype)), k
    assert model.training and not model[3].training and frozen.caller_mode == "mixed"
    with pytest.raises(RuntimeError), frozen.evaluating():
        raise RuntimeError("inside")
    assert model.training and not model[3].training
    # later changes to the module do not reach the copies
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with frozen.evaluating():
        torch.testing.assert_close(frozen.caller()(x), out)


def test_frozen_model_train_mode_uses_batch_statistics() -> None:
    model = _bn_model()
    x = torch.randn(8, 3)
    frozen = FrozenModel(model, mode="train")
    with frozen.evaluating():
        got = frozen.caller()(x)
    reference = nn.Sequential(*[m for m in _bn_model()]).train()(x)  # a fresh twin, train
    torch.testing.assert_close(got, reference)
    frozen_eval = FrozenModel(model, mode="eval")
    with frozen_eval.evaluating():
        torch.testing.assert_close(frozen_eval.caller()(x), _bn_model().eval()(x))


def test_select_and_load_state() -> None:
    model = _bn_model()
    frozen = FrozenModel(model)
    block = frozen.select(["3.bias"])
    assert block.names == ["3.bias"] and block.values["3.bias"] is frozen.values["3.bias"]
    assert block.random_state is frozen.random_state
    with pytest.raises(ValueError, match="names: expected parameter names"):
        frozen.select(["nope"])
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    frozen.load_state(state)
    assert all(float(t.abs().sum()) == 0 for t in frozen.values.values())
    assert float(frozen.buffers["1.running_mean"].abs().sum()) == 0
    with pytest.raises(ValueError, match=r"missing \['0\.bias'\]"):
        frozen.load_state({k: v for k, v in state.items() if k != "0.bias"})


def test_random_state_is_a_public_argument() -> None:
    """Dropout in training mode: evaluations replay one state, and measurements built
    with the same state see the same masks (HessianOperator and Objective alike)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    x = torch.randn(16, 4)

    def loss_fn(m, b):
        return (m(b) ** 2).mean()

    shared = RandomState(model.parameters())
    torch.manual_seed(1)
    a = Objective(model, loss_fn, x, mode="train", random_state=shared)
    torch.manual_seed(2)
    b = Objective(model, loss_fn, x, mode="train", random_state=shared)
    c = Objective(model, loss_fn, x, mode="train")  # its own state (seed 2 now)
    assert a.mean_loss() == b.mean_loss() == a.mean_loss()
    assert c.mean_loss() != a.mean_loss()
    h1 = HessianOperator(model, loss_fn, x, mode="train", random_state=shared)
    h2 = a.hessian()
    v = torch.randn(h1.dim)
    torch.testing.assert_close(h1.matvec(v), h2.matvec(v), rtol=0, atol=0)
    with pytest.raises(TypeError, match="random_state"):
        HessianOperator(model, loss_fn, x, random_state=0)  # type: ignore[arg-type]
