"""Auction generation on a tiny random Llama: the compiled loop against a plain reference loop.

The reference re-runs the model's full forward pass (no KV cache) on every agent's whole sequence at
every step, in Python, and charges the closed-form linear payments: it shares neither the cache,
the batching, the masking nor the autodiff payment path with `jaxauction.generate`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxauction import aggregation, payments
from jaxauction.generation import generate
from jaxauction.models import Llama, LlamaConfig, jit_forward

VOCAB, EOS, PAD = 16, 1, 0


class TinyTokenizer:
    """The tokenizer protocol `generate` uses: chat template, decode, pad and EOS ids, length."""

    pad_token_id, eos_token_id = PAD, EOS

    def __len__(self):
        return VOCAB

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        text = "|".join(m["content"] for m in messages)
        return [2 + ord(c) % (VOCAB - 2) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"t{int(i)}" for i in ids if not (skip_special_tokens and i in (PAD, EOS)))


@pytest.fixture(scope="module")
def tiny():
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        eos_token_ids=(EOS,),
        pad_token_id=PAD,
    )
    return Llama(config, rngs=nnx.Rngs(0)), TinyTokenizer()


PROMPTS = [[3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14]]


def reference_auction(model, prompts, bids, *, max_new_tokens, base=None, base_bid=0.0):
    """Greedy linear auction, recomputing every agent's full sequence each step (no cache)."""
    sequences = [list(p) for p in prompts] + ([list(base)] if base is not None else [])
    all_bids = np.append(bids, base_bid) if base is not None else np.asarray(bids)
    tokens, charged = [], []
    for _ in range(max_new_tokens):
        logits = jnp.stack([jit_forward(model, jnp.asarray([s]))[0, -1] for s in sequences])
        log_q = aggregation.linear(logits, jnp.asarray(all_bids, jnp.float32))
        token = int(jnp.argmax(log_q))
        charged.append(np.asarray(payments.linear_closed_form(logits, jnp.asarray(all_bids)))[: len(prompts)])
        tokens.append(token)
        if token == EOS:
            break
        for s in sequences:
            s.append(token)
    return np.array(tokens), np.array(charged)


def test_greedy_auction_matches_uncached_reference_loop(tiny):
    model, _ = tiny
    bids = np.array([[1.0, 0.5, 2.0], [0.2, 3.0, 0.0]])
    result = generate(
        PROMPTS, bids, rule="linear", payment="second_price", decoding="greedy", max_new_tokens=8, model=tiny
    )
    for a in range(len(bids)):
        tokens, charged = reference_auction(model, PROMPTS, bids[a], max_new_tokens=8)
        length = int(result.lengths[a])
        assert length == len(tokens)
        np.testing.assert_array_equal(result.tokens[a, :length], tokens)
        np.testing.assert_allclose(result.token_payments[a, :length], charged, rtol=2e-3, atol=1e-6)
        assert np.all(result.tokens[a, length:] == PAD)
        assert np.all(result.token_payments[a, length:] == 0)
    np.testing.assert_allclose(result.payments, result.token_payments.sum(axis=1), rtol=1e-6)


def test_base_prompt_takes_part_and_is_never_charged(tiny):
    model, _ = tiny
    base = [2, 2, 3]
    bids = np.array([1.0, 0.0, 0.0])
    result = generate(PROMPTS, bids, decoding="greedy", max_new_tokens=6, model=tiny, base_prompt=base, base_bid=0.7)
    tokens, charged = reference_auction(model, PROMPTS, bids, max_new_tokens=6, base=base, base_bid=0.7)
    assert result.payments.shape == (3,)
    np.testing.assert_array_equal(result.tokens[: len(tokens)], tokens)
    np.testing.assert_allclose(result.token_payments[: len(tokens)], charged, rtol=2e-3, atol=1e-6)
    # The lone paying bidder faces the base bid, so it pays; zero bidders never pay.
    assert result.payments[0] > 0 and np.all(result.payments[1:] == 0)


def test_same_key_same_result_and_batch_equals_each_alone(tiny):
    bids = np.array(
        [
            [1.0, 1.0, 1.0],
            [5.0, 0.1, 0.1],
            [0.0, 0.0, 2.0],
            [0.3, 0.3, 0.9],
            [2.0, 0.0, 0.0],
            [0.1, 0.1, 0.1],
            [1.0, 4.0, 0.2],
            [0.5, 0.0, 0.5],
        ]
    )
    keys = jax.random.split(jax.random.key(42), len(bids))
    batch = generate(PROMPTS, bids, key=keys, max_new_tokens=16, model=tiny)
    again = generate(PROMPTS, bids, key=keys, max_new_tokens=16, model=tiny)
    np.testing.assert_array_equal(batch.tokens, again.tokens)
    np.testing.assert_array_equal(batch.token_payments, again.token_payments)
    assert any(length < 16 for length in batch.lengths), "precondition: some auction ends at EOS"
    for a in range(len(bids)):
        alone = generate(PROMPTS, bids[a], key=keys[a][None], max_new_tokens=16, model=tiny)
        assert alone.tokens.shape == (16,) and alone.payments.shape == (3,)
        np.testing.assert_array_equal(alone.tokens, batch.tokens[a])
        assert alone.lengths == batch.lengths[a] and alone.text == batch.texts[a]
        np.testing.assert_allclose(alone.token_payments, batch.token_payments[a], rtol=1e-4, atol=1e-6)
    other = generate(PROMPTS, bids, key=jax.random.key(7), max_new_tokens=16, model=tiny)
    assert not np.array_equal(other.tokens, batch.tokens)


def test_sampled_tokens_follow_the_aggregate(tiny):
    """The first token of many auctions is distributed as q (chi-square against the exact q)."""
    model, _ = tiny
    bids = np.array([0.6, 0.3, 0.1])
    num = 3000
    result = generate(
        PROMPTS, np.tile(bids, (num, 1)), key=jax.random.key(3), max_new_tokens=1, model=tiny, payment=None
    )
    logits = jnp.stack([jit_forward(model, jnp.asarray([p]))[0, -1] for p in PROMPTS])
    q = np.exp(np.asarray(aggregation.linear(logits, jnp.asarray(bids))))
    counts = np.bincount(result.tokens[:, 0], minlength=VOCAB)
    expected = num * q
    chi2 = np.sum((counts - expected) ** 2 / expected)
    assert chi2 < 50.0, (chi2, counts, expected)  # 15 degrees of freedom: P(chi2 > 50) < 1e-5


def test_stable_decoding_pays_realized_thresholds(tiny):
    bids = np.tile([0.7, 0.3], (64, 1))
    result = generate(PROMPTS[:2], bids, decoding="stable", max_new_tokens=4, model=tiny, key=jax.random.key(5))
    assert result.token_payments.shape == (64, 4, 2)
    assert np.all(result.token_payments >= 0)
    # At most one agent pays for any token (the one whose bid the outcome's switch depends on).
    assert np.all((result.token_payments > 0).sum(axis=-1) <= 1)
    with pytest.raises(ValueError, match="two agents"):
        generate(PROMPTS, [1.0, 1.0, 1.0], decoding="stable", model=tiny)


def test_temperature_scales_agent_logits(tiny):
    """Temperature T equals feeding logits / T: checked by greedy equality at T and by the closed form."""
    model, _ = tiny
    bids = np.array([1.0, 2.0, 0.5])
    hot = generate(PROMPTS, bids, decoding="greedy", max_new_tokens=1, model=tiny, temperature=3.0)
    logits = jnp.stack([jit_forward(model, jnp.asarray([p]))[0, -1] for p in PROMPTS])
    expected = payments.linear_closed_form(logits / 3.0, jnp.asarray(bids))
    np.testing.assert_allclose(hot.token_payments[0], expected, rtol=2e-3, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bids=[1.0, -1.0, 1.0]), "bids: every bid must be finite and >= 0"),
        (dict(bids=[1.0, np.nan, 1.0]), "bids: every bid must be finite"),
        (dict(bids=[1.0, 1.0]), r"bids: expected shape \[n\].*n = 3.*got shape \(2,\)"),
        (dict(bids=[[[1.0, 1.0, 1.0]]]), r"bids: expected shape"),
        (dict(rule="quadratic"), "rule: unknown rule 'quadratic'"),
        (dict(payment="first_price"), "payment: expected one of"),
        (dict(decoding="beam"), "decoding: expected one of"),
        (dict(max_new_tokens=0), "max_new_tokens: expected a positive integer"),
        (dict(temperature=0.0), "temperature: expected a finite number > 0"),
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
