"""jaxauction: JAX-accelerated, differentiable mechanism design for LLM token auctions."""

__version__ = "0.1.0"

from jaxauction import (
    aggregation,
    base,
    compare,
    design,
    engine,
    mechanism,
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
from jaxauction.auction import AuctionOutcome, TokenAuction
from jaxauction.base import Rule, as_rule, register, rule_names
from jaxauction.engine import Auction, GenerateOptions, GenerationResult, generate
from jaxauction.rules import linear, log_linear

__all__ = [
    "Auction",
    "AuctionOutcome",
    "GenerateOptions",
    "GenerationResult",
    "Rule",
    "TokenAuction",
    "aggregation",
    "as_rule",
    "base",
    "compare",
    "design",
    "engine",
    "generate",
    "linear",
    "log_linear",
    "mechanism",
    "models",
    "outputs",
    "payments",
    "preferences",
    "prompts",
    "register",
    "reply",
    "rule_names",
    "rules",
    "sampling",
    "sharding",
    "simulation",
]


def __getattr__(name):
    # The model backend imports transformers (seconds): load it on first use, not on `import jaxauction`.
    if name == "models":
        import importlib

        return importlib.import_module("jaxauction.models")
    raise AttributeError(f"module 'jaxauction' has no attribute {name!r}")
