"""Saving figures the same way everywhere: PNG and SVG, closed afterwards."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

__all__ = ["save_figure"]


def save_figure(
    fig: Figure, out_dir: str | Path, stem: str, *, formats: tuple[str, ...] = ("png", "svg")
) -> list[Path]:
    """Write ``fig`` as ``out_dir/stem.{png,svg}`` and close it; return the paths.

    The files depend only on the figure: the SVG has no date and its element ids are
    salted with ``stem`` (not random), so redrawing an unchanged figure rewrites
    identical bytes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        p = out / f"{stem}.{fmt}"
        kwargs = {"dpi": 150} if fmt == "png" else {"metadata": {"Date": None}}
        with plt.rc_context({"svg.hashsalt": stem}):
            fig.savefig(p, bbox_inches="tight", **kwargs)
        paths.append(p)
    plt.close(fig)
    return paths
