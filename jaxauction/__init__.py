"""jaxauction: JAX-accelerated, differentiable mechanism design for LLM token auctions."""

__version__ = "0.1.0"
