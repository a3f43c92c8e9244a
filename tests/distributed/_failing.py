"""A loss that fails on rank 1 only, after a few evaluations (a run that breaks midway)."""

from __future__ import annotations

import os

from torch import nn

_calls = {"n": 0}


def loss(model, batch):
    """Cross-entropy; raises on rank 1 from its 20th evaluation on."""
    _calls["n"] += 1
    if os.environ.get("RANK") == "1" and _calls["n"] >= 20:
        raise RuntimeError("injected failure on rank 1")
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)
