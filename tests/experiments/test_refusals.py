"""What ``sharpkit experiment`` and the experiment configs refuse, and how.

A catalogue (issue: nothing silently wrong): every case states the exact
behaviour, exit 2 with one line on stderr before any compute, or exit 130 on
Ctrl-C, and checks that nothing on disk changed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sharpkit.cli import main
from sharpkit.experiments import EXPERIMENTS, config_key


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _float_fields():
    for name, exp in EXPERIMENTS.items():
        cfg = exp.config("test")
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if isinstance(value, float) or (
                isinstance(value, tuple) and value and isinstance(value[0], float)
            ):
                yield name, f.name, value


FLOAT_FIELDS = list(_float_fields())


def test_the_catalogue_covers_the_float_fields() -> None:
    assert len(FLOAT_FIELDS) >= 40


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize(("name", "field", "value"), FLOAT_FIELDS)
def test_non_finite_floats_are_refused_by_every_config(name, field, value, bad) -> None:
    bad_value = (*value[:-1], bad) if isinstance(value, tuple) else bad
    with pytest.raises(ValueError, match=f"^{field}: must be finite"):
        EXPERIMENTS[name].config("test", **{field: bad_value})


def _cli(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1,inf"])
def test_cli_refuses_inf_in_a_config_before_compute(tmp_path, capsys, value) -> None:
    field = "eta_lambdas" if "," in value else "rho"
    rc, err = _cli(
        ["experiment", "two_cycle", "--scale", "test", "--out", str(tmp_path),
         "--set", f"{field}={value}", "--no-progress"],
        capsys,
    )  # fmt: skip
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith(f"sharpkit experiment: {field}: must be finite")
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_an_out_that_is_a_file(tmp_path, capsys) -> None:
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    for out in (target, target / "sub"):
        rc, err = _cli(["experiment", "all", "--scale", "test", "--out", str(out)], capsys)
        assert rc == 2 and err.count("\n") == 1 and "--out" in err
        assert ("is a file" if out == target else "lies under a file") in err
    assert _snapshot(tmp_path) == {"results.txt": b"keep me"}


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc")
def test_cli_refuses_an_unwritable_out(capsys) -> None:
    rc, err = _cli(["experiment", "two_cycle", "--scale", "test", "--out", "/proc/sk"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "--out: /proc/sk is not writable" in err
    assert not Path("/proc/sk").exists()


def test_cli_rerun_with_another_config_keeps_the_first(tmp_path, capsys) -> None:
    base = ["experiment", "two_cycle", "--scale", "test", "--seeds", "2", "--out",
            str(tmp_path), "--no-progress"]  # fmt: skip
    assert main(base) == 0
    capsys.readouterr()
    before = _snapshot(tmp_path)
    assert main([*base, "--set", "rho=0.1"]) == 0
    capsys.readouterr()
    after = _snapshot(tmp_path)
    assert {k: after[k] for k in before} == before  # nothing of the first run changed
    exp = EXPERIMENTS["two_cycle"]
    for cfg in (exp.config("test"), exp.config("test", rho=0.1)):
        folder = Path("two_cycle", "test", config_key(cfg))
        assert {str(folder / f) for f in ("config.json", "seed0.json", "seed1.json")} <= set(after)
        assert json.loads(after[str(folder / "config.json")])["config"]["rho"] == cfg.rho
    # and the rerun of the first config says it reused its seeds
    assert main(base) == 0
    assert "Reused cached seeds [0, 1]" in capsys.readouterr().out


_SLOW = """
import dataclasses, sys, time
from sharpkit.experiments import EXPERIMENTS
exp = EXPERIMENTS["two_cycle"]
run = exp.run
def slow(cfg):
    result = run(cfg)
    time.sleep(0.5)
    return result
EXPERIMENTS["two_cycle"] = dataclasses.replace(exp, run=slow)
from sharpkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigint_prints_one_line_exits_130_and_leaves_no_partial_file(tmp_path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW, "experiment", "two_cycle", "--scale", "test",
         "--seeds", "50", "--out", str(out), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
        # a suite started in the background ignores SIGINT, and so would the child
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(out.rglob("seed0.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.count("\n") == 1 and err.startswith("sharpkit experiment: interrupted")
    assert "Traceback" not in err
    files = [p for p in out.rglob("*") if p.is_file()]
    assert all(not p.name.startswith(".") for p in files)  # no temporary file left
    seeds = [p for p in files if p.name.startswith("seed")]
    assert 1 <= len(seeds) < 50
    for p in seeds:  # every seed file is complete
        json.loads(p.read_text())
