"""What a caller asks of :func:`jaxauction.generate`, checked and turned into token ids.

Every argument check of ``generate`` lives here, so the rest of the engine receives valid input
only: the two call forms are normalised to a list of :class:`EncodedAuction`, the mechanism to one
frozen :class:`GenerateOptions` (a :class:`jaxauction.mechanism.MechanismSpec`, checked there, and a
length).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxauction import _validation, base, sharding
from jaxauction import prompts as prompts_lib
from jaxauction.mechanism import DECODINGS, PAYMENTS, MechanismSpec, SpecError, describe, real_scalar
from jaxauction.models.base import LanguageModel, default_model, missing_members

__all__ = [
    "DECODINGS",
    "PAYMENTS",
    "Auction",
    "EncodedAuction",
    "GenerateOptions",
    "Request",
    "encode_request",
]


@dataclasses.dataclass(frozen=True)
class Auction:
    """One auction of a heterogeneous batch (see :func:`jaxauction.generate`).

    Attributes:
      prompts: the ``n`` agents' prompts: each a string (the tokenizer's chat template is applied), a
        list of ``{"role", "content"}`` chat messages, or a list of token ids (used exactly as given).
      bids: ``[n]`` non-negative bids, one per prompt.
      base_prompt: optional platform prompt that takes part with ``base_bid`` and is never charged.
      base_bid: the base prompt's fixed bid (>= 0).
    """

    prompts: Sequence[Any]
    bids: Sequence[float]
    base_prompt: Any = None
    base_bid: float = 0.0


@dataclasses.dataclass(frozen=True)
class EncodedAuction:
    """One auction as token ids: ``agents`` (n tuples), ``bids [n]``, ``base`` (tuple or None)."""

    agents: tuple[tuple[int, ...], ...]
    bids: np.ndarray
    base: tuple[int, ...] | None
    base_bid: float

    @property
    def sequences(self) -> list[tuple[int, ...]]:
        """The token sequences of its slots: the agents', then the base prompt's."""
        return [*self.agents, *([self.base] if self.base is not None else [])]


@dataclasses.dataclass(frozen=True)
class GenerateOptions(MechanismSpec):
    """The mechanism and decoding settings of a generation: a :class:`~jaxauction.mechanism.MechanismSpec`
    and a length (hashable, checked by :meth:`create`).

    Attributes:
      rule: ``"linear"`` (default), ``"log_linear"``, a :class:`jaxauction.base.Rule` or a function
        ``(logits [..., m, V], bids [..., m]) -> log q [..., V]``.
      payment: ``"second_price"`` (default; robust allocation, docs/maths.md §5), ``"kl"`` (Myerson
        payments for KL valuations, docs/maths.md §7) or ``None``.
      decoding: ``"sample"`` (default: draw from ``q`` exactly: no temperature or truncation, which
        would change the mechanism), ``"greedy"`` (argmax of ``q``) or ``"stable"`` (two agents, linear
        rule, no base prompt: docs/maths.md §5's stable sampler; payments are the realized threshold
        payments).
      temperature: the agents' sampling temperature (default 1), in ``[1e-30, 1e30]``: every row's
        logits are divided by it before aggregation; the rule, the payments and the draw from ``q``
        are applied unchanged.
      max_new_tokens: length limit (default 48); an auction also stops at EOS (which it pays for).
    """

    max_new_tokens: int = 48

    def __post_init__(self):
        """Checks every field (the spec's, then the length): :class:`SpecError` naming the argument."""
        super().__post_init__()
        length = self.max_new_tokens
        if isinstance(length, (bool, np.bool_)) or not isinstance(length, (int, np.integer)):
            raise SpecError("max_new_tokens", f"expected a positive integer; got {describe(length)}.")
        if length < 1:
            raise SpecError("max_new_tokens", f"expected a positive integer; got {length!r}.")
        object.__setattr__(self, "max_new_tokens", int(length))

    @classmethod
    def create(cls, rule="linear", payment="second_price", decoding="sample", temperature=1.0, max_new_tokens=48):
        """Checks every setting (:meth:`MechanismSpec.create`); ValueError naming the argument otherwise."""
        options = cls(rule, payment, decoding, temperature, max_new_tokens)
        options.warn_payment()
        return options

    def keywords(self) -> dict[str, Any]:
        """The options as the keywords of :func:`jaxauction.generate` (a registered rule by its name)."""
        return dict(super().keywords(), max_new_tokens=self.max_new_tokens)


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked generation request.

    Attributes:
      auctions: the ``A`` auctions as token ids. single: the caller passed one auction (the result
        drops the ``A`` axis). keys: ``[A]`` PRNG keys, one per auction.
    """

    auctions: list[EncodedAuction]
    single: bool
    keys: jax.Array

    @property
    def num_agents(self) -> np.ndarray:
        """``[A]`` each auction's number of agents."""
        return np.array([len(a.agents) for a in self.auctions])

    @property
    def n_max(self) -> int:
        return int(self.num_agents.max())

    @property
    def has_base(self) -> bool:
        return any(a.base is not None for a in self.auctions)

    @property
    def slots(self) -> int:
        """``m``, the slots of every auction in the batch layout: ``n_max`` (+ 1 with a base prompt)."""
        return self.n_max + int(self.has_base)


def _checked_base_bid(value, argument: str) -> float:
    base_bid = real_scalar(value, argument, "a number >= 0")
    if not (math.isfinite(base_bid) and 0 <= base_bid <= _validation.max_bid()):
        raise ValueError(f"{argument}: expected a finite number in [0, {_validation.max_bid():.3g}]; got {base_bid!r}.")
    return base_bid


def validate_keys(key, num_auctions: int) -> jax.Array:
    """``[A]`` typed PRNG keys from None (key 0), one key (split per auction) or ``[A]`` keys."""
    if key is None:
        key = jax.random.key(0)
    if isinstance(key, (str, bytes, bool)) or not isinstance(key, (jax.Array, np.ndarray, list, tuple)):
        raise ValueError(
            f"key: expected a PRNG key (jax.random.key(seed)) or [A] keys (jax.random.split(key, A)); got "
            f"{describe(key)}."
        )
    try:
        key = key if isinstance(key, jax.Array) else jnp.asarray(key)
    except (TypeError, ValueError):
        raise ValueError(f"key: expected a PRNG key (jax.random.key(seed)); got {describe(key)}.") from None
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


def validate_model(model):
    """The ``(model, tokenizer)`` pair, the model a :class:`jaxauction.models.base.LanguageModel`;
    None loads the bundled model once per process."""
    if model is None:
        model = default_model()
    try:
        llm, tokenizer = model
    except (TypeError, ValueError):
        raise ValueError(
            "model: expected the (model, tokenizer) pair returned by jaxauction.models.load(...); got "
            f"{describe(model)}."
        ) from None
    if not isinstance(llm, LanguageModel):
        raise ValueError(
            "model: the first element must be the language model (a jaxauction.models.Llama, or any "
            "jaxauction.models.base.LanguageModel) and the second its tokenizer, as jaxauction.models.load(...) "
            f"returns them; got ({describe(llm)}, {describe(tokenizer)}), the model lacking "
            f"{', '.join(missing_members(llm))}."
        )
    if not hasattr(tokenizer, "decode") or not (
        hasattr(tokenizer, "pad_token_id") or hasattr(tokenizer, "eos_token_id")
    ):
        raise ValueError(
            "model: the second element must be the tokenizer (with decode, pad_token_id, eos_token_id), as "
            f"jaxauction.models.load(...) returns it; got {describe(tokenizer)}."
        )
    return llm, tokenizer


def validate_mesh(mesh, llm: LanguageModel | None = None):
    """None, or a ``jax.sharding.Mesh`` with axes ``("auctions",)`` or ``("auctions", "model")``
    (:func:`jaxauction.sharding.check_mesh`) whose ``"model"`` axis ``llm`` can split over (its
    ``partition_specs`` raise the reason otherwise)."""
    mesh = sharding.check_mesh(mesh)
    if llm is not None and sharding.model_devices(mesh) > 1:
        llm.partition_specs(sharding.AXIS, sharding.MODEL_AXIS, sharding.model_devices(mesh))
    return mesh


def validate_rule_output(rule_fn: base.Rule, rows: int, vocab: int, dtype) -> None:
    """A user rule must map ``[A, m, V], [A, m]`` to ``[A, V]``: checked on shapes, without running it."""
    try:
        out = jax.eval_shape(
            rule_fn, jax.ShapeDtypeStruct((2, rows, vocab), dtype), jax.ShapeDtypeStruct((2, rows), dtype)
        )
    except Exception as error:  # noqa: BLE001 - any failure of a user rule is reported by name
        raise ValueError(
            f"rule: calling rule(logits [A, m, V], bids [A, m]) with A = 2, m = {rows}, V = {vocab} failed: "
            f"{type(error).__name__}: {str(error)[:200]}"
        ) from None
    if not hasattr(out, "shape") or tuple(out.shape) != (2, vocab):
        got = tuple(out.shape) if hasattr(out, "shape") else type(out).__name__
        raise ValueError(
            f"rule: expected rule(logits [A, m, V], bids [A, m]) to return log q of shape [A, V] = (2, {vocab}) "
            f"for A = 2, m = {rows}; got {got}. A rule aggregates over the agent axis (-2)."
        )


def _is_auction_list(prompts) -> bool:
    return isinstance(prompts, Auction) or (
        isinstance(prompts, Sequence) and len(prompts) > 0 and all(isinstance(x, Auction) for x in prompts)
    )


def _encode_auctions(auctions, tokenizer) -> list[EncodedAuction]:
    encoded = []
    for a, auction in enumerate(auctions):
        name = f"auctions[{a}]"
        if not isinstance(auction, Auction):
            raise ValueError(f"auctions: expected a list of jaxauction.Auction; {name} is {describe(auction)}.")
        prompts = auction.prompts
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError(
                f"{name}.prompts: expected a non-empty list with one prompt per agent; got {describe(prompts)}."
            )
        bids = _validation.host_bids(f"{name}.bids", auction.bids, num_agents=len(prompts), ndim=1)
        base_bid = _checked_base_bid(auction.base_bid, f"{name}.base_bid")
        _validation.check_base_pair(auction.base_prompt, base_bid, where=f"{name}.")
        agents = tuple(
            tuple(prompts_lib.encode_prompt(tokenizer, p, argument=f"{name}.prompts[{i}]"))
            for i, p in enumerate(prompts)
        )
        base_ids = None
        if auction.base_prompt is not None:
            base_ids = tuple(prompts_lib.encode_prompt(tokenizer, auction.base_prompt, argument=f"{name}.base_prompt"))
        encoded.append(EncodedAuction(agents, bids, base_ids, base_bid))
    return encoded


def _encode_prompt_form(prompts, bids, base_prompt, base_bid, tokenizer) -> tuple[list[EncodedAuction], bool]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(
            "prompts: expected a non-empty list with one prompt per agent, or a list of jaxauction.Auction; "
            f"got {describe(prompts)}."
        )
    if bids is None:
        raise ValueError("bids: expected [n] or [A, n] bids for the prompts; got None.")
    bid_array = _validation.host_bids("bids", bids, num_agents=len(prompts))
    base_bid = _checked_base_bid(base_bid, "base_bid")
    _validation.check_base_pair(base_prompt, base_bid)
    agents = tuple(
        tuple(prompts_lib.encode_prompt(tokenizer, p, argument=f"prompts[{i}]")) for i, p in enumerate(prompts)
    )
    base_ids = None
    if base_prompt is not None:
        base_ids = tuple(prompts_lib.encode_prompt(tokenizer, base_prompt, argument="base_prompt"))
    return [EncodedAuction(agents, row, base_ids, base_bid) for row in np.atleast_2d(bid_array)], bid_array.ndim == 1


def _check_options_fit(options: GenerateOptions, request: Request, vocab: int) -> None:
    options.check_fits(request.num_agents.tolist(), request.has_base)
    if all(options.rule is not base.as_rule(name) for name in base.rule_names()):
        validate_rule_output(options.rule, request.slots, vocab, _validation.default_float_dtype())


def encode_request(prompts, bids, *, key, tokenizer, options, vocab, base_prompt=None, base_bid=0.0) -> Request:
    """Both call forms of ``generate`` as one checked :class:`Request` (see :func:`jaxauction.generate`)."""
    if _is_auction_list(prompts):
        if bids is not None or base_prompt is not None:
            raise ValueError(
                "bids/base_prompt: with a list of jaxauction.Auction each auction carries its own bids and base "
                "prompt; pass bids=None and base_prompt=None."
            )
        single = isinstance(prompts, Auction)
        auctions = _encode_auctions([prompts] if single else list(prompts), tokenizer)
    else:
        auctions, single = _encode_prompt_form(prompts, bids, base_prompt, base_bid, tokenizer)
    request = Request(auctions, single, validate_keys(key, len(auctions)))
    _check_options_fit(options, request, vocab)
    return request
