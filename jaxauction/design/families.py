"""The power-mean family of aggregation rules, differentiable in every parameter.

For agents' next-token distributions ``p_i = softmax(l_i)`` and bids ``b_i`` (docs/maths.md §2)::

    lambda_i ∝ b_i ** gamma                                  (bid transform)
    r_t      = (sum_i lambda_i p_i(t) ** rho) ** (1 / rho)   (power mean; rho -> 0: geometric mean)
    q_t      ∝ r_t ** (1 / temperature)                      (output temperature)

``rho = 1, gamma = 1, temperature = 1`` is the linear rule and ``rho -> 0`` the log-linear rule.
An optional base distribution ``p_0`` takes part as one more agent with bid ``base_bid`` (it is
transformed by ``gamma`` like every bid and is never charged).

Everything is computed in log space, centred at the weighted geometric mean ``m = sum_i lambda_i x_i``
(``x_i = log p_i(t)``): ``log r = m + log(sum_i lambda_i exp(rho (x_i - m))) / rho``, with double-safe
``jnp.where`` so that values and gradients stay finite everywhere:

* ``|rho| < eps**(1/3) / 4``: the cumulant series ``m + rho k2 / 2 + rho**2 k3 / 6`` (``k2``, ``k3`` the
  weighted central moments of ``x``): the rho -> 0 limit and its derivatives;
* otherwise, per token, the logarithm is ``log1p(sum_i lambda_i expm1(rho (x_i - m)))`` when that sum
  is within 0.5 of 0 (accurate to ``eps |x - m|`` as rho -> 0, where a log-sum-exp would lose
  ``eps / rho``), else a shifted log-sum-exp (accurate when a few terms dominate, as for rho = 1).

Masked tokens (``-inf`` logits): for ``rho > 0`` a token masked by some agents keeps the mass of the
others (as in the linear rule); for ``rho <= 0`` (and in the series branch) a token masked by any agent
with positive weight gets probability 0 (as in the log-linear rule), unless those agents share no
token at all: then, as in the core log-linear rule, the tokens masked by the least total weight keep
the geometric mean of the agents that allow them. Agents with weight 0 have no effect. All bids zero
gives every agent (with an allowed token) the same weight, as in the core rules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxauction import _validation, aggregation, base, payments
from jaxauction.design.base import Bounds, Family, family_of, register_family

Rule = Callable[[jax.Array, jax.Array], jax.Array]

FIELDS = ("rho", "gamma", "base_bid", "temperature")

MIN_TEMPERATURE = 1e-2
"""The smallest temperature :meth:`Bounds.domain` (the search's default box) lets an iterate reach."""


@struct.dataclass
class PowerMeanParams:
    """Parameters of the power-mean family (a pytree of scalars).

    Attributes:
      rho: power-mean exponent; 1 linear, 0 log-linear (geometric mean), any real value allowed.
      gamma: bid transform ``lambda_i ∝ b_i ** gamma``; >= 0 (0 gives equal weights to positive bids).
      base_bid: fixed bid ``b_0 >= 0`` of the base distribution (no effect without one).
      temperature: output temperature ``tau > 0``: ``q ∝ r ** (1 / tau)``.
    """

    rho: jax.Array
    gamma: jax.Array
    base_bid: jax.Array
    temperature: jax.Array

    @classmethod
    def create(cls, rho=1.0, gamma=1.0, base_bid=0.0, temperature=1.0, dtype=None) -> PowerMeanParams:
        """Builds parameters as scalar arrays (``dtype`` defaults to JAX's default float)."""
        values = dict(rho=rho, gamma=gamma, base_bid=base_bid, temperature=temperature)
        for name, value in values.items():
            if np.ndim(value) != 0 or not np.isfinite(_validation.check_real_number(value, name)):
                raise ValueError(f"{name} must be a finite scalar, got {value!r}.")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma!r}.")
        if base_bid < 0:
            raise ValueError(f"base_bid must be >= 0, got {base_bid!r}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}.")
        dtype = dtype or jnp.result_type(float)
        return cls(**{name: jnp.asarray(value, dtype) for name, value in values.items()})

    @classmethod
    def linear(cls, dtype=None) -> PowerMeanParams:
        """The linear rule: ``rho = 1``."""
        return cls.create(rho=1.0, dtype=dtype)

    @classmethod
    def log_linear(cls, dtype=None) -> PowerMeanParams:
        """The log-linear rule: ``rho = 0``."""
        return cls.create(rho=0.0, dtype=dtype)

    def to_dict(self) -> dict[str, float]:
        """The parameters as plain floats (for JSON and tables)."""
        return {name: float(getattr(self, name)) for name in FIELDS}


def power_mean_bounds(
    rho=(-1.0, 3.0), gamma=(0.0, 4.0), base_bid=(0.0, 1e6), temperature=(0.2, 5.0), dtype=None
) -> Bounds:
    """A box for :class:`PowerMeanParams` from ``(low, high)`` pairs (:meth:`Bounds.create`)."""
    pairs = dict(rho=rho, gamma=gamma, base_bid=base_bid, temperature=temperature)
    for name, (low, high) in pairs.items():
        if not low <= high:
            raise ValueError(f"bounds for {name} must satisfy low <= high, got ({low}, {high}).")
    if pairs["gamma"][0] < 0 or pairs["base_bid"][0] < 0 or pairs["temperature"][0] <= 0:
        raise ValueError("bounds must keep gamma >= 0, base_bid >= 0 and temperature > 0.")
    dtype = dtype or jnp.result_type(float)
    lower = PowerMeanParams(**{k: jnp.asarray(v[0], dtype) for k, v in pairs.items()})
    upper = PowerMeanParams(**{k: jnp.asarray(v[1], dtype) for k, v in pairs.items()})
    return Bounds(lower=lower, upper=upper)


def power_mean_domain(dtype=None) -> Bounds:
    """The power mean's own domain, the search's default box (:meth:`Bounds.domain`): ``gamma >= 0``,
    ``base_bid >= 0``, ``temperature >= MIN_TEMPERATURE`` (> 0), ``rho`` free."""
    inf = float("inf")
    return power_mean_bounds(
        rho=(-inf, inf), gamma=(0.0, inf), base_bid=(0.0, inf), temperature=(MIN_TEMPERATURE, inf), dtype=dtype
    )


def trainable_mask(trainable: Sequence[str] = FIELDS) -> PowerMeanParams:
    """A boolean pytree for the search: ``True`` for the fields named in ``trainable``."""
    unknown = set(trainable) - set(FIELDS)
    if unknown:
        raise ValueError(f"trainable names unknown fields {sorted(unknown)}; expected a subset of {FIELDS}.")
    return PowerMeanParams(**{name: name in trainable for name in FIELDS})


def series_max_rho(dtype) -> float:
    """Below this ``|rho|`` the cumulant series is used: ``eps**(1/3) / 4`` (1.2e-3 float32, 1.5e-6 float64).

    It balances the series' truncation error (``~ rho**3``) against the rounding error of the exact
    branch's derivative in ``rho`` (``~ eps / rho``).
    """
    return float(jnp.finfo(dtype).eps) ** (1.0 / 3.0) / 4.0


def log_power_mean(log_p: jax.Array, log_weights: jax.Array, rho: jax.Array | float) -> jax.Array:
    """``log (sum_i lambda_i p_i(t)**rho) ** (1/rho)``: ``[..., V]``, unnormalised (module docs).

    Args:
      log_p: ``[..., n, V]`` normalised log-probabilities, may contain ``-inf``.
      log_weights: ``[..., n]`` normalised log weights, ``-inf`` for agents without weight.
      rho: scalar or broadcastable to the batch shape ``[...]``.
    """
    rho = jnp.asarray(rho, log_p.dtype)[..., None]  # [..., 1] broadcasts against [..., V]
    eps = jnp.finfo(log_p.dtype).eps
    active = (log_weights > -jnp.inf)[..., None]  # [..., n, 1]
    weights = jnp.where(active, jnp.exp(log_weights)[..., None], 0.0)
    finite = jnp.isfinite(log_p)
    allowed = active & finite
    x = jnp.where(allowed, log_p, 0.0)

    masked_by_any = jnp.any(active & ~finite, axis=-2)  # [..., V]
    masked_by_all = ~jnp.any(allowed, axis=-2)
    small = jnp.abs(rho) < series_max_rho(log_p.dtype)
    positive = (rho > 0) & ~small
    masked = jnp.where(positive, masked_by_all, masked_by_any)
    # Disjoint supports with rho <= 0: keep the tokens masked by the least weight, as log-linear does.
    masked_weight = jnp.sum(weights * ~finite, axis=-2)
    least = jnp.min(masked_weight, axis=-1, keepdims=True)
    geometric_fallback = ~positive & masked_by_any & (masked_weight <= least * (1 + 8 * eps))

    mean = jnp.sum(weights * x, axis=-2)  # geometric mean over the agents that allow the token
    centred = x - mean[..., None, :]
    second = jnp.sum(weights * centred**2, axis=-2)
    third = jnp.sum(weights * centred**3, axis=-2)
    series = mean + rho * second / 2.0 + rho**2 * third / 6.0

    safe_rho = jnp.where(small, 1.0, rho)
    scaled = safe_rho[..., None, :] * centred
    shift = jax.lax.stop_gradient(jnp.max(jnp.where(allowed, scaled, -jnp.inf), axis=-2))
    shift = jnp.where(masked_by_all, 0.0, shift)
    direct = jnp.sum(jnp.where(finite, weights * jnp.exp(scaled - shift[..., None, :]), 0.0), axis=-2)
    near_zero = jnp.sum(weights * jnp.where(finite, jnp.expm1(jnp.minimum(scaled, 1.0)), -1.0), axis=-2)
    use_expm1 = (jnp.abs(near_zero) < 0.5) & (shift <= 1.0)
    log_sum = jnp.where(
        use_expm1,
        jnp.log1p(jnp.where(use_expm1, near_zero, 0.0)),
        shift + jnp.log(jnp.where(use_expm1 | masked, 1.0, direct)),
    )
    value = jnp.where(small, series, mean + log_sum / safe_rho)
    value = jnp.where(geometric_fallback, mean, value)
    return jnp.where(masked & ~geometric_fallback, -jnp.inf, value)


def power_mean(
    logits: jax.Array,
    bids: jax.Array,
    rho: jax.Array | float,
    gamma: jax.Array | float = 1.0,
    temperature: jax.Array | float = 1.0,
) -> jax.Array:
    """The power-mean rule: normalised ``log q: [..., V]``.

    Args:
      logits: ``[..., n, V]`` unnormalised agent logits (``-inf`` allowed).
      bids: ``[..., n]`` non-negative bids.
      rho: power-mean exponent (1 linear, 0 log-linear); scalar or broadcastable to ``[...]``.
      gamma: bid transform ``lambda_i ∝ b_i**gamma``.
      temperature: output temperature ``tau``: ``q ∝ (power mean)**(1/tau)``.

    Returns:
      ``log q: [..., V]``, normalised (module docs for masked tokens and zero bids). Agents whose
      logits are all ``-inf`` and negative bids count as bidding 0, as in the core rules.

    Raises:
      ValueError: (outside jit) for shapes that do not fit, or NaN/+inf logits, rows of all ``-inf``,
        negative or non-finite bids, as the core rules; for a non-finite ``rho``, ``gamma < 0`` (or
        non-finite), or ``temperature <= 0`` (or non-finite, or so small that ``1 / temperature``
        overflows). Inside jit the parameters are not checked: such values give NaN outputs.
    """
    logits, bids = _validation.mechanism_inputs("power_mean", logits, bids)
    _check_parameters("power_mean", logits.dtype, rho=rho, gamma=gamma, temperature=temperature)
    return _power_mean(logits, bids, rho, gamma, temperature)


def _check_parameters(fn: str, dtype, **values) -> None:
    """Host-side checks of concrete family parameters (tracers pass through unchecked)."""
    for name, value in values.items():
        if not _validation.is_concrete(value):
            continue
        try:
            array = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{fn}: {name} must be a real number (or an array of them); got {value!r:.60}.") from None
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{fn}: {name} must be finite; got {value!r:.60}.")
        if name == "gamma" and np.any(array < 0):
            raise ValueError(f"{fn}: gamma must be >= 0 (lambda_i ∝ b_i**gamma); got {value!r:.60}.")
        if name == "temperature":
            tiny = float(jnp.finfo(dtype).tiny) if jnp.issubdtype(dtype, jnp.floating) else 0.0
            with np.errstate(divide="ignore", over="ignore"):
                reciprocal = (1.0 / array).astype(dtype) if np.all(array > 0) else None
            if reciprocal is None or not np.all(np.isfinite(reciprocal)) or np.any(array <= tiny):
                raise ValueError(
                    f"{fn}: temperature must be > 0 with a finite reciprocal in {np.dtype(dtype).name} "
                    f"(q ∝ r**(1/temperature)); got {value!r:.60}. Fix: use e.g. temperature=1.0."
                )


@jax.jit
def _power_mean(logits, bids, rho, gamma, temperature):
    log_p = aggregation.agent_log_probs(logits)
    has_mass = jnp.max(logits, axis=-1) > -jnp.inf
    log_weights = aggregation.log_bid_weights(aggregation.effective_bids(logits, bids), gamma, has_mass)
    log_r = log_power_mean(log_p, log_weights, rho)
    temperature = jnp.asarray(temperature, log_r.dtype)[..., None]
    finite = jnp.isfinite(log_r)
    scaled = jnp.where(finite, jnp.where(finite, log_r, 0.0) / temperature, -jnp.inf)
    return jax.nn.log_softmax(scaled, axis=-1)


@dataclasses.dataclass(frozen=True)
class _FixedPowerMean:
    """A power-mean aggregate with Python-float parameters: hashable by value (a static jit argument)."""

    rho: float
    gamma: float
    temperature: float

    def __call__(self, logits: jax.Array, bids: jax.Array) -> jax.Array:
        return power_mean(logits, bids, self.rho, self.gamma, self.temperature)


def _fixed_power_rule(params: PowerMeanParams) -> base.Rule:
    """The power-mean member at concrete ``params``: hashable by value (see :func:`fixed_rule`)."""
    values = params.to_dict()
    _check_parameters("fixed_rule", jnp.result_type(float), **{k: values[k] for k in ("rho", "gamma", "temperature")})
    aggregate = _FixedPowerMean(values["rho"], values["gamma"], values["temperature"])
    name = f"power_mean(rho={aggregate.rho:g}, gamma={aggregate.gamma:g}, temperature={aggregate.temperature:g})"
    linear_in_p = aggregate.rho == 1.0 and aggregate.temperature == 1.0
    payment = payments.PowerWeightClosedForm(aggregate.gamma) if linear_in_p else None
    return base.Rule(name=name, log_aggregate=aggregate, closed_form_payment=payment, monotone=linear_in_p)


def power_mean_rule(params: PowerMeanParams) -> base.Rule:
    """The power mean's ``params -> Rule`` map: :func:`fixed_rule`'s member for concrete scalar parameters,
    else (traced, inside a search step) a rule closing over them (generic payments, not ``monotone``)."""
    leaves = jax.tree.leaves(params)
    if _validation.is_concrete(*leaves) and all(np.ndim(x) == 0 for x in leaves):
        return _fixed_power_rule(params)

    def power_mean_member(logits: jax.Array, bids: jax.Array) -> jax.Array:
        return power_mean(logits, bids, params.rho, params.gamma, params.temperature)

    return base.Rule(name="power_mean", log_aggregate=power_mean_member)


MONOTONE_TRAINABLE = ("gamma", "base_bid")
"""What ``search(monotone=True)`` trains of the power mean: rho = 1 and temperature = 1 stay frozen (docs/maths.md §3)."""


def power_mean_monotone_part(params: PowerMeanParams, trainable, bounds):
    """``params`` with rho = temperature = 1 and the mask that trains only gamma and the base bid (checked)."""
    if trainable is None:
        trainable = trainable_mask(MONOTONE_TRAINABLE)
    frozen = [name for name in ("rho", "temperature") if bool(getattr(trainable, name))]
    if frozen:
        raise ValueError(
            f"search: monotone=True keeps rho = 1 and temperature = 1 fixed, but trainable trains {frozen}. "
            f"Fix: leave trainable=None (trains {MONOTONE_TRAINABLE}) or train only a subset of them."
        )
    if bounds is not None:
        lower, upper = bounds.lower, bounds.upper
        outside = [name for name in ("rho", "temperature") if not getattr(lower, name) <= 1 <= getattr(upper, name)]
        if outside:
            raise ValueError(f"search: monotone=True needs bounds that contain 1 for {outside}; widen them.")
    return params.replace(rho=jnp.ones_like(params.rho), temperature=jnp.ones_like(params.temperature)), trainable


POWER_MEAN = register_family(
    Family(
        name="power mean",
        params_type=PowerMeanParams,
        rule=power_mean_rule,
        domain=lambda params: power_mean_domain(jnp.result_type(*jax.tree.leaves(params))),
        base_bid=lambda params: params.base_bid,
        monotone_part=power_mean_monotone_part,
    )
)
"""The power-mean family (:class:`PowerMeanParams`), registered with the design package."""


def fixed_rule(params) -> base.Rule:
    """The family member at concrete ``params`` as a hashable :class:`jaxauction.base.Rule` (no base row).

    Two calls with equal parameters give equal rules, so functions that take the rule as a static
    argument (:func:`jaxauction.preferences.certify`) compile once per member. At ``rho = 1,
    temperature = 1`` (``q = sum_i lambda_i p_i``, ``lambda_i ∝ b_i**gamma``) the rule is ``monotone``
    (docs/maths.md §3: by construction for any ``gamma >= 0``) and carries its closed-form robust payment
    (:class:`jaxauction.payments.PowerWeightClosedForm`, docs/maths.md §5), which
    :func:`jaxauction.payments.second_price` and the decode loop use instead of the quadrature over the
    vocabulary (``method="quadrature"`` still forces the generic path). The base distribution, if any,
    is not part of the rule: append it as the last agent (:func:`jaxauction.aggregation.append_base` with
    bid ``params.base_bid``, or ``second_price(..., base_logits=..., base_bid=params.base_bid)``).

    Raises:
      ValueError: ``params`` of no registered family, traced ``params``, or a rule map that returns no Rule.
    """
    family = family_of(params, "fixed_rule")
    if not _validation.is_concrete(*jax.tree.leaves(params)):
        raise ValueError(
            "fixed_rule: params must be concrete (not traced); inside a search step use bind(params) or the "
            "family's rule map."
        )
    return family.rule_of(params, "fixed_rule")


def bind(params, base_logits: jax.Array | None = None) -> base.Rule:
    """Binds the parameters of any registered family into a rule ``rule(logits, bids) -> log q``.

    With ``base_logits: [..., V]`` the base distribution takes part as the last agent with the family's
    base bid (``params.base_bid``; its batch axes must broadcast against those of the calls). Without a
    base this is the family's rule (for concrete power-mean parameters :func:`fixed_rule`: hashable by
    value, with the closed-form payment at ``rho = 1, temperature = 1``); traced ``params`` (inside a
    search step) give a rule closing over them.
    """
    family = family_of(params, "bind")
    member = family.rule_of(params, "bind")
    if base_logits is None:
        return member

    def with_base(logits: jax.Array, bids: jax.Array) -> jax.Array:
        logits, bids = aggregation.append_base(logits, bids, base_logits, family.base_bid(params))
        return member(logits, bids)

    return base.Rule(name=f"{member.name} with base", log_aggregate=with_base)
