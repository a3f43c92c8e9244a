"""Silence the deprecation notices torch emits about its own internals.

torch 2.13 loads jit-scripted forward-mode decompositions on the first forward-AD
use in a process (``torch.func.jvp``, ``jacfwd``, ``linearize``) and its fx
constant folding warns about an attribute it creates itself. Neither says
anything about the user's model or code, so sharpkit hides exactly those
messages, and only around its own calls into ``torch.func``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

__all__ = ["torch_internal_notices_hidden"]

_NOTICES = (
    r"`torch\.jit\.script` is deprecated",
    r"Attempted to insert a get_attr Node with no underlying reference",
)


@contextlib.contextmanager
def torch_internal_notices_hidden() -> Iterator[None]:
    """Inside the block, torch's notices about its own internals are not shown."""
    with warnings.catch_warnings():
        for pattern in _NOTICES:
            warnings.filterwarnings("ignore", message=pattern)
        yield
