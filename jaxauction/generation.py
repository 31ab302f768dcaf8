"""Token-by-token auction generation with an LLM.

Every auction ``a`` has ``n`` agents (advertisers), each a prompt and a bid, and optionally a base
prompt (the platform's neutral prompt) that takes part with a fixed bid nobody pays for. All
``A * m`` sequences (``m = n``, or ``n + 1`` with the base prompt) share one KV cache and are decoded
together in one compiled ``lax.while_loop``: at each step the model gives every row's next-token
logits, the aggregation rule forms ``log q: [A, V]``, one token is drawn per auction, every agent is
charged its payment for that token, and the token is appended to all ``m`` contexts of its auction.

The prompts are the same in every auction of a batch (a batch is a bid sweep or a set of random bid
profiles), so the prompts are prefilled once and the cache is repeated ``A`` times.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxauction import base, sampling, sharding
from jaxauction import prompts as prompts_lib
from jaxauction.auction import TokenAuction

Rule = Callable[[jax.Array, jax.Array], jax.Array]

PAYMENTS = ("second_price", "kl", None)
DECODINGS = ("sample", "greedy", "stable")


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What an auction generation returns (numpy arrays, host side).

    Attributes:
      tokens: ``[A, T]`` generated token ids, ``T = max_new_tokens``; after an auction ends (its EOS
        token included) the row holds the tokenizer's pad id.
      lengths: ``[A]`` number of generated tokens, EOS included.
      texts: ``A`` decoded strings (special tokens removed).
      payments: ``[A, n]`` each agent's total payment over the tokens of its auction.
      token_payments: ``[A, T, n]`` the payment for every token (0 after the auction ended).
      bids: ``[A, n]`` the bids the auctions ran with.
    For a single auction (``bids: [n]``) the ``A`` axis is dropped from the arrays and ``texts`` is a
    list holding one string (``text`` gives it directly).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    texts: list[str]
    payments: np.ndarray
    token_payments: np.ndarray
    bids: np.ndarray

    @property
    def text(self) -> str:
        """The first (for a single auction, the only) generated text."""
        return self.texts[0]


# ----------------------------------------------------------------------------------------------
# Model handling.

_DEFAULT_MODEL: tuple[Any, Any] | None = None


def default_model() -> tuple[Any, Any]:
    """Loads the bundled SmolLM2-135M-Instruct once per process and caches it."""
    global _DEFAULT_MODEL
    if _DEFAULT_MODEL is None:
        from jaxauction import models

        _DEFAULT_MODEL = models.load()
    return _DEFAULT_MODEL


def _repeat_cache(cache, repeats: int):
    """Repeats every per-row leaf of a KV cache ``repeats`` times: rows ``[m] -> [repeats * m]``.

    Row ``a * m + j`` of the result is row ``j`` of the input (auction-major order).
    """
    return cache.replace(
        k=jnp.tile(cache.k, (1, repeats) + (1,) * (cache.k.ndim - 2)),
        v=jnp.tile(cache.v, (1, repeats) + (1,) * (cache.v.ndim - 2)),
        valid=jnp.tile(cache.valid, (repeats, 1)),
        positions=jnp.tile(cache.positions, (repeats,)),
    )


# ----------------------------------------------------------------------------------------------
# One auction step and the compiled decode loop.


def auction_step(logits, bids, key, *, rule: Rule, payment: str | None, decoding: str, num_charged: int):
    """One token of ``A`` auctions.

    Args:
      logits: ``[A, m, V]`` next-token logits of every row: the ``n = num_charged`` agents first,
        then the base row if ``m = n + 1``.
      bids: ``[A, m]`` bids (the base row's fixed bid last).
      key: ``[A]`` PRNG keys, one per auction.
      rule: aggregation rule ``(logits [..., m, V], bids [..., m]) -> log q [..., V]``.
      payment: ``"second_price"``, ``"kl"`` or ``None``.
      decoding: ``"sample"``, ``"greedy"`` or ``"stable"`` (two agents, linear rule, no base row).
      num_charged: ``n``, the number of rows that pay (the base row never pays).

    Returns:
      ``(token [A], payments [A, n])``.
    """
    if decoding == "stable":
        return jax.vmap(sampling.stable_sample_two)(key, logits, bids)
    has_base = logits.shape[-2] > num_charged
    auction = TokenAuction(
        rule=rule,
        payment=payment,
        base_logits=logits[..., num_charged, :] if has_base else None,
        base_bid=bids[..., num_charged] if has_base else 0.0,
    )
    outcome = auction(logits[..., :num_charged, :], bids[..., :num_charged])
    if decoding == "greedy":
        token = jnp.argmax(outcome.log_q, axis=-1)
    else:
        token = jax.vmap(jax.random.categorical)(key, outcome.log_q)
    return token, outcome.payments


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "rule",
        "payment",
        "decoding",
        "num_charged",
        "max_new_tokens",
        "pad_id",
        "eos_ids",
        "progress",
    ),
)
def _decode(
    graphdef,
    state,
    cache,
    logits,
    bids,
    keys,
    temperature,
    *,
    rule,
    payment,
    decoding,
    num_charged,
    max_new_tokens,
    pad_id,
    eos_ids,
    progress=False,
):
    """The compiled auction decode loop; see :func:`generate`.

    ``logits: [A * m, V]`` are the next-token logits after the prompts, ``bids: [A, m]``,
    ``keys: [A]``, ``temperature`` a scalar dividing the agents' logits. A finished auction keeps running through the batched model step (shapes are
    static) but its tokens are replaced by ``pad_id`` and its payments by 0.
    """
    num_auctions, rows_per_auction = bids.shape
    vocab = logits.shape[-1]
    eos = jnp.asarray(eos_ids, jnp.int32)
    tokens = jnp.full((num_auctions, max_new_tokens), pad_id, jnp.int32)
    token_payments = jnp.zeros((num_auctions, max_new_tokens, num_charged), logits.dtype)
    done = jnp.zeros((num_auctions,), bool)
    lengths = jnp.zeros((num_auctions,), jnp.int32)

    def cond(carry):
        step, done = carry[0], carry[5]
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, logits, tokens, token_payments, done, lengths = carry
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
        token, charged = auction_step(
            (logits / temperature).reshape(num_auctions, rows_per_auction, vocab),
            bids,
            step_keys,
            rule=rule,
            payment=payment,
            decoding=decoding,
            num_charged=num_charged,
        )
        token = jnp.where(done, pad_id, token.astype(jnp.int32))
        charged = jnp.where(done[:, None], 0.0, charged).astype(token_payments.dtype)
        tokens = tokens.at[:, step].set(token)
        token_payments = token_payments.at[:, step].set(charged)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, eos)
        if progress:
            jax.debug.callback(_report_progress, step)
        model = nnx.merge(graphdef, state)
        logits, cache = model.decode(jnp.repeat(token, rows_per_auction), cache)
        return step + 1, cache, logits, tokens, token_payments, done, lengths

    carry = (jnp.int32(0), cache, logits, tokens, token_payments, done, lengths)
    _, _, _, tokens, token_payments, done, lengths = jax.lax.while_loop(cond, body, carry)
    return tokens, token_payments, lengths


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prefill(graphdef, state, input_ids, attention_mask, cache):
    model = nnx.merge(graphdef, state)
    return model.prefill(input_ids, attention_mask, cache)


# ----------------------------------------------------------------------------------------------
# The public entry point.


def _resolve_rule(rule) -> Rule:
    return base.as_rule(rule)


def _validate_bids(bids, num_agents: int) -> np.ndarray:
    array = np.asarray(bids, dtype=np.float64)
    if array.ndim not in (1, 2) or array.shape[-1] != num_agents:
        raise ValueError(
            f"bids: expected shape [n] for one auction or [A, n] for a batch with n = {num_agents} "
            f"(one bid per prompt); got shape {array.shape}."
        )
    if array.size == 0:
        raise ValueError(f"bids: got an empty array of shape {array.shape}; pass at least one auction.")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError(f"bids: every bid must be finite and >= 0; got {array.tolist()!r:.200}.")
    return array


def _validate_keys(key, num_auctions: int):
    if key is None:
        key = jax.random.key(0)
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        typed = key
    elif key.dtype == jnp.uint32 and key.shape[-1:] == (2,):
        typed = jax.random.wrap_key_data(key)
    else:
        raise ValueError(
            f"key: expected a PRNG key (jax.random.key(seed)) or [A] keys; got dtype {key.dtype} and shape {key.shape}."
        )
    if typed.ndim == 0:
        return jax.random.split(typed, num_auctions)
    if typed.shape != (num_auctions,):
        raise ValueError(
            f"key: a batch of keys must have shape [A] = ({num_auctions},); got "
            f"{typed.shape}. Pass one key to have it split per auction."
        )
    return typed


def generate(
    prompts,
    bids,
    *,
    rule="linear",
    payment="second_price",
    decoding="sample",
    key=None,
    max_new_tokens: int = 48,
    model=None,
    base_prompt=None,
    base_bid: float = 0.0,
    temperature: float = 1.0,
    progress: bool = False,
    mesh=None,
) -> GenerationResult:
    """Runs ``A`` token auctions among ``n`` LLM agents and returns the texts and payments.

    Args:
      prompts: the ``n`` agents' prompts: each a string (the tokenizer's chat template is applied), a
        list of chat messages, or a list of token ids (used exactly as given).
      bids: ``[n]`` for one auction or ``[A, n]`` for a batch (e.g. a bid sweep); non-negative.
      rule: ``"linear"``, ``"log_linear"`` or a rule ``(logits [..., m, V], bids [..., m]) -> log q``.
      payment: ``"second_price"`` (robust allocation, SPEC §4), ``"kl"`` (Myerson payments for KL
        valuations, SPEC §5) or ``None``.
      decoding: ``"sample"`` (draw from ``q`` exactly: no temperature or truncation, which would change
        the mechanism), ``"greedy"`` (argmax of ``q``) or ``"stable"`` (two agents, linear rule, no
        base prompt: SPEC §4's stable sampler; payments are the realized threshold payments).
      key: one PRNG key (split per auction) or ``[A]`` keys (auction ``a`` uses ``key[a]``, so a
        batch gives what each auction gives alone with its key). Default ``jax.random.key(0)``.
      max_new_tokens: length limit; an auction also stops at EOS (which it pays for).
      model: ``(model, tokenizer)`` from :func:`jaxauction.models.load`; ``None`` uses the bundled
        SmolLM2-135M-Instruct, loaded once per process.
      base_prompt: optional platform prompt that takes part with ``base_bid`` and is never charged.
      base_bid: the base prompt's fixed bid (>= 0).
      temperature: the agents' sampling temperature: every agent's logits are divided by it before
        aggregation, i.e. each agent reports the distribution its LLM samples from at that
        temperature; the rule, the payments and the draw from ``q`` are then applied unchanged, so the
        mechanism's properties hold for the tempered distributions. Default 1 (the raw LLM).
      progress: show a progress bar over the generated tokens.
      mesh: optional ``jax.sharding.Mesh`` from :func:`jaxauction.sharding.auction_mesh`: the auctions
        are split over its devices (the batch is padded to a multiple of the device count and the
        padding sliced off) and the model is replicated; the result equals the unsharded one.

    Returns:
      A :class:`GenerationResult`.
    """
    if model is None:
        model = default_model()
    try:
        llm, tokenizer = model
    except (TypeError, ValueError):
        raise ValueError(
            "model: expected the (model, tokenizer) pair returned by jaxauction.models.load(...)"
        ) from None
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(f"prompts: expected a non-empty list with one prompt per agent; got {prompts!r:.80}.")
    rule_fn = _resolve_rule(rule)
    if payment not in PAYMENTS:
        raise ValueError(f"payment: expected one of {PAYMENTS}; got {payment!r}.")
    if decoding not in DECODINGS:
        raise ValueError(f"decoding: expected one of {DECODINGS}; got {decoding!r}.")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive integer; got {max_new_tokens!r}.")
    max_new_tokens = int(max_new_tokens)
    num_agents = len(prompts)
    bid_array = _validate_bids(bids, num_agents)
    single = bid_array.ndim == 1
    bid_array = np.atleast_2d(bid_array)
    num_auctions = bid_array.shape[0]
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a finite number > 0; got {temperature!r}.")
    if not np.isfinite(base_bid) or base_bid < 0:
        raise ValueError(f"base_bid: expected a finite number >= 0; got {base_bid!r}.")
    if decoding == "stable" and (num_agents != 2 or base_prompt is not None or base.as_rule(rule_fn).name != "linear"):
        raise ValueError(
            "decoding='stable' is SPEC §4's sampler for exactly two agents under the linear "
            f"rule without a base prompt; got n = {num_agents}, rule = {rule!r}, "
            f"base_prompt = {'set' if base_prompt is not None else 'None'}."
        )

    sequences = [prompts_lib.encode_prompt(tokenizer, p, argument=f"prompts[{i}]") for i, p in enumerate(prompts)]
    all_bids = bid_array
    if base_prompt is not None:
        sequences.append(prompts_lib.encode_prompt(tokenizer, base_prompt, argument="base_prompt"))
        all_bids = np.concatenate([bid_array, np.full((num_auctions, 1), base_bid)], axis=1)
    rows_per_auction = len(sequences)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, attention_mask = prompts_lib.left_pad(sequences, pad_id)
    max_length = input_ids.shape[1] + max_new_tokens
    context = llm.config.max_position_embeddings
    longest = int(attention_mask.sum(axis=1).max())
    if longest + max_new_tokens > context:
        raise ValueError(
            f"prompts: the longest prompt has {longest} tokens; with max_new_tokens = "
            f"{max_new_tokens} that is {longest + max_new_tokens} > the model's context of {context}. Shorten the "
            "prompts or lower max_new_tokens."
        )
    if max_length > context:
        input_ids, attention_mask = input_ids[:, max_length - context :], attention_mask[:, max_length - context :]
        max_length = context
    keys = _validate_keys(key, num_auctions)
    eos_ids = prompts_lib.eos_ids(llm, tokenizer)

    graphdef, state = nnx.split(llm)
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    cache = llm.init_cache(rows_per_auction, max_length)
    prompt_logits, cache = _prefill(graphdef, state, jnp.asarray(input_ids), jnp.asarray(attention_mask), cache)
    padded = sharding.padded_size(num_auctions, mesh)
    batch_bids = sharding.pad_batch(jnp.asarray(all_bids, dtype), padded)
    keys = sharding.pad_batch(keys, padded)
    cache = _repeat_cache(cache, padded)
    logits = jnp.tile(prompt_logits, (padded, 1))
    if mesh is not None:
        state = sharding.replicate(state, mesh)
        cache = cache.replace(
            k=sharding.shard_batch(cache.k, mesh, 1),
            v=sharding.shard_batch(cache.v, mesh, 1),
            valid=sharding.shard_batch(cache.valid, mesh),
            positions=sharding.shard_batch(cache.positions, mesh),
            index=sharding.replicate(cache.index, mesh),
        )
        logits, batch_bids, keys = (sharding.shard_batch(x, mesh) for x in (logits, batch_bids, keys))

    bar = _open_progress_bar(max_new_tokens) if progress else None
    try:
        tokens, token_payments, lengths = _decode(
            graphdef,
            state,
            cache,
            logits,
            batch_bids,
            keys,
            jnp.asarray(temperature, dtype),
            rule=rule_fn,
            payment=payment,
            decoding=decoding,
            num_charged=num_agents,
            max_new_tokens=max_new_tokens,
            pad_id=int(pad_id),
            eos_ids=eos_ids,
            progress=bool(progress),
        )
        tokens, token_payments, lengths = jax.device_get((tokens, token_payments, lengths))
    finally:
        _close_progress_bar(bar)
    tokens, token_payments, lengths = (np.asarray(x)[:num_auctions] for x in (tokens, token_payments, lengths))
    texts = [tokenizer.decode(row[:length], skip_special_tokens=True).strip() for row, length in zip(tokens, lengths)]
    result = GenerationResult(
        tokens=np.asarray(tokens),
        lengths=np.asarray(lengths),
        texts=texts,
        payments=np.asarray(token_payments).sum(axis=1),
        token_payments=np.asarray(token_payments),
        bids=bid_array,
    )
    if single:
        result = dataclasses.replace(
            result,
            tokens=result.tokens[0],
            lengths=result.lengths[0],
            payments=result.payments[0],
            token_payments=result.token_payments[0],
            bids=result.bids[0],
        )
    return result


_ACTIVE_BARS: list = []


def _open_progress_bar(total: int):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="tokens", unit="tok", leave=False)
    _ACTIVE_BARS.append(bar)
    return bar


def _close_progress_bar(bar) -> None:
    if bar is not None:
        _ACTIVE_BARS.remove(bar)
        bar.close()


def _report_progress(step) -> None:
    """Host callback from the compiled loop (module level, so it never triggers a recompile)."""
    if _ACTIVE_BARS:
        bar = _ACTIVE_BARS[-1]
        bar.n = int(step) + 1
        bar.refresh()
