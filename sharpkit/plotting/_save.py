"""Saving figures the same way everywhere: PNG and SVG, closed afterwards."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

__all__ = ["save_figure"]


def save_figure(
    fig: Figure, out_dir: str | Path, stem: str, *, formats: tuple[str, ...] = ("png", "svg")
) -> list[Path]:
    """Write ``fig`` as ``out_dir/stem.{png,svg}`` and close it; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        p = out / f"{stem}.{fmt}"
        fig.savefig(p, dpi=150 if fmt == "png" else None, bbox_inches="tight")
        paths.append(p)
    plt.close(fig)
    return paths
