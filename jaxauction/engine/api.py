"""``generate``: the engine's entry point, a script of named stages."""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from jaxauction import prompts as prompts_lib
from jaxauction import sharding
from jaxauction.engine import chunk, loop, plan, request, runtime
from jaxauction.engine.loop import DecodeSpec
from jaxauction.mechanism import describe

__all__ = ["GenerationResult", "generate"]

_FORM_OPTIONS = ("base_prompt", "base_bid")


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What an auction generation returns (numpy arrays, host side).

    Attributes:
      tokens: ``[A, T]`` generated token ids, ``T = max_new_tokens``; after an auction ends (its EOS
        token included) the row holds the tokenizer's pad id.
      lengths: ``[A]`` number of generated tokens, EOS included.
      texts: ``A`` decoded strings (special tokens removed).
      payments: ``[A, n]`` each agent's total payment over the tokens of its auction (``n = n_max``,
        the batch's largest agent count; 0 for the padded agents of smaller auctions; NaN for every
        agent of an auction that is not ``valid``).
      token_payments: ``[A, T, n]`` the payment for every token (0 after the auction ended; NaN at the
        step where an invalid auction broke).
      bids: ``[A, n]`` the bids the auctions ran with (0 for padded agents).
      num_agents: ``[A]`` each auction's number of agents ``n_a``.
      valid: ``[A]`` False for an auction whose distribution ``q`` (or payment) was ever non-finite
        (NaN/inf logits, a rule returning NaN): it stopped at that step, its text is what came before.
    For a single auction (``bids: [n]`` or one :class:`Auction`) the ``A`` axis is dropped from the
    arrays and ``texts`` is a list holding one string (``text`` gives it directly).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    texts: list[str]
    payments: np.ndarray
    token_payments: np.ndarray
    bids: np.ndarray
    num_agents: np.ndarray
    valid: np.ndarray

    @property
    def text(self) -> str:
        """The first (for a single auction, the only) generated text."""
        return self.texts[0]

    @classmethod
    def of(cls, req: request.Request, outputs: list[chunk.ChunkOutput], tokenizer) -> GenerationResult:
        """The result of ``req`` from its chunks' outputs (padding auctions sliced off)."""
        num_auctions, n_max = len(req.auctions), req.n_max
        tokens, token_payments, lengths, valid = (
            np.concatenate([o[i] for o in outputs])[:num_auctions] for i in range(4)
        )
        texts = [tokenizer.decode(row[:n], skip_special_tokens=True).strip() for row, n in zip(tokens, lengths)]
        bids = np.zeros((num_auctions, n_max))
        for a, auction in enumerate(req.auctions):
            bids[a, : len(auction.agents)] = auction.bids
        result = cls(tokens, lengths, texts, token_payments.sum(axis=1), token_payments, bids, req.num_agents, valid)
        if not req.single:
            return result
        batched = ("tokens", "lengths", "payments", "token_payments", "bids", "num_agents", "valid")
        return dataclasses.replace(result, **{f: getattr(result, f)[0] for f in batched})


def _split_options(options, keywords: dict) -> tuple[request.GenerateOptions, dict]:
    """The mechanism options (``options=`` or keywords) and the prompt-form keywords."""
    form = {name: keywords.pop(name) for name in _FORM_OPTIONS if name in keywords}
    fields = [f.name for f in dataclasses.fields(request.GenerateOptions)]
    unknown = sorted(set(keywords) - set(fields))
    if unknown:
        raise TypeError(
            f"generate() got unexpected keyword argument(s) {unknown}; the options are {fields + list(_FORM_OPTIONS)}, "
            "key, model, mesh, memory_budget and progress."
        )
    if options is None:
        return request.GenerateOptions.create(**keywords), form
    if not isinstance(options, request.GenerateOptions) or keywords:
        raise ValueError(
            f"options: expected a jaxauction.GenerateOptions and no option keywords beside it; got "
            f"{describe(options)} with {sorted(keywords)}."
        )
    return options, form


def _decode_spec(options: request.GenerateOptions, n_max: int, token_slots: int, llm, tokenizer) -> DecodeSpec:
    pad_id, eos_ids = int(prompts_lib.pad_id(tokenizer)), prompts_lib.eos_ids(llm, tokenizer)
    mechanism = dataclasses.replace(options.mechanism, temperature=1.0)  # the temperature is an input array
    return DecodeSpec(mechanism, n_max, token_slots, pad_id, eos_ids)


def generate(prompts, bids=None, *, options=None, key=None, model=None, mesh=None, progress=False, **keywords):
    """Runs ``A`` token auctions among LLM agents and returns the texts and payments.

    Two forms:

    * ``generate(auctions)`` with a list of :class:`Auction` (or one): each auction has its own
      prompts (any number of agents), bids, base prompt and base bid. Results are padded to the
      batch's largest agent count ``n_max`` (0 for padded agents) with ``result.num_agents [A]``.
    * ``generate(prompts, bids)``: one prompt set and ``bids [n]`` (one auction) or ``[A, n]`` (e.g. a
      bid sweep); ``base_prompt``/``base_bid`` apply to every auction.

    Each auction gives what it gives alone with the same key (tokens identical under greedy decoding,
    payments equal to float rounding): padded agents have zero bid and no allowed token.

    Args:
      prompts: the list of :class:`Auction`, or the ``n`` agents' prompts: each a string (the
        tokenizer's chat template is applied), a list of ``{"role", "content"}`` chat messages, or a
        list of token ids (used exactly as given).
      bids: ``[n]`` or ``[A, n]`` non-negative bids (at most :func:`jaxauction.payments.max_bid`); None with auctions.
      options: a :class:`GenerateOptions`, or give its fields as keywords (below).
      key: one PRNG key (split per auction) or ``[A]`` keys (auction ``a`` uses ``key[a]``, so a
        batch gives what each auction gives alone with its key). Default ``jax.random.key(0)``.
      model: ``(model, tokenizer)`` from :func:`jaxauction.models.load`; ``None`` uses the bundled
        SmolLM2-135M-Instruct, loaded once per process.
      mesh: optional ``jax.sharding.Mesh`` from :func:`jaxauction.sharding.make_mesh` (axes
        ``"auctions"`` and ``"model"``) or :func:`~jaxauction.sharding.auction_mesh` (``"auctions"``
        only): the auctions are split over the ``"auctions"`` axis (the batch is padded to a multiple
        of its size and the padding sliced off) and the model over the ``"model"`` axis as its
        ``partition_specs`` declare; the result equals the unsharded one. Other axes are refused.
      progress: show one progress bar over the generated tokens of the whole batch (all chunks).

    Keywords: the fields of :class:`GenerateOptions` (``rule``, ``payment``, ``decoding``,
    ``temperature``, ``max_new_tokens``); ``base_prompt`` and ``base_bid`` (prompt-list form: a
    platform prompt that takes part with the fixed bid ``base_bid >= 0`` and is never charged);
    ``memory_budget``: bytes (or a string like ``"4GB"``) of working memory per device and chunk, model
    weights excluded (default :func:`jaxauction.engine.plan.default_memory_budget`: a share of each
    accelerator's free memory, or of host RAM on CPU); a larger batch runs in equal chunks with the
    same results and the same compiled programs.

    Returns:
      A :class:`GenerationResult`. An auction whose ``q`` or payment becomes non-finite stops at that
      step and is flagged ``valid = False`` with NaN payments; it is never reported as a normal ad.

    Raises:
      ValueError naming the argument, the expected type or shape and what was given.
    """
    llm, tokenizer = request.validate_model(model)
    budget = keywords.pop("memory_budget", None)
    options, form = _split_options(options, keywords)
    mesh = request.validate_mesh(mesh, llm)
    budget = None if budget is None else plan.parse_memory_budget(budget)
    if not isinstance(progress, (bool, np.bool_)):
        raise ValueError(f"progress: expected True or False; got {describe(progress)}.")
    req = request.encode_request(
        prompts, bids, **form, key=key, tokenizer=tokenizer, options=options, vocab=llm.config.vocab_size
    )
    model_parts = loop.shard_weights(nnx.split(llm), mesh)  # before the budget: the weights are in use
    if budget is None:
        budget = plan.default_memory_budget(None if mesh is None else mesh.devices.flat)
    the_plan = plan.make_plan(req, llm, options, budget, sharding.auction_devices(mesh), sharding.model_devices(mesh))
    spec = _decode_spec(options, req.n_max, the_plan.token_slots, llm, tokenizer)
    runtime.enable_compilation_cache()
    keys = sharding.pad_batch(req.keys, the_plan.chunk_size * the_plan.num_chunks)
    outputs = []
    with runtime.TokenProgress(options.max_new_tokens, the_plan.num_chunks, bool(progress)) as bar:
        for c, layout in enumerate(the_plan.layouts):
            chunk_keys = keys[c * the_plan.chunk_size : (c + 1) * the_plan.chunk_size]
            outputs.append(
                chunk.run_chunk(
                    model_parts,
                    layout,
                    chunk_keys,
                    the_plan,
                    spec,
                    mesh=mesh,
                    temperature=options.temperature,
                    progress=bar,
                )
            )
    return GenerationResult.of(req, outputs, tokenizer)
