"""A griffe extension: a Google-style ``Example:`` section is read as ``Examples:``.

griffe parses only the plural title as an examples section (doctest lines become
highlighted console blocks); the singular one, which sharpkit's docstrings use,
would otherwise be an admonition whose ``>>>`` lines are read as prose.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SINGULAR = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` section titles to ``Examples:`` before parsing."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _SINGULAR.sub(r"\1Examples:", obj.docstring.value)
