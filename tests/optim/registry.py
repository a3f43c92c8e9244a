"""The registry every sharpkit optimizer joins to be held to the shared contract.

Each ``tests/optim/specs_*.py`` module defines ``SPECS: list[OptimizerSpec]``
(:class:`sharpkit.testing.contract.OptimizerSpec`, the public spec a user fills
in for their own optimizer); ``test_contract.py`` runs every check of
:mod:`sharpkit.testing.contract` over all of them, the capability flags
deciding which apply.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from sharpkit.testing.contract import OptimizerSpec, default_batch, default_model

__all__ = ["OptimizerSpec", "all_specs", "default_batch", "default_model"]


def all_specs() -> list[OptimizerSpec]:
    """Collect ``SPECS`` from every ``specs_*.py`` module beside this file."""
    here = Path(__file__).parent
    specs: list[OptimizerSpec] = []
    for info in sorted(pkgutil.iter_modules([str(here)]), key=lambda i: i.name):
        if info.name.startswith("specs_"):
            mod = importlib.import_module(
                f"{__package__}.{info.name}" if __package__ else info.name
            )
            specs.extend(mod.SPECS)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise RuntimeError(f"duplicate optimizer spec names: {names}")
    return specs
