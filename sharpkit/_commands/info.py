"""``sharpkit info``: versions and the device sharpkit would use."""

from __future__ import annotations

import argparse
import importlib
import platform

import torch

from sharpkit import __version__
from sharpkit._device import resolve_device

_PACKAGES = (
    "torch",
    "numpy",
    "scipy",
    "matplotlib",
    "seaborn",
    "pandas",
    "sklearn",
    "pyhessian",
    "peft",
)

#: import name -> distribution name, where they differ
_DISTRIBUTIONS = {"sklearn": "scikit-learn"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="print versions and the device sharpkit would use")
    p.set_defaults(func=run)


def versions() -> dict[str, str]:
    out = {"sharpkit": __version__, "python": platform.python_version()}
    for name in _PACKAGES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            out[name] = "not installed"
            continue
        version = getattr(mod, "__version__", None)
        if version is None:  # e.g. pyhessian has no __version__: ask the installed metadata
            from importlib.metadata import PackageNotFoundError
            from importlib.metadata import version as dist_version

            try:
                version = dist_version(_DISTRIBUTIONS.get(name, name))
            except PackageNotFoundError:
                version = "unknown"
        out[name] = str(version)
    return out


def run(args: argparse.Namespace) -> int:
    for name, version in versions().items():
        print(f"{name:<12} {version}")
    dev = resolve_device(None)
    print(f"{'device':<12} {dev}")
    if dev.type == "cuda":
        print(f"{'gpu':<12} {torch.cuda.get_device_name(dev)}")
    print(f"{'threads':<12} {torch.get_num_threads()}")
    return 0
