"""The course's exercises: :func:`check` compares an answer with the reference solution.

Each notebook of ``notebooks/`` ends with exercises. An exercise asks for a
function; ``check("01.1", my_function)`` calls it on a few seeded inputs, compares
the results with :mod:`sharpkit.course.solutions` and prints what differs. An
answer left as ``None`` is reported as not attempted, so a notebook still runs top
to bottom before it is solved.

Example:
    >>> import torch
    >>> def e_norm(grads):
    ...     return float(torch.sqrt(sum((g**2).sum() for g in grads)))
    >>> def e(grads, rho):
    ...     norm = torch.sqrt(sum((g**2).sum() for g in grads))
    ...     return [rho * g / norm for g in grads]
    >>> check("01.1", e)  # forgets the zero-gradient case
    01.1 SAM perturbation: case 2: item 0: got non-finite values (expected e.g. [0.0, 0.0, 0.0])
    False
    >>> check("01.1", lambda grads, rho: [rho * g / max(e_norm(grads), 1e-300) for g in grads])
    01.1 SAM perturbation: correct
    True
    >>> check("01.1", None)
    01.1 SAM perturbation: not attempted (replace None with your function)
    False
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch

from sharpkit.course import solutions

__all__ = ["EXERCISES", "Exercise", "check"]

F64 = torch.float64


@dataclasses.dataclass(frozen=True)
class Exercise:
    """One exercise: its title, the reference solution and the inputs it is checked on.

    Attributes:
        title: a short name.
        solution: the reference function in :mod:`sharpkit.course.solutions`.
        cases: a function yielding ``(args, kwargs)`` for the checks.
        rtol, atol: the tolerance of the comparison.
    """

    title: str
    solution: Callable[..., Any]
    cases: Callable[[], Iterator[tuple[tuple[Any, ...], dict[str, Any]]]]
    rtol: float = 1e-6
    atol: float = 1e-9


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _grads_cases():
    g = _gen(0)
    yield (
        ([torch.randn(3, 4, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)], 0.1),
        {},
    )
    yield ([torch.randn(5, generator=g, dtype=F64)], 0.5), {}
    yield ([torch.zeros(2, 2, dtype=F64), torch.zeros(2, dtype=F64)], 0.1), {}  # zero gradient


def _asam_cases():
    g = _gen(1)
    shapes = [(3, 4), (3,), (2, 3)]
    params = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    grads = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    yield (params, grads, 0.5), {"xi": 0.01}
    yield (params, grads, 1.0), {"xi": 0.1}


def _two_cycle_cases():
    for lam, eta, rho in ((2.0, 0.3, 0.1), (1.0, 0.5, 0.05), (10.0, 0.15, 0.2)):
        yield (lam, eta, rho), {}


def _quadratic(seed: int, d: int = 6):
    g = _gen(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return Q @ torch.diag(torch.rand(d, generator=g, dtype=F64) * 3) @ Q.T


def _hvp_cases():
    g = _gen(2)
    A = _quadratic(2)
    b = torch.randn(6, generator=g, dtype=F64)
    w = torch.randn(6, generator=g, dtype=F64)
    v = torch.randn(6, generator=g, dtype=F64)

    def loss(x):  # a non-quadratic loss: the Hessian depends on w
        return 0.5 * x @ A @ x + torch.log1p(torch.exp(b @ x)) + (x**4).sum() / 12

    yield (loss, w, v), {}


def _hutchinson_cases():
    A = _quadratic(3, 8)
    yield (lambda z: A @ z, 8, 50, _gen(4)), {}


def _quadrature_cases():
    g = _gen(5)
    yield (
        (torch.rand(5, generator=g, dtype=F64) * 4, torch.rand(4, generator=g, dtype=F64) + 0.1),
        {},
    )


def _quadratic_sharpness_cases():
    yield (_quadratic(6), 0.2), {}
    yield (_quadratic(7, 4), 0.05), {}


def _filter_cases():
    g = _gen(8)
    for shape in ((4, 3), (2, 3, 3, 3), (5,)):
        yield (
            (
                torch.randn(shape, generator=g, dtype=F64),
                torch.randn(shape, generator=g, dtype=F64),
            ),
            {},
        )


def _balancedness_cases():
    g = _gen(9)
    yield (torch.randn(4, 2, generator=g, dtype=F64), torch.randn(3, 2, generator=g, dtype=F64)), {}
    yield (torch.randn(3, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)), {}


def _drift_cases():
    g = _gen(10)
    for _ in range(3):
        x = torch.randn(3, 2, generator=g, dtype=F64)
        y = torch.randn(4, 2, generator=g, dtype=F64)
        yield (torch.randn(3, 4, generator=g, dtype=F64), x, y, 0.1), {}


def _nbar_cases():
    g = _gen(11)
    x, y = torch.randn(3, 2, generator=g, dtype=F64), torch.randn(4, 2, generator=g, dtype=F64)
    yield (x, y, torch.ones(3, 2, dtype=F64), 0.5 * torch.ones(4, 2, dtype=F64), 0.5, 0.1), {}
    yield (x, y, 0.1 * torch.ones(3, 2, dtype=F64), torch.ones(4, 2, dtype=F64), 0.5, 0.1), {}


def _small_classifier(seed: int):
    g = _gen(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(
        F64
    )
    x = torch.randn(22, 5, generator=g, dtype=F64)
    y = torch.randint(0, 3, (22,), generator=g)
    return model, (x, y)


def _msam_cases():
    model, batch = _small_classifier(12)

    def loss_fn(mdl, b):
        return torch.nn.functional.cross_entropy(mdl(b[0]), b[1])

    for m in (1, 4):  # 22 examples: 4 micro-batches of unequal size
        yield (model, loss_fn, batch, 0.05, m), {}


def _unguardedness_cases():
    g = _gen(13)
    G = torch.randn(10, 7, generator=g, dtype=F64)
    G[3] = 0.0  # an example with a zero gradient
    yield (G,), {}


EXERCISES: dict[str, Exercise] = {
    "01.1": Exercise("SAM perturbation", solutions.sam_perturbation, _grads_cases),
    "01.2": Exercise("ASAM perturbation", solutions.asam_perturbation, _asam_cases),
    "01.3": Exercise("2-cycle amplitude", solutions.two_cycle_amplitude, _two_cycle_cases),
    "02.1": Exercise("Hessian-vector product", solutions.hessian_vector_product, _hvp_cases),
    "02.2": Exercise("Hutchinson trace", solutions.hutchinson_trace, _hutchinson_cases),
    "02.3": Exercise("Lanczos quadrature", solutions.lanczos_quadrature, _quadrature_cases),
    "03.1": Exercise(
        "sharpness of a quadratic", solutions.quadratic_sharpness, _quadratic_sharpness_cases
    ),
    "03.2": Exercise("filter normalisation", solutions.filter_normalize, _filter_cases),
    "04.1": Exercise("balancedness", solutions.balancedness, _balancedness_cases),
    "04.2": Exercise("Theorem 2 drift", solutions.nop_sam_drift, _drift_cases),
    "04.3": Exercise("nBAR rescaling", solutions.nbar_scale, _nbar_cases),
    "05.1": Exercise("mSAM gradient", solutions.msam_gradient, _msam_cases, rtol=1e-8),
    "05.2": Exercise("unguardedness", solutions.unguardedness, _unguardedness_cases),
}


def _flatten(value: Any) -> list[torch.Tensor]:
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flatten(v)]
    return [torch.as_tensor(value, dtype=F64)]


def _compare(got: Any, want: Any, rtol: float, atol: float) -> str:
    got_f, want_f = _flatten(got), _flatten(want)
    if len(got_f) != len(want_f):
        return f"expected {len(want_f)} values/tensors, got {len(got_f)}"
    for i, (a, b) in enumerate(zip(got_f, want_f)):
        a = a.to(F64)
        if a.shape != b.shape:
            return f"item {i}: expected shape {tuple(b.shape)}, got {tuple(a.shape)}"
        if not torch.isfinite(a).all() and torch.isfinite(b).all():
            return f"item {i}: got non-finite values (expected e.g. {b.flatten()[:3].tolist()})"
        if not torch.allclose(a, b.to(F64), rtol=rtol, atol=atol):
            err = float((a - b).abs().max())
            return (
                f"item {i}: largest difference {err:.3g} (expected e.g. {b.flatten()[:3].tolist()})"
            )
    return ""


def check(exercise: str, answer: Callable[..., Any] | None) -> bool:
    """Check an exercise's answer against the reference solution; print the verdict.

    Args:
        exercise: the exercise id, ``"NN.k"`` (notebook, number), a key of
            :data:`EXERCISES`.
        answer: the student's function, or ``None`` when not attempted yet.

    Returns:
        ``True`` when every checked input gives the reference result.

    Raises:
        KeyError: ``exercise`` is not a known id.
    """
    if exercise not in EXERCISES:
        raise KeyError(f"exercise: unknown id {exercise!r}; known: {sorted(EXERCISES)}")
    ex = EXERCISES[exercise]
    head = f"{exercise} {ex.title}"
    if answer is None:
        print(f"{head}: not attempted (replace None with your function)")
        return False
    for k, ((args, kwargs), (args2, kwargs2)) in enumerate(zip(ex.cases(), ex.cases())):
        try:
            got = answer(*args, **kwargs)
        except Exception as exc:  # a student's bug: report it, do not stop the notebook
            print(f"{head}: case {k} raised {type(exc).__name__}: {exc}")
            return False
        problem = _compare(got, ex.solution(*args2, **kwargs2), ex.rtol, ex.atol)
        if problem:
            print(f"{head}: case {k}: {problem}")
            return False
    print(f"{head}: correct")
    return True
