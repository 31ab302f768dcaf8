"""The reply-level auction with an LLM (docs/maths.md §8): the allocation against pi* enumerated on a tiny
vocabulary, the chosen reply against the allocation, and named errors. The array-level mechanism is tested in
test_reply_mechanism.py, the teacher-forced scorer in test_engine_scoring.py.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_llm import EOS, TinyTokenizer, tiny_llama

from jaxauction import reply
from jaxauction.models import jit_forward

# ------------------------------------------------------------------------------ LLM level on a tiny model

VOCAB = 5


def tiny_model(vocab=VOCAB, seed=5, sharpness=6.0):
    """A random tiny Llama whose next-token distributions are far from uniform (scaled LM head)."""
    return tiny_llama(vocab, seed=seed, sharpness=sharpness)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(), TinyTokenizer(VOCAB)


PROMPTS = [[2, 3, 4, 2], [4, 4, 3]]
BASE = [3, 2, 2]


def outcomes(max_new_tokens):
    """Every outcome of generation up to max_new_tokens: sequences ending in EOS, or cut at the limit."""
    found = []
    for length in range(1, max_new_tokens + 1):
        for body in itertools.product([t for t in range(VOCAB) if t != EOS], repeat=length - 1):
            found.append(list(body) + [EOS])
    found += [list(b) for b in itertools.product([t for t in range(VOCAB) if t != EOS], repeat=max_new_tokens)]
    return found


def enumerated_log_probs(model, prompt, sequences):
    """log pi(y) of each outcome: unpadded full forward passes, one per group of outcomes of equal length."""
    out = np.zeros(len(sequences))
    for length in sorted({len(y) for y in sequences}):
        group = [i for i, y in enumerate(sequences) if len(y) == length]
        ids = np.asarray([list(prompt) + sequences[i] for i in group])
        log_p = np.asarray(jax.nn.log_softmax(jit_forward(model, ids), axis=-1), np.float64)
        steps = np.arange(length)
        rows = np.arange(len(group))[:, None]
        out[group] = log_p[rows, len(prompt) - 1 + steps, ids[:, len(prompt) + steps]].sum(axis=-1)
    return out


@pytest.mark.parametrize("proposal", ["base", "mixture"])
def test_allocation_converges_to_the_enumerated_target(tiny, proposal):
    """The importance-weighted law sum_k pi_k 1[y_k = y] approaches pi* ∝ pi_ref^(1-sum b/tau) prod pi_i^(b_i/tau)."""
    model, _ = tiny
    bids, tau, max_new = np.array([0.6, 0.9]), 1.0, 2
    seqs = outcomes(max_new)
    log_ref = enumerated_log_probs(model, BASE, seqs)
    log_agents = np.stack([enumerated_log_probs(model, p, seqs) for p in PROMPTS])
    np.testing.assert_allclose(np.exp(log_ref).sum(), 1.0, rtol=1e-4)  # the outcome space is complete
    log_target = (1 - bids.sum() / tau) * log_ref + (bids[:, None] / tau * log_agents).sum(axis=0)
    target = np.exp(log_target - np.logaddexp.reduce(log_target))
    assert 0.5 * np.abs(target - np.exp(log_ref)).sum() > 0.3  # the target is far from the proposal

    result = reply.auction(
        PROMPTS, bids, base_prompt=BASE, num_candidates=8000, proposal=proposal, tau=tau,
        key=jax.random.key(3), max_new_tokens=max_new, model=tiny,
    )  # fmt: skip
    index = {tuple(y): i for i, y in enumerate(seqs)}
    estimate = np.zeros(len(seqs))
    for k, (row, length) in enumerate(zip(result.candidate_tokens, result.candidate_lengths)):
        estimate[index[tuple(int(t) for t in row[:length])]] += result.probabilities[k]
    tv = 0.5 * np.abs(estimate - target).sum()
    assert tv < 0.05, tv
    # The rewards and weights are the docs/maths.md §8 quantities of the candidates (checked against enumeration).
    k = 0
    y = tuple(int(t) for t in result.candidate_tokens[k][: result.candidate_lengths[k]])
    np.testing.assert_allclose(result.log_ref[k], log_ref[index[y]], atol=1e-4)
    np.testing.assert_allclose(
        result.rewards[:, k], bids * (log_agents[:, index[y]] - log_ref[index[y]]), rtol=1e-4, atol=1e-4
    )
    assert (result.payments >= 0).all()
    # A payment is tau log sum_k of M terms of size |r| / tau, evaluated in float32: its rounding error
    # scales with eps max|r| sqrt(M), not with the payment. Measured on a 2-core AMD EPYC: 48.5 eps max|r|
    # (base proposal) and 12.9 (mixture) with M = 8000, i.e. 0.54 and 0.14 eps max|r| sqrt(M).
    atol = 2 * np.finfo(np.float32).eps * np.abs(result.rewards).max() * np.sqrt(result.rewards.shape[-1])
    np.testing.assert_allclose(
        result.payments, reply.payments(result.log_weights, result.rewards, tau), rtol=1e-5, atol=atol
    )


def test_chosen_reply_follows_the_allocation_and_profiles_share_candidates(tiny):
    profiles = np.array([[0.5, 1.0]] * 3000)
    result = reply.auction(
        PROMPTS, profiles, base_prompt=BASE, num_candidates=4, key=jax.random.key(1), max_new_tokens=3, model=tiny
    )
    assert result.probabilities.shape == (3000, 4) and result.payments.shape == (3000, 2)
    counts = np.bincount(result.chosen, minlength=4) / len(profiles)
    np.testing.assert_allclose(counts, result.probabilities[0], atol=0.03)
    k = int(result.chosen[0])
    assert result.texts[0] == result.candidates[k]
    np.testing.assert_allclose(result.log_weights, -np.log(4))  # base proposal: pi_gen = pi_ref, uniform w
    single = reply.auction(
        PROMPTS, [0.5, 1.0], base_prompt=BASE, num_candidates=4, key=jax.random.key(1), max_new_tokens=3, model=tiny
    )
    assert single.payments.shape == (2,) and isinstance(single.text, str)
    # The same payment evaluated alone and in a batch of 3000: float32 rounding at eps max|r| (measured
    # 0.77 eps max|r| on a 2-core AMD EPYC; see the test above).
    atol = 16 * np.finfo(np.float32).eps * np.abs(result.rewards).max()
    np.testing.assert_allclose(single.payments, result.payments[0], rtol=1e-6, atol=atol)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(proposal="agents"), "proposal"),
        (dict(num_candidates=0), "num_candidates"),
        (dict(tau=-1.0), "tau"),
        (dict(bids=[1.0]), "bids"),
        (dict(base_prompt=None), "base_prompt"),
    ],
)
def test_auction_bad_input_is_named(tiny, kwargs, match):
    args = dict(bids=[1.0, 1.0], base_prompt=BASE, max_new_tokens=2, model=tiny) | kwargs
    with pytest.raises(ValueError, match=match):
        reply.auction(PROMPTS, **args)


def test_dtype_follows_x64(tiny):
    with jax.enable_x64(True):
        z = reply.payments(jnp.zeros(3), jnp.ones((2, 3)))
    assert z.dtype == jnp.float64
