"""Run a test case in several CPU processes with the gloo backend, bounded in time.

Each rank is a fresh ``python -m tests.distributed._worker CASE OUT`` process with
the environment ``torchrun`` would give it (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``). The processes are killed and
the test fails if they do not all finish within ``timeout`` seconds, so a hang
fails instead of blocking CI. Each rank writes its results with ``torch.save``
to ``OUT/rank{r}.pt``; :func:`launch` returns them (loaded with
``weights_only=True``). :func:`run_ranks` runs any command that way (the
``sharpkit`` command, say).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sharpkit_env() -> dict[str, str]:
    """The environment for a ``python -m sharpkit`` subprocess: one thread, Agg, the
    repository on the import path."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }


def run_sharpkit(
    args: list[str], cwd: Path, *, nproc: int = 1, timeout: float = 300.0
) -> subprocess.CompletedProcess[str]:
    """``python -m sharpkit ARGS`` in one process, or under torchrun with ``nproc``
    ranks on 127.0.0.1; bounded by ``timeout`` seconds (a hang fails the test)."""
    launcher = [sys.executable, "-m"]
    if nproc > 1:
        launcher += [
            "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m",
        ]  # fmt: skip
    return subprocess.run(
        [*launcher, "sharpkit", *args],
        cwd=cwd,
        env=sharpkit_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_and_torchrun(
    args: list[str], cwd: Path, one: Path, two: Path
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """``python -m sharpkit ARGS --out ONE`` in one process, then under torchrun with 2
    ranks and ``--out TWO``; both must succeed."""
    single = run_sharpkit([*args, "--out", str(one)], cwd)
    assert single.returncode == 0, single.stderr[-3000:]
    launched = run_sharpkit([*args, "--out", str(two)], cwd, nproc=2)
    assert launched.returncode == 0, (launched.stdout + launched.stderr)[-3000:]
    return single, launched


def run_ranks(
    argv: list[str], world_size: int, logs: Path, timeout: float, cwd: Path = ROOT
) -> list[tuple[int, str]]:
    """Run ``argv`` as ``world_size`` ranks (torchrun's environment, gloo on localhost);
    fail the test if they do not all end within ``timeout`` s. Returns each rank's exit
    code and output (also in ``logs/rank{r}.log``)."""
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    files = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        log = open(logs / f"rank{rank}.log", "w")  # closed below
        files.append(log)
        procs.append(subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            left = max(0.1, deadline - time.monotonic())
            try:
                p.wait(timeout=left)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{argv}: the {world_size} ranks did not finish within {timeout} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in files:
            log.close()
    return [(p.returncode, (logs / f"rank{r}.log").read_text()) for r, p in enumerate(procs)]


def launch(case: str, world_size: int, out: Path, timeout: float = 120.0) -> list[dict[str, Any]]:
    """Run ``case`` on ``world_size`` ranks; return each rank's saved results."""
    argv = [sys.executable, "-m", "tests.distributed._worker", case, str(out)]
    for rank, (code, text) in enumerate(run_ranks(argv, world_size, out, timeout)):
        if code != 0:
            pytest.fail(f"{case}: rank {rank} exited with {code}:\n{text[-4000:]}")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
