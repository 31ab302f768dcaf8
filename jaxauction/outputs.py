"""Output files: atomic writes (an interrupted run never leaves a half-written JSON, PNG or checkpoint)
and up-front path checks (a bad output path fails before any work starts, naming the option).

``atomic_path(path)`` yields a temporary path that is renamed onto ``path`` on success (removed on any
exception); ``write_json(path, data)`` and ``save_figure(figure, path)`` write through it;
``check_output_path(option, path, inputs=(), suffixes=None)`` refuses a path that cannot be written.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "check_output_path", "figure_suffixes", "save_figure", "write_json"]


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


def check_output_path(
    option: str, path: str | os.PathLike | None, *, inputs: Iterable[str | os.PathLike] = (), suffixes=None
) -> Path | None:
    """Checks, before any work starts, that ``path`` can be written; returns it as a ``Path`` (None stays None).

    Refused with a ``ValueError`` naming ``option``: an empty path; a path onto an existing folder; a path
    equal to one of ``inputs`` (e.g. the configuration being read, or another output); a suffix not in
    ``suffixes`` (lower-case, with the dot, e.g. ``(".png", ".pdf")``; None accepts any); a folder on the
    way that is a file; a place where no file can be created (probed with a temporary file that is
    removed again). Missing parent folders are fine: :func:`atomic_path` creates them when it writes.
    Nothing is created or changed by the check.
    """
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{option}: expected a file path (str or os.PathLike), got {type(path).__name__} {path!r}.")
    if str(path).strip() == "":
        raise ValueError(f"{option}: the path is empty; give a file path such as outputs/result.json.")
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{option}: {path} is a folder; give a file path inside it, e.g. {path / 'result.json'}.")
    for source in inputs:
        if source is not None and str(source) != "" and _same_file(path, Path(source).expanduser()):
            raise ValueError(f"{option}: {path} is also an input or another output ({source}); choose another path.")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise ValueError(
            f"{option}: {path} has suffix {path.suffix or '(none)'!r}; expected one of {sorted(suffixes)} "
            f"(the suffix picks the file format), e.g. {path.with_suffix(sorted(suffixes)[0])}."
        )
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{option}: cannot write {path}: {folder} is a file, not a folder.")
    try:
        handle, probe = tempfile.mkstemp(prefix=".jaxauction-write-check.", dir=folder)
    except OSError as error:
        raise ValueError(
            f"{option}: cannot write {path}: no file can be created in {folder} ({error.strerror or error}); "
            "choose a writable place."
        ) from None
    os.close(handle)
    os.remove(probe)
    return path


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def figure_suffixes() -> tuple[str, ...]:
    """The suffixes matplotlib can save a figure as (``".png"``, ``".pdf"``, ``".svg"``, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return tuple(sorted("." + kind for kind in FigureCanvasBase.get_supported_filetypes()))


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
