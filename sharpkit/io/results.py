"""Result files: written atomically, read back checked.

Results convert to plain JSON with :func:`sharpkit.protocol.to_jsonable` (where
:class:`~sharpkit.protocol.MeasurementProtocol`, the record of how a number was
measured, lives too). Files are written atomically (:func:`write_json_atomic`): a
crash mid-write never leaves a half-written result that a rerun would trust.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from sharpkit.protocol import to_jsonable

__all__ = [
    "ordinary_permissions",
    "read_json",
    "writable_file",
    "write_bytes_atomic",
    "write_json_atomic",
]


def ordinary_permissions(path: str | Path) -> None:
    """Give a file made by :func:`tempfile.mkstemp` (mode 0600) the mode a plain
    ``open(path, "w")`` would have given it (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def writable_file(path: Any) -> Path:
    """``path`` as a :class:`Path` whose folder exists, or a ``ValueError`` naming why not
    (a directory at the path, a file where a folder must be)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path: {str(path)!r} is a directory")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"path: cannot write {str(path)!r}: {str(parent)!r} is a file")
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and
    ``os.replace``, with ordinary permissions: a crash never leaves a half-written file.

    Example:
        >>> import tempfile, os
        >>> p = write_bytes_atomic(os.path.join(tempfile.mkdtemp(), "a", "x.txt"), b"hi")
        >>> p.read_bytes()
        b'hi'
    """
    path = writable_file(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        ordinary_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any, *, indent: int = 2) -> Path:
    """Write ``to_jsonable(obj)`` to ``path`` atomically (:func:`write_bytes_atomic`)."""
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False) + "\n"
    return write_bytes_atomic(path, text.encode())


def read_json(path: str | Path) -> Any:
    """Read a JSON file written by :func:`write_json_atomic`."""
    return json.loads(Path(path).read_text())
