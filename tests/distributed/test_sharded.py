"""Curvature and the SAM family over several processes (gloo on localhost) against one process.

Every case spawns 2 or 3 CPU ranks (3 gives uneven shards of the 53 examples),
bounded in time by :func:`tests.distributed._launch.launch`.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpkit.curvature import HessianOperator
from sharpkit.distributed import ShardedOperator, is_main_process, shared_seed, world
from tests.distributed import _cases
from tests.distributed._launch import launch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def single_curvature():
    x, y = _cases.data()
    op = HessianOperator(_cases.mlp(), nn.CrossEntropyLoss(), _cases.batches(x, y))
    return _cases.curvature_estimates(op)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_curvature_equals_one_process(tmp_path, single_curvature, world_size):
    ranks = launch("curvature", world_size, tmp_path)
    ref = single_curvature
    for r in ranks:
        assert int(r["examples"]) == _cases.N_EXAMPLES
        torch.testing.assert_close(r["hv"], ref["hv"], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(r["eigenvalues"], ref["eigenvalues"], rtol=1e-8, atol=1e-10)
        assert bool(r["converged"]) and bool(ref["converged"])
        for key in ("hutchinson", "hutchpp", "frobenius"):
            torch.testing.assert_close(r[key], ref[key], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(
            r["slq_nodes"], ref["slq_nodes"], rtol=1e-8, atol=1e-9, equal_nan=True
        )
        torch.testing.assert_close(r["slq_weights"], ref["slq_weights"], rtol=1e-8, atol=1e-9)
    # every rank holds the same numbers (one estimate, not world_size of them)
    for r in ranks[1:]:
        assert torch.equal(r["eigenvalues"], ranks[0]["eigenvalues"])
        assert torch.equal(r["hutchinson"], ranks[0]["hutchinson"])


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_products_follow_the_loss_s_own_weights(tmp_path, world_size):
    """A loss that normalises by kept entries (tokens, say): the shards are weighted by
    their entries, not their examples, so the product is that of the mean over all
    the data's entries (one batch of everything, in one process)."""
    x, y, m = _cases.masked_data()
    loss = _cases.MaskedMSE()
    dim = sum(p.numel() for p in _cases.mlp().parameters())
    v = torch.linspace(-1.0, 1.0, dim, dtype=torch.float64)
    ref = HessianOperator(_cases.mlp(), loss, (x, y, m)).matvec(v)
    by_examples = sum(
        (len(xs) / len(x)) * HessianOperator(_cases.mlp(), loss, (xs, ys, ms)).matvec(v)
        for xs, ys, ms in zip(*(torch.tensor_split(t, world_size) for t in (x, y, m)))
    )
    assert not torch.allclose(by_examples, ref, rtol=1e-6)  # the weights matter here
    for r in launch("curvature_weighted", world_size, tmp_path):
        torch.testing.assert_close(r["hv"], ref, rtol=1e-12, atol=1e-14)
        assert bool(r["custom"])  # the protocol says the loss's own weights were used


def test_seeds_across_ranks(tmp_path):
    ranks = launch("seeds", 3, tmp_path)
    # estimators given no seed draw different vectors per rank: refused, not mixed
    for r in ranks:
        assert bool(r["raised"])
        assert "same seed" in r["message"]
    # shared_seed() gives every rank rank 0's draw; different explicit seeds are refused
    assert len({int(r["seed"]) for r in ranks}) == 1
    assert all(bool(r["refused"]) for r in ranks)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"world{n}")
def ddp_runs(request, tmp_path_factory):
    return launch("train", request.param, tmp_path_factory.mktemp("train"))


@pytest.mark.parametrize("kind", _cases.KINDS)
def test_ddp_training_equals_one_process_on_the_global_batch(ddp_runs, kind):
    ranks = [r[kind] for r in ddp_runs]
    ref = _cases.train(kind)
    for r in ranks:
        assert r["params"].keys() == ref["params"].keys()
        for name, p in ref["params"].items():
            torch.testing.assert_close(r["params"][name], p, rtol=1e-10, atol=1e-12)
    # replicas never drift apart: bit-identical weights on every rank
    for r in ranks[1:]:
        for name, p in ranks[0]["params"].items():
            assert torch.equal(r["params"][name], p)
    # the losses each rank reports are its local ones; their mean is the global loss
    local = torch.tensor([r["losses"] for r in ranks], dtype=torch.float64).mean(dim=0)
    expected = torch.tensor(ref["losses"], dtype=torch.float64)
    torch.testing.assert_close(local, expected, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"world{n}")
def data_parallel_runs(request, tmp_path_factory):
    runs = launch("train_batch_driven", request.param, tmp_path_factory.mktemp("dp"))
    return request.param, runs


@pytest.mark.parametrize("kind", _cases.BATCH_DRIVEN)
def test_data_parallel_batch_driven_equals_one_process(data_parallel_runs, kind):
    """mSAM: R ranks x m micro-batches == one process with R*m micro-batches; delta-SAM:
    the example-weighted mean of the shards' own directions. The returned loss is global."""
    world_size, runs = data_parallel_runs
    ranks = [r[kind] for r in runs]
    ref = _cases.train_batch_driven(kind, world_size=world_size)
    for r in ranks:
        for name, p in ref["params"].items():
            torch.testing.assert_close(r["params"][name], p, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            torch.tensor(r["losses"], dtype=torch.float64),
            torch.tensor(ref["losses"], dtype=torch.float64),
            rtol=1e-10,
            atol=1e-12,
        )
    for r in ranks[1:]:
        for name, p in ranks[0]["params"].items():
            assert torch.equal(r["params"][name], p)


def test_data_parallel_needs_a_process_group():
    from sharpkit.optim import MSAM

    net = _cases.mlp()
    with pytest.raises(ValueError, match="process_group"):
        MSAM(net.parameters(), torch.optim.SGD, model=net, process_group=object(), lr=0.1)


def test_one_process_helpers():
    assert world() == (0, 1) and is_main_process()
    assert shared_seed(3) == 3
    with pytest.raises(TypeError, match="seed"):
        shared_seed("3")  # type: ignore[arg-type]
    A = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="examples"):
        ShardedOperator(A)
    with pytest.raises(ValueError, match="examples"):
        ShardedOperator(A, examples=-1)
    with pytest.raises(ValueError, match="no examples"):
        ShardedOperator(A, examples=0)
    op = ShardedOperator(A, examples=4)
    assert op.protocol().extra["world_size"] == 1 and op.protocol().examples == 4


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_sharpness_report_equals_one_process(tmp_path, world_size):
    """measure_sharpness(process_group=...) on uneven shards == one process on the union of
    the shards' batches: values, errors, per-batch maxima, costs, on every rank."""
    union = [b for r in range(world_size) for b in _cases.shard_batches(r, world_size)]
    ref = _cases.sharpness(union)
    ranks = launch("sharpness", world_size, tmp_path)
    assert int(ref["examples"]) == _cases.N_EXAMPLES
    for r in ranks:
        assert r.keys() == ref.keys()
        for key, value in ref.items():
            if key.endswith(".cost") or value.dtype == torch.int64:
                assert torch.equal(r[key], value), key
            else:
                torch.testing.assert_close(
                    r[key], value, rtol=1e-10, atol=1e-12, equal_nan=True, msg=key
                )
    for r in ranks[1:]:  # one answer, not world_size of them: bit for bit
        for key, value in ranks[0].items():
            torch.testing.assert_close(r[key], value, rtol=0, atol=0, equal_nan=True, msg=key)


@pytest.fixture(scope="module")
def robustness_runs(tmp_path_factory):
    """Two ranks (the shards are equal here: DDP averages the ranks' mean gradients)."""
    return 2, launch("robustness", 2, tmp_path_factory.mktemp("robust"))


def test_batchnorm_under_ddp_equals_one_process(robustness_runs):
    """With model=, SAM's perturbed pass leaves no trace in the running statistics under
    DDP: rank 0's buffers and every rank's weights are the ghost-batch one-process run's.
    Without model=, the perturbed pass is counted (twice the batches tracked)."""
    world_size, runs = robustness_runs
    ref = _cases.train_bn(world_size=world_size)["state"]
    r0 = runs[0]["bn"]["state"]
    for key, value in ref.items():
        torch.testing.assert_close(r0[key], value, rtol=1e-10, atol=1e-12, msg=key)
    for r in runs[1:]:
        for key, value in r0.items():
            if "running" not in key and "num_batches" not in key:  # buffers: rank 0's
                assert torch.equal(r["bn"]["state"][key], value), key
    assert int(r0["1.num_batches_tracked"]) == _cases.STEPS
    loose = runs[0]["bn_no_model"]["state"]
    assert int(loose["1.num_batches_tracked"]) == 2 * _cases.STEPS
    assert not torch.allclose(loose["1.running_mean"], ref["1.running_mean"], rtol=1e-6)


def test_batchnorm_under_data_parallel_msam_no_drift(robustness_runs):
    """Data-parallel mSAM bypasses DDP's forward (and its buffer broadcast): the step
    itself gives every rank rank 0's running statistics, so replicas never drift; the
    weights are one process's mSAM with R x m micro-batches."""
    world_size, runs = robustness_runs
    ref = _cases.train_bn_msam(world_size=world_size)["state"]
    for r in runs:
        for key, value in ref.items():
            got = r["bn_msam"]["state"][key]
            torch.testing.assert_close(got, value, rtol=1e-10, atol=1e-12, msg=key)
    for r in runs[1:]:
        for key, value in runs[0]["bn_msam"]["state"].items():
            assert torch.equal(r["bn_msam"]["state"][key], value), key


@pytest.mark.parametrize("kind", ["sam", "msam-vectorised"])
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(robustness_runs, kind):
    world_size, runs = robustness_runs
    ref = _cases.nonfinite(kind, world_size=world_size)
    for r in runs:
        got = r["nonfinite_" + kind]
        assert got["skipped"].tolist() == [False, True, False]
        for name, p in ref["params"].items():
            torch.testing.assert_close(got["params"][name], p, rtol=1e-10, atol=1e-12)
    for r in runs[1:]:
        for name, p in runs[0]["nonfinite_" + kind]["params"].items():
            assert torch.equal(r["nonfinite_" + kind]["params"][name], p)


@pytest.mark.parametrize("kind", _cases.RESUME_KINDS)
def test_state_dict_resume_under_ddp_equals_an_uninterrupted_run(robustness_runs, kind):
    _, runs = robustness_runs
    for r in runs:
        got = r["resume_" + kind]
        for name, p in got["straight"].items():
            torch.testing.assert_close(got["resumed"][name], p, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("case", "world_size"), [("exception_sam", 2), ("exception_sam", 3), ("exception_msam", 2)]
)
def test_an_exception_on_one_rank_restores_every_rank_and_does_not_hang(tmp_path, case, world_size):
    ranks = launch(case, world_size, tmp_path, timeout=90)
    assert "injected failure" in ranks[1]["error"]
    for r in [ranks[0], *ranks[2:]]:  # waiting in a collective: failed, not hung
        assert r["error"] and "injected" not in r["error"]
    for r in ranks:
        assert bool(r["restored"]) and not bool(r["perturbed"])


def test_a_process_group_without_init_is_refused_before_compute():
    from sharpkit.sharpness import measure_sharpness, worst_case_sharpness

    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    data = _cases.shard_batches(0, 1)
    with pytest.raises(ValueError, match="process_group"):
        measure_sharpness(_cases.mlp(), loss, data, ["lambda_max"], process_group=object())
    with pytest.raises(ValueError, match="process_group"):
        worst_case_sharpness(_cases.mlp(), loss, data, 0.05, process_group=object())
    assert calls["n"] == 0
