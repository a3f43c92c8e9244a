"""Suite-wide pytest set-up: one CPU thread per test process.

The test models are tiny; torch's intra-op threads only add synchronisation
there, and on a busy 2-core machine they made single tests up to ~100x slower
(measured while several jobs shared the CI machine). Subprocesses (the notebook
runner, the CLI end-to-end tests) inherit ``OMP_NUM_THREADS=1``. Benchmarks do
not run under pytest and keep torch's default.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
