"""Benchmark harness: interleaved timing against a baseline in the same run.

Machines are noisy, so every benchmark reports *ratios* to a baseline measured
in the same process, with the cases interleaved round by round (a slow spell
hits every case alike). A row's ratio is the median over rounds of
``t_case / t_baseline`` within that round; medians and quartiles of the raw
times are reported beside it.

Used by every ``analysis/benchmarks/bench_*.py`` script:

    from analysis.benchmarks.harness import Case, compare, machine_info, write_table
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sharpkit._device import machine_info

__all__ = ["Case", "Row", "compare", "machine_info", "rows_from_samples", "sync", "write_table"]


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work (no-op on the CPU)."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


@dataclass
class Case:
    """One thing to time: ``fn()`` is called ``calls`` times per round."""

    name: str
    fn: Callable[[], Any]
    group: str = ""
    note: str = ""


@dataclass
class Row:
    group: str
    name: str
    baseline: str
    median_ms: float
    q1_ms: float
    q3_ms: float
    ratio: float
    ratio_q1: float
    ratio_q3: float
    rounds: int
    calls: int
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _time_once(fn: Callable[[], Any], calls: int, device: Any) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / calls


def compare(
    cases: Sequence[Case],
    baseline: str,
    *,
    rounds: int = 15,
    calls: int = 5,
    warmup: int = 2,
    device: Any = None,
) -> list[Row]:
    """Time ``cases`` interleaved, ``rounds`` rounds of ``calls`` calls each.

    Args:
        cases: the cases; one of them is named ``baseline``.
        baseline: the name of the case ratios are taken against.
        rounds: number of interleaved rounds (the statistics are over rounds).
        calls: calls per case per round (their mean is one sample).
        warmup: untimed rounds first.
        device: synchronised around each sample when it is a CUDA device.

    Returns:
        One :class:`Row` per case, in the given order.
    """
    names = [c.name for c in cases]
    if baseline not in names:
        raise ValueError(f"baseline: {baseline!r} is not among the cases {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"cases: names must be unique, got {names}")
    for _ in range(warmup):
        for c in cases:
            _time_once(c.fn, calls, device)
    samples: dict[str, list[float]] = {c.name: [] for c in cases}
    for r in range(rounds):
        order = cases if r % 2 == 0 else list(reversed(cases))
        for c in order:
            samples[c.name].append(_time_once(c.fn, calls, device))
    return rows_from_samples(
        [(c.group, c.name, c.note) for c in cases], samples, baseline, rounds, calls
    )


def rows_from_samples(
    cases: Sequence[tuple[str, str, str]],
    samples: dict[str, list[float]],
    baseline: str,
    rounds: int,
    calls: int,
) -> list[Row]:
    """One :class:`Row` per ``(group, name, note)`` case from per-round times in seconds
    (``samples[name]``, rounds aligned with ``samples[baseline]``): the median and
    quartiles of the times and of the per-round ratios to the baseline."""
    base = samples[baseline]
    rows = []
    for group, name, note in cases:
        s = samples[name]
        ratios = [a / b for a, b in zip(s, base)]
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
        qr = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
        rows.append(
            Row(
                group=group,
                name=name,
                baseline=baseline,
                median_ms=1e3 * statistics.median(s),
                q1_ms=1e3 * q[0],
                q3_ms=1e3 * q[2],
                ratio=statistics.median(ratios),
                ratio_q1=qr[0],
                ratio_q3=qr[2],
                rounds=rounds,
                calls=calls,
                note=note,
            )
        )
    return rows


def write_table(
    rows: Sequence[Row],
    path: str | Path,
    *,
    title: str,
    machine: dict[str, Any],
    notes: Sequence[str] = (),
    extra_columns: Sequence[str] = (),
) -> Path:
    """Write ``rows`` as a markdown table (``path``) and as JSON (same stem, ``.json``).

    ``extra_columns`` are keys of each row's ``extra`` dict shown as columns.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = ["group", "case", "median ms", "IQR ms", "ratio", "ratio IQR", *extra_columns]
    lines = [f"### {title}", ""]
    lines.append(
        "Machine: "
        + ", ".join(f"{k} {v}" for k, v in machine.items())
        + f". Ratios: median over {rows[0].rounds if rows else 0} interleaved rounds of "
        "t(case)/t(baseline) in the same round."
    )
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.group,
            r.name + ("" if r.name != r.baseline else " (baseline)"),
            f"{r.median_ms:.3f}",
            f"{r.q1_ms:.3f}-{r.q3_ms:.3f}",
            f"{r.ratio:.3f}",
            f"{r.ratio_q1:.3f}-{r.ratio_q3:.3f}",
            *[str(r.extra.get(k, "")) for k in extra_columns],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for n in notes:
        lines += ["", n]
    path.write_text("\n".join(lines) + "\n")
    payload = {
        "title": title,
        "machine": machine,
        "notes": list(notes),
        "rows": [asdict(r) for r in rows],
    }
    path.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    return path
