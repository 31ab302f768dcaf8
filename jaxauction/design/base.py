"""The family protocol: what the objectives, the certificate and the search need to know of a family of rules.

A family is parameters (a pytree of float arrays, e.g. a ``flax.struct.dataclass``) and a map
``params -> jaxauction.base.Rule`` (the log-space aggregate; optionally a closed-form robust payment, a
valuation, ``monotone=True`` when the member is monotone by construction). Everything in
:mod:`jaxauction.design` (``revenue``, ``welfare``, ``violation``, ``distance``, ``evaluate``,
``certify_rule``, ``search``, ``fixed_rule``, ``bind``) finds the family of a parameter object by its type
(:func:`family_of`), so a family written in a few lines and registered with :func:`register_family` runs
the whole path::

    @struct.dataclass
    class MyParams:
        w: jax.Array

    def my_rule(params) -> jaxauction.Rule:            # traceable: params may be tracers in a search step
        return jaxauction.Rule("mine", lambda logits, bids: ...)

    design.register_family(design.Family("mine", MyParams, my_rule))

The power mean (:class:`~jaxauction.design.PowerMeanParams`) and the learned monotone family
(:class:`~jaxauction.design.MonotoneWeightParams`) are two instances.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxauction import base


@struct.dataclass
class Bounds:
    """A box ``lower <= params <= upper`` (two pytrees of the parameters' structure) for any family.

    :meth:`project` is the one clipping of :func:`~jaxauction.design.search` (after every update).
    :meth:`create` and :meth:`domain` build the power mean's box (``PowerMeanParams`` fields).
    """

    lower: Any
    upper: Any

    @classmethod
    def create(cls, rho=(-1.0, 3.0), gamma=(0.0, 4.0), base_bid=(0.0, 1e6), temperature=(0.2, 5.0), dtype=None):
        """A power-mean box from ``(low, high)`` pairs; the defaults keep gamma >= 0, base_bid >= 0, temperature > 0."""
        from jaxauction.design import families  # the power mean's fields live with the family

        return families.power_mean_bounds(rho, gamma, base_bid, temperature, dtype)

    @classmethod
    def domain(cls, dtype=None):
        """The power mean's domain, the search's default box for it (:func:`~jaxauction.design.families.power_mean_domain`)."""
        from jaxauction.design import families

        return families.power_mean_domain(dtype)

    def project(self, params):
        """Clips every parameter into the box."""
        return jax.tree.map(jnp.clip, params, self.lower, self.upper)


def _no_base_bid(params) -> float:
    return 0.0


@dataclasses.dataclass(frozen=True)
class Family:
    """A family of aggregation rules.

    Attributes:
      name: a label (tables, messages).
      params_type: the class of the family's parameter objects (one family per class).
      rule: ``params -> jaxauction.base.Rule``; must be traceable (inside a search step ``params`` holds
        tracers). For concrete parameters it may return a rule hashable by value (compiles once per member).
      domain: optional ``params -> Bounds``: the box the parameters must stay in (the search's default
        ``bounds``, built for the structure and dtype of ``params``); None: unconstrained.
      base_bid: ``params -> scalar``: the bid of the batch's base distribution (appended as the last agent);
        default 0 (a family without a base bid).
      monotone_part: optional ``(params, trainable, bounds) -> (params, trainable)``: the starting point and
        trainable mask of the family's part that is monotone by construction (``search(monotone=True)``).
      needs_base: True if the rule needs the base distribution as its last row (e.g. as the unit of bids).
    """

    name: str
    params_type: type
    rule: Callable[[Any], base.Rule]
    domain: Callable[[Any], Bounds] | None = None  # params -> Bounds
    base_bid: Callable[[Any], Any] = _no_base_bid
    monotone_part: Callable[[Any, Any, Any], tuple[Any, Any]] | None = None
    needs_base: bool = False

    def __post_init__(self):
        if not isinstance(self.params_type, type):
            raise ValueError(
                f"Family.params_type: expected the class of the family's parameters, got {self.params_type!r:.60}."
            )
        if not callable(self.rule):
            raise ValueError(f"Family.rule: expected a function params -> jaxauction.Rule, got {self.rule!r:.60}.")

    def rule_of(self, params, fn: str = "design") -> base.Rule:
        """``self.rule(params)``, checked: a :class:`jaxauction.base.Rule` (a ValueError naming the fix otherwise)."""
        rule = self.rule(params)
        if not isinstance(rule, base.Rule):
            raise ValueError(
                f"{fn}: family {self.name!r}'s rule map returned {type(rule).__name__}, not a jaxauction.Rule. "
                "Fix: return jaxauction.Rule(name, log_aggregate) (log_aggregate(logits [..., n, V], bids [..., n]) "
                "-> log q [..., V])."
            )
        return rule


_FAMILIES: dict[type, Family] = {}


def register_family(family: Family, *, overwrite: bool = False) -> Family:
    """Makes ``family`` known to the objectives, the certificate and the search (keyed by its ``params_type``)."""
    if not isinstance(family, Family):
        raise ValueError(f"register_family: expected a jaxauction.design.Family, got {type(family).__name__}.")
    known = _FAMILIES.get(family.params_type)
    if known is not None and known is not family and not overwrite:
        raise ValueError(
            f"register_family: {family.params_type.__name__} already belongs to family {known.name!r}; pass "
            "overwrite=True to replace it."
        )
    _FAMILIES[family.params_type] = family
    return family


def family_of(params, fn: str = "design", argument: str = "params") -> Family:
    """The registered family of a parameter object; a ValueError naming the argument and the fix otherwise."""
    family = _FAMILIES.get(type(params))
    if family is None:
        known = sorted(t.__name__ for t in _FAMILIES)
        raise ValueError(
            f"{fn}: {argument} is a {type(params).__name__}, the parameters of no registered family ({known}). "
            "Fix: pass e.g. design.PowerMeanParams.create(...), or register your family with "
            "design.register_family(design.Family(name, YourParams, params -> jaxauction.Rule))."
        )
    return family


def is_registered(params) -> bool:
    """Whether ``params`` are the parameters of a registered family (the lookup :func:`family_of` makes)."""
    return type(params) in _FAMILIES


def registered_families() -> tuple[Family, ...]:
    """The registered families."""
    return tuple(_FAMILIES.values())


def describe(params) -> dict[str, Any]:
    """The parameters as plain floats (lists for arrays) for JSON, tables and messages."""
    to_dict = getattr(params, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        value = np.asarray(leaf, np.float64)
        out[jax.tree_util.keystr(path).lstrip(".") or "params"] = float(value) if value.ndim == 0 else value.tolist()
    return out


def check_bounds(bounds: Bounds, params, fn: str = "search") -> None:
    """A ValueError naming ``bounds`` and the fix if its lower/upper trees do not have the structure of ``params``."""
    expected = jax.tree.structure(params)
    for side in ("lower", "upper"):
        tree = getattr(bounds, side)
        if jax.tree.structure(tree) != expected:
            raise ValueError(
                f"{fn}: bounds.{side} has the structure {jax.tree.structure(tree)}, but params has {expected}. "
                f"Fix: build bounds like params (e.g. Bounds(lower=params.replace(...), upper=...)) or leave "
                "bounds=None for the family's domain."
            )
        for path, low, leaf in zip(
            jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(tree), jax.tree.leaves(params), strict=True
        ):
            if np.shape(low) not in ((), np.shape(leaf)):
                raise ValueError(
                    f"{fn}: bounds.{side}{jax.tree_util.keystr(path[0])} has shape {np.shape(low)}, but the parameter "
                    f"has shape {np.shape(leaf)}. Fix: give a scalar or an array of the parameter's shape."
                )
