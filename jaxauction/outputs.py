"""Output files: atomic writes (an interrupted run never leaves a half-written JSON, PNG or checkpoint)
and up-front path checks (a bad output path fails before any work starts, naming the option).

``atomic_path(path)`` yields a temporary path that is renamed onto ``path`` on success (removed on any
exception); ``write_json(path, data)`` and ``save_figure(figure, path)`` write through it;
``check_output_path(option, path, inputs=(), suffixes=None)`` refuses a path that cannot be written.

Atomic replacement is for regular files and new paths. A symlink is followed: the file it points to is
replaced atomically and the link stays a link. A FIFO, a character device (``/dev/null``, a terminal) or a
file descriptor (``/dev/stdout``, ``/proc/self/fd/1``, ``/dev/fd/3``) is written into directly, as
``open(path, "w")`` would, never replaced. A socket or a block device is refused. :func:`destination`
is the one home of that decision.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "Destination",
    "atomic_path",
    "check_output_path",
    "destination",
    "figure_suffixes",
    "save_figure",
    "write_json",
]


class Destination(NamedTuple):
    """Where a write to an output path lands: ``path`` (symlinks followed) and whether it is replaced
    atomically (a regular file or a new path) or written into (a FIFO, a character device, a descriptor)."""

    path: Path
    atomic: bool


_MAX_LINKS = 40  # as the kernel's limit on symbolic links followed in one lookup


def destination(path: str | os.PathLike, *, option: str = "path") -> Destination:
    """Follows the symlinks of ``path`` and says how to write there (see the module docstring).

    A link in a ``/proc/<pid>/fd`` folder (what ``/dev/stdout`` and ``/dev/fd/N`` lead to) is a file
    descriptor: the chain stops there and the write goes into it. Raises ``ValueError`` naming ``option``
    for a socket, a block device or a symlink loop.
    """
    path = Path(path).absolute()  # no lexical ".." folding: the kernel resolves "link/.." through the link
    for _ in range(_MAX_LINKS):
        if not path.is_symlink():
            break
        if _is_descriptor_link(path):
            return Destination(path, False)  # open() follows the descriptor; its kind decides below
        path = path.parent / os.readlink(path)
    else:
        raise ValueError(f"{option}: {path}: too many levels of symbolic links (a loop?); give a file path.")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return Destination(path, True)
    except OSError as error:
        raise ValueError(f"{option}: cannot write {path}: {error.strerror or error}.") from None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):  # a folder is refused by check_output_path
        return Destination(path, True)
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        return Destination(path, False)
    kind = "a socket" if stat.S_ISSOCK(mode) else "a block device" if stat.S_ISBLK(mode) else "not a file"
    raise ValueError(f"{option}: {path} is {kind}, which cannot take the output; give a file path.")


def _is_descriptor_link(path: Path) -> bool:
    folder = Path(os.path.realpath(path.parent))
    return folder.name == "fd" and folder.parts[:2] == ("/", "proc")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success it is renamed onto ``path``.

    On any exception (KeyboardInterrupt included) the temporary file is removed and ``path`` is left
    as it was. ``path`` is resolved by :func:`destination`: through a symlink the file it points to is
    replaced (the link stays); a FIFO, a character device or a file descriptor is yielded itself, to be
    written into (not atomic: a reader sees what was written before a failure).
    """
    target, atomic = destination(path)
    if not atomic:
        yield target
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600; give what open() would
        os.replace(temporary, target)
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
    way that is a file; a place where no file can be created (probed with an unnamed temporary file); a
    socket, a block device or a symlink loop (:func:`destination`); a FIFO, character device or file
    descriptor without write permission (not opened by the check). Missing parent folders are fine:
    :func:`atomic_path` creates them when it writes. Nothing is created or changed by the check.
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
    _existing_folder(option, path)
    target, atomic = destination(path, option=option)
    if not atomic:  # written into: opening it now could block (a FIFO without a reader) or consume it
        if not os.access(target, os.W_OK):
            raise ValueError(f"{option}: cannot write {path}: permission denied; choose a writable place.")
        return path
    folder = _existing_folder(option, target)
    try:  # an unnamed file where the system allows (O_TMPFILE): even Ctrl-C here leaves nothing behind
        with tempfile.TemporaryFile(prefix=".jaxauction-write-check.", dir=folder):
            pass
    except OSError as error:
        raise ValueError(
            f"{option}: cannot write {path}: no file can be created in {folder} ({error.strerror or error}); "
            "choose a writable place."
        ) from None
    return path


def _existing_folder(option: str, path: Path) -> Path:
    """The nearest existing folder above ``path`` (where its missing folders would be created)."""
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{option}: cannot write {path}: {folder} is a file, not a folder.")
    return folder


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
