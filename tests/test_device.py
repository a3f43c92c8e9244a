"""Device helpers: the available-memory reading behind the curvature memory budgets."""

from __future__ import annotations

import builtins
import io

import pytest
import torch

from sharpkit import _device
from sharpkit.curvature.hessian import CACHE_SHARE, default_cache_budget


def test_available_memory_reads_meminfo(monkeypatch) -> None:
    text = "MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    512 kB\n"
    real_open = builtins.open

    def fake_open(path, *a, **kw):
        if path == "/proc/meminfo":
            return io.StringIO(text)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert _device.available_memory("cpu") == 512 * 1024
    assert default_cache_budget("cpu") == int(512 * 1024 * CACHE_SHARE)


def test_available_memory_falls_back(monkeypatch) -> None:
    def no_file(path, *a, **kw):
        raise OSError("no /proc here")

    def no_sysconf(name):
        raise ValueError(name)

    monkeypatch.setattr(builtins, "open", no_file)
    monkeypatch.setattr(_device.os, "sysconf", no_sysconf)
    assert _device.available_memory(torch.device("cpu")) == _device.FALLBACK_AVAILABLE


def test_available_memory_is_plausible_here() -> None:
    avail = _device.available_memory("cpu")
    assert 0 < avail
    try:
        with open("/proc/meminfo") as f:
            total = next(int(x.split()[1]) * 1024 for x in f if x.startswith("MemTotal:"))
    except (OSError, StopIteration):
        pytest.skip("no /proc/meminfo")
    assert avail <= total
