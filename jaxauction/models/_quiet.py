"""Silences exactly transformers' "PyTorch was not found" advisory (imported before transformers).

The model backend deliberately runs without torch (tokenizers only), so that advisory is noise; every other
transformers message is left alone.
"""

from __future__ import annotations

import logging

ADVISORY = "PyTorch was not found"


class NoTorchAdvisory(logging.Filter):
    """Drops the log records whose message starts with :data:`ADVISORY`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ADVISORY)


_logger = logging.getLogger("transformers")
if not any(isinstance(f, NoTorchAdvisory) for f in _logger.filters):
    _logger.addFilter(NoTorchAdvisory())
