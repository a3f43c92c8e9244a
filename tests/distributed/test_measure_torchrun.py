"""``sharpkit measure`` under torchrun: the report of one process, written by rank 0 alone."""

from __future__ import annotations

import json
import math
import sys

import pytest

from tests.distributed._launch import ROOT, one_and_torchrun, run_ranks

pytestmark = pytest.mark.slow

DEMO = ["measure", "--demo", "--dtype", "float64", "--no-landscape", "--no-progress"]


def _close(a: float | None, b: float | None, rtol: float = 1e-8) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12)


def test_torchrun_demo_report_equals_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _, launched = one_and_torchrun(DEMO, tmp_path, one, two)
    # rank 0 alone prints: one table, one "wrote" line
    assert launched.stdout.count("wrote ") == 1 and launched.stdout.count("sharpness of") == 1
    a = json.loads((one / "report.json").read_text())
    b = json.loads((two / "report.json").read_text())
    assert a["distributed"] == {"world_size": 1, "backend": None}
    assert b["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert b["protocol"]["extra"]["world_size"] == 2
    assert b["protocol"]["examples"] == a["protocol"]["examples"]
    assert b["protocol"]["batches"] == a["protocol"]["batches"]
    assert b["config_key"] == a["config_key"]
    assert b["metrics"].keys() == a["metrics"].keys() and not b["failures"]
    for key in ("loss", "accuracy"):
        assert _close(b["base"][key], a["base"][key])
    for name, ra in a["metrics"].items():
        rb = b["metrics"][name]
        assert _close(rb["value"], ra["value"]), (name, rb["value"], ra["value"])
        assert _close(rb["stderr"], ra["stderr"]), name
        assert rb["cost"] == ra["cost"], name
    # the same files, from rank 0 alone; no staging folder left
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert (two / "esd.png").stat().st_size > 0


def test_a_rank_that_fails_does_not_hang_the_others(tmp_path):
    """A loss that raises on rank 1 midway: both ranks exit with 1 long before the
    collective timeout, and nothing is written."""
    from sharpkit.demo import demo_model
    from sharpkit.io import save_state_dict

    ckpt = tmp_path / "ckpt.safetensors"
    save_state_dict(demo_model().state_dict(), ckpt)
    out = tmp_path / "out"
    argv = [
        sys.executable, "-m", "sharpkit", "measure", str(ckpt),
        "--model", "sharpkit.demo:demo_model", "--data", "digits",
        "--loss", "tests.distributed._failing:loss", "--metrics", "lambda_max,worst_case",
        "--no-landscape", "--dist-timeout", "300", "--out", str(out),
    ]  # fmt: skip
    ranks = run_ranks(argv, 2, tmp_path / "logs", timeout=200, cwd=ROOT)
    (code0, log0), (code1, log1) = ranks
    assert code1 == 1 and "injected failure on rank 1" in log1
    assert code0 == 1 and "measurement failed" in log0
    assert not out.exists()
