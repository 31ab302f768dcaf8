"""The built-in aggregation rules as :class:`jaxauction.base.Rule` objects, registered by name.

``jaxauction.linear`` and ``jaxauction.log_linear`` are these objects: callable like the functions in
:mod:`jaxauction.aggregation`, and carrying what the payments need (docs/maths.md §2, §4, §5).
"""

from __future__ import annotations

from jaxauction import aggregation, payments
from jaxauction.base import Rule, register

__all__ = ["linear", "log_linear"]

linear = register(
    Rule(
        name="linear",
        log_aggregate=aggregation.linear,
        probabilities=aggregation.linear_probabilities,
        closed_form_payment=payments._linear_closed_form,
        valuation=payments.forward_kl_value,
        monotone=True,
        path="linear",
    )
)
"""Linear aggregation ``q = sum_i lambda_i p_i`` (:func:`jaxauction.aggregation.linear`); monotone."""

log_linear = register(
    Rule(
        name="log_linear",
        log_aggregate=aggregation.log_linear,
        valuation=payments.reverse_kl_value,
        monotone=False,
        path="log_linear",
    )
)
"""Log-linear aggregation ``q ∝ exp(sum_i lambda_i log p_i)`` (:func:`jaxauction.aggregation.log_linear`)."""
