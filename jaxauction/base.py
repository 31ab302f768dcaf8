"""Shared types: the aggregation-rule protocol and the one registry of rules.

A rule is a :class:`Rule`: a name, the log-space aggregate ``(logits [..., n, V], bids [..., n]) ->
log q [..., V]`` and what the rest of the library may use when it knows more about the rule: a
probability-space form, a closed-form robust second-price payment, the valuation its KL (Myerson)
payments use, and whether it is monotone by construction. Every module that accepts a rule
(payments, auctions, generation, simulation, configurations, design) resolves it with
:func:`as_rule`, so a name, a built-in :class:`Rule`, a ``jax.jit`` of one, or a plain user function
``rule(logits, bids) -> log q`` work everywhere alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

__all__ = [
    "Aggregate",
    "ClosedFormPayment",
    "Rule",
    "Valuation",
    "as_rule",
    "register",
    "rule_names",
]

Aggregate = Callable[[jax.Array, jax.Array], jax.Array]
"""``(logits [..., n, V], bids [..., n]) -> [..., V]``: ``log q`` or, for a probability form, ``q``."""

Valuation = Callable[[jax.Array, jax.Array], jax.Array]
"""``(log_p [..., V], log_q [..., V]) -> [...]``: an agent's value of the outcome ``q``."""

ClosedFormPayment = Callable[[jax.Array, jax.Array, int], jax.Array]
"""``(logits [..., m, V], bids [..., m], n_charged) -> [..., n_charged]``: robust second-price payments
of the first ``n_charged`` rows (the rows after them, e.g. a base distribution, are never charged)."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """An aggregation rule and what the library knows about it (hashable: usable as a static argument).

    Attributes:
      name: the registry name (``"linear"``); a user rule gets its function's ``__name__``.
      log_aggregate: ``(logits [..., n, V], bids [..., n]) -> log q [..., V]``, normalised.
      probabilities: optional ``q = exp(log_aggregate(...))`` computed in probability space (cheaper
        to differentiate for the robust allocation).
      closed_form_payment: optional exact robust second-price payments (see :data:`ClosedFormPayment`);
        :func:`jaxauction.payments.second_price` uses it instead of the quadrature when present.
      valuation: the valuation whose bid-weighted welfare the rule maximises (docs/maths.md §7); the KL
        (Myerson) payments need it.
      monotone: True only if the rule is monotone by construction (docs/maths.md §4).
      path: the family an agent's own bid moves ``q`` along, when the rule is one of the built-in
        aggregates of the agents' distributions with weights ``lambda = b / sum b``: ``"linear"`` (``q``
        on the segment ``a p_i + (1 - a) r``) or ``"log_linear"`` (``q ∝ p_i^a r^(1 - a)``), ``a`` the
        own weight (docs/maths.md §5, "Structured payments"). The payments then skip autodiff
        (:func:`jaxauction.payments.second_price`); None (any other rule): the generic path.
    """

    name: str
    log_aggregate: Aggregate
    probabilities: Aggregate | None = None
    closed_form_payment: ClosedFormPayment | None = None
    valuation: Valuation | None = None
    monotone: bool = False
    path: str | None = None

    def __call__(self, logits: jax.Array, bids: jax.Array) -> jax.Array:
        return self.log_aggregate(logits, bids)


_REGISTRY: dict[str, Rule] = {}


def register(rule: Rule, *, overwrite: bool = False) -> Rule:
    """Adds ``rule`` to the registry under ``rule.name`` and returns it."""
    if not isinstance(rule, Rule):
        raise ValueError(f"register: expected a jaxauction.base.Rule, got {type(rule).__name__}.")
    registry = _registry()  # the built-ins first, so that a new rule cannot take their names
    if rule.name in registry and not overwrite and registry[rule.name] is not rule:
        raise ValueError(f"register: a rule named {rule.name!r} exists already; pass overwrite=True to replace it.")
    _REGISTRY[rule.name] = rule
    return rule


def _registry() -> dict[str, Rule]:
    """The registry, with the built-in rules in it (``import jaxauction`` is lazy, so they register here)."""
    import jaxauction.rules  # noqa: F401  (registers linear and log_linear; a dict lookup after the first call)

    return _REGISTRY


def rule_names() -> tuple[str, ...]:
    """The registered rule names, sorted."""
    return tuple(sorted(_registry()))


def _registered_for(function) -> Rule | None:
    """The registered rule whose aggregate is ``function`` (also through ``jax.jit``/functools wrappers)."""
    seen = set()
    while function is not None and id(function) not in seen:
        seen.add(id(function))
        if isinstance(function, Rule):
            return function
        for rule in _registry().values():
            if function is rule.log_aggregate:
                return rule
        function = getattr(function, "__wrapped__", None)
    return None


def as_rule(rule, *, argument: str = "rule") -> Rule:
    """Resolves a rule name, a :class:`Rule`, a wrapped built-in rule or a plain function to a :class:`Rule`.

    A plain callable ``rule(logits, bids) -> log q`` becomes ``Rule(name=its __name__, log_aggregate=it)``
    with nothing else known (generic autodiff payments; KL payments need an explicit valuation).
    """
    if isinstance(rule, Rule):
        return rule
    if isinstance(rule, str):
        if rule not in _registry():
            raise ValueError(
                f"{argument}: unknown rule {rule!r}; use one of {list(rule_names())}, a jaxauction.base.Rule "
                "or a callable rule(logits [..., n, V], bids [..., n]) -> log q [..., V]."
            )
        return _REGISTRY[rule]
    if callable(rule):
        known = _registered_for(rule)
        if known is not None:
            return known
        return Rule(name=getattr(rule, "__name__", type(rule).__name__), log_aggregate=rule)
    raise ValueError(
        f"{argument}: expected a rule name {list(rule_names())}, a jaxauction.base.Rule or a callable "
        f"rule(logits [..., n, V], bids [..., n]) -> log q [..., V]; got {type(rule).__name__} {rule!r:.60}."
    )
