"""The former home of the engine, kept as an alias of :mod:`jaxauction.engine`."""

from jaxauction.engine import *  # noqa: F403
from jaxauction.engine import __all__  # noqa: F401
