"""The ``jaxauction`` console command and ``python -m jaxauction``: the command line behind a Ctrl-C guard.

Ctrl-C is honoured whenever it comes: one line on stderr, exit status 130, and no half-written output
(outputs are written atomically, :mod:`jaxauction.outputs`; what was printed before stays). Python's
default handling misses this in the first seconds, and the guard answers each way it fails:

- JAX and the model code take seconds to import; a ``KeyboardInterrupt`` raised there ends in a traceback
  from the imports, and raised inside a native extension's initialisation (jaxlib) it can abort or
  crash the process. This module imports only the standard library (``import jaxauction`` is lazy) and
  installs its handler first. While the command line is imported, nothing can be half-written yet: Ctrl-C
  prints the line and exits at once. Later, a Ctrl-C that arrives inside an import is held back and
  delivered again (every 10 ms) until the import is over.
- JAX runs a Python callback at every garbage collection (``_xla_gc_callback``), often while it starts;
  an exception raised inside it is printed as "Exception ignored" and dropped, and the run would go on
  to the end. The guard sees such a dropped ``KeyboardInterrupt`` in ``sys.unraisablehook`` and delivers
  SIGINT again, until it lands in ordinary code.

Once the command has returned (output complete, status decided), SIGINT is ignored while the process
exits: JAX's teardown takes most of a second, and a Ctrl-C there would print a traceback from an exit
handler or kill the process without a word.

Redelivery is a real SIGINT sent to the main thread by a helper thread, so a main thread blocked in a
system call wakes up. A SIGINT that the parent process ignores (``nohup``, a background job of a
script) stays ignored, as Python does. Nothing here imports JAX.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

__all__ = ["EXIT_INTERRUPTED", "guard", "interrupted", "main"]

EXIT_INTERRUPTED = 130
"""The exit status after Ctrl-C (128 + SIGINT, what shells report for a process ended by it)."""


def interrupted() -> int:
    """Prints the one line that ends an interrupted command and returns :data:`EXIT_INTERRUPTED`."""
    print("interrupted; no half-written output file is left behind", file=sys.stderr)
    return EXIT_INTERRUPTED


def _exit_at_once() -> None:
    """Says the line and ends the process now with :data:`EXIT_INTERRUPTED` (before the command runs, when
    there is nothing to clean up and unwinding a native extension's import is not safe)."""
    interrupted()
    _end_process()


def _end_process() -> None:
    """Flushes the streams and ends the process with :data:`EXIT_INTERRUPTED` without the interpreter's
    teardown: after an interrupted computation JAX's teardown can crash (seen once: a segmentation fault
    after the line), and the command's own clean-up has run by then."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(EXIT_INTERRUPTED)


class _Guard:
    """The SIGINT handler: exits at once while starting, raises ``KeyboardInterrupt`` once the command runs
    (held back inside imports), and delivers again any interrupt that was held back or dropped."""

    def __init__(self) -> None:
        self.received = 0
        self.running = False  # False while the command line is imported: nothing to clean up yet
        self._again = threading.Event()
        self._closed = False
        self._main = threading.main_thread().ident
        self._previous_hook = sys.unraisablehook

    def on_sigint(self, signum, frame) -> None:
        self.received += 1
        if not self.running:
            _exit_at_once()
        if _inside_import(frame):
            self._again.set()
            return
        raise KeyboardInterrupt

    def unraisable(self, unraisable) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            self._again.set()  # raised where Python drops exceptions (a gc callback, __del__): deliver again
            return
        self._previous_hook(unraisable)

    def redeliver(self) -> None:
        while True:
            self._again.wait()
            self._again.clear()
            if self._closed:
                return
            time.sleep(0.01)
            if hasattr(signal, "pthread_kill"):
                signal.pthread_kill(self._main, signal.SIGINT)
            else:  # pragma: no cover (Windows)
                import _thread

                _thread.interrupt_main()

    def close(self) -> None:
        self._closed = True
        self._again.set()


def _inside_import(frame) -> bool:
    """Whether ``frame`` runs inside an import (a module body, possibly a native extension's initialisation)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def guard(after=None) -> Iterator[_Guard | None]:
    """Installs the SIGINT handler and the unraisable hook for the block, then restores them (SIGINT gets
    ``after`` if given). Yields None, changing nothing, where Python's own SIGINT handling is not in place:
    SIGINT ignored or handled by the parent's choice, or not the main thread."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield None
        return
    state = _Guard()
    previous = signal.signal(signal.SIGINT, state.on_sigint)
    sys.unraisablehook = state.unraisable
    threading.Thread(target=state.redeliver, name="jaxauction-sigint", daemon=True).start()
    try:
        yield state
    finally:
        state.close()
        sys.unraisablehook = state._previous_hook
        signal.signal(signal.SIGINT, previous if after is None else after)


def main(argv: list[str] | None = None) -> int:
    """Runs ``jaxauction`` (:func:`jaxauction.cli.main`) with Ctrl-C honoured from the first instant.

    The process entry point: once the command has returned (its output complete, its status decided),
    SIGINT is ignored while the process exits. JAX's teardown takes most of a second, and a Ctrl-C there
    would otherwise print a traceback from an exit handler or kill the process without a word.
    """
    active = None
    try:
        with guard(after=signal.SIG_IGN) as active:
            from jaxauction import cli

            if active is not None:
                active.running = True
            status = cli.main(argv)
    except BaseException as error:
        # C code can turn a KeyboardInterrupt into another error (a failed extension import while JAX starts)
        if isinstance(error, KeyboardInterrupt) or (active is not None and active.received):
            _exit_at_once()
        raise
    if active is not None and active.received:
        if status != EXIT_INTERRUPTED:
            interrupted()  # an interrupt that never surfaced (or surfaced as an error line): it decides
        _end_process()
    return status
