"""SharpnessReport: metric dispatch, JSON schema stability, table."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sharpkit.sharpness import METRICS, SCHEMA_VERSION, measure_sharpness
from sharpkit.testing import dense_hessian
from tests.sharpness._models import class_data, relu_net

#: the JSON layout that SCHEMA_VERSION 1 promises: change it only with a version bump
TOP_KEYS = {
    "failures",
    "not_converged",
    "schema_version",
    "base",
    "model",
    "protocol",
    "timings",
    "metrics",
}
METRIC_KEYS = {"name", "value", "stderr", "details", "cost", "protocol"}
COST_KEYS = {"forward", "gradient", "hvp", "jvp"}
PROTOCOL_KEYS = {
    "estimator", "examples", "batches", "weighting", "mode", "dtype", "device", "seed", "matvecs",
    "extra",
    "version",
}  # fmt: skip


def _float32():
    # float32: the CPU Hessian-vector products in float64 are ~70x slower (torch.func
    # forward-over-reverse), which this suite cannot afford for every metric
    x, y = class_data(n=48)
    return relu_net().float(), (x.float(), y)


@pytest.fixture(scope="module")
def report():
    # module scope runs before the per-test one-thread fixture (conftest): set it here
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net, data = _float32()
        return measure_sharpness(net, nn.CrossEntropyLoss(), [data], list(METRICS), seed=0)
    finally:
        torch.set_num_threads(before)


def test_json_schema_is_stable(report, tmp_path) -> None:
    assert SCHEMA_VERSION == 1
    path = report.to_json(tmp_path / "r.json")
    doc = json.loads(path.read_text())
    assert set(doc) == TOP_KEYS and doc["schema_version"] == 1
    assert list(doc["metrics"]) == list(METRICS)
    for name, m in doc["metrics"].items():
        assert set(m) == METRIC_KEYS, name
        assert set(m["cost"]) == COST_KEYS, name
        assert set(m["protocol"]) == PROTOCOL_KEYS, name
        assert isinstance(m["value"], float), name
    assert set(doc["base"]) == {"loss", "accuracy"}
    assert doc["protocol"]["seed"] == 0 and doc["model"]["parameters"] == 5 * 8 + 8 + 8 * 3 + 3


def test_curvature_entries_match_dense_hessian(report) -> None:
    net, data = _float32()
    H = dense_hessian(net, nn.CrossEntropyLoss(), data)  # float64 reference
    evals = torch.linalg.eigvalsh(H)
    m = report.metrics
    # Lanczos stops at a residual of 1e-4 * ||H|| (the default tol) in float32 products
    assert m["lambda_max"].value == pytest.approx(float(evals[-1]), rel=1e-4)
    assert m["lambda_min"].value == pytest.approx(float(evals[0]), abs=1e-4 * float(evals[-1]))
    # Hutch++ error bar: within 4 standard errors of the exact trace
    assert abs(m["trace"].value - float(H.trace())) <= 4 * m["trace"].stderr + 1e-9
    assert m["top_k"].details["eigenvalues"] == pytest.approx(evals.flip(0)[:5].tolist(), rel=1e-3)
    assert m["lambda_max"].cost.hvp > 0


def test_table_and_options(report) -> None:
    text = str(report)
    for name in METRICS:
        assert name in text
    net, data = _float32()
    r = measure_sharpness(
        net, nn.CrossEntropyLoss(), data, ["worst_case"], options={"worst_case": {"rho": 0.2}}
    )
    assert r.metrics["worst_case"].details["rho"] == 0.2
    with pytest.raises(ValueError, match="metrics"):
        measure_sharpness(net, nn.CrossEntropyLoss(), data, ["nope"])
    with pytest.raises(ValueError, match="options"):
        measure_sharpness(net, nn.CrossEntropyLoss(), data, ["worst_case"], options={"x": {}})


def test_lanczos_basis_options(tmp_path) -> None:
    # top_k with a basis of 8 vectors in a file: thick restarts, the dense answer;
    # a basis too small for k is refused before any product.
    net, data = _float32()
    evals = torch.linalg.eigvalsh(dense_hessian(net, nn.CrossEntropyLoss(), data)).flip(0)
    opts = {"top_k": {"max_basis": 8, "basis_storage": str(tmp_path)}}
    rep = measure_sharpness(net, nn.CrossEntropyLoss(), [data], ["top_k"], options=opts, seed=0)
    extra = rep.metrics["top_k"].protocol.extra
    assert extra["max_basis"] == 8 and extra["thick_restarts"] >= 1
    assert extra["basis_storage"] == f"file in {tmp_path}"
    assert rep.metrics["top_k"].details["eigenvalues"] == pytest.approx(
        evals[:5].tolist(), rel=1e-3
    )
    with pytest.raises(ValueError, match=r"top_k\.max_basis: expected at least 8"):
        measure_sharpness(
            net, nn.CrossEntropyLoss(), [data], ["top_k"], options={"top_k": {"max_basis": 7}}
        )


def test_linearize_products_give_the_same_curvature() -> None:
    net, data = _float32()
    H = dense_hessian(net, nn.CrossEntropyLoss(), data)
    metrics = ["lambda_max", "trace"]
    rep = measure_sharpness(net, nn.CrossEntropyLoss(), [data], metrics, seed=0, hvp="linearize")
    assert rep.metrics["lambda_max"].protocol.extra["hvp"] == "linearize"
    assert rep.metrics["lambda_max"].value == pytest.approx(
        float(torch.linalg.eigvalsh(H)[-1]), rel=1e-4
    )
    default = measure_sharpness(net, nn.CrossEntropyLoss(), [data], metrics, seed=0)
    # same probes, products equal to float32 rounding
    assert rep.metrics["trace"].value == pytest.approx(default.metrics["trace"].value, rel=1e-4)
    with pytest.raises(ValueError, match="hvp"):
        measure_sharpness(net, nn.CrossEntropyLoss(), [data], metrics, hvp="double-backward")


def test_train_mode_dropout_report_measures_one_draw_of_the_masks() -> None:
    """Dropout in training mode: the report's curvature and its base loss are those of
    one fixed draw of the masks, the one the global state held when it started
    (reference: the dense float64 Hessian and the loss of one evaluation from it)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).double()
    x, y = class_data(n=48)
    data = (x.double(), y)
    state = torch.get_rng_state()
    rep = measure_sharpness(net, nn.CrossEntropyLoss(), [data], ["lambda_max", "worst_case"],
                            seed=0, mode="train")  # fmt: skip
    torch.set_rng_state(state)
    H = dense_hessian(net, nn.CrossEntropyLoss(), data, mode="train")
    torch.set_rng_state(state)
    net.train()
    with torch.no_grad():
        loss = nn.functional.cross_entropy(net(data[0]), data[1]).item()
    assert rep.metrics["lambda_max"].value == pytest.approx(
        float(torch.linalg.eigvalsh(H)[-1]), rel=1e-4
    )
    assert rep.base["loss"] == pytest.approx(loss, abs=1e-12)
