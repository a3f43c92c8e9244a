"""Device selection shared by the CLI, experiments and benchmarks."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


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
