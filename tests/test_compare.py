"""The single-winner baseline and the per-ad metrics of docs/maths.md §9, on a tiny random Llama.

References: a plain greedy loop over unpadded full forward passes (no cache, no batching) for the
winner's ad, and unpadded per-ad forward passes for every log-probability behind the metrics.
"""

import jax
import numpy as np
import pytest
from test_reply import BASE, PROMPTS, VOCAB, tiny_model
from tiny_llm import EOS, TinyTokenizer

import jaxauction
from jaxauction import compare
from jaxauction.models import jit_forward

PROMPTS3 = PROMPTS + [[4, 2, 2, 3]]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(), TinyTokenizer(VOCAB)


def greedy_reference(model, prompt, max_new_tokens):
    seq, out = list(prompt), []
    for _ in range(max_new_tokens):
        token = int(np.argmax(np.asarray(jit_forward(model, np.asarray([seq]))[0, -1])))
        out.append(token)
        if token == EOS:
            break
        seq.append(token)
    return out


def sequence_log_probs(model, prompt, y):
    """Per-token log p(y_t | prompt, y_<t), one unpadded forward pass."""
    log_p = np.asarray(jax.nn.log_softmax(jit_forward(model, np.asarray([list(prompt) + list(y)]))[0], axis=-1))
    return np.array([log_p[len(prompt) - 1 + t, tok] for t, tok in enumerate(y)], np.float64)


def test_single_winner_ad_and_second_price_per_token(tiny):
    model, _ = tiny
    bids = np.array([[1.0, 3.0, 2.0], [2.0, 2.0, 1.0], [0.5, 0.0, 4.0]])
    result = compare.single_winner(PROMPTS3, bids, decoding="greedy", max_new_tokens=5, model=tiny)
    np.testing.assert_array_equal(result.winners, [1, 0, 2])  # the tie goes to the lower index
    second = np.array([2.0, 2.0, 0.5])
    for a, winner in enumerate(result.winners):
        ad = greedy_reference(model, PROMPTS3[winner], 5)
        assert result.lengths[a] == len(ad)
        np.testing.assert_array_equal(result.tokens[a, : len(ad)], ad)
        want = np.zeros(3)
        want[winner] = second[a] * len(ad)
        np.testing.assert_allclose(result.payments[a], want)
    alone = compare.single_winner(PROMPTS3[:1], [2.5], decoding="greedy", max_new_tokens=5, model=tiny)
    assert alone.winners == 0 and alone.payments.tolist() == [0.0]  # n = 1: no second bid


def test_single_winner_samples_profile_a_with_the_a_th_split_key(tiny):
    """Each profile's ad is the winner's prompt alone sampled with ``split(key, A)[a]``: what a batch of
    one-agent auctions (bid 1, linear rule, no payment) draws with those keys (experiments/benchmark.py
    runs the single winner of many queries in one such batch)."""
    from jaxauction import Auction, generate

    bids = np.array([[1.0, 3.0, 2.0], [2.0, 2.0, 1.0], [0.5, 0.0, 4.0]])
    key = jax.random.key(7)
    result = compare.single_winner(PROMPTS3, bids, key=key, max_new_tokens=5, model=tiny)
    auctions = [Auction([PROMPTS3[w]], [1.0]) for w in result.winners]
    batch = generate(auctions, rule="linear", payment=None, key=jax.random.split(key, 3), max_new_tokens=5, model=tiny)
    np.testing.assert_array_equal(result.tokens, batch.tokens)
    np.testing.assert_array_equal(result.lengths, batch.lengths)


def test_single_winner_bad_input_is_named(tiny):
    with pytest.raises(ValueError, match="bids"):
        compare.single_winner(PROMPTS, [1.0, -1.0], model=tiny)
    with pytest.raises(ValueError, match="decoding: the single-winner baseline writes with one LLM"):
        compare.single_winner(PROMPTS, [1.0, 1.0], decoding="stable", model=tiny)
    # An unknown decoding gets the mechanism spec's message, the same as generate's.
    with pytest.raises(ValueError) as spec_error:
        jaxauction.GenerateOptions.create(decoding="beam")
    with pytest.raises(ValueError) as compare_error:
        compare.single_winner(PROMPTS, [1.0, 1.0], decoding="beam", model=tiny)
    assert str(compare_error.value) == str(spec_error.value)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ad_metrics_match_unpadded_scoring(tiny, dtype):
    model, _ = tiny
    ads = [[2, 3, EOS], [4, 4, 2, 3, 2], [3]]
    bids = np.array([[1.0, 2.0], [0.5, 0.5], [3.0, 0.0]])
    pay = np.array([[0.1, 0.2], [0.0, 0.3], [1.0, 0.0]])
    with jax.enable_x64(dtype == "float64"):
        metrics = compare.ad_metrics(tiny, PROMPTS, BASE, bids, ads, pay, ["t2", "Beta"])
    for a, y in enumerate(ads):
        base = sequence_log_probs(model, BASE, y)
        values = np.array([sequence_log_probs(model, p, y).sum() - base.sum() for p in PROMPTS])
        np.testing.assert_allclose(metrics.values[a], values, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(metrics.welfare[a], bids[a] @ values, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(metrics.user_log_prob[a], base.mean(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(metrics.revenue, pay.sum(axis=1))
    # TinyTokenizer decodes token 2 as "t2": ads 0 and 1 mention "t2", none mentions "Beta".
    np.testing.assert_array_equal(metrics.mentioned, [[True, False], [True, False], [False, False]])
    records = metrics.records()
    assert len(records) == 3 and records[1]["length"] == 5 and records[0]["mentioned"] == [True, False]


def test_ad_metrics_bad_input_is_named(tiny):
    with pytest.raises(ValueError, match="bids, payments"):
        compare.ad_metrics(tiny, PROMPTS, BASE, [[1.0, 1.0]], [[2], [3]], [[0.0, 0.0]], ["a", "b"])
    with pytest.raises(ValueError, match="names"):
        compare.ad_metrics(tiny, PROMPTS, BASE, [1.0, 1.0], [[2]], [0.0, 0.0], ["a"])


def test_mentions_whole_words_case_insensitive():
    texts = ["Fly ALPHA   airlines today", "AlphaAirlines rocks", "alpha air", "Stay at Beta-Resort? beta resort!"]
    got = compare.mentions(texts, ["Alpha Airlines", "Beta Resort"])
    np.testing.assert_array_equal(got, [[True, False], [False, False], [False, False], [False, True]])
