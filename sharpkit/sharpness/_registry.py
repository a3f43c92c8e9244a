"""The one validation layer of the sharpness metrics: names, options, ranges, needs.

Every metric :func:`~sharpkit.sharpness.measure_sharpness` knows is a
:class:`MetricSpec` in :data:`REGISTRY`: its options (type, default, valid range or
choices, help text) and what it needs from the loss and the data. The Python API
and ``sharpkit measure`` both call :func:`resolve_options` (and the report calls
:func:`check_requirements`) before any compute, so an unknown key, a value out of
range or an option for a metric that was not requested is refused with a one-line
reason instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["REGISTRY", "MetricSpec", "Option", "describe_metrics", "resolve_options"]


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a metric.

    Attributes:
        kind: ``int``, ``float`` or ``str``.
        default: the value used when the option is not given (``None``: keep the batches).
        help: one line for ``--help``.
        low: smallest valid value (numbers).
        low_open: ``low`` itself is invalid (``x > low`` instead of ``x >= low``).
        high: largest valid value (numbers), inclusive unless ``high_open``.
        high_open: ``high`` itself is invalid.
        choices: the valid strings (``kind=str``).
        allow_none: ``None`` is a valid value.
    """

    kind: type
    default: Any
    help: str
    low: float | None = None
    low_open: bool = False
    high: float | None = None
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    allow_none: bool = False

    def range_text(self) -> str:
        """The valid values in words, e.g. ``a number in (0, 1)``."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        what = "an integer" if self.kind is int else "a finite number"
        if self.low is None and self.high is None:
            return what
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low is None or self.low_open else "["
        right = ")" if self.high is None or self.high_open else "]"
        return f"{what} in {left}{lo}, {hi}{right}" + (" or None" if self.allow_none else "")

    def check(self, where: str, value: Any, *, from_text: bool = False) -> Any:
        """``value`` converted to :attr:`kind` and range-checked, or ``ValueError``.

        With ``from_text`` (command-line values) a string is parsed first.
        """
        if value is None or (from_text and isinstance(value, str) and value == "none"):
            if self.allow_none:
                return None
            raise ValueError(f"{where}: expected {self.range_text()}, got None")
        if from_text and isinstance(value, str) and self.kind is not str:
            try:
                value = self.kind(value) if self.kind is float else int(value, 10)
            except ValueError:
                raise ValueError(f"{where}: expected {self.range_text()}, got {value!r}") from None
        if self.kind is str:
            if not isinstance(value, str) or value not in (self.choices or (value,)):
                raise ValueError(f"{where}: expected {self.range_text()}, got {value!r}")
            return value
        ok_types = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok_types):
            # numpy / torch scalars are numbers too
            if hasattr(value, "item") and not isinstance(value, bool):
                return self.check(where, value.item())
            raise ValueError(f"{where}: expected {self.range_text()}, got {value!r}")
        if self.kind is float:
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{where}: expected {self.range_text()}, got {value!r}")
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise ValueError(f"{where}: expected {self.range_text()}, got {value!r}")
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise ValueError(f"{where}: expected {self.range_text()}, got {value!r}")
        return value


def _positive(help: str, default: float) -> Option:
    return Option(float, default, help, low=0.0, low_open=True)


def _count(help: str, default: int, low: int = 1) -> Option:
    return Option(int, default, help, low=low)


_TOL = Option(
    float,
    1e-4,
    "Lanczos stops when every wanted residual is below tol * max |lambda|",
    low=0.0,
    low_open=True,
    high=1.0,
    high_open=True,
)
_RESTARTS = _count("auto-PGD restarts (the first from w, the others at random points)", 1)
_PGD_STEPS = _count("gradient evaluations per restart and batch", 20)
_M = Option(
    int,
    128,
    "m of m-sharpness: batches re-split to at most m examples (none: keep the batches)",
    low=1,
    allow_none=True,
)
_SAMPLES_AVG = _count("noise draws (Monte Carlo samples)", 32)
_NOISE = Option(str, "gaussian", "noise distribution", choices=("gaussian", "uniform"))


def _pac_options() -> dict[str, Option]:
    return {
        "samples": _count("noise draws per candidate sigma (common random numbers)", 4),
        "target": Option(
            str, "accuracy", "what may drop: accuracy or loss", choices=("accuracy", "loss")
        ),
        "max_drop": _positive("allowed mean drop of the target (Jiang et al.: 0.1)", 0.1),
        "sigma_init": _positive("first candidate sigma (doubled or halved to bracket)", 0.01),
        "rtol": _positive("bisection stops when sigma_upper / sigma <= 1 + rtol", 0.05),
        "max_iter": _count("most candidate evaluations after the first", 40),
    }


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """A metric of :func:`~sharpkit.sharpness.measure_sharpness`.

    Attributes:
        name: the metric's name.
        description: one line.
        options: option name -> :class:`Option`.
        needs: what it needs beyond a mean loss: ``"hvp"`` (Hessian-vector products),
            ``"per_example"`` (per-example losses: an nn loss module), ``"accuracy"``
            (an accuracy for ``target="accuracy"``).
        error_note: what the error column says when there is no standard error.
        can_fail_to_converge: the estimator has a stopping rule that can run out.
    """

    name: str
    description: str
    options: dict[str, Option]
    needs: frozenset[str] = frozenset()
    error_note: str = "n/a: one batch"
    can_fail_to_converge: bool = False

    def defaults(self) -> dict[str, Any]:
        """Option name -> default value."""
        return {k: o.default for k, o in self.options.items()}


_MAX_BASIS = Option(
    int,
    None,
    "most Lanczos vectors held at once, thick restart beyond "
    "(none: what a quarter of the available memory holds)",
    low=4,
    allow_none=True,
)
_BASIS_STORAGE = Option(
    str,
    None,
    "where the Lanczos basis lives: none (the model's device), cpu, cuda, or a "
    "directory for a temporary file",
    allow_none=True,
)


def _lanczos(name: str, what: str, k: bool = False) -> MetricSpec:
    opts = {"tol": _TOL}
    if k:
        opts = {"k": _count("number of eigenvalues", 5), "tol": _TOL}
    opts |= {"max_basis": _MAX_BASIS, "basis_storage": _BASIS_STORAGE}
    return MetricSpec(name, what, opts, frozenset({"hvp"}), "n/a: Lanczos", True)


def _worst(name: str, what: str, rho: float) -> MetricSpec:
    return MetricSpec(
        name,
        what,
        {
            "rho": _positive("radius of the perturbation ball (in units of c)", rho),
            "steps": _PGD_STEPS,
            "m": _M,
            "restarts": _RESTARTS,
        },
    )


def _average(name: str, what: str, rho: float) -> MetricSpec:
    return MetricSpec(
        name,
        what,
        {
            "rho": _positive("noise scale (std for gaussian, half-width for uniform)", rho),
            "samples": _SAMPLES_AVG,
            "noise": _NOISE,
        },
    )


_SPECS = (
    _lanczos("lambda_max", "largest Hessian eigenvalue (Lanczos)"),
    _lanczos("top_k", "k largest Hessian eigenvalues (Lanczos)", k=True),
    _lanczos("lambda_min", "smallest Hessian eigenvalue (Lanczos)"),
    MetricSpec(
        "trace",
        "Hessian trace (Hutch++)",
        {
            "method": Option(str, "hutch++", "trace estimator", choices=("hutch++", "hutchinson")),
            "num_samples": _count("budget of Hessian-vector products (probes)", 60, low=3),
        },
        frozenset({"hvp"}),
    ),
    MetricSpec(
        "esd",
        "Hessian spectral density (SLQ)",
        {
            "runs": _count("independent SLQ runs (random start vectors)", 3),
            "steps": _count("Lanczos steps per run", 60, low=2),
            "num_points": _count("grid points of the density", 400, low=2),
        },
        frozenset({"hvp"}),
        "n/a: a density",
    ),
    _worst("worst_case", "worst-case sharpness, p=2, c=1 (auto-PGD)", 0.05),
    _worst("worst_case_adaptive", "worst-case sharpness, p=2, c=|w| (auto-PGD)", 0.5),
    _worst("worst_case_inf", "worst-case sharpness, p=inf, c=1 (auto-PGD)", 0.001),
    _worst("worst_case_adaptive_inf", "worst-case sharpness, p=inf, c=|w| (auto-PGD)", 0.01),
    _average("average_case", "average-case sharpness, Gaussian, c=1", 0.01),
    _average("average_case_adaptive", "average-case sharpness, Gaussian, c=|w|", 0.1),
    MetricSpec(
        "pac_bayes",
        "PAC-Bayes flatness 1/sigma^2 (accuracy drop 0.1; bigger sigma = flatter)",
        _pac_options(),
        frozenset({"accuracy"}),
        "n/a: bisection",
        True,
    ),
    MetricSpec(
        "pac_bayes_mag",
        "magnitude-aware PAC-Bayes flatness 1/sigma^2 (bigger sigma = flatter)",
        _pac_options(),
        frozenset({"accuracy"}),
        "n/a: bisection",
        True,
    ),
    MetricSpec(
        "fisher_rao",
        "Fisher-Rao norm (empirical Fisher)",
        {
            "fisher": Option(
                str,
                "empirical",
                "Fisher of the data labels or of the model's own",
                choices=("empirical", "model"),
            )
        },
        frozenset({"per_example"}),
    ),
    MetricSpec(
        "epsilon_sharpness",
        "Keskar epsilon-sharpness (box, full data)",
        {
            "epsilon": _positive("half-width of the box, |d_i| <= eps (|w_i| + 1)", 1e-3),
            "steps": _PGD_STEPS,
            "restarts": _RESTARTS,
        },
    ),
)

#: metric name -> :class:`MetricSpec`, in the order of ``sharpkit measure --help``
REGISTRY: dict[str, MetricSpec] = {s.name: s for s in _SPECS}


def _suggest(word: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def resolve_options(
    metrics: Sequence[str],
    options: Mapping[str, Mapping[str, Any]] | None,
    *,
    from_text: bool = False,
    where: str = "options",
) -> dict[str, dict[str, Any]]:
    """Every requested metric's options: defaults overridden by ``options``, all checked.

    Args:
        metrics: the requested metric names (each in :data:`REGISTRY`).
        options: ``{metric: {key: value}}`` overrides.
        from_text: values are command-line strings (parsed to each option's type).
        where: the argument's name in messages (``"options"`` or ``"--set"``).

    Returns:
        ``{metric: {key: value}}`` for every requested metric, fully resolved.

    Raises:
        ValueError: an unknown metric or key, an option for a metric that was not
            requested, or a value of the wrong type or out of its range; the message
            names ``metric.key`` and the valid values.

    Example:
        >>> resolve_options(["worst_case"], {"worst_case": {"rho": 0.1}})["worst_case"]["rho"]
        0.1
        >>> resolve_options(["worst_case"], {"worst_case": {"rhoo": 0.1}})
        Traceback (most recent call last):
        ...
        ValueError: options: worst_case has no option 'rhoo' (did you mean 'rho'?); it takes m, restarts, rho, steps
    """
    unknown = [m for m in metrics if m not in REGISTRY]
    if unknown:
        raise ValueError(f"metrics: unknown {unknown}; known: {', '.join(REGISTRY)}")
    options = options or {}
    if not isinstance(options, Mapping):
        raise ValueError(f"{where}: expected a dict {{metric: {{key: value}}}}, got {options!r}")
    for metric, given in options.items():
        if metric not in REGISTRY:
            raise ValueError(
                f"{where}: unknown metric {metric!r}{_suggest(str(metric), list(REGISTRY))}"
            )
        if metric not in metrics:
            raise ValueError(
                f"{where}: options for {metric!r}, which is not among the requested metrics "
                f"({', '.join(metrics)})"
            )
        if not isinstance(given, Mapping):
            raise ValueError(f"{where}: {metric}: expected a dict of options, got {given!r}")
    out: dict[str, dict[str, Any]] = {}
    for metric in metrics:
        spec = REGISTRY[metric]
        given = options.get(metric, {})
        resolved = spec.defaults()
        for key, value in given.items():
            if key not in spec.options:
                raise ValueError(
                    f"{where}: {metric} has no option {key!r}{_suggest(str(key), spec.options)}; "
                    f"it takes {', '.join(sorted(spec.options)) or 'no options'}"
                )
            resolved[key] = spec.options[key].check(
                f"{where}: {metric}.{key}", value, from_text=from_text
            )
        out[metric] = resolved
    return out


def describe_metrics() -> str:
    """The metrics and their options with defaults, for ``sharpkit measure --help``."""
    lines = []
    for spec in REGISTRY.values():
        lines.append(f"  {spec.name}: {spec.description}")
        for key, o in spec.options.items():
            default = "none" if o.default is None else o.default
            lines.append(f"      {spec.name}.{key}={default}  {o.help}; {o.range_text()}")
    return "\n".join(lines)
