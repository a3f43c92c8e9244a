"""MkDocs hooks: pages made at build time from the repository, never copied by hand.

- ``api/<module>.md``: one API page per public module of sharpkit, found by walking
  the package (a module or package whose dotted name has no part starting with
  ``_``). A package page shows its docstring, its public submodules, and the
  names of its ``__all__`` that are defined in a private submodule (``SAMBase``
  in ``sharpkit.optim._base``, say), so every public name has one home.
- ``benchmarks.md``: every table in ``analysis/benchmarks/results/*.md``, each
  included with a snippet directive (the file is read at build time).
- ``claims/...png``: the figures the claims report links to, taken from
  ``figures/experiments`` so that the report's relative image links resolve.
- ``notebooks/<notebook>.py``: the teaching notebooks, handed to mkdocs-jupyter,
  which executes them (see ``mkdocs.yml``).
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "sharpkit"
# Modules that are not part of the library's API (the command-line plumbing has its
# own page: the CLI's --help).
SKIP = {"sharpkit.cli"}


def _public(name: str) -> bool:
    return not any(part.startswith("_") for part in name.split("."))


def public_modules() -> list[str]:
    """Dotted names of sharpkit's public modules and packages, sorted."""
    pkg = importlib.import_module(PACKAGE)
    names = []
    for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{PACKAGE}."):
        if _public(info.name) and info.name not in SKIP:
            names.append(info.name)
    return sorted(names)


def _is_package(name: str) -> bool:
    return hasattr(importlib.import_module(name), "__path__")


def _api_page(name: str, modules: list[str]) -> str:
    mod = importlib.import_module(name)
    title = f"`{name}`"
    if not _is_package(name):
        return f"# {title}\n\n::: {name}\n"
    lines = [f"# {title}\n", f"::: {name}", "    options:", "      members: false\n"]
    children = [m for m in modules if m.rpartition(".")[0] == name]
    if children:
        lines.append("## Modules\n")
        lines += [f"- [`{c}`]({c}.md)" for c in children]
        lines.append("")
    # Public names whose defining module is private (or the package itself) have
    # no other page: document them here.
    homeless = []
    for attr in getattr(mod, "__all__", ()):
        obj = getattr(mod, attr, None)
        where = getattr(obj, "__module__", None)
        if where is None or not (callable(obj) or isinstance(obj, type)):
            continue
        if where == name or (where.startswith(name + ".") and not _public(where)):
            homeless.append(attr)
    if homeless:
        lines.append("## Defined here\n")
        lines += [f"::: {name}.{attr}\n" for attr in homeless]
    return "\n".join(lines) + "\n"


def _benchmarks_page() -> str:
    results = sorted((ROOT / "analysis" / "benchmarks" / "results").glob("*.md"))
    lines = [
        "# Benchmarks",
        "",
        "The tables below are included, at build time, from the files the benchmark",
        "scripts in `analysis/benchmarks/` write (`analysis/benchmarks/results/*.md`).",
        "Every ratio compares a case with its baseline in the same interleaved round;",
        "each table names the machine it was measured on.",
        "",
    ]
    for path in results:
        rel = path.relative_to(ROOT).as_posix()
        lines += [f"## `{path.stem}`", "", f'--8<-- "{rel}"', ""]
    return "\n".join(lines)


def on_config(config):
    modules = public_modules()
    config["extra"]["api_modules"] = modules
    api_nav = [{"Overview": "api/index.md"}] + [{m: f"api/{m}.md"} for m in modules]
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
    gallery_nav = [{"Overview": "course.md"}] + [
        {p.stem.replace("_", " ", 1): f"notebooks/{p.name}"} for p in notebooks
    ]
    for entry in config["nav"]:
        if isinstance(entry, dict) and "API reference" in entry:
            entry["API reference"] = api_nav
        if isinstance(entry, dict) and "Course" in entry:
            entry["Course"] = gallery_nav
    return config


@event_priority(100)  # before mkdocs-jupyter looks for notebooks among the files
def on_files(files, config):
    modules = config["extra"]["api_modules"]
    for name in modules:
        files.append(File.generated(config, f"api/{name}.md", content=_api_page(name, modules)))
    index = ["# API reference", "", "Generated from the docstrings of every public module.", ""]
    index += [f"- [`{m}`]({m}.md)" for m in modules]
    files.append(File.generated(config, "api/index.md", content="\n".join(index) + "\n"))
    files.append(File.generated(config, "benchmarks.md", content=_benchmarks_page()))
    figures = ROOT / "figures" / "experiments"
    for png in sorted(figures.rglob("*.png")):  # NAME/SCALE/KEY/NAME.png
        rel = png.relative_to(figures).as_posix()
        files.append(File.generated(config, f"claims/{rel}", abs_src_path=str(png)))
    # A real File rooted at the repository (not a generated one): mkdocs-jupyter wraps
    # it and reads its path through ``src_dir``.
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")):
        src = nb.relative_to(ROOT).as_posix()
        files.append(File(src, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files
