"""A learned monotone family: the linear rule with weights ``lambda_i ∝ g_theta(b_i / u)``, ``g`` increasing.

For agents' distributions ``p_i`` and bids ``b_i`` (docs/maths.md §3)::

    q        = sum_i lambda_i p_i,        lambda_i = g(b_i / u) / sum_j g(b_j / u)
    g(s)     = s ** gamma * exp(H(log s)),   H(x) = sum_k a_k sigmoid((x - shift - c_k) / w)

with ``gamma > 0``, step heights ``a_k >= 0`` at fixed knots ``c_k`` (width ``w``) moved by a learned
``shift`` (so the steps can follow the bids when the base bid, the unit, moves). ``g`` is strictly
increasing for every ``theta = (gamma, a)`` in the domain, so every member is monotone by construction
(the proof of docs/maths.md §3 needs only ``g >= 0`` non-decreasing); ``a = 0`` is ``b ** gamma``
exactly, so the family contains the power mean's monotone part.

**The unit ``u``.** ``g`` is not a power, so the rule is not invariant to the bids' scale in ``g``'s
argument. ``g`` sees every bid relative to the bid of the **last row**, the base distribution
(``MonotoneWeightParams.base_bid``: the batch's base in the objectives, ``base_logits``/``base_prompt``
with ``base_bid`` in ``second_price``/``TokenAuction``/``generate``). The base is one more row with weight
``∝ g(1)``, never charged. Since the unit is a row, the rule depends on the bid ratios of its rows only:
``rule(logits, c * bids) == rule(logits, bids)`` when the base bid is scaled with the agents' (not when it
stays fixed), and the payments' normalisation by the largest bid is exact. **A call without a base row
takes the last agent's bid as the unit**, and that agent is then not treated monotonically: always pass
the base (the closed-form payment refuses a call without one with a ``ValueError``). A zero last bid gives NaN (no unit).

Its robust second-price payment is the one-dimensional integral of docs/maths.md §5
(:class:`jaxauction.payments.MonotoneWeightClosedForm`), which every member carries.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxauction import _validation, aggregation, base, payments
from jaxauction.design.base import Bounds, Family, register_family

DEFAULT_KNOTS = tuple(float(c) for c in np.linspace(-4.0, 4.0, 9))
"""The knots ``c_k`` of ``H`` in ``log(b / u)``: one per nat from ``u e^-4`` to ``u e^4``."""
DEFAULT_WIDTH = 0.5
MIN_GAMMA = 1e-2
"""The domain's smallest ``gamma`` (``g`` strictly increasing, its inverse finite)."""
MIN_BASE_BID = 1e-6
"""The domain's smallest base bid (the unit must be positive)."""


@struct.dataclass
class MonotoneWeightParams:
    """Parameters of the learned monotone family (a pytree; ``knots`` and ``width`` are static).

    Attributes:
      gamma: ``> 0``, the power ``g(s) = s**gamma exp(H(log s))`` falls back to outside the knots.
      steps: ``[K] >= 0``, the heights ``a_k`` of ``H``'s steps at ``knots``.
      base_bid: ``> 0``, the base distribution's bid, the unit ``u`` of ``g``'s argument.
      shift: where the knots sit: ``H`` steps at ``log(b / u) = shift + c_k`` (any real).
      knots, width: the steps' centres ``c_k`` (in ``log(b / u)``) and width ``w`` (not trained).
    """

    gamma: jax.Array
    steps: jax.Array
    base_bid: jax.Array
    shift: jax.Array
    knots: tuple[float, ...] = struct.field(pytree_node=False, default=DEFAULT_KNOTS)
    width: float = struct.field(pytree_node=False, default=DEFAULT_WIDTH)

    @classmethod
    def create(
        cls, gamma=1.0, steps=None, base_bid=1.0, shift=0.0, knots=DEFAULT_KNOTS, width=DEFAULT_WIDTH, dtype=None
    ) -> MonotoneWeightParams:
        """Checked parameters; ``steps=None`` is zeros (the power ``b**gamma``)."""
        shift = _validation.check_real_number(shift, "shift")
        if not (np.ndim(shift) == 0 and np.isfinite(shift)):
            raise ValueError(f"shift must be a finite scalar, got {shift!r}.")
        knots = tuple(float(_validation.check_real_number(c, "knots")) for c in knots)
        if not knots or not np.all(np.isfinite(knots)) or np.any(np.diff(knots) <= 0):
            raise ValueError(f"knots must be finite and increasing (at least one), got {knots!r:.80}.")
        width = float(_validation.check_real_number(width, "width"))
        if not (np.isfinite(width) and width > 0):
            raise ValueError(f"width must be finite and > 0, got {width!r}.")
        steps = np.zeros(len(knots)) if steps is None else np.asarray(steps, np.float64)
        if steps.shape != (len(knots),) or not np.all(np.isfinite(steps)) or np.any(steps < 0):
            raise ValueError(
                f"steps must be {len(knots)} finite values >= 0 (one per knot), got shape {steps.shape}: {steps!r:.80}."
            )
        for name, value, low in (("gamma", gamma, 0.0), ("base_bid", base_bid, 0.0)):
            value = _validation.check_real_number(value, name)
            if not (np.ndim(value) == 0 and np.isfinite(value) and value > low):
                raise ValueError(f"{name} must be a finite scalar > 0, got {value!r}.")
        dtype = dtype or jnp.result_type(float)
        return cls(
            gamma=jnp.asarray(gamma, dtype),
            steps=jnp.asarray(steps, dtype),
            base_bid=jnp.asarray(base_bid, dtype),
            shift=jnp.asarray(shift, dtype),
            knots=knots,
            width=width,
        )

    @classmethod
    def power(cls, gamma=1.0, base_bid=1.0, dtype=None, **keywords) -> MonotoneWeightParams:
        """The member ``g(s) = s**gamma`` (steps 0): the power mean at ``rho = 1``, ``temperature = 1``."""
        return cls.create(gamma=gamma, base_bid=base_bid, dtype=dtype, **keywords)

    def log_g(self, x: jax.Array) -> jax.Array:
        """``log g(e^x)`` for ``x = log(b / u)``: ``[...]`` (:func:`jaxauction.payments.monotone_weight_log`)."""
        knots = jnp.asarray(self.knots, jnp.result_type(self.gamma)) + self.shift
        return payments.monotone_weight_log(jnp.asarray(x), self.gamma, self.steps, knots, self.width)

    def to_dict(self) -> dict:
        """The parameters as plain floats (steps as a list) for JSON and tables."""
        return {
            "gamma": float(self.gamma),
            "steps": [float(a) for a in np.asarray(self.steps)],
            "base_bid": float(self.base_bid),
            "shift": float(self.shift),
            "knots": list(self.knots),
            "width": self.width,
        }


@dataclasses.dataclass(frozen=True)
class _MonotoneWeights:
    """The aggregate ``log q`` of a member: hashable by value when built from Python floats (:func:`learned_rule`)."""

    payment: payments.MonotoneWeightClosedForm

    def __call__(self, logits: jax.Array, bids: jax.Array) -> jax.Array:
        """``logits: [..., m, V]``, ``bids: [..., m]`` (the last row the unit) -> ``log q: [..., V]``."""
        bids = aggregation.effective_bids(logits, bids)
        scores = self.payment.log_weights(bids)
        none = ~jnp.any(bids > 0, axis=-1, keepdims=True)  # all bids zero: equal weights, as the core rules
        scores = jnp.where(none, jnp.where(aggregation._has_mass(logits), 0.0, -jnp.inf), scores)
        weights = jnp.exp(scores - jax.nn.logsumexp(scores, axis=-1, keepdims=True))
        return aggregation.linear_from_log_probs(aggregation.agent_log_probs(logits), weights)


def learned_rule(params: MonotoneWeightParams) -> base.Rule:
    """The family's ``params -> Rule``: the linear rule with weights ``∝ g(b / u)`` (the last row's bid ``u``),
    ``monotone=True``, carrying :class:`jaxauction.payments.MonotoneWeightClosedForm`. Concrete parameters
    give a rule hashable by value (compiles once per member); traced ones (a search step) a rule over them."""
    leaves = (params.gamma, params.steps, params.shift)
    if _validation.is_concrete(*leaves):
        gamma, steps = float(params.gamma), tuple(float(a) for a in np.asarray(params.steps))
        knots = tuple(float(c) + float(params.shift) for c in params.knots)
        name = (
            f"monotone_weights(gamma={gamma:.4g}, steps={len(steps)}, shift={float(params.shift):.3g}, unit=last row)"
        )
    else:
        gamma, steps, name = params.gamma, params.steps, "monotone_weights"
        knots = jnp.asarray(params.knots, jnp.result_type(params.gamma)) + params.shift
    payment = payments.MonotoneWeightClosedForm(gamma, steps, knots, params.width)
    return base.Rule(name=name, log_aggregate=_MonotoneWeights(payment), closed_form_payment=payment, monotone=True)


def learned_domain(dtype=None, knots=DEFAULT_KNOTS, width=DEFAULT_WIDTH) -> Bounds:
    """The family's domain (the search's default box): ``gamma >= MIN_GAMMA``, steps >= 0, base_bid >= MIN_BASE_BID,
    shift free."""
    dtype = dtype or jnp.result_type(float)
    k, inf = len(knots), jnp.inf
    free = jnp.asarray(inf, dtype)
    lower = MonotoneWeightParams(
        jnp.asarray(MIN_GAMMA, dtype), jnp.zeros(k, dtype), jnp.asarray(MIN_BASE_BID, dtype), -free, knots, width
    )
    upper = MonotoneWeightParams(free, jnp.full(k, inf, dtype), free, free, knots, width)
    return Bounds(lower=lower, upper=upper)


def _domain_of(params: MonotoneWeightParams) -> Bounds:
    return learned_domain(jnp.result_type(params.gamma), params.knots, params.width)


def _whole_family(params, trainable, bounds):
    """Every member is monotone by construction: the monotone part is the whole family."""
    return params, trainable


MONOTONE_WEIGHTS = register_family(
    Family(
        name="learned monotone weights",
        params_type=MonotoneWeightParams,
        rule=learned_rule,
        domain=_domain_of,
        base_bid=lambda params: params.base_bid,
        monotone_part=_whole_family,
        needs_base=True,
    )
)
"""The learned monotone family (:class:`MonotoneWeightParams`), registered with the design package."""
