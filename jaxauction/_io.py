"""Atomic output files: an interrupted run never leaves a half-written JSON or PNG."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success it is renamed onto ``path``.

    On any exception (KeyboardInterrupt included) the temporary file is removed and ``path`` is left
    as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600; give what open() would
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, data: Any) -> Path:
    """Writes ``data`` as indented JSON, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, default=_to_builtin) + "\n", encoding="utf-8")
    return Path(path)


def save_figure(figure, path: str | Path, **kwargs) -> Path:
    """Saves a matplotlib figure atomically (the format follows the suffix of ``path``)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format=fmt, **kwargs)
    return Path(path)


def _to_builtin(value):
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
