"""Boundary checks shared by the public functions.

Shapes are static, so shape checks run always (also under ``jit`` and ``vmap``). Value checks
(NaN, infinities, negative bids, agents without any allowed token) need concrete numbers: they run
only when every checked array is concrete, i.e. outside ``jit``/``vmap``/``grad`` tracing. Under
tracing the functions document what they do with such values instead.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Headroom between the largest accepted bid and the dtype's largest number: sums over agents, KL
# (Myerson) payments (at most about 100 times the bid in float32, where KL values are floored near
# -87 nats per token) and sums of payments over thousands of generated tokens must stay finite.
_BID_HEADROOM = 1e8
MAX_SEED = 2**32 - 1
"""The largest seed: ``jax.random.key`` takes 32-bit seeds (``seed`` and ``seed + 2**32`` give the same key)."""


def check_seed(seed: Any, argument: str = "seed") -> int:
    """``seed`` as an int in ``[0, MAX_SEED]`` (the seeds the PRNG tells apart), else ``ValueError`` naming
    ``argument``. Outside that range ``jax.random.key`` wraps seeds around (``0`` and ``2**32`` are the same
    key) or fails with an OverflowError (beyond int64), so one rule holds at every door."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ValueError(
            f"{argument}: expected an integer seed in [0, {MAX_SEED}]; got {type(seed).__name__} {seed!r:.60}."
        )
    if not 0 <= seed <= MAX_SEED:
        text = repr(int(seed)) if len(str(seed)) <= 40 else f"an integer of {len(str(abs(int(seed))))} digits"
        raise ValueError(
            f"{argument}: expected an integer seed in [0, {MAX_SEED}] (the PRNG takes 32-bit seeds: larger ones "
            f"would wrap around and repeat a smaller seed's draws); got {text}."
        )
    return int(seed)


def check_count(value: Any, argument: str, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum`` (a Python or NumPy integer, not a bool, float or string), else
    ``ValueError`` naming ``argument``: the one check of counts, sizes and seeds of NumPy generators."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{argument}: expected an integer >= {minimum}; got {type(value).__name__} {value!r:.60}.")
    return int(value)


def check_real_number(value: Any, argument: str) -> float:
    """``value`` as a float (a real Python or NumPy scalar, not a bool or string), else ``ValueError``."""
    if isinstance(value, (bool, np.bool_, str, bytes)) or np.ndim(value) != 0:
        raise ValueError(f"{argument}: expected a real number; got {type(value).__name__} {value!r:.60}.")
    try:
        number = np.asarray(value)
        if not (np.issubdtype(number.dtype, np.integer) or np.issubdtype(number.dtype, np.floating)):
            raise TypeError
        return float(number)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{argument}: expected a real number; got {type(value).__name__} {value!r:.60}.") from None


def check_base_pair(
    base: Any, base_bid: Any, *, where: str = "", base_field: str = "base_prompt", fn: str = ""
) -> None:
    """A nonzero ``base_bid`` needs a base (``base_field``: the ``base_prompt``, or ``base_logits`` for the
    mechanism alone); alone it would be ignored: ``ValueError`` naming both fields.

    ``base_bid`` must already be a checked number or array; ``where`` prefixes the field names
    (``auctions[2].``), ``fn`` the message (``TokenAuction: ``).
    """
    if base is None and np.any(np.asarray(base_bid) != 0):
        bid = repr(float(base_bid)) if np.ndim(base_bid) == 0 else "nonzero values"
        raise ValueError(
            f"{fn}{where}base_bid: {bid} without a {where}{base_field}: the base bid weighs the base's "
            f"distribution and has no effect without one. Fix: add {where}{base_field}, or drop {where}base_bid "
            "(or set it to 0)."
        )


def is_concrete(*trees: Any) -> bool:
    """True when no leaf of the arguments is a tracer: values can be inspected on the host.

    The package's one eager-vs-traced test. Eager calls get concrete arrays (check the values,
    dispatch to a compiled program); under an enclosing ``jit``, ``vmap`` or ``grad`` some leaf is a
    tracer (skip value checks, inline the computation). Arguments may be arrays, Python or NumPy
    scalars, None or pytrees of them (a ``KVCache``, tuples); a pytree is concrete when all its
    leaves are.
    """
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees))


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def as_array(x: Any) -> Any:
    """Arrays and tracers unchanged; nested lists and scalars as NumPy arrays."""
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return x
    return np.asarray(x)


def check_real(fn: str, name: str, x: Any) -> None:
    """``ValueError`` unless ``x`` has a real dtype (integer or floating; not complex, bool or string)."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None and not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        if jnp.issubdtype(dtype, jnp.complexfloating):
            raise ValueError(
                f"{fn}: {name} has the complex dtype {jnp.dtype(dtype).name}; expected real numbers (bids, logits "
                f"and probabilities are real). Fix: pass the real part (x.real) if the imaginary part is zero."
            )
        fix = "x.astype(float) if 0 and 1 are meant" if jnp.issubdtype(dtype, jnp.bool_) else "int or float numbers"
        raise ValueError(f"{fn}: {name} has dtype {jnp.dtype(dtype).name}; expected real numbers. Fix: pass {fix}.")


def float_dtype(*arrays: Any) -> jnp.dtype:
    """The floating dtype shared by the arguments (float32 by default, float64 under x64)."""
    dtype = jnp.result_type(*arrays)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(dtype, float)
    return jnp.dtype(dtype)


def default_float_dtype() -> jnp.dtype:
    """The floating dtype JAX computes in now: float32, or float64 when ``jax_enable_x64`` is on."""
    return jnp.dtype(jnp.result_type(float))


def max_bid(dtype: Any = None) -> float:
    """The largest accepted bid in ``dtype`` (default: :func:`default_float_dtype`).

    ``finfo(dtype).max / 1e8``: about ``3.4e30`` in float32 and ``1.8e300`` in float64. Payments are
    computed on bids normalised by their largest one and scaled back (docs/maths.md §5), so every bid up to
    this bound gives finite payments (KL payments and sums over generated tokens included); larger
    bids are rejected at the public boundary. Only bid ratios matter to the outcome, so divide all
    bids by a common unit instead.
    """
    try:
        dtype = default_float_dtype() if dtype is None else jnp.dtype(dtype)
        largest = float(jnp.finfo(dtype).max)
    except (TypeError, ValueError):
        raise ValueError(f"dtype: expected a floating dtype such as float32 or float64; got {dtype!r:.60}.") from None
    return largest / _BID_HEADROOM


def host_bids(
    argument: str,
    bids: Any,
    *,
    num_agents: int | None = None,
    ndim: int | tuple[int, ...] = (1, 2),
    dtype: Any = None,
) -> np.ndarray:
    """Checks user-given bids on the host (configurations, generation, simulation); returns float64 NumPy.

    ``bids`` must be a numeric (int or float, not bool or str) rectangular array or nested list with
    ``ndim`` axes (an int or a tuple of allowed ranks), at least one element, finite values in
    ``[0, max_bid(dtype)]`` and, if ``num_agents`` is given, ``num_agents`` entries along the last
    axis. Raises ``ValueError`` naming ``argument``, the expected shape and what was given.
    """
    ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    shape_text = " or ".join(
        "[" + ", ".join([*(["batch"] * (r - 1)), str(num_agents or "n_agents")]) + "]" for r in ranks
    )
    expected = f"numeric bids >= 0 of shape {shape_text}"
    if isinstance(bids, (str, bytes)):
        raise ValueError(
            f"{argument}: expected {expected}; got the string {bids!r:.60}. Fix: pass numbers, e.g. [1.0, 2.0]."
        )
    try:
        values = np.asarray(bids)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"{argument}: expected {expected}; got a ragged or non-numeric value {bids!r:.80} ({error}). "
            f"Fix: give every row the same number of bids."
        ) from None
    if values.dtype == object:
        raise ValueError(
            f"{argument}: expected {expected}; got a ragged or non-numeric value {bids!r:.80}. "
            f"Fix: give every row the same number of numeric bids."
        )
    if values.dtype == bool or not (
        np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)
    ):
        raise ValueError(
            f"{argument}: expected {expected}; got dtype {values.dtype} ({bids!r:.60}). "
            f"Fix: pass int or float numbers (not strings or booleans), e.g. [1.0, 2.0]."
        )
    if values.ndim not in ranks:
        raise ValueError(
            f"{argument}: expected {expected} ({' or '.join(map(str, ranks))} axes); got shape {values.shape}."
        )
    if values.size == 0:
        raise ValueError(f"{argument}: expected {expected}; got an empty array of shape {values.shape}.")
    if num_agents is not None and values.shape[-1] != num_agents:
        raise ValueError(
            f"{argument}: expected {expected}, one bid per agent ({num_agents}); got shape {values.shape}."
        )
    values = values.astype(np.float64)
    check_bid_values(argument, "bids", values, dtype=default_float_dtype() if dtype is None else dtype)
    return values


def _first_index(bad: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(bad)[0])


def mechanism_inputs(fn: str, logits: Any, bids: Any, *, n_agents: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Check and convert ``logits: [..., n, V]`` and ``bids: [..., n]``; returns float arrays.

    Leading axes must broadcast against each other. ``n_agents`` demands a fixed ``n``.
    """
    logits, bids = as_array(logits), as_array(bids)
    check_real(fn, "logits", logits)
    check_real(fn, "bids", bids)
    logits_shape, bids_shape = _shape(logits), _shape(bids)
    if len(logits_shape) < 2:
        raise ValueError(
            f"{fn}: logits must have shape [..., n_agents, vocab] (rank >= 2); got shape {logits_shape}. "
            f"Fix: for a single agent use logits[None, :] and bids of shape [1]."
        )
    if len(bids_shape) < 1:
        raise ValueError(
            f"{fn}: bids must have shape [..., n_agents] (rank >= 1); got shape {bids_shape} (a scalar). "
            f"Fix: pass one bid per agent, e.g. jnp.array([bid])."
        )
    n, vocab = logits_shape[-2:]
    if n == 0:
        raise ValueError(f"{fn}: logits has shape {logits_shape}, i.e. zero agents; at least one agent is needed.")
    if vocab == 0:
        raise ValueError(f"{fn}: logits has shape {logits_shape}, i.e. an empty vocabulary.")
    if bids_shape[-1] != n:
        raise ValueError(
            f"{fn}: logits has shape {logits_shape} ({n} agents) but bids has shape {bids_shape} "
            f"({bids_shape[-1]} agents); expected bids of shape [..., {n}], one bid per agent row of logits."
        )
    if n_agents is not None and n != n_agents:
        raise ValueError(
            f"{fn}: expected exactly {n_agents} agents, i.e. logits [..., {n_agents}, V] and bids "
            f"[..., {n_agents}]; got logits {logits_shape} and bids {bids_shape}."
        )
    try:
        np.broadcast_shapes(logits_shape[:-2], bids_shape[:-1])
    except ValueError:
        raise ValueError(
            f"{fn}: the leading (batch) axes of logits {logits_shape[:-2]} and bids {bids_shape[:-1]} "
            f"do not broadcast; got logits {logits_shape} and bids {bids_shape}. "
            f"Fix: give both the same leading axes [...], or drop them from one of the two."
        ) from None
    dtype = float_dtype(logits, bids)
    logits = jnp.asarray(logits, dtype)
    bids = jnp.asarray(bids, dtype)
    if is_concrete(logits):
        check_logit_values(fn, "logits", logits)
    if is_concrete(bids):
        check_bid_values(fn, "bids", bids)
    return logits, bids


def check_logit_values(fn: str, name: str, logits: jax.Array) -> None:
    """No NaN, no +inf, and at least one token that is not -inf in every row (checked with numpy)."""
    logits = np.asarray(logits)
    if np.isnan(logits).any():
        idx = _first_index(np.isnan(logits))
        raise ValueError(
            f"{fn}: {name} (shape {tuple(logits.shape)}) contains NaN, first at index {idx}; expected "
            f"real numbers or -inf (a masked token). Fix: replace NaN by -inf to mask the token."
        )
    if (logits == np.inf).any():
        idx = _first_index(logits == np.inf)
        raise ValueError(
            f"{fn}: {name} (shape {tuple(logits.shape)}) contains +inf, first at index {idx}; expected "
            f"finite values or -inf. Fix: use a large finite logit or a one-hot row of 0 and -inf."
        )
    empty = ~(logits > -np.inf).any(axis=-1)
    if empty.any():
        idx = _first_index(empty)
        raise ValueError(
            f"{fn}: {name} (shape {tuple(logits.shape)}) has a row that is -inf for every token, "
            f"first at row {idx}; every agent needs at least one allowed token. "
            f"Fix: drop that agent, or give it a finite logit."
        )


def check_bid_values(fn: str, name: str, bids: Any, *, dtype: Any = None) -> None:
    """Finite, non-negative and at most :func:`max_bid` of ``dtype`` (default: the bids' float dtype)."""
    if dtype is None:
        dtype = bids.dtype if jnp.issubdtype(bids.dtype, jnp.floating) else default_float_dtype()
    bids = np.asarray(bids)
    bad = ~np.isfinite(bids)
    if bad.any():
        idx = _first_index(bad)
        raise ValueError(
            f"{fn}: {name} (shape {tuple(bids.shape)}) contains a non-finite value "
            f"{float(bids[idx])} at index {idx}; expected finite bids >= 0 (and at most "
            f"{max_bid(dtype):.3g} in {jnp.dtype(dtype).name})."
        )
    limit = max_bid(dtype)
    large = bids > limit
    if large.any():
        idx = _first_index(large)
        raise ValueError(
            f"{fn}: {name} (shape {tuple(bids.shape)}) contains the bid {float(bids[idx]):.6g} at index {idx}, "
            f"above the largest accepted bid {limit:.3g} in {jnp.dtype(dtype).name} "
            f"(jaxauction._validation.max_bid). Fix: only bid ratios matter; divide every bid by a common unit."
        )
    negative = bids < 0
    if negative.any():
        idx = _first_index(negative)
        raise ValueError(
            f"{fn}: {name} (shape {tuple(bids.shape)}) contains a negative bid {float(bids[idx])} "
            f"at index {idx}; expected bids >= 0. Fix: clip at 0 (a zero bid means the agent has no "
            f"weight)."
        )


def base_inputs(fn: str, logits: jax.Array, base_logits: Any, base_bid: Any) -> tuple[jax.Array | None, jax.Array]:
    """Check the optional base distribution: ``base_logits: [..., V]`` and ``base_bid: [...]``."""
    dtype = logits.dtype
    base_bid = as_array(base_bid)
    check_real(fn, "base_bid", base_bid)
    base_bid_shape = _shape(base_bid)
    if base_logits is None:
        return None, jnp.asarray(base_bid, dtype)
    base_logits = as_array(base_logits)
    check_real(fn, "base_logits", base_logits)
    base_shape = _shape(base_logits)
    if len(base_shape) < 1 or base_shape[-1] != logits.shape[-1]:
        raise ValueError(
            f"{fn}: base_logits must have shape [..., {logits.shape[-1]}] (the vocabulary of logits "
            f"{tuple(logits.shape)}); got shape {base_shape}."
        )
    try:
        np.broadcast_shapes(base_shape[:-1], tuple(logits.shape[:-2]), base_bid_shape)
    except ValueError:
        raise ValueError(
            f"{fn}: the leading axes of base_logits {base_shape[:-1]}, base_bid {base_bid_shape} and "
            f"logits {tuple(logits.shape[:-2])} do not broadcast. Fix: give them the same leading axes."
        ) from None
    base_logits = jnp.asarray(base_logits, dtype)
    base_bid = jnp.asarray(base_bid, dtype)
    if is_concrete(base_logits):
        check_logit_values(fn, "base_logits", base_logits)
    if is_concrete(base_bid):
        check_bid_values(fn, "base_bid", base_bid)
    return base_logits, base_bid


def probabilities(fn: str, name: str, p: Any) -> jax.Array:
    """Check a probability vector ``[..., V]`` (non-negative, finite); returns a float array."""
    p = as_array(p)
    check_real(fn, name, p)
    shape = _shape(p)
    if len(shape) < 1 or shape[-1] == 0:
        raise ValueError(f"{fn}: {name} must have shape [..., V] with V >= 1; got shape {shape}.")
    p = jnp.asarray(p, float_dtype(p))
    if is_concrete(p):
        values = np.asarray(p)
        bad = ~np.isfinite(values) | (values < 0)
        if bad.any():
            idx = _first_index(bad)
            raise ValueError(
                f"{fn}: {name} (shape {shape}) must hold probabilities (finite, >= 0); got "
                f"{float(values[idx])} at index {idx}. Fix: pass jnp.exp(log_q), not log-probabilities."
            )
    return p
