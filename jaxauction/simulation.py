"""Mechanism-only batch simulation: many bid profiles over cached agent distributions.

Each simulated auction picks one set of agent logits (``[n, V]``, e.g. the agents' next-token
logits at one position of an ad) and one bid profile, and reports what the mechanism does there:
every agent's payment and value, the bid-weighted welfare and which agent the outcome favours.
The batch axis is processed in fixed-size chunks (one compiled program, :func:`chunk_program`) and
each chunk is split over the devices of a mesh (:mod:`jaxauction.sharding`): every device computes
its own auctions only. :func:`compress_vocabulary` (from
:mod:`jaxauction.vocabulary`) shrinks the logits first.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxauction import _validation, aggregation, base, mechanism, payments, sharding
from jaxauction.auction import TokenAuction
from jaxauction.vocabulary import compress_vocabulary

__all__ = ["SimulationResult", "chunk_program", "compress_vocabulary", "simulate"]


@dataclasses.dataclass(frozen=True)
class SimulationResult:
    """Per-auction results (numpy, host side).

    Attributes:
      bids: ``[A, n]``.
      index: ``[A]`` which logits set each auction used.
      payments: ``[A, n]`` expected payments for the token.
      values: ``[A, n]`` each agent's value of the outcome, the rule's ``valuation``: ``-KL(p_i || q)``
        under the linear rule, ``-KL(q || p_i)`` under the log-linear rule (docs/maths.md §7).
      welfare: ``[A]`` the bid-weighted welfare ``sum_i b_i v_i``.
      favoured: ``[A]`` the agent with the highest value (the one the outcome is closest to).
    """

    bids: np.ndarray
    index: np.ndarray
    payments: np.ndarray
    values: np.ndarray
    welfare: np.ndarray
    favoured: np.ndarray

    @property
    def revenue(self) -> np.ndarray:
        """``[A]`` total payment of each auction."""
        return self.payments.sum(axis=-1)


def _auctions(logit_sets, index, bids, *, rule, payment, quadrature):
    """The auctions ``index [C], bids [C, n]`` (a :class:`~jaxauction.base.Rule` with a valuation)."""
    logits = jnp.take(logit_sets, index, axis=0)
    outcome = TokenAuction(rule=rule, payment=payment, quadrature=quadrature)(logits, bids)
    log_p = aggregation.agent_log_probs(logits)
    values = rule.valuation(log_p, outcome.log_q[..., None, :])
    welfare = jnp.sum(bids * values, axis=-1)
    return outcome.payments, values, welfare, jnp.argmax(values, axis=-1)


@functools.lru_cache(maxsize=32)
def _chunk_function(rule: base.Rule, payment, quadrature, mesh):
    """The jitted chunk of :func:`simulate`: with a ``mesh``, a ``shard_map`` over its ``"auctions"``
    axis, so each device computes its own auctions (the logits sets replicated; a ``"model"`` axis
    unused, its devices computing the same auctions)."""
    body = functools.partial(_auctions, rule=rule, payment=payment, quadrature=quadrature)
    if mesh is not None:
        split = PartitionSpec(sharding.AXIS)
        body = jax.shard_map(
            body, mesh=mesh, in_specs=(PartitionSpec(), split, split), out_specs=split, check_vma=False
        )
    return jax.jit(body)


def _rule_with_valuation(rule) -> base.Rule:
    """The :class:`~jaxauction.base.Rule` of ``rule``; a ValueError if it has no valuation."""
    resolved = base.as_rule(rule)
    if resolved.valuation is None:
        raise ValueError(
            f"rule: simulate reports each agent's value of the outcome, so it needs the rule's valuation; rule "
            f"{resolved.name!r} has none. Fix: pass a jaxauction.base.Rule with valuation=(log_p, log_q) -> value "
            "(e.g. jaxauction.payments.forward_kl_value), or a built-in rule such as 'linear' or 'log_linear'."
        )
    return resolved


def simulate(
    logits,
    bids,
    *,
    index=None,
    rule: str | base.Rule = "linear",
    payment: str | None = "second_price",
    chunk_size: int = 256,
    mesh=None,
    progress: bool = True,
    quadrature: payments.Quadrature = payments.Quadrature(),
) -> SimulationResult:
    """Runs ``A`` token auctions over cached agent distributions.

    Args:
      logits: ``[n, V]`` one set of agent logits, or ``[K, n, V]`` several sets.
      bids: ``[A, n]`` bid profiles (non-negative).
      index: ``[A]`` ints in ``[0, K)``, the logits set of each auction (default: all use set 0).
      rule: a rule name (``"linear"``, ``"log_linear"``) or a :class:`~jaxauction.base.Rule` that has a
        ``valuation`` (the values reported); a name and its registered rule give identical results.
      payment: ``"second_price"``, ``"kl"`` or ``None``.
      chunk_size: auctions per compiled step (a multiple of the device count is used); bounds memory
        to about ``chunk_size * n * V`` floats plus the payments' working set.
      mesh: optional mesh from :func:`jaxauction.sharding.make_mesh` or :func:`~jaxauction.sharding.auction_mesh`;
        each chunk is split over its ``"auctions"`` axis (replicated over a ``"model"`` axis).
      progress: show a progress bar over the chunks.
      quadrature: the payments' integration rule (see :class:`jaxauction.payments.Quadrature`).

    Raises:
      ValueError naming the argument: a rule without a valuation; logits with NaN or +inf, or a row that is ``-inf`` for every token
      (an agent with no allowed token); bids of the wrong shape, with no auctions (``A = 0``), or
      negative/non-finite; an ``index`` that is not integer-typed (floats are refused, not truncated) or
      out of ``[0, K)``; a ``chunk_size`` that is not a positive int; a ``mesh`` that is not a
      ``jax.sharding.Mesh`` with axes ``("auctions",)`` or ``("auctions", "model")``.
    """
    logit_sets, bids, index, setting = _checked(logits, bids, index, rule, payment, chunk_size, mesh, quadrature)
    rule, _, _, mesh, chunk = setting
    program = _chunk_function(*setting[:4])
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    logit_sets = sharding.replicate(jnp.asarray(logit_sets, dtype), mesh)
    outputs = []
    starts = range(0, len(bids), chunk)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"auctions ({rule.name})", unit="chunk")
    for start in starts:
        chunk_index, chunk_bids = _placed_chunk(index[start : start + chunk], bids[start : start + chunk], chunk, mesh)
        out = program(logit_sets, chunk_index, chunk_bids)
        outputs.append(tuple(np.asarray(x)[: len(bids[start : start + chunk])] for x in sharding.host_value(out)))
    paid, values, welfare, favoured = (np.concatenate(parts) for parts in zip(*outputs))
    return SimulationResult(bids=bids, index=index, payments=paid, values=values, welfare=welfare, favoured=favoured)


def chunk_program(
    logits,
    bids,
    *,
    index=None,
    rule: str | base.Rule = "linear",
    payment: str | None = "second_price",
    chunk_size: int = 256,
    mesh=None,
    quadrature: payments.Quadrature = payments.Quadrature(),
) -> jax.stages.Compiled:
    """The compiled program :func:`simulate` runs on every chunk of these arguments (the same ones,
    checked the same way), for inspection: ``.as_text()`` (e.g. that a mesh's devices gather no
    auctions), ``.input_shardings``, ``.output_shardings``, ``.cost_analysis()``."""
    logit_sets, bids, index, setting = _checked(logits, bids, index, rule, payment, chunk_size, mesh, quadrature)
    mesh, chunk = setting[3:]
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    logit_sets = sharding.replicate(jnp.asarray(logit_sets, dtype), mesh)
    chunk_index, chunk_bids = _placed_chunk(index[:chunk], bids[:chunk], chunk, mesh)
    return _chunk_function(*setting[:4]).lower(logit_sets, chunk_index, chunk_bids).compile()


def _placed_chunk(index: np.ndarray, bids: np.ndarray, chunk: int, mesh):
    """``(index [C], bids [C, n])`` of one chunk, padded to ``C = chunk`` auctions and split over ``mesh``."""
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    placed = (sharding.pad_batch(jnp.asarray(index), chunk), sharding.pad_batch(jnp.asarray(bids, dtype), chunk))
    return tuple(sharding.shard_batch(x, mesh) for x in placed)


def _checked(logits, bids, index, rule, payment, chunk_size, mesh, quadrature):
    """:func:`simulate`'s arguments checked: ``(logit_sets [K, n, V], bids [A, n], index [A], (rule,
    payment, quadrature, mesh, chunk))`` (numpy arrays; ``chunk`` a multiple of the auction devices)."""
    spec = mechanism.MechanismSpec.create(rule=rule, payment=payment)  # the one validator, before any work
    rule, payment = _rule_with_valuation(spec.rule), spec.payment
    logit_sets = np.asarray(logits)
    if logit_sets.ndim == 2:
        logit_sets = logit_sets[None]
    if logit_sets.ndim != 3 or 0 in logit_sets.shape:
        raise ValueError(
            f"logits: expected shape [n, V] or [K, n, V] with no empty axis; got {np.shape(logits)}. "
            "Fix: stack the agents' next-token logits, e.g. jnp.stack([logits_a, logits_b])."
        )
    if not np.issubdtype(logit_sets.dtype, np.floating):
        if not np.issubdtype(logit_sets.dtype, np.number) or logit_sets.dtype == np.bool_:
            raise ValueError(f"logits: expected real numbers, got an array of dtype {logit_sets.dtype}.")
        logit_sets = logit_sets.astype(np.float64)
    _validation.check_logit_values("simulate", "logits", logit_sets)
    num_sets, num_agents, _ = logit_sets.shape
    bids = _validation.host_bids("bids", bids, num_agents=num_agents, ndim=2)
    index = _check_index(index, len(bids), num_sets)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {type(chunk_size).__name__} {chunk_size!r}.")
    mesh = sharding.check_mesh(mesh)
    chunk = sharding.padded_size(min(chunk_size, len(bids)), mesh)
    return logit_sets, bids, index, (rule, payment, quadrature, mesh, chunk)


def _check_index(index, num_auctions: int, num_sets: int) -> np.ndarray:
    """``index [A]`` as int32 in ``[0, K)``; floats and out-of-range values are refused, not cast."""
    if index is None:
        return np.zeros(num_auctions, np.int32)
    array = np.asarray(index)
    if array.dtype.kind not in "iu":
        raise ValueError(
            f"index: expected integers (the logits set of each auction), got dtype {array.dtype}; floats are not "
            "truncated. Fix: pass np.asarray(index, int)."
        )
    if array.shape != (num_auctions,):
        raise ValueError(
            f"index: expected shape [A] = ({num_auctions},), one entry per bid profile; got {array.shape}."
        )
    bad = (array < 0) | (array >= num_sets)
    if bad.any():
        where = int(np.argmax(bad))
        raise ValueError(
            f"index: expected shape [A] = ({num_auctions},) with entries in [0, {num_sets}) (K = {num_sets} logits "
            f"sets); got {int(array[where])} at position {where}."
        )
    return array.astype(np.int32)
