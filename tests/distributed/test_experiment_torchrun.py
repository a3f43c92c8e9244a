"""``sharpkit experiment`` under torchrun: the seeds shared out over the ranks, each run
once, and rank 0's report equal to one process's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.distributed._launch import one_and_torchrun, run_sharpkit, sharpkit_env

pytestmark = pytest.mark.slow

# theorem2 is a few tenths of a second per seed; 5 seeds on 2 ranks: 3 and 2
ARGS = ["experiment", "theorem2", "--scale", "test", "--seeds", "5", "--no-progress"]


def _summary(out):
    (folder,) = (out / "theorem2" / "test").iterdir()
    return folder, json.loads((folder / "summary.json").read_text())


def test_torchrun_shares_the_seeds_and_reports_what_one_process_does(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    single, launched = one_and_torchrun(ARGS, tmp_path, one, two)
    assert launched.stdout.count("theorem2") == single.stdout.count("theorem2") > 0  # rank 0 only
    fa, a = _summary(one)
    fb, b = _summary(two)
    assert fa.name == fb.name  # the same config key
    assert sorted(p.name for p in fb.iterdir()) == sorted(p.name for p in fa.iterdir())
    assert b["seeds"] == a["seeds"] == [0, 1, 2, 3, 4] and b["cached_seeds"] == []
    assert b["stats"] == a["stats"] and b["verdict"] == a["verdict"]
    # each seed ran once, on its own rank: seeds 0, 2, 4 on rank 0 and 1, 3 on rank 1
    for seed in range(5):
        ra = json.loads((fa / f"seed{seed}.json").read_text())
        rb = json.loads((fb / f"seed{seed}.json").read_text())
        assert rb["summary"] == ra["summary"] and rb["series"] == ra["series"]
    # a rerun under torchrun reuses every seed, whichever rank wrote it
    again = run_sharpkit([*ARGS, "--out", str(two)], tmp_path, nproc=2)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert _summary(two)[1]["cached_seeds"] == [0, 1, 2, 3, 4]


def test_a_malformed_torchrun_environment_is_one_line_before_any_compute(tmp_path):
    env = {**sharpkit_env(), "WORLD_SIZE": "2"}  # no RANK, MASTER_ADDR, MASTER_PORT
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "sharpkit", *ARGS, "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "start with torchrun" in done.stderr
    assert not (out / "theorem2").exists()
