"""Batches of auctions for design search: synthetic Dirichlet draws or the bundled LLM's distributions.

An :class:`AuctionBatch` holds ``A`` auctions among ``n`` agents over ``V`` outcomes: agent logits
``[A, n, V]``, bid profiles ``[A, n]`` and, optionally, a base distribution ``[A, V]``. LLM batches
are cached to a ``.npz`` file so that a search never re-runs the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxauction import _validation, base, engine, rules
from jaxauction import prompts as prompts_lib
from jaxauction.design.checkpoint import atomic_savez, file_errors
from jaxauction.engine import scoring
from jaxauction.engine.request import validate_model
from jaxauction.vocabulary import compress_vocabulary

CACHE_FORMAT = 2  # 2: kept tokens in increasing id order; the continuation decoded by the engine, then teacher-forced


@struct.dataclass
class AuctionBatch:
    """``A`` auctions: ``logits [A, n, V]``, ``bids [A, n]``, optional ``base_logits [A, V]``."""

    logits: jax.Array
    bids: jax.Array
    base_logits: jax.Array | None = None

    @property
    def num_auctions(self) -> int:
        return self.logits.shape[0]

    @property
    def num_agents(self) -> int:
        return self.logits.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.logits.shape[2]


def make_batch(logits, bids, base_logits=None, dtype=None) -> AuctionBatch:
    """Validates arrays (outside jit) and builds an :class:`AuctionBatch`.

    Raises:
      ValueError: naming the argument, its shape and what is expected.
    """
    logits = np.asarray(logits)
    bids = np.asarray(bids)
    if logits.ndim != 3 or logits.shape[1] == 0 or logits.shape[2] == 0:
        raise ValueError(f"logits must have shape [A, n, V] with n, V >= 1, got shape {logits.shape}.")
    if bids.shape != logits.shape[:2]:
        raise ValueError(
            f"bids must have shape [A, n] = {logits.shape[:2]} to match logits {logits.shape}, got {bids.shape}."
        )
    if np.isnan(logits).any() or np.isposinf(logits).any():
        raise ValueError(f"logits {logits.shape} contain NaN or +inf; only finite values and -inf are allowed.")
    if np.isneginf(logits).all(axis=-1).any():
        raise ValueError(f"logits {logits.shape} have a row of all -inf; every agent needs a token it allows.")
    if not np.isfinite(bids).all() or (bids < 0).any():
        raise ValueError(f"bids {bids.shape} must be finite and >= 0.")
    if base_logits is not None:
        base_logits = np.asarray(base_logits)
        if base_logits.shape != (logits.shape[0], logits.shape[2]):
            raise ValueError(
                f"base_logits must have shape [A, V] = {(logits.shape[0], logits.shape[2])}, got {base_logits.shape}."
            )
        if np.isnan(base_logits).any() or np.isposinf(base_logits).any() or np.isneginf(base_logits).all(-1).any():
            raise ValueError(f"base_logits {base_logits.shape} must be finite or -inf, with a token allowed per row.")
    dtype = dtype or jnp.result_type(float)
    return AuctionBatch(
        logits=jnp.asarray(logits, dtype),
        bids=jnp.asarray(bids, dtype),
        base_logits=None if base_logits is None else jnp.asarray(base_logits, dtype),
    )


def dirichlet_auctions(
    seed: int,
    num_auctions: int,
    num_agents: int,
    vocab_size: int,
    *,
    concentration: float = 1.0,
    bid_sigma: float = 1.0,
    with_base: bool = False,
    dtype=None,
) -> AuctionBatch:
    """Synthetic auctions: each agent's distribution ~ Dirichlet(concentration), log-normal bids.

    Bids are ``exp(bid_sigma * N(0, 1))`` (median 1). The base distribution (``with_base``) is another
    Dirichlet draw. Drawn with NumPy's ``default_rng(seed)``: same seed, same batch.
    """
    seed = _validation.check_count(seed, "seed", minimum=0)
    for name, value in dict(num_auctions=num_auctions, num_agents=num_agents, vocab_size=vocab_size).items():
        _validation.check_count(value, name)
    concentration = _validation.check_real_number(concentration, "concentration")
    bid_sigma = _validation.check_real_number(bid_sigma, "bid_sigma")
    if not concentration > 0 or not bid_sigma >= 0:
        raise ValueError(f"need concentration > 0 and bid_sigma >= 0, got {concentration}, {bid_sigma}.")
    rng = np.random.default_rng(seed)
    logits = _log_dirichlet(rng, concentration, (num_auctions, num_agents, vocab_size))
    bids = np.exp(bid_sigma * rng.standard_normal((num_auctions, num_agents)))
    base = _log_dirichlet(rng, concentration, (num_auctions, vocab_size)) if with_base else None
    dtype = dtype or jnp.result_type(float)
    return AuctionBatch(
        logits=jnp.asarray(logits, dtype),
        bids=jnp.asarray(bids, dtype),
        base_logits=None if base is None else jnp.asarray(base, dtype),
    )


def _log_dirichlet(rng: np.random.Generator, alpha: float, shape: tuple[int, ...]) -> np.ndarray:
    """Log of Dirichlet(alpha) draws over the last axis, from log-Gamma variates.

    ``log G_alpha = log G_(alpha+1) + log(U) / alpha`` (``U ~ U(0, 1)``) never underflows to ``-inf``,
    even for small ``alpha``.
    """
    log_gamma = np.log(rng.standard_gamma(alpha + 1.0, shape)) + np.log(rng.uniform(size=shape)) / alpha
    return log_gamma - np.logaddexp.reduce(log_gamma, axis=-1, keepdims=True)


def save_batch(path: str | Path, batch: AuctionBatch, metadata: dict | None = None) -> Path:
    """Writes the batch (and JSON-able ``metadata``) to ``path`` (``.npz``) atomically."""
    arrays = {"logits": np.asarray(batch.logits), "bids": np.asarray(batch.bids)}
    if batch.base_logits is not None:
        arrays["base_logits"] = np.asarray(batch.base_logits)
    arrays["metadata"] = np.asarray(json.dumps(metadata or {}, sort_keys=True))
    return atomic_savez(path, arrays)


def load_batch(path: str | Path) -> tuple[AuctionBatch, dict]:
    """Reads a batch written by :func:`save_batch`: ``(batch, metadata)``.

    Raises:
      ValueError: naming the file, if it is missing, corrupt or not an auction batch.
    """
    path = Path(path)
    with file_errors(path, "auction batch", "delete it to rebuild it"):
        with np.load(path, allow_pickle=False) as data:
            missing = {"logits", "bids", "metadata"} - set(data.files)
            if missing:
                raise ValueError(f"{path} is not an auction batch file: missing {sorted(missing)}.")
            batch = AuctionBatch(
                logits=jnp.asarray(data["logits"]),
                bids=jnp.asarray(data["bids"]),
                base_logits=jnp.asarray(data["base_logits"]) if "base_logits" in data.files else None,
            )
            metadata = json.loads(str(data["metadata"]))
    if not isinstance(metadata, dict):
        raise ValueError(f"{path} is not an auction batch file: its metadata is not a JSON object.")
    return batch, metadata


# --- The bundled LLM ---------------------------------------------------------------------------------

DEFAULT_QUERY = "Vacations in Hawaii"

DEFAULT_ADVERTISERS = (
    "Write a one-sentence ad for flights to Hawaii with Alpha Airlines.",
    "Write a one-sentence ad for a stay at Beta Resort in Hawaii.",
    "Write a one-sentence ad for snorkeling tours in Maui with Gamma Adventures.",
    "Write a one-sentence ad for rental cars in Honolulu with Delta Cars.",
)


def _chat_ids(tokenizer, system: str | None, user: str) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return prompts_lib.encode_prompt(tokenizer, messages)


def coarsen(log_probs: np.ndarray, top_k: int) -> np.ndarray:
    """Keeps the ``top_k`` tokens most likely for any row (of one auction) and lumps the rest.

    ``log_probs: [m, V]`` normalised rows of one auction -> ``[m, top_k + 1]`` normalised rows (float32):
    the kept tokens in increasing id order, then the total probability of every other token (an "other"
    outcome). :func:`jaxauction.vocabulary.compress_vocabulary` with ``top_k`` and no mass.
    """
    return compress_vocabulary(log_probs, mass=None, top_k=top_k)[0]


def llm_auctions(
    cache: str | Path,
    *,
    advertisers: Sequence[str] = DEFAULT_ADVERTISERS,
    query: str = DEFAULT_QUERY,
    agents_per_auction: int = 2,
    steps: int = 8,
    top_k: int = 32,
    num_bid_profiles: int = 4,
    bid_sigma: float = 1.0,
    seed: int = 0,
    model=None,
    model_id: str = "bundled",
) -> AuctionBatch:
    """Auctions among the bundled LLM's advertiser distributions, cached to ``cache`` (``.npz``).

    For every group of ``agents_per_auction`` consecutive advertisers (cyclically), the shared
    continuation is decoded greedily under the linear rule with equal bids, its end tokens excluded, for
    ``steps - 1`` tokens (one batched :func:`jaxauction.generate` call); the agents' next-token
    distributions before each of its tokens and after the last (``steps`` in all, from one
    teacher-forced pass, :func:`jaxauction.engine.scoring.next_token_log_probs`) form one auction each, and the
    base distribution is the LLM's distribution for the bare ``query`` followed by the same tokens. Each
    auction's outcomes are coarsened to the ``top_k`` most likely tokens plus one "other" outcome
    (:func:`coarsen`). Every auction is paired with ``num_bid_profiles`` log-normal bid profiles drawn
    with ``seed``.

    The cache is keyed by every argument above and ``model_id``; a matching file is loaded without
    touching the model. The model is loaded only when the cache must be (re)built. ``model`` is an
    optional ``(model, tokenizer)`` pair as for :func:`jaxauction.generate` (default: the bundled
    model); give it a ``model_id`` of its own so that caches of different models are told apart.
    """
    if agents_per_auction < 1 or agents_per_auction > len(advertisers):
        raise ValueError(
            f"agents_per_auction must be in [1, {len(advertisers)}] (the number of advertisers), got {agents_per_auction}."
        )
    if steps < 1 or top_k < 1 or num_bid_profiles < 1:
        raise ValueError(f"steps, top_k and num_bid_profiles must be >= 1, got {steps}, {top_k}, {num_bid_profiles}.")
    settings = dict(
        format=CACHE_FORMAT,
        advertisers=list(advertisers),
        query=query,
        agents_per_auction=agents_per_auction,
        steps=steps,
        top_k=top_k,
        num_bid_profiles=num_bid_profiles,
        bid_sigma=bid_sigma,
        seed=seed,
        model_id=model_id,
    )
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    cache = Path(cache)
    if cache.exists():
        batch, metadata = load_batch(cache)
        if metadata.get("fingerprint") == fingerprint:
            return batch
    logits, base = _llm_distributions(model, advertisers, query, agents_per_auction, steps, top_k)
    logits = np.repeat(logits, num_bid_profiles, axis=0)
    base = np.repeat(base, num_bid_profiles, axis=0)
    bids = np.exp(bid_sigma * np.random.default_rng(seed).standard_normal(logits.shape[:2]))
    batch = make_batch(logits, bids, base, dtype=jnp.float32)
    save_batch(cache, batch, dict(settings, fingerprint=fingerprint))
    return batch


def _llm_distributions(model, advertisers, query, agents_per_auction, steps, top_k):
    """Runs the LLM: ``(logits [steps * G, m, top_k + 1], base [steps * G, top_k + 1])``, coarsened.

    Auction ``s * G + g`` is group ``g`` at step ``s``: the next-token distributions of its agents and
    of the bare query after the first ``s`` tokens of the group's shared continuation.
    """
    model = validate_model(model)
    tokenizer = model[1]
    count = len(advertisers)
    groups = [[(start + offset) % count for offset in range(agents_per_auction)] for start in range(count)]
    prompts = [_chat_ids(tokenizer, f"You are a copywriter. {query}", text) for text in advertisers]
    base_prompt = _chat_ids(tokenizer, None, query)
    continuations = _shared_continuations(model, [[prompts[agent] for agent in group] for group in groups], steps - 1)
    sequences = [
        row + continuation
        for group, continuation in zip(groups, continuations)
        for row in [*(prompts[agent] for agent in group), base_prompt]
    ]
    log_probs = scoring.next_token_log_probs(model, sequences, steps).astype(np.float64)  # [G * (m + 1), steps, V]
    log_probs = log_probs.reshape(len(groups), agents_per_auction + 1, steps, -1)
    auctions, bases = [], []
    for step in range(steps):
        for group_rows in log_probs[:, :, step]:
            coarse = coarsen(group_rows, top_k)
            auctions.append(coarse[:-1])
            bases.append(coarse[-1])
    return np.stack(auctions).astype(np.float32), np.stack(bases).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class _LinearWithoutStop:
    """The linear rule's ``log q`` with the end tokens removed (renormalised): a continuation that never stops."""

    eos_ids: tuple[int, ...]

    def __call__(self, logits: jax.Array, bids: jax.Array) -> jax.Array:
        log_q = rules.linear(logits, bids).at[..., list(self.eos_ids)].set(-jnp.inf)
        return log_q - jax.scipy.special.logsumexp(log_q, axis=-1, keepdims=True)


def _shared_continuations(model, groups: list[list[list[int]]], length: int) -> list[list[int]]:
    """Each group's ``length`` shared tokens: greedy under the equal-bid linear rule, no end token.

    One batched :func:`jaxauction.generate` call (the engine's decode loop), one auction per group.
    """
    if length == 0:
        return [[] for _ in groups]
    llm, tokenizer = model
    rule = base.Rule(name="linear_without_stop", log_aggregate=_LinearWithoutStop(prompts_lib.eos_ids(llm, tokenizer)))
    result = engine.generate(
        [engine.Auction(group, np.ones(len(group))) for group in groups],
        rule=rule, payment=None, decoding="greedy", max_new_tokens=length, model=model,
    )  # fmt: skip
    return [list(map(int, row[:length])) for row in np.atleast_2d(result.tokens)]
