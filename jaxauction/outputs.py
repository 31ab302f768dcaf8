"""Public output-file helpers (for experiments and user scripts): atomic writes and up-front path checks.

``atomic_path(path)`` yields a temporary path that is renamed onto ``path`` on success (removed on any
exception); ``write_json(path, data)`` and ``save_figure(figure, path)`` write through it;
``check_output_path(option, path, inputs=(), suffixes=None)`` refuses a path that cannot be written,
naming ``option``, before any work starts. The implementation lives in ``jaxauction._io``.
"""

from jaxauction._io import atomic_path, check_output_path, figure_suffixes, save_figure, write_json

__all__ = ["atomic_path", "check_output_path", "figure_suffixes", "save_figure", "write_json"]
