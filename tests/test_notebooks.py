"""Every teaching notebook runs top to bottom (as CI promises), is valid jupytext, and is a
course unit: learning goals at the top, exercises at the end that name known exercise ids."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.py"))


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS, "notebooks/ holds no notebooks"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_jupytext_percent(path: Path) -> None:
    jupytext = pytest.importorskip("jupytext")
    nb = jupytext.read(path)
    kinds = {c.cell_type for c in nb.cells}
    assert {"markdown", "code"} <= kinds, "a teaching notebook has prose and code"


COURSE = [p for p in NOTEBOOKS if re.match(r"0[1-5]_", p.name)]


@pytest.mark.parametrize("path", COURSE, ids=lambda p: p.name)
def test_course_notebook_has_goals_and_exercises(path: Path) -> None:
    from sharpkit.course import EXERCISES

    text = path.read_text(encoding="utf-8")
    head = text[: text.index("# %%\n")]  # the markdown before the first code cell
    assert "**Learning goals.**" in head, "learning goals belong at the top"
    ids = re.findall(r'check\("(\d\d\.\d)"', text)
    assert len(ids) >= 2, "two or three exercises per notebook"
    assert all(i.startswith(path.name[:2] + ".") for i in ids), ids
    assert set(ids) <= set(EXERCISES), f"unknown exercise ids {set(ids) - set(EXERCISES)}"
    assert len(ids) == len(set(ids)), "each exercise is checked once"
    assert not re.search(r"PAPERS\.md|DESIGN\.md", text), "cite the papers or docs/theory.md"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path, tmp_path: Path) -> None:
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    proc = subprocess.run(
        [sys.executable, str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_every_exercise_is_in_a_notebook() -> None:
    from sharpkit.course import EXERCISES

    ids = {i for p in COURSE for i in re.findall(r'check\("(\d\d\.\d)"', p.read_text())}
    assert ids == set(EXERCISES)
