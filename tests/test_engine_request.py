"""engine/request.py: every argument check of `jaxauction.generate` (errors name the argument), and the
two call forms normalised to one checked request of token ids."""

import jax
import numpy as np
import pytest
from tiny_llm import MIXED, PROMPTS, TinyTokenizer, tiny_llama

from jaxauction.engine import Auction, generate
from jaxauction.engine.request import EncodedAuction, GenerateOptions, encode_request

VOCAB = 16


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(VOCAB, seed=0), TinyTokenizer(VOCAB)


def encode(prompts, bids=None, *, key=None, options=None, **kwargs):
    options = GenerateOptions.create() if options is None else options
    return encode_request(
        prompts, bids, key=key, tokenizer=TinyTokenizer(VOCAB), options=options, vocab=VOCAB, **kwargs
    )


def test_both_call_forms_give_the_same_request():
    """A prompt list with ``[A, n]`` bids is ``A`` auctions of the same prompts; with ``[n]`` bids one
    auction whose result drops the ``A`` axis. Strings go through the chat template, token ids stay."""
    bids = np.array([[1.0, 0.5, 2.0], [0.2, 3.0, 0.1]])
    swept = encode(PROMPTS, bids, base_prompt="hi", base_bid=0.4)
    listed = encode([Auction(PROMPTS, row, base_prompt="hi", base_bid=0.4) for row in bids])
    assert not swept.single and not listed.single and swept.keys.shape == (2,)
    for a, b in zip(swept.auctions, listed.auctions, strict=True):
        assert a.agents == b.agents == tuple(map(tuple, PROMPTS))
        assert a.base == b.base == tuple(TinyTokenizer(VOCAB).apply_chat_template([{"role": "user", "content": "hi"}]))
        np.testing.assert_array_equal(a.bids, b.bids)
        assert a.base_bid == b.base_bid == 0.4
    one = encode(PROMPTS, bids[0])
    assert one.single and len(one.auctions) == 1 and one.auctions[0].base is None
    assert encode(MIXED[0]).single


def test_request_counts_agents_and_slots():
    request = encode(MIXED)
    np.testing.assert_array_equal(request.num_agents, [3, 2, 1, 2, 2])
    assert request.n_max == 3 and request.has_base and request.slots == 4
    assert encode(PROMPTS, [1.0, 1.0, 1.0]).slots == 3
    encoded = EncodedAuction(((3,), (4, 5)), np.ones(2), (6,), 0.5)
    assert encoded.sequences == [(3,), (4, 5), (6,)]


def test_keys_default_split_and_per_auction():
    """No key: ``key(0)``; one key: ``split(key, A)``, auction ``a`` gets the ``a``-th; ``[A]`` keys: one per
    auction, as given."""
    default, given = encode(PROMPTS, np.ones((3, 3))), encode(PROMPTS, np.ones((3, 3)), key=jax.random.key(0))
    np.testing.assert_array_equal(jax.random.key_data(default.keys), jax.random.key_data(given.keys))
    split = jax.random.split(jax.random.key(0), 3)
    np.testing.assert_array_equal(jax.random.key_data(given.keys), jax.random.key_data(split))
    keys = jax.random.split(jax.random.key(5), 3)
    each = encode(PROMPTS, np.ones((3, 3)), key=keys)
    np.testing.assert_array_equal(jax.random.key_data(each.keys), jax.random.key_data(keys))


@pytest.mark.parametrize(
    "prompts, bids, kwargs, match",
    [
        (MIXED, [1.0], {}, r"bids/base_prompt: with a list of jaxauction.Auction"),
        (MIXED, None, dict(base_prompt=[2]), r"bids/base_prompt: with a list of jaxauction.Auction"),
        (PROMPTS, None, {}, r"bids: expected \[n\] or \[A, n\] bids for the prompts; got None"),
        ("a prompt", [1.0], {}, r"prompts: expected a non-empty list with one prompt per agent"),
        (PROMPTS, [1.0, 1.0, 1.0], dict(base_bid=float("inf"), base_prompt=[2]), r"base_bid: expected a finite number"),
        (
            [[3], [4]],
            [1.0, 1.0],
            dict(options=GenerateOptions.create(decoding="stable"), base_prompt=[2]),
            r"decoding: decoding 'stable' .*got a base prompt",
        ),
    ],
)
def test_encode_request_errors(prompts, bids, kwargs, match):
    with pytest.raises(ValueError, match=match):
        encode(prompts, bids, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rule="quadratic"), "rule: unknown rule 'quadratic'"),
        (dict(payment="first_price"), "payment: expected one of"),
        (dict(decoding="beam"), "decoding: expected one of"),
        (dict(rule=lambda logits, bids: logits[..., 0, :], payment="kl"), "payment: 'kl' needs the rule's valuation"),
        (dict(max_new_tokens=np.int64(0)), "max_new_tokens: expected a positive integer"),
    ],
)
def test_generate_options_create_names_the_setting(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerateOptions.create(**kwargs)


def test_generate_options_are_hashable_and_equal_for_equal_settings():
    a, b = (
        GenerateOptions.create(rule="log_linear", payment="kl"),
        GenerateOptions.create(rule="log_linear", payment="kl"),
    )
    assert a == b and hash(a) == hash(b) and a.max_new_tokens == 48 and isinstance(a.max_new_tokens, int)


# ---------------------------------------------------------------------------------------------- through generate


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bids=[1.0, -1.0, 1.0]), "bids: .*negative bid"),
        (dict(bids=[1.0, np.nan, 1.0]), "bids: .*non-finite"),
        (
            dict(bids=[1.0, 1.0]),
            r"bids: expected .* shape \[3\] or \[batch, 3\], one bid per agent \(3\); got shape \(2,\)",
        ),
        (dict(bids=[[[1.0, 1.0, 1.0]]]), r"bids: expected .*\(1 or 2 axes\); got shape \(1, 1, 3\)"),
        (dict(rule="quadratic"), "rule: unknown rule 'quadratic'"),
        (dict(payment="first_price"), "payment: expected one of"),
        (dict(decoding="beam"), "decoding: expected one of"),
        (dict(max_new_tokens=0), "max_new_tokens: expected a positive integer"),
        (dict(temperature=0.0), r"temperature: expected a finite number in \[1e-30, 1e\+30\]"),
        (dict(base_bid=-1.0, base_prompt=[2]), "base_bid"),
        (dict(key=jax.random.split(jax.random.key(0), 5)), r"key: a batch of keys must have shape"),
        (dict(prompts=[[3, 4], [99], [5]]), r"prompts\[1\]: token ids \[99\] are outside the vocabulary"),
        (dict(prompts=[]), "prompts: expected a non-empty list"),
        (dict(prompts=[3.5, [2], [5]]), r"prompts\[0\]: each prompt must be"),
        (dict(max_new_tokens=200), "the model's context of 128"),
        (dict(model="llama"), r"model: expected the \(model, tokenizer\) pair"),
    ],
)
def test_bad_input_is_named(tiny, kwargs, match):
    arguments = dict(prompts=PROMPTS, bids=[1.0, 1.0, 1.0], model=tiny)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(arguments.pop("prompts"), arguments.pop("bids"), **arguments)


def wrong_shape_rule(logits, bids):
    return logits[..., 0, :3]  # [A, 3] instead of [A, V]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mesh="cpu"), r"mesh: expected None or a jax.sharding.Mesh.*got str 'cpu'"),
        (dict(mesh=5), r"mesh: expected None or a jax.sharding.Mesh.*got int 5"),
        (dict(mesh=jax.devices()), r"mesh: expected None or a jax.sharding.Mesh.*got list"),
        (dict(bids=["1", "2", "3"]), r"bids: expected numeric bids .*got dtype <U1"),
        (dict(bids=[[1.0, 1.0, 1.0], [1.0, 1.0]]), r"bids: expected .*got a ragged or non-numeric value"),
        (dict(bids=[1e33, 1.0, 1.0]), r"bids: .*above the largest accepted bid 3.4e\+30"),
        (dict(max_new_tokens=True), r"max_new_tokens: expected a positive integer; got bool True"),
        (dict(max_new_tokens=2.0), r"max_new_tokens: expected a positive integer; got float 2.0"),
        (dict(key="abc"), r"key: expected a PRNG key .*got str 'abc'"),
        (dict(temperature=None), r"temperature: expected a finite number in .*; got NoneType None"),
        (dict(temperature="1"), r"temperature: expected a finite number in .*; got str '1'"),
        (dict(temperature=1e-40), r"temperature: .*reciprocal finite in float32\); got 1e-40"),
        (dict(base_bid="x", base_prompt=[2]), r"base_bid: expected a number >= 0; got str 'x'"),
        (dict(base_bid=np.array([1.0, 2.0]), base_prompt=[2]), r"base_bid: expected a number >= 0; got ndarray"),
        (dict(rule=wrong_shape_rule), r"rule: expected rule\(logits \[A, m, V\], bids \[A, m\]\) to return .*\(2, 3\)"),
        (dict(prompts=[[{"text": "hi"}], [2], [3]]), r"prompts\[0\]\[0\]: a chat message must be a dict with string"),
        (dict(prompts=[[{"role": "user"}], [2], [3]]), r"prompts\[0\]\[0\]: a chat message must be a dict with string"),
        (dict(progress="yes"), r"progress: expected True or False"),
        (dict(memory_budget="lots"), r"memory_budget: expected a positive size"),
    ],
)
def test_generate_rejects_bad_arguments_by_name(tiny, kwargs, match):
    arguments = dict(prompts=PROMPTS, bids=[1.0, 1.0, 1.0], model=tiny, max_new_tokens=2)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(arguments.pop("prompts"), arguments.pop("bids"), **arguments)


def test_generate_rejects_a_swapped_or_wrong_model_pair(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"model: the first element must be the language model"):
        generate(PROMPTS, [1.0, 1.0, 1.0], model=(tokenizer, model))
    with pytest.raises(ValueError, match=r"model: the second element must be the tokenizer"):
        generate(PROMPTS, [1.0, 1.0, 1.0], model=(model, "tokenizer"))
    with pytest.raises(ValueError, match=r"model: expected the \(model, tokenizer\) pair"):
        generate(PROMPTS, [1.0, 1.0, 1.0], model=(model, tokenizer, 3))


def test_auction_list_errors_name_the_auction(tiny):
    with pytest.raises(ValueError, match=r"auctions\[1\]\.bids: expected .* one bid per agent \(2\); got shape \(1,\)"):
        generate([MIXED[0], Auction([[3], [4]], [1.0])], model=tiny)
    with pytest.raises(ValueError, match=r"auctions\[0\]\.base_bid: expected a number >= 0; got str"):
        generate([Auction([[3]], [1.0], base_prompt=[2], base_bid="x")], model=tiny)
    with pytest.raises(ValueError, match=r"auctions\[0\]\.prompts: expected a non-empty list"):
        generate([Auction([], [])], model=tiny)
    with pytest.raises(ValueError, match=r"bids/base_prompt: with a list of jaxauction.Auction"):
        generate(MIXED, [1.0], model=tiny)
    with pytest.raises(ValueError, match=r"decoding: decoding 'stable' .*got agent counts \[1, 2, 3\]"):
        generate(MIXED, decoding="stable", model=tiny)
