"""Curvature at the sizes users measure: sharpkit against PyHessian, hessian-eigenthings
and a plain double-backward reference, one interleaved run on this machine.

Models (analysis/benchmarks/models.py, built from code, seeded init, synthetic data, float32):
S a 0.35M-parameter CNN and M an 11.2M-parameter ResNet-18 (CIFAR form) on random
3x32x32 images with random labels, L a 5.3M-parameter GPT-style decoder on random
tokens (sequence 64, next-token cross-entropy). Measured per model:

- **product cost / gradient**, 1 and 4 batches (interleaved ratios to one gradient
  over the same data): sharpkit's default operator, the plain double-backward
  reference (``autograd.grad(create_graph=True)`` then ``autograd.grad(g, v)``, the
  graph rebuilt per product), PyHessian's product (graph cached for one batch,
  rebuilt per batch for a data loader) and hessian-eigenthings' (rebuilt).
- **top-1 / top-5 at 1e-3**: products, wall time and the largest relative error
  against scipy's ``eigsh`` (ARPACK, tol 1e-6) on sharpkit's float32 operator;
  sharpkit ``eigenvalues(tol=1e-3)`` (its ``converged`` flag included), PyHessian
  ``eigenvalues(top_n, tol=1e-3)`` (defaults), hessian-eigenthings ``lanczos(k)``
  (defaults: ``max_iter = 2k``) and with ``max_iter = 4k, tol=1e-3``.
- **trace to a stated precision** (95% interval within ``TRACE_RTOL`` of the
  estimate): sharpkit Hutchinson and Hutch++ with a cap, their projected need when
  the cap cannot reach it; PyHessian's ``trace()`` defaults (no interval).
- **SLQ at equal products**: one run of ``SLQ_STEPS`` Lanczos steps each (sharpkit
  ``spectral_density``, PyHessian ``density``, hessian-eigenthings
  ``spectral_density``) and, for sharpkit, the share of its time spent outside the
  products (the bookkeeping).
- **peak memory** of a top-5 computation in a fresh process per method (rise of
  the peak resident set, ``VmHWM``, over its value once the model and data are built).
- **top-5 by basis** (the budget stage, ``--max-basis``): sharpkit's top-5 with the
  default basis, a bounded one (thick restart) and one held in a temporary file
  (``basis_storage``), each in a fresh process: products, time, explicit residuals,
  peak memory.

Run: ``python -m analysis.benchmarks.bench_scale [--quick] [--models S,M,L]``; writes
analysis/benchmarks/results/scale.md (and .json; ``--quick`` writes scale_quick.*).
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sharpkit.curvature import HessianOperator, eigenvalues, spectral_density, trace

from .harness import Case, Row, compare, machine_info, write_table
from .models import scale_model

RESULTS = Path(__file__).parent / "results"
ACC = 1e-3
TRACE_RTOL = 0.05


def _loss() -> nn.Module:
    return nn.CrossEntropyLoss()


BATCH: dict[str, int] = {}  # --batch overrides (examples per batch), for busy machines


def _batch_size(size: str, quick: bool) -> int:
    if size in BATCH:
        return BATCH[size]
    return {"S": 32, "M": 8, "L": 8}[size] // (2 if quick else 1)


def setup(size: str, batches: int, quick: bool) -> tuple[nn.Module, list[Any]]:
    model, make = scale_model(size)
    model.eval()
    n = _batch_size(size, quick)
    return model, [make(n, 100 + b) for b in range(batches)]


# ---------------------------------------------------------------- peers
def _pyhessian(model: nn.Module, data: list[Any]) -> Any:
    import pyhessian  # noqa: F401

    mod = sys.modules["pyhessian.hessian"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if len(data) == 1:
            return mod.hessian(copy.deepcopy(model), _loss(), data=data[0], cuda=False)
        return mod.hessian(copy.deepcopy(model), _loss(), dataloader=data, cuda=False)


class _Count:
    """Count calls of a module-level function while the context is open."""

    def __init__(self, mod: Any, name: str) -> None:
        self.mod, self.name, self.count = mod, name, 0
        self.orig = getattr(mod, name)

    def __enter__(self) -> _Count:
        def counted(*a: Any, **k: Any) -> Any:
            self.count += 1
            return self.orig(*a, **k)

        setattr(self.mod, self.name, counted)
        return self

    def __exit__(self, *exc: Any) -> None:
        setattr(self.mod, self.name, self.orig)


def _ph_counter() -> _Count:
    """Counts pyhessian's products in its single-batch mode (one module-level function)."""
    return _Count(sys.modules["pyhessian.hessian"], "hessian_vector_product")


def _eigenthings(model: nn.Module, data: list[Any]) -> Any:
    import hessian_eigenthings as he

    return he.HessianOperator(model, data, he.supervised_loss(_loss()))


class Counted:
    """An operator wrapper that counts products and the time spent in them."""

    def __init__(self, op: Any) -> None:
        self.op, self.dim, self.dtype, self.device = op, op.dim, op.dtype, op.device
        self.num_matvecs, self.seconds = 0, 0.0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.op.matvec(v)
        self.seconds += time.perf_counter() - t0
        self.num_matvecs += 1
        return out

    def protocol(self) -> Any:
        return self.op.protocol()


def reference_hvp(model: nn.Module, data: list[Any]) -> Any:
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(len(y) for _, y in data)
    lf = _loss()

    def hvp(v: torch.Tensor) -> torch.Tensor:
        vs = [c.view_as(p) for c, p in zip(torch.split(v, [p.numel() for p in params]), params)]
        out = torch.zeros_like(v)
        for x, y in data:
            g = torch.autograd.grad(lf(model(x), y), params, create_graph=True)
            h = torch.autograd.grad(g, params, grad_outputs=vs)
            out += (len(y) / n) * torch.cat([t.reshape(-1) for t in h])
        return out

    return hvp


def _rel(vals: Any, ref: np.ndarray) -> float:
    vals = np.sort(np.asarray(vals, dtype=float))[::-1]
    k = min(len(vals), len(ref))
    return float(np.max(np.abs(vals[:k] - ref[:k]) / abs(ref[0])))


# ---------------------------------------------------------------- measurements
def _product_cases(size: str, batches: int, quick: bool) -> list[Case]:
    model, data = setup(size, batches, quick)
    params = list(model.parameters())
    lf = _loss()

    def grad() -> None:
        for x, y in data:
            torch.autograd.grad(lf(model(x), y), params)

    sk = HessianOperator(model, lf, data if batches > 1 else data[0])
    v = torch.randn(sk.dim, generator=torch.Generator().manual_seed(0))
    ref = reference_hvp(model, data)
    ph = _pyhessian(model, data)
    v_ph = [c.view_as(p) for c, p in zip(torch.split(v, [p.numel() for p in ph.params]), ph.params)]
    mod = sys.modules["pyhessian.hessian"]

    def ph_product() -> Any:
        if batches == 1:
            return mod.hessian_vector_product(ph.gradsH, ph.params, v_ph)
        return ph.dataloader_hv_product(v_ph)

    he = _eigenthings(model, data)
    plural = "es" if batches > 1 else ""
    group = f"{size} ({sk.dim / 1e6:.2f}M), {batches} batch{plural} of {len(data[0][1])}"
    return [
        Case("gradient", grad, group=group),
        Case(f"sharpkit HVP ({sk.hvp}, default)", lambda: sk.matvec(v), group=group),
        Case("reference double backward", lambda: ref(v), group=group),
        Case("pyhessian HVP", ph_product, group=group),
        Case("hessian-eigenthings HVP", lambda: he.matvec(v), group=group),
    ]


def product_rows(size: str, quick: bool, rounds: int) -> list[Any]:
    rows = []
    for batches in (1, 4):
        cases = _product_cases(size, batches, quick)
        rows += compare(cases, "gradient", rounds=rounds, calls=1, warmup=1)
    return rows


def eigsh_reference(op: HessianOperator, k: int) -> tuple[np.ndarray, int]:
    from scipy.sparse.linalg import LinearOperator, eigsh

    count = [0]

    def mv(x: np.ndarray) -> np.ndarray:
        count[0] += 1
        return op.matvec(torch.as_tensor(x, dtype=torch.float32).reshape(-1)).double().numpy()

    lin = LinearOperator((op.dim, op.dim), matvec=mv, dtype=np.float64)
    v0 = torch.randn(
        op.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    ).numpy()
    vals = eigsh(lin, k=k, which="LA", tol=1e-6, v0=v0, ncv=max(2 * k + 1, 20))[0]
    return np.sort(vals)[::-1], count[0]


def eig_rows(size: str, quick: bool) -> dict[str, Any]:
    model, data = setup(size, 1, quick)
    op = HessianOperator(model, _loss(), data[0])
    ref, n_ref = eigsh_reference(op, 5)
    out: dict[str, Any] = {"eigsh": ref.tolist(), "eigsh_products": n_ref}
    for k in (1, 5):
        res: dict[str, Any] = {}
        c = Counted(op)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = eigenvalues(c, k=k, tol=ACC, seed=0)
        res["sharpkit"] = {
            "products": r.num_matvecs,
            "seconds": time.perf_counter() - t0,
            "err": _rel(r.eigenvalues.numpy(), ref),
            "converged": r.converged,
            "max_rel_residual": float(r.residuals.max() / r.ritz_values.abs().max()),
            "bookkeeping_share": 1 - c.seconds / (time.perf_counter() - t0),
            "warnings": [str(w.message)[:120] for w in caught],
        }
        ph = _pyhessian(model, data)
        torch.manual_seed(0)
        with _ph_counter() as cnt, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            vals, _ = ph.eigenvalues(top_n=k, tol=ACC, maxIter=100)
            dt = time.perf_counter() - t0
        res["pyhessian"] = {"products": cnt.count, "seconds": dt, "err": _rel(vals, ref)}
        for label, kw in (
            ("eigenthings default", {}),
            ("eigenthings 4k", {"max_iter": 4 * k, "tol": ACC}),
        ):
            heop = Counted(_WrapHE(_eigenthings(model, data)))
            t0 = time.perf_counter()
            er = _he_lanczos(heop, k, kw)
            res[label] = {
                "products": heop.num_matvecs,
                "seconds": time.perf_counter() - t0,
                "err": _rel(er.eigenvalues.numpy(), ref),
                "converged": bool(torch.as_tensor(er.converged).all()),
            }
        out[f"top{k}"] = res
    return out


class _WrapHE:
    """hessian-eigenthings' operator seen through sharpkit's operator attributes."""

    def __init__(self, he_op: Any) -> None:
        self.he, self.dim, self.dtype, self.device = he_op, he_op.size, he_op.dtype, he_op.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.he.matvec(v)


def _he_operator(counted: Counted) -> Any:
    """A hessian-eigenthings operator whose products go through ``counted``."""
    import hessian_eigenthings as he

    class Op(he.CurvatureOperator):  # type: ignore[misc]
        size = counted.dim
        dtype = counted.dtype
        device = counted.device

        def matvec(self, v: torch.Tensor) -> torch.Tensor:
            return counted.matvec(v)

    return Op()


def _he_lanczos(counted: Counted, k: int, kw: dict[str, Any]) -> Any:
    import hessian_eigenthings as he

    return he.lanczos(_he_operator(counted), k=k, which="LA", seed=0, **kw)


def trace_rows(size: str, quick: bool, cap: int) -> dict[str, Any]:
    model, data = setup(size, 1, quick)
    op = HessianOperator(model, _loss(), data[0])
    out: dict[str, Any] = {}
    for method, budget in (("hutchinson", cap), ("hutch++", cap)):
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = trace(op, method=method, num_samples=budget, rtol=TRACE_RTOL, seed=0)
        out[method] = {
            "products": t.num_matvecs,
            "seconds": time.perf_counter() - t0,
            "estimate": t.estimate,
            "half_width_rel": (t.ci[1] - t.ci[0]) / 2 / abs(t.estimate),
            "reached": t.reached,
            "matvecs_needed": t.matvecs_needed,
            "warned": any("needs about" in str(w.message) for w in caught),
        }
    ph = _pyhessian(model, data)
    torch.manual_seed(0)
    with _ph_counter() as cnt:
        t0 = time.perf_counter()
        samples = ph.trace()
        dt = time.perf_counter() - t0
    s = np.asarray(samples, dtype=float)
    out["pyhessian"] = {
        "products": cnt.count,
        "seconds": dt,
        "estimate": float(s.mean()),
        "half_width_rel": float(1.96 * s.std(ddof=1) / np.sqrt(len(s)) / abs(s.mean())),
    }
    return out


def slq_rows(size: str, quick: bool, steps: int) -> dict[str, Any]:
    model, data = setup(size, 1, quick)
    out: dict[str, Any] = {}
    for key, reorth in (("sharpkit", True), ("sharpkit plain", False)):
        op = Counted(HessianOperator(model, _loss(), data[0]))
        t0 = time.perf_counter()
        spectral_density(op, runs=1, steps=steps, seed=0, reorthogonalize=reorth)
        total = time.perf_counter() - t0
        out[key] = {
            "products": op.num_matvecs,
            "seconds": total,
            "bookkeeping_share": 1 - op.seconds / total,
        }
    ph = _pyhessian(model, data)
    torch.manual_seed(0)
    with _ph_counter() as cnt:
        t0 = time.perf_counter()
        try:
            ph.density(iter=steps, n_v=1)
            note = ""
        except RuntimeError as err:  # pyhessian 0.1 calls torch.eig, removed from torch 2
            if "torch.eig" not in str(err) and "deprecated" not in str(err):
                raise
            note = "fails after its Lanczos loop (torch.eig removed from torch); time to there"
        out["pyhessian"] = {
            "products": cnt.count,
            "seconds": time.perf_counter() - t0,
            "note": note,
        }
    import hessian_eigenthings as he

    c = Counted(_WrapHE(_eigenthings(model, data)))
    t0 = time.perf_counter()
    he.spectral_density(_he_operator(c), num_runs=1, lanczos_steps=steps, seed=0)
    out["eigenthings"] = {"products": c.num_matvecs, "seconds": time.perf_counter() - t0}
    return out


def bookkeeping_rows(size: str, quick: bool, rows: int) -> dict[str, Any]:
    """One Lanczos step's bookkeeping (recurrence, reorthogonalisation against ``rows``
    basis vectors) against one product of the model, both timed twice (medians)."""
    from sharpkit.curvature.lanczos import StackedBasis

    model, data = setup(size, 1, quick)
    op = HessianOperator(model, _loss(), data[0])
    g = torch.Generator().manual_seed(0)
    basis = StackedBasis(op.dim, op.dtype, op.device)
    for _ in range(rows):
        basis.append(torch.randn(op.dim, generator=g) / op.dim**0.5)
    v = torch.randn(op.dim, generator=g)
    op.matvec(v)
    prod, book = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        w = op.matvec(v)
        prod.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        w64 = w.to(torch.float64)
        a = float(torch.dot(w64, w64))
        w64.add_(basis.row(0), alpha=-a)
        basis.orthogonalise(w64)
        book.append(time.perf_counter() - t0)
    return {
        "rows": rows,
        "product_s": float(np.median(prod)),
        "bookkeeping_s": float(np.median(book)),
        "share": float(np.median(book) / (np.median(book) + np.median(prod))),
    }


# ---------------------------------------------------------------- memory (fresh process)
def _peak_rss_mib() -> float:
    """This process's peak resident set (``VmHWM``, MiB). Not ``ru_maxrss``: on Linux a
    child starts with its parent's high-water mark, which would hide its own peak."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("peak memory: /proc/self/status has no VmHWM (not Linux?)")


def _fresh_child(size: str, quick: bool, batch: dict[str, int]) -> tuple[Any, Any, float]:
    """In a fresh process: 1 thread, the model and data, the code paths loaded once
    on a tiny model (code, not data); the model, its batches and the peak so far."""
    torch.set_num_threads(1)
    BATCH.update(batch)
    model, data = setup(size, 1, quick)
    tiny = nn.Linear(2, 2)
    xt, yt = torch.ones(1, 2), torch.zeros(1, dtype=torch.long)
    HessianOperator(tiny, _loss(), (xt, yt)).matvec(torch.ones(6))
    return model, data, _peak_rss_mib()


def _memory_child(size: str, which: str, quick: bool, batch: dict[str, int], queue: Any) -> None:
    model, data, base = _fresh_child(size, quick, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if which == "sharpkit":
            eigenvalues(HessianOperator(model, _loss(), data[0]), k=5, tol=ACC, seed=0)
        elif which == "reference product":
            ref = reference_hvp(model, data)
            v = torch.randn(sum(p.numel() for p in model.parameters()))
            for _ in range(3):
                ref(v)
        elif which == "pyhessian":
            torch.manual_seed(0)
            _pyhessian(model, data).eigenvalues(top_n=5, tol=ACC, maxIter=100)
        else:
            import hessian_eigenthings as he

            he.lanczos(_eigenthings(model, data), k=5, which="LA", seed=0)
    queue.put(_peak_rss_mib() - base)


def _budget_item(item: str) -> tuple[str, int | None]:
    """``"12"`` (a basis of 12 vectors in memory), ``"default"`` (the default basis in
    memory), ``"file:12"`` or ``"file"`` (in a temporary file, 12 rows or the default
    number): storage and ``max_basis``."""
    named = {"default": ("memory", None), "file": ("file", None)}
    if item in named:
        return named[item]
    where, _, n = item.rpartition(":")
    if where not in ("", "file") or not n.isdigit():
        raise SystemExit(f"--max-basis: {item!r}: expected N, default, file:N or file")
    return where or "memory", int(n)


def _budget_child(size: str, item: str, quick: bool, batch: dict[str, int], queue: Any) -> None:
    where, max_basis = _budget_item(item)
    model, data, base = _fresh_child(size, quick, batch)
    op = Counted(HessianOperator(model, _loss(), data[0]))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-scale-basis-") as tmp:
        storage = Path(tmp) if where == "file" else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = eigenvalues(op, k=5, tol=ACC, seed=0, max_basis=max_basis, basis_storage=storage)
    total = time.perf_counter() - t0
    queue.put(
        {
            "storage": where,
            "requested": max_basis,
            "basis_mib": r.protocol.extra["max_basis"] * op.dim * 4 / 2**20,
            "max_basis": r.protocol.extra["max_basis"],
            "thick_restarts": r.protocol.extra["thick_restarts"],
            "products": r.num_matvecs,
            "seconds": total,
            "bookkeeping_share": 1 - op.seconds / total,
            "eigenvalues": r.eigenvalues.tolist(),
            "converged": r.converged,
            "max_rel_residual": float(r.residuals.max() / r.ritz_values.abs().max()),
            "peak_mib": _peak_rss_mib() - base,
            "warnings": [str(w.message)[:160] for w in caught],
        }
    )


def budget_rows(size: str, quick: bool, bases: list[str]) -> list[dict[str, Any]]:
    """Top-5 at tol 1e-3 with a bounded Lanczos basis (thick restart), in memory or in
    a file (``_budget_item``), each in a fresh process: products, time, explicit
    residuals and the peak memory."""
    ctx = mp.get_context("spawn")
    out = []
    for b in bases:
        q = ctx.Queue()
        p = ctx.Process(target=_budget_child, args=(size, b, quick, dict(BATCH), q))
        p.start()
        out.append(q.get(timeout=3600))
        p.join()
        print(size, "max_basis", b, out[-1]["products"], f"{out[-1]['seconds']:.0f}s", flush=True)
    return out


def peak_memory_mb(size: str, which: str, quick: bool) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_memory_child, args=(size, which, quick, dict(BATCH), q))
    p.start()
    out = q.get(timeout=1800)
    p.join()
    return float(out)


# ---------------------------------------------------------------- CLI threads
def threads_check(rounds: int) -> Path:
    """Interleaved wall time of fixed curvature work at 1 thread and at torch's default,
    on the CLI demo's model size (2410 parameters, 100 products) and on S (5 products),
    under whatever load the machine carries (recorded)."""
    import os

    from sharpkit.demo import demo_data, demo_model

    default = torch.get_num_threads()
    digits = demo_data()
    tiny_model, tiny_data = demo_model(), (digits.x_train, digits.y_train)
    s_model, s_data = setup("S", 1, False)
    work = {
        "demo model (2410 params), 100 HVPs": (
            HessianOperator(tiny_model, _loss(), tiny_data),
            100,
        ),
        f"S (0.35M, batch {len(s_data[0][1])}), 3 HVPs": (
            HessianOperator(s_model, _loss(), s_data[0]),
            3,
        ),
    }
    path = RESULTS / "scale_threads.md"
    lines = [
        "### CLI thread default: the same work at 1 thread and at torch's default",
        "",
        f"torch default here: {default} threads on {os.cpu_count()} cores (1-minute load "
        "average of the machine at each round in the last column). Rounds alternate the order.",
        "",
        "| work | round | 1 thread s | default threads s | default / 1 | load |",
        "|---|---|---|---|---|---|",
    ]
    results: dict[str, Any] = {}
    for name, (op, n) in work.items():
        v = torch.randn(op.dim)
        op.matvec(v)
        results[name] = []
        for r in range(rounds):
            t: dict[int, float] = {}
            for th in (1, default) if r % 2 == 0 else (default, 1):
                torch.set_num_threads(th)
                t0 = time.perf_counter()
                for _ in range(n):
                    op.matvec(v)
                t[th] = time.perf_counter() - t0
            torch.set_num_threads(default)
            load = os.getloadavg()[0]
            results[name].append({"one": t[1], "default": t[default], "load": load})
            lines.append(
                f"| {name} | {r + 1} | {t[1]:.2f} | {t[default]:.2f} | "
                f"{t[default] / t[1]:.2f} | {load:.1f} |"
            )
            path.write_text("\n".join(lines) + "\n")  # after every round (slow machines)
            path.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    print(path.read_text())
    return path


# ---------------------------------------------------------------- report
def _cell(d: dict[str, Any]) -> str:
    extra = ""
    if "converged" in d:
        extra = f", converged={d['converged']}"
    return f"{d['products']} / {d['seconds']:.1f}s (err {d['err']:.1e}{extra})"


def _machine(measured: dict[str, Any], rendered: bool) -> dict[str, Any]:
    """The machine the measurements ran on: this one, or, when rendering saved runs,
    the one they recorded (this one only if none did). Runs that recorded different
    machines (another pinning, say) are refused: one table names one machine."""
    here = machine_info(torch.device("cpu"))
    if not rendered:
        return here
    saved = [m["machine"] for m in measured.values() if "machine" in m]
    if not saved:
        return here
    if any(x != saved[0] for x in saved[1:]):
        raise SystemExit("--report-from: the saved runs name different machines: " + str(saved))
    return saved[0]


def _drop_empty_tables(lines: list[str]) -> list[str]:
    """Remove '#### ' sections whose table has no data row (a stage not measured)."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        if lines[i].startswith("#### "):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("#### "):
                j += 1
            body = lines[i:j]
            rows = [x for x in body if x.startswith("| ") and not x.startswith("| model")]
            if rows:
                out += body
            i = j
        else:
            out.append(lines[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: half batches, few rounds")
    ap.add_argument("--models", default="S,M,L")
    ap.add_argument(
        "--stages",
        default="products,eigs,trace,slq,bookkeeping,memory",
        help="comma-separated subset of products,eigs,trace,slq,bookkeeping,memory,budget",
    )
    ap.add_argument(
        "--max-basis",
        default="default,12,file:12,file",
        help="the budget stage's Lanczos bases: N (N vectors in memory), default (the "
        "default basis in memory), file:N (in a temporary file), file (default size, in a file)",
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch", default="", help="per-model batch sizes, e.g. S=4,M=2")
    ap.add_argument("--memory-peers", default="reference product,sharpkit,pyhessian,eigenthings")
    ap.add_argument(
        "--report-from", default="", help="partial .json files to render, comma-separated"
    )
    ap.add_argument("--threads-check", action="store_true", help="only the CLI thread check")
    ap.add_argument("--note", default="", help="a sentence on the machine's state (reports)")
    args = ap.parse_args(argv)
    for item in filter(None, args.batch.split(",")):
        name, n = item.split("=")
        BATCH[name] = int(n)
    if args.report_from:  # render the tables from saved partial results
        measured_saved: dict[str, Any] = {}
        for f in args.report_from.split(","):
            for size, m in json.loads(Path(f).read_text()).items():
                prev = measured_saved.setdefault(size, {})
                if "machine" in prev and "machine" in m and prev["machine"] != m["machine"]:
                    raise SystemExit(f"--report-from: {f} ran on another machine than the rest")
                prev.update(m)
        args.models = ",".join(measured_saved)
    if args.threads_check:
        threads_check(rounds=3)
        return
    sizes = args.models.split(",")
    out = args.out or str(RESULTS / ("scale_quick.md" if args.quick else "scale.md"))
    rounds = 3 if args.quick else 5
    steps = 10 if args.quick else 40
    cap = 30 if args.quick else 60
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    rows, measured = [], {}
    stages = args.stages.split(",")
    partial = Path(out).with_suffix(".partial.json")
    for size in sizes:
        m: dict[str, Any] = {"machine": machine_info(torch.device("cpu"))}
        measured[size] = m
        if args.report_from:
            m.update(measured_saved[size])
            rows += [Row(**r) for r in m.get("products", [])]
            continue
        for stage in stages:
            t0 = time.perf_counter()
            if stage == "products":
                rows += product_rows(size, args.quick, rounds)
                m["products"] = [r.__dict__ for r in rows if r.group.startswith(size)]
            elif stage == "eigs":
                m["eigs"] = eig_rows(size, args.quick)
            elif stage == "trace":
                m["trace"] = trace_rows(size, args.quick, cap)
            elif stage == "slq":
                m["slq"] = slq_rows(size, args.quick, steps)
            elif stage == "bookkeeping":
                m["bookkeeping"] = bookkeeping_rows(size, args.quick, 30)
            elif stage == "budget":
                bases = args.max_basis.split(",")
                m["budget"] = budget_rows(size, args.quick, bases)
            elif stage == "memory":
                m["peak_mb"] = {
                    w: peak_memory_mb(size, w, args.quick) for w in args.memory_peers.split(",")
                }
            m.setdefault("stage_seconds", {})[stage] = time.perf_counter() - t0
            m.setdefault("load_1min_after", {})[stage] = os.getloadavg()[0]
            partial.write_text(json.dumps(measured, indent=2, default=str) + "\n")
            print(size, stage, f"{time.perf_counter() - t0:.0f}s", flush=True)
    notes = [
        args.note
        or (
            f"1-minute load average of the machine: {load_start:.1f} at the start of this run, "
            f"{os.getloadavg()[0]:.1f} at its end."
        ),
        "Ratios in the first table are interleaved (same round); the other tables are single runs.",
        "",
        f"#### Eigenvalues: products / wall time to {ACC:g} (error: max relative to lambda_1, "
        "against scipy eigsh tol 1e-6 on sharpkit's float32 operator)",
        "",
        "| model | task | eigsh lambda | sharpkit tol=1e-3 | pyhessian defaults | "
        "eigenthings defaults (max_iter=2k) | eigenthings max_iter=4k | products ratio "
        "sharpkit / pyhessian |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size, m in measured.items():
        if "eigs" not in m:
            continue
        e = m["eigs"]
        for k in (1, 5):
            r = e[f"top{k}"]
            lam = ", ".join(f"{x:.4g}" for x in e["eigsh"][:k])
            ratio = r["sharpkit"]["products"] / max(r["pyhessian"]["products"], 1)
            notes.append(
                f"| {size} | top-{k} | {lam} | {_cell(r['sharpkit'])} | {_cell(r['pyhessian'])} | "
                f"{_cell(r['eigenthings default'])} | {_cell(r['eigenthings 4k'])} | {ratio:.2f} |"
            )
    notes += [
        "",
        f"#### Trace to a 95% interval within {TRACE_RTOL:.0%} (cap {cap} products)",
        "",
        "| model | sharpkit Hutchinson | sharpkit Hutch++ | pyhessian trace() defaults |",
        "|---|---|---|---|",
    ]
    for size, m in measured.items():
        if "trace" not in m:
            continue
        cells = []
        for k in ("hutchinson", "hutch++", "pyhessian"):
            t = m["trace"][k]
            c = f"{t['products']} / {t['seconds']:.1f}s, half-width {t['half_width_rel']:.1%}"
            if "reached" in t:
                c += (
                    ", reached"
                    if t["reached"]
                    else f", NOT reachable: needs ~{t['matvecs_needed']:.0f}"
                )
            cells.append(c)
        notes.append(f"| {size} | " + " | ".join(cells) + " |")
    notes += [
        "",
        f"#### SLQ, one run of {steps} Lanczos steps (equal products)",
        "",
        "| model | sharpkit reorthogonalize=True | its bookkeeping share | "
        "sharpkit reorthogonalize=False (the default) | its bookkeeping share | pyhessian | "
        "eigenthings | time ratio sharpkit / pyhessian (reorthogonalize=True; False) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size, m in measured.items():
        if "slq" not in m:
            continue
        s = m["slq"]
        sk, pl, ph = s["sharpkit"], s.get("sharpkit plain"), s["pyhessian"]
        plain_cells = (
            f"{pl['products']} / {pl['seconds']:.1f}s | {pl['bookkeeping_share']:.1%}"
            if pl
            else "not measured | -"
        )
        plain_ratio = f"; {pl['seconds'] / ph['seconds']:.2f}" if pl else ""
        notes.append(
            f"| {size} | {sk['products']} / {sk['seconds']:.1f}s | "
            f"{sk['bookkeeping_share']:.1%} | {plain_cells} | {ph['products']} / "
            f"{ph['seconds']:.1f}s | {s['eigenthings']['products']} / "
            f"{s['eigenthings']['seconds']:.1f}s | "
            f"{sk['seconds'] / ph['seconds']:.2f}{plain_ratio} |"
        )
    if any("bookkeeping" in m for m in measured.values()):
        notes += [
            "",
            "#### Lanczos bookkeeping of one step (recurrence + reorthogonalisation against "
            "30 stored vectors) against one product (medians of 2)",
            "",
            "| model | product s | bookkeeping s | bookkeeping share of the step |",
            "|---|---|---|---|",
        ]
        for size, m in measured.items():
            if "bookkeeping" in m:
                b = m["bookkeeping"]
                notes.append(
                    f"| {size} | {b['product_s']:.2f} | {b['bookkeeping_s']:.2f} | {b['share']:.1%} |"
                )
    if any("budget" in m for m in measured.values()):
        notes += [
            "",
            f"#### Top-5 at tol {ACC:g} by Lanczos basis: its size (max_basis vectors; "
            "thick restart when it is full) and where it lives, each in a fresh process "
            "(1 thread)",
            "",
            "| model | max_basis | basis storage | thick restarts | products (/ PyHessian's) | "
            "wall time | converged (largest relative explicit residual) | error vs eigsh | "
            "peak memory MiB (/ 3 reference products) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for size, m in measured.items():
            ph = m.get("eigs", {}).get("top5", {}).get("pyhessian", {}).get("products")
            ref = m.get("eigs", {}).get("eigsh")
            ref_mb = m.get("peak_mb", {}).get("reference product")
            for b in m.get("budget", []):
                prod = f"{b['products']}" + (f" ({b['products'] / ph:.2f})" if ph else "")
                err = f"{_rel(b['eigenvalues'], np.asarray(ref)):.1e}" if ref else "-"
                mem = f"{b['peak_mib']:.0f}" + (
                    f" ({b['peak_mib'] / ref_mb:.2f})" if ref_mb else ""
                )
                where = b.get("storage", "memory")
                if where == "file":  # the rows written: the steps (products less the
                    # 5 explicit residuals), at most max_basis
                    used = min(b["max_basis"], b["products"] - 5)
                    where = f"file ({b['basis_mib'] / b['max_basis'] * used:.0f} MiB written)"
                size_text = (
                    b["max_basis"] if b.get("requested", 1) else f"default ({b['max_basis']})"
                )
                notes.append(
                    f"| {size} | {size_text} | {where} | {b['thick_restarts']} | {prod} | "
                    f"{b['seconds']:.0f}s | {b['converged']} ({b['max_rel_residual']:.1e}) | "
                    f"{err} | {mem} |"
                )
    if any("peak_mb" in m for m in measured.values()):
        notes += [
            "",
            "#### Peak memory (rise of the peak resident set, VmHWM, in a fresh process, MiB; 1 thread)",
            "",
            "| model | reference double backward (3 products) | sharpkit top-5 (default basis) | "
            "pyhessian top-5 | eigenthings top-5 (defaults) |",
            "|---|---|---|---|---|",
        ]
        for size, m in measured.items():
            if "peak_mb" not in m:
                continue
            p = m["peak_mb"]
            ref_mb = p.get("reference product")
            cells = [f"{ref_mb:.0f}" if ref_mb else "not measured"]
            for w in ("sharpkit", "pyhessian", "eigenthings"):
                if w not in p:
                    cells.append("not measured")
                    continue
                cells.append(f"{p[w]:.0f}" + (f" ({p[w] / ref_mb:.2f}x)" if ref_mb else ""))
            notes.append(f"| {size} | " + " | ".join(cells) + " |")
    notes = _drop_empty_tables(notes)
    if not args.report_from:  # a rendering of saved runs has no run time of its own
        notes += ["", f"Total wall time of this run: {time.perf_counter() - t_start:.0f} s."]
    path = write_table(
        rows,
        out,
        title="Curvature at scale: product cost / gradient (float32, CPU)",
        machine=_machine(measured, bool(args.report_from)),
        notes=["\n".join(notes)],
    )
    payload = json.loads(path.with_suffix(".json").read_text())
    payload["measurements"] = measured
    path.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main()
