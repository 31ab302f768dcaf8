"""jaxauction: JAX-accelerated, differentiable mechanism design for LLM token auctions."""

__version__ = "0.1.0"

from jaxauction import aggregation, payments, preferences, sampling
from jaxauction.aggregation import linear, log_linear
from jaxauction.auction import AuctionOutcome, TokenAuction
from jaxauction import design, sharding, simulation
from jaxauction.generation import GenerationResult, generate
