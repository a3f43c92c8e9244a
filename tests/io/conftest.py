"""One CPU thread for these tests: their models are tiny, and on a busy 2-core machine
torch's intra-op threads only add synchronisation (measured: up to ~100x slower)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
