"""What the engine keeps across calls: compiled programs (bounded), the disk cache, the progress bar."""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax

from jaxauction.models.base import compiler_options

__all__ = [
    "MAX_PROGRAMS",
    "TokenProgress",
    "compilations",
    "compile_seconds",
    "compiled",
    "default_cache_dir",
    "empty_program_table",
    "enable_compilation_cache",
    "held_programs",
    "program_texts",
    "program_count",
]

MAX_PROGRAMS = 48
"""Compiled programs kept in memory at most; the least recently used is dropped beyond it. Each
holds its machine code in memory mappings (Linux allows 65530 per process by default), so a
long-lived process that meets many shapes stays bounded; a dropped program comes back from the
disk cache (:func:`enable_compilation_cache`) when needed again."""

_PROGRAMS: collections.OrderedDict[Any, Any] = collections.OrderedDict()
_COMPILATIONS: collections.Counter[str] = collections.Counter()
_COMPILE_SECONDS: collections.Counter[str] = collections.Counter()


def _signature(args) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple(
        (leaf.shape, leaf.dtype, getattr(leaf, "sharding", None)) if hasattr(leaf, "shape") else leaf for leaf in leaves
    )


def compiled(function: Callable, static: tuple, args: tuple, *, donate: tuple[int, ...] = ()) -> Callable:
    """``function(*static, *args)`` compiled for the shapes, dtypes and shardings of ``args``.

    ``function`` is a module-level function and ``static`` hashable settings (a new value compiles a
    new program). Programs are kept in a least-recently-used table of :data:`MAX_PROGRAMS`; the
    arguments at positions ``donate`` (of ``args``) are donated to the program.
    """
    key = (function, static, _signature(args))
    program = _PROGRAMS.get(key)
    if program is not None:
        _PROGRAMS.move_to_end(key)
        return program
    jitted = jax.jit(
        functools.partial(function, *static), donate_argnums=donate, compiler_options=compiler_options() or None
    )
    start = time.perf_counter()
    program = jitted.lower(*args).compile()
    _COMPILE_SECONDS[function.__name__] += time.perf_counter() - start
    _COMPILATIONS[function.__name__] += 1
    _PROGRAMS[key] = program
    while len(_PROGRAMS) > MAX_PROGRAMS:
        _PROGRAMS.popitem(last=False)
    return program


def compilations() -> dict[str, int]:
    """How many programs each engine function compiled (or loaded from the disk cache) in this process."""
    return dict(_COMPILATIONS)


def compile_seconds() -> dict[str, float]:
    """Seconds spent tracing and compiling (or loading from disk) each engine function's programs."""
    return dict(_COMPILE_SECONDS)


def program_count() -> int:
    """The compiled programs held now (at most :data:`MAX_PROGRAMS`)."""
    return len(_PROGRAMS)


def held_programs() -> list[tuple[Callable, tuple]]:
    """``(function, static)`` of every compiled program held now, least recently used first; one entry
    per program, so a function and settings compiled for two argument shapes appear twice."""
    return [(key[0], key[1]) for key in _PROGRAMS]


def program_texts(name: str) -> list[str]:
    """The compiled HLO text of every held program whose function is named ``name`` (e.g.
    ``"_model_program"``), least recently used first: to inspect what XLA made of it (its collectives)."""
    return [program.as_text() for key, program in _PROGRAMS.items() if key[0].__name__ == name]


@contextlib.contextmanager
def empty_program_table() -> Iterator[None]:
    """Runs the body with an empty table of compiled programs, as a new process would start.

    Afterwards the earlier programs come back with the body's added as the most recently used (the
    next compilation trims the table to :data:`MAX_PROGRAMS`), so nothing compiled in the body or
    before it needs compiling again. For measuring which programs a call compiles (the tests).
    """
    global _PROGRAMS
    earlier, _PROGRAMS = _PROGRAMS, collections.OrderedDict()
    try:
        yield
    finally:
        earlier.update(_PROGRAMS)
        _PROGRAMS = earlier


_CACHE_STATE: dict[str, Any] = {}


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/jaxauction/xla`` (default ``~/.cache/jaxauction/xla``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "jaxauction" / "xla"


def enable_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache for this process (once), unless already configured.

    The folder is ``JAXAUCTION_CACHE_DIR`` if set (an empty string or ``"off"`` disables the cache),
    else :func:`default_cache_dir`. Nothing changes when the user configured a cache already
    (``jax_compilation_cache_dir`` or ``JAX_COMPILATION_CACHE_DIR``). Every program taking at least
    0.1 s to compile is stored, so a second process loads the model's programs instead of compiling
    them. Called by :func:`jaxauction.generate`; returns the folder in use, or None.
    """
    if "dir" in _CACHE_STATE:
        return _CACHE_STATE["dir"]
    configured = jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    setting = os.environ.get("JAXAUCTION_CACHE_DIR")
    if configured:
        folder = str(configured)
    elif setting is not None and setting.strip().lower() in ("", "off"):
        folder = None
    else:
        folder = str(Path(setting).expanduser()) if setting else str(default_cache_dir())
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError:
            folder = None  # an unwritable cache folder must not stop a generation
        if folder is not None:
            from jax.experimental.compilation_cache import compilation_cache

            jax.config.update("jax_compilation_cache_dir", folder)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
            compilation_cache.reset_cache()  # JAX decides once per process whether to use the cache
    _CACHE_STATE["dir"] = folder
    return folder


class TokenProgress:
    """One progress bar over the generated tokens of a whole batch (all chunks); a no-op when disabled.

    Use as a context manager; :meth:`advance` after every decoded token, :meth:`finish_chunk` when a
    chunk ends (early if all its auctions stopped)."""

    def __init__(self, tokens_per_chunk: int, num_chunks: int, enabled: bool):
        self._per_chunk, self._chunks_done, self._bar = tokens_per_chunk, 0, None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=tokens_per_chunk * num_chunks, desc="tokens", unit="tok", leave=False)

    def __enter__(self) -> TokenProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def finish_chunk(self) -> None:
        self._chunks_done += 1
        if self._bar is not None:
            self._bar.n = self._chunks_done * self._per_chunk
            self._bar.refresh()
