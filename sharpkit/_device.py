"""Device selection shared by the CLI, experiments and benchmarks."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

__all__ = ["available_memory", "describe_machine", "machine_info", "resolve_device"]

#: What :func:`available_memory` reports where the available memory cannot be read (4 GiB).
FALLBACK_AVAILABLE = 4 << 30


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Return the device to run on.

    Args:
        device: ``None`` or ``"auto"`` picks CUDA when available, else the CPU.
            Anything else is parsed by :class:`torch.device`; asking for CUDA on a
            machine without it raises instead of silently falling back.

    Returns:
        The resolved :class:`torch.device`.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: cannot parse {device!r} as a torch device ({err})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} was asked for, but CUDA is not available here")
    return dev


def available_memory(device: torch.device | str) -> int:
    """The bytes of memory available now on ``device``.

    On CUDA the free device memory (``torch.cuda.mem_get_info``); on the CPU the
    ``MemAvailable`` line of ``/proc/meminfo``, else the available physical pages;
    where neither can be read, :data:`FALLBACK_AVAILABLE`. The memory budgets of
    the curvature estimators (cached graphs, Lanczos bases) are shares of it.

    Example:
        >>> available_memory("cpu") > 0
        True
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return FALLBACK_AVAILABLE


def _affinity() -> dict[str, Any]:
    """The CPUs this process may run on, when it is pinned to fewer than all of them."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return {}
    return {"pinned_to_cpus": ",".join(map(str, cpus))} if len(cpus) < (os.cpu_count() or 0) else {}


def machine_info(device: Any = None) -> dict[str, Any]:
    """What a measurement ran on: CPU model, cores, threads, versions, device, GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        **_affinity(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device or "cpu"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def describe_machine(device: Any = None) -> str:
    """One line for reports, e.g. ``'CPU Intel Xeon ... (2 cores), torch 2.13.0, device cpu'``."""
    info = machine_info(device)
    line = (
        f"CPU {info['cpu']} ({info['cores']} cores), torch {info['torch']}, device {info['device']}"
    )
    if "gpu" in info and str(info["device"]).startswith("cuda"):
        line += f" ({info['gpu']})"
    return line
