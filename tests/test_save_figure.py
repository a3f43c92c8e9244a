"""save_figure writes the same bytes for the same figure (no dates, no random ids)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from sharpkit.plotting._save import save_figure


def _draw():
    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [1, 3, 2], marker="o", label="a")
    ax.legend()
    return fig


def test_same_figure_same_bytes(tmp_path) -> None:
    a = save_figure(_draw(), tmp_path / "a", "fig")
    b = save_figure(_draw(), tmp_path / "b", "fig")
    assert [p.suffix for p in a] == [".png", ".svg"]
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
    assert b"<dc:date>" not in a[1].read_bytes()
