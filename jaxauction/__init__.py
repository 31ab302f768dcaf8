"""jaxauction: JAX-accelerated, differentiable mechanism design for LLM token auctions.

``import jaxauction`` imports nothing heavy: the submodules and the public names (``ja.generate``,
``ja.linear``, ...) load on first use (PEP 562). So the command line can set up its Ctrl-C handling
(:mod:`jaxauction.console`) before JAX starts, and ``import jaxauction`` costs milliseconds.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_SUBMODULES = (
    "aggregation",
    "base",
    "compare",
    "design",
    "engine",
    "mechanism",
    "models",
    "outputs",
    "payments",
    "preferences",
    "prompts",
    "reply",
    "rules",
    "sampling",
    "sharding",
    "simulation",
)
_NAMES = {
    "AuctionOutcome": "auction",
    "TokenAuction": "auction",
    "Rule": "base",
    "as_rule": "base",
    "register": "base",
    "rule_names": "base",
    "Auction": "engine",
    "GenerateOptions": "engine",
    "GenerationResult": "engine",
    "generate": "engine",
    "linear": "rules",
    "log_linear": "rules",
}

__all__ = sorted([*_SUBMODULES, *_NAMES])

if TYPE_CHECKING:  # the names as static analysis should see them
    from jaxauction import (  # noqa: F401
        aggregation,
        base,
        compare,
        design,
        engine,
        mechanism,
        models,
        outputs,
        payments,
        preferences,
        prompts,
        reply,
        rules,
        sampling,
        sharding,
        simulation,
    )
    from jaxauction.auction import AuctionOutcome, TokenAuction  # noqa: F401
    from jaxauction.base import Rule, as_rule, register, rule_names  # noqa: F401
    from jaxauction.engine import Auction, GenerateOptions, GenerationResult, generate  # noqa: F401
    from jaxauction.rules import linear, log_linear  # noqa: F401


def __getattr__(name: str):
    if name in _SUBMODULES or (not name.startswith("__") and importlib.util.find_spec(f"jaxauction.{name}")):
        return importlib.import_module(f"jaxauction.{name}")  # any submodule, as the eager import gave them
    if name in _NAMES:
        value = getattr(importlib.import_module(f"jaxauction.{_NAMES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jaxauction' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
