"""Gradient-based design of token-auction aggregation rules.

* :mod:`~jaxauction.design.base`: the family protocol (:class:`Family`: parameters, domain, ``params ->
  Rule``; :func:`register_family`), which every objective, the certificate and the search use.
* :mod:`~jaxauction.design.families`: the power-mean family (``rho``, bid transform ``gamma``, base
  bid, temperature) as a pytree of parameters; :func:`bind` gives a rule ``rule(logits, bids)``.
* :mod:`~jaxauction.design.learned`: the learned monotone family, weights ``∝ g_theta(b / u)`` with ``g``
  increasing for every ``theta`` (monotone by construction; closed-form payment).
* :mod:`~jaxauction.design.objectives`: welfare, revenue, monotonicity violation and distance to a
  reference rule over a batch of auctions, jit-compiled and differentiable; :func:`certify_rule`, the
  strict monotonicity certificate (docs/maths.md §4) a design claim must carry on held-out auctions.
* :mod:`~jaxauction.design.search`: an optax search with a violation budget (augmented Lagrangian),
  checkpoints that resume, and a progress bar; its result carries the strict certificate of the rule
  it found (held-out auctions when given), and ``monotone=True`` searches the family's monotone part.
* :mod:`~jaxauction.design.data`: synthetic Dirichlet auctions or the bundled LLM's (cached).
"""

from jaxauction.aggregation import log_bid_weights  # the family's bid transform; its home is the core
from jaxauction.design import checkpoint, objectives  # noqa: F401 (submodules)
from jaxauction.design.base import Bounds, Family, describe, family_of, register_family, registered_families
from jaxauction.design.checkpoint import SearchState
from jaxauction.design.data import (
    AuctionBatch,
    dirichlet_auctions,
    llm_auctions,
    load_batch,
    make_batch,
    save_batch,
)
from jaxauction.design.families import (
    POWER_MEAN,
    PowerMeanParams,
    bind,
    fixed_rule,
    power_mean,
    trainable_mask,
)
from jaxauction.design.learned import MONOTONE_WEIGHTS, MonotoneWeightParams, learned_rule
from jaxauction.design.objectives import (
    aggregate,
    certify_rule,
    distance,
    evaluate,
    kl_divergence,
    revenue,
    rule_of,
    violation,
    welfare,
)
from jaxauction.design.search import CertificateWarning, Constraint, SearchResult, augmented_lagrangian, search

__all__ = [
    "AuctionBatch",
    "Bounds",
    "CertificateWarning",
    "Constraint",
    "Family",
    "MONOTONE_WEIGHTS",
    "MonotoneWeightParams",
    "POWER_MEAN",
    "PowerMeanParams",
    "SearchResult",
    "SearchState",
    "aggregate",
    "augmented_lagrangian",
    "bind",
    "certify_rule",
    "describe",
    "dirichlet_auctions",
    "distance",
    "evaluate",
    "registered_families",
    "family_of",
    "fixed_rule",
    "kl_divergence",
    "learned_rule",
    "llm_auctions",
    "load_batch",
    "log_bid_weights",
    "make_batch",
    "power_mean",
    "register_family",
    "revenue",
    "rule_of",
    "save_batch",
    "search",
    "trainable_mask",
    "violation",
    "welfare",
]
