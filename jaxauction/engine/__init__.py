"""The auction decode engine: token-by-token auctions with an LLM, for batches of different auctions.

An auction has ``n`` agents, each a prompt and a bid, and optionally a base prompt that takes part
with a fixed bid nobody pays for. A batch of ``A`` auctions is laid out as ``A`` rows of ``m``
slots (``m = n_max``, + 1 with a base prompt); absent slots have zero bid and every logit ``-inf``.

1. :mod:`~jaxauction.engine.request` checks the arguments and encodes the prompts.
2. :mod:`~jaxauction.engine.plan` splits the batch into equal chunks that fit the memory budget.
3. Per chunk (:mod:`~jaxauction.engine.chunk`): the distinct prompts are prefilled once; slots with
   equal token sequences share one KV-cache row, live rows first.
4. Per token (:mod:`~jaxauction.engine.loop`): the auction program (rule, payments, draw:
   :mod:`~jaxauction.engine.step`), then the rows program (the next rows:
   :mod:`~jaxauction.engine.rows`) and the model program on the first live rows, both shared by
   every rule, payment and decoding. Lengths are compiled rounded up
   (:func:`~jaxauction.engine.plan.token_slots`).
5. Compiled programs are kept in a bounded table and on disk (:mod:`~jaxauction.engine.runtime`).
"""

from jaxauction.engine.api import GenerationResult, generate
from jaxauction.engine.plan import DEFAULT_MEMORY_BUDGET, Plan, make_plan, parse_memory_budget, plan_chunks
from jaxauction.engine.request import DECODINGS, PAYMENTS, Auction, GenerateOptions
from jaxauction.engine.rows import RowUpdate, next_rows, row_capacities
from jaxauction.engine.runtime import enable_compilation_cache
from jaxauction.engine.step import auction_step

__all__ = [
    "DECODINGS",
    "DEFAULT_MEMORY_BUDGET",
    "PAYMENTS",
    "Auction",
    "GenerateOptions",
    "GenerationResult",
    "Plan",
    "RowUpdate",
    "auction_step",
    "enable_compilation_cache",
    "generate",
    "make_plan",
    "next_rows",
    "parse_memory_budget",
    "plan_chunks",
    "row_capacities",
]
