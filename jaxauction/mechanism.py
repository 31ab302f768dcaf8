"""The mechanism spec: one description of (rule, payment, decoding, temperature), one vocabulary, one validator.

Every door builds a :class:`MechanismSpec` through :meth:`MechanismSpec.create`, so a bad value gets
the same message whichever door it came through: :class:`jaxauction.GenerateOptions` (and the
keywords of :func:`jaxauction.generate`), a TOML configuration (:mod:`jaxauction.config`), the
command line's flags and JSONL batches (:mod:`jaxauction.cli`, :mod:`jaxauction.batch`) and
:class:`jaxauction.TokenAuction`. Each door only adds where the value came from (``payment: ...``,
``--payment: ...``, ``FILE:LINE: field 'payment': ...``, ``TokenAuction: payment: ...``).

Vocabulary:

* payment kinds :data:`PAYMENTS`: ``"second_price"`` (robust second-price payments, docs/maths.md §5),
  ``"kl"`` (Myerson payments for the rule's KL valuation, docs/maths.md §7) or ``None`` (no payments).
  Text (a TOML file, a command-line flag) spells ``None`` as ``"none"``: :func:`payment_from_text` is
  the one translation. :func:`allocation` is the one map from a payment kind to the allocation
  ``jaxauction.payments`` charges for (:data:`ALLOCATIONS`: ``"robust"`` or ``"kl"``); an unknown
  kind is a ``ValueError``, never silently one of them.
* decodings :data:`DECODINGS`: ``"sample"``, ``"greedy"``, ``"stable"``; :func:`stable_problem` is the
  one statement of when ``"stable"`` can run (two agents, the linear rule, no base prompt).
* the payment a rule justifies (:func:`justified_payment`): the expected second-price payment is the
  threshold payment of a *monotone* rule (docs/maths.md §4-5); for a rule whose ``monotone`` is False
  (``log_linear``, a plain function) it has no incentive meaning and can be negative, so
  :meth:`MechanismSpec.create` warns (:class:`PaymentWarning`) naming the rule and the payment that
  fits it (``"kl"``, Myerson payments for the rule's valuation, where it has one).
* temperature: a finite number in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]`` (``1e-30 .. 1e30``), so that
  it and its reciprocal are finite in float32 and a setting that is accepted runs in either precision
  (:func:`check_temperature`).

This module belongs to the mechanism maths: it imports nothing of the models, the engine or the
command line.
"""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxauction import base

__all__ = [
    "ALLOCATIONS",
    "DECODINGS",
    "MAX_TEMPERATURE",
    "MIN_TEMPERATURE",
    "PAYMENTS",
    "MechanismSpec",
    "PaymentWarning",
    "SpecError",
    "allocation",
    "check_decoding",
    "check_payment",
    "check_temperature",
    "describe",
    "justified_payment",
    "payment_from_text",
    "stable_problem",
]

PAYMENTS = ("second_price", "kl", None)
"""The payment kinds: ``"second_price"`` (robust allocation), ``"kl"`` (the rule's KL valuation), None."""
ALLOCATIONS = {"second_price": "robust", "kl": "kl", None: None}
"""The allocation each payment kind charges for (the ``allocation`` of :func:`jaxauction.payments.second_price`)."""
DECODINGS = ("sample", "greedy", "stable")
"""The decodings: draw from ``q``, its argmax, or docs/maths.md §5's stable sampler."""
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-30, 1e30
"""The accepted temperatures: it and its reciprocal are finite in float32 (so in either precision)."""
NO_PAYMENT_TEXT = "none"
"""How text (a TOML file, a command-line flag) writes the payment kind None."""


class SpecError(ValueError):
    """A bad mechanism setting: ``argument`` (the field) and ``reason`` (the same text at every door)."""

    def __init__(self, argument: str, reason: str):
        super().__init__(f"{argument}: {reason}")
        self.argument, self.reason = argument, reason


class PaymentWarning(UserWarning):
    """A payment kind the rule does not justify (``"second_price"`` with a rule that is not monotone)."""


def describe(value) -> str:
    """A short ``type repr`` of a user value for error messages."""
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"


def real_scalar(value, argument: str, expected: str) -> float:
    """A Python/NumPy real number (not bool, not a string, not an array of several), else :class:`SpecError`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        if hasattr(value, "dtype") and np.ndim(value) == 0:
            dtype = np.asarray(value).dtype
            if np.issubdtype(dtype, np.number):
                return float(value)
        raise SpecError(argument, f"expected {expected}; got {describe(value)}.")
    try:
        return float(value)
    except OverflowError:  # an int of hundreds of digits
        raise SpecError(argument, f"expected {expected}; got an integer of {len(str(abs(value)))} digits.") from None


def check_payment(payment, argument: str = "payment") -> str | None:
    """``payment`` if it is a payment kind (:data:`PAYMENTS`), else :class:`SpecError`."""
    if isinstance(payment, (str, type(None))) and payment in PAYMENTS:
        return payment
    raise SpecError(
        argument,
        f"expected one of {list(PAYMENTS)} ('second_price': robust second-price payments, 'kl': Myerson "
        f"payments for the rule's KL valuation, None: no payments, written {NO_PAYMENT_TEXT!r} in a configuration "
        f"file or on the command line); got {payment!r}.",
    )


def allocation(payment, argument: str = "payment") -> str | None:
    """The allocation (``"robust"``, ``"kl"`` or None) a payment kind charges for; :class:`SpecError` otherwise."""
    return ALLOCATIONS[check_payment(payment, argument)]


def payment_from_text(text: Any) -> Any:
    """The payment kind a text setting spells: ``"none"`` is None; anything else is passed on to be checked."""
    return None if text == NO_PAYMENT_TEXT else text


def check_decoding(decoding, argument: str = "decoding") -> str:
    """``decoding`` if it is one of :data:`DECODINGS`, else :class:`SpecError`."""
    if isinstance(decoding, str) and decoding in DECODINGS:
        return decoding
    raise SpecError(
        argument,
        f"expected one of {list(DECODINGS)} ('sample': draw from q, 'greedy': its argmax, 'stable': the stable "
        f"sampler of docs/maths.md §5); got {decoding!r}.",
    )


def check_temperature(temperature, argument: str = "temperature") -> float:
    """``temperature`` as a float in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]``, else :class:`SpecError`.

    One rule for every door and precision: the temperature and its reciprocal (every row's logits are
    divided by it) are finite in float32.
    """
    expected = (
        f"a finite number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] (it and its reciprocal finite in float32)"
    )
    value = real_scalar(temperature, argument, expected)
    if not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        raise SpecError(argument, f"expected {expected}; got {value!r}.")
    return value


def check_rule(rule, argument: str = "rule") -> base.Rule:
    """The :class:`jaxauction.base.Rule` of a rule name, rule or function (:func:`jaxauction.base.as_rule`)."""
    try:
        return base.as_rule(rule)
    except ValueError as error:
        raise SpecError(argument, str(error).removeprefix("rule: ")) from None


def justified_payment(rule: base.Rule) -> str | None:
    """The payment kind ``rule`` justifies: ``"second_price"`` for a monotone rule (the threshold payment,
    docs/maths.md §5), else ``"kl"`` where it has a valuation (Myerson payments, docs/maths.md §7), else None."""
    if rule.monotone:
        return "second_price"
    return "kl" if rule.valuation is not None else None


def payment_problem(rule: base.Rule, payment: str | None) -> str | None:
    """Why ``payment`` has no incentive meaning under ``rule`` (None if it has): second price needs a monotone rule."""
    if payment != "second_price" or rule.monotone:
        return None
    fits = justified_payment(rule)
    fix = (
        f"use payment {fits!r} (Myerson payments for the rule's valuation, docs/maths.md §7)"
        if fits
        else "use payment None, or a jaxauction.base.Rule with monotone=True if the rule is proven monotone"
    )
    return (
        f"payment 'second_price' with rule {rule.name!r}: the second-price payment is the threshold payment of a "
        f"monotone rule (docs/maths.md §4-5); rule {rule.name!r} is not monotone, so it has no incentive meaning "
        f"and can be negative. Fix: {fix}."
    )


def stable_problem(rule: base.Rule | str, num_agents: int | Sequence[int], has_base: bool) -> str | None:
    """Why ``decoding = "stable"`` cannot run with this rule, agent count(s) and base prompt (None if it can).

    ``num_agents``: the agent count of one auction, or of each auction of a batch.
    """
    counts = sorted({int(num_agents)} if isinstance(num_agents, (int, np.integer)) else {int(n) for n in num_agents})
    name = rule if isinstance(rule, str) else rule.name
    problems = []
    if counts != [2]:
        problems.append(f"{counts[0]} agents" if len(counts) == 1 else f"agent counts {counts}")
    if name != "linear":
        problems.append(f"rule {name!r}")
    if has_base:
        problems.append("a base prompt")
    if not problems:
        return None
    return (
        "decoding 'stable' is docs/maths.md §5's sampler for exactly two agents, the linear rule and no base prompt; "
        f"got {', '.join(problems)}. Use decoding 'sample' or 'greedy', or meet those conditions."
    )


@dataclasses.dataclass(frozen=True)
class MechanismSpec:
    """What decides each token: rule, payment kind, decoding and the agents' temperature (hashable).

    Build it with :meth:`create`, which checks every field and warns (:class:`PaymentWarning`) about a
    payment the rule does not justify. The constructor checks the fields too (a rule name or function
    is resolved, a bad value is a :class:`SpecError`), so a spec built directly is never invalid.

    Attributes:
      rule: a :class:`jaxauction.base.Rule` (:meth:`create` resolves names and functions).
      payment: a payment kind (:data:`PAYMENTS`). decoding: one of :data:`DECODINGS`.
      temperature: every agent row's logits are divided by it before aggregation; the rule, the
        payments and the draw from ``q`` are applied unchanged.
    """

    rule: base.Rule = dataclasses.field(default_factory=lambda: base.as_rule("linear"))
    payment: str | None = "second_price"
    decoding: str = "sample"
    temperature: float = 1.0

    def __post_init__(self):
        """Checks (and normalises) every field: :class:`SpecError` naming the argument and the fix."""
        rule = check_rule(self.rule)
        payment = check_payment(self.payment)
        if payment == "kl" and rule.valuation is None:
            raise SpecError(
                "payment",
                f"'kl' needs the rule's valuation; rule {rule.name!r} has none. Use a built-in rule, a "
                "jaxauction.base.Rule with a valuation, or payment 'second_price'.",
            )
        object.__setattr__(self, "rule", rule)
        object.__setattr__(self, "decoding", check_decoding(self.decoding))
        object.__setattr__(self, "temperature", check_temperature(self.temperature))

    @classmethod
    def create(cls, rule="linear", payment="second_price", decoding="sample", temperature=1.0):
        """Checks every setting; :class:`SpecError` (a ``ValueError``) naming the argument and the fix.

        Warns once per spec (:class:`PaymentWarning`, :func:`payment_problem`) when the payment has no
        incentive meaning under the rule (``"second_price"`` with a rule that is not monotone).
        """
        spec = cls(rule, payment, decoding, temperature)
        spec.warn_payment()
        return spec

    def warn_payment(self, stacklevel: int = 4) -> None:
        """Issues :class:`PaymentWarning` when the payment kind is not the one the rule justifies."""
        problem = payment_problem(self.rule, self.payment)
        if problem:
            warnings.warn(problem, PaymentWarning, stacklevel=stacklevel)

    @property
    def allocation(self) -> str | None:
        """The allocation the payment kind charges for (:func:`allocation`)."""
        return allocation(self.payment)

    @property
    def mechanism(self) -> MechanismSpec:
        """The spec alone (a subclass adds settings of its own, e.g. a length)."""
        return MechanismSpec(self.rule, self.payment, self.decoding, self.temperature)

    def keywords(self) -> dict[str, Any]:
        """The spec as the keywords of :func:`jaxauction.generate` (a registered rule by its name)."""
        registered = self.rule.name in base.rule_names() and base.as_rule(self.rule.name) is self.rule
        rule = self.rule.name if registered else self.rule
        return dict(rule=rule, payment=self.payment, decoding=self.decoding, temperature=self.temperature)

    def check_fits(self, num_agents: int | Sequence[int], has_base: bool) -> None:
        """:class:`SpecError` (argument ``decoding``) when the decoding cannot run these auctions."""
        if self.decoding == "stable":
            problem = stable_problem(self.rule, num_agents, has_base)
            if problem:
                raise SpecError("decoding", problem)
