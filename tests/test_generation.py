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
from tiny_llm import EOS, MIXED, PAD, PROMPTS, TinyTokenizer, tiny_llama

from jaxauction import aggregation, payments, prompts
from jaxauction.engine import Auction, generate
from jaxauction.models import jit_forward

VOCAB = 16


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(VOCAB, seed=0), TinyTokenizer(VOCAB)


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


def test_sweep_points_that_share_and_fork_histories_match_the_reference(tiny):
    """A greedy bid sweep: auctions with the same tokens share model rows until they diverge (a fork
    copies the row's cache). Every auction equals the uncached reference loop."""
    model, _ = tiny
    prompts = PROMPTS[:2]
    shares = np.linspace(0.0, 1.0, 9)
    bids = np.stack([shares, 1.0 - shares], axis=1)
    result = generate(prompts, bids, rule="linear", decoding="greedy", max_new_tokens=10, model=tiny)
    histories = [tuple(result.tokens[a, : result.lengths[a]]) for a in range(len(bids))]
    assert len(set(histories)) < len(bids), "precondition: some auctions repeat another's tokens"
    forked = any(h[0] == g[0] and h != g for h in histories for g in histories)
    assert forked, "precondition: two auctions share a first token, then diverge"
    for a in range(len(bids)):
        tokens, charged = reference_auction(model, prompts, bids[a], max_new_tokens=10)
        assert histories[a] == tuple(tokens)
        np.testing.assert_allclose(result.token_payments[a, : len(tokens)], charged, rtol=2e-3, atol=1e-6)


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


# ---------------------------------------------------------------------------------------------- mixed batches


def test_mixed_batch_each_auction_equals_alone_and_the_reference(tiny):
    model, _ = tiny
    batch = generate(MIXED, decoding="greedy", max_new_tokens=8, model=tiny)
    assert batch.tokens.shape == (5, 8) and batch.payments.shape == (5, 3) and batch.token_payments.shape == (5, 8, 3)
    np.testing.assert_array_equal(batch.num_agents, [3, 2, 1, 2, 2])
    np.testing.assert_array_equal(batch.bids[1], [0.3, 1.2, 0.0])
    assert batch.valid.all()
    for a, auction in enumerate(MIXED):
        n = len(auction.prompts)
        alone = generate(auction, decoding="greedy", max_new_tokens=8, model=tiny)
        assert alone.payments.shape == (n,) and alone.num_agents == n and alone.valid
        np.testing.assert_array_equal(alone.tokens, batch.tokens[a])
        assert alone.lengths == batch.lengths[a] and alone.text == batch.texts[a]
        np.testing.assert_allclose(alone.token_payments, batch.token_payments[a, :, :n], rtol=1e-5, atol=1e-7)
        assert np.all(batch.token_payments[a, :, n:] == 0)  # padded agents are never charged
        tokens, charged = reference_auction(
            model, auction.prompts, auction.bids, max_new_tokens=8, base=auction.base_prompt, base_bid=auction.base_bid
        )
        length = int(batch.lengths[a])
        np.testing.assert_array_equal(batch.tokens[a, :length], tokens)
        np.testing.assert_allclose(batch.token_payments[a, :length, :n], charged, rtol=2e-3, atol=1e-6)


SHARED = [2, 3, 4, 5, 6, 7, 8, 9] * 3  # a 24-token prefix common to every prompt below (a system prompt)
SHARED_MIXED = [
    Auction([SHARED + [10, 11], SHARED + [12], SHARED + [13, 14, 15]], [1.0, 0.4, 2.0]),
    Auction([SHARED + [15, 2, 3, 4], SHARED + [5]], [0.3, 1.2], base_prompt=SHARED + [6, 7], base_bid=0.5),
]


def test_shared_prefix_length_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(200):
        head = list(rng.integers(2, 4, rng.integers(0, 40)))
        seqs = [head + list(rng.integers(2, 4, rng.integers(0, 6))) for _ in range(rng.integers(1, 5))]
        distinct = {tuple(q) for q in seqs}
        common = 0  # brute force: the longest c with one prefix and at least one own token per sequence
        for c in range(min(map(len, distinct))):
            if len({q[:c] for q in distinct}) == 1:
                common = c
        expected = common // 8 * 8 if len(distinct) > 1 else 0
        assert prompts.shared_prefix_length(seqs) == (expected if expected >= prompts.SHARED_PREFIX_MIN else 0)
    ids, mask = prompts.left_pad([[5, 6], [7]], 0, width=4)
    np.testing.assert_array_equal(ids, [[0, 0, 5, 6], [0, 0, 0, 7]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 0, 0, 1]])
    with pytest.raises(ValueError, match="width: 1 is shorter than the longest sequence"):
        prompts.left_pad([[5, 6]], 0, width=1)


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_shared_prompt_prefix_is_prefilled_once_with_the_same_result(tiny, monkeypatch, x64):
    model, _ = tiny
    found = []
    measure = prompts.shared_prefix_length
    monkeypatch.setattr(prompts, "shared_prefix_length", lambda seqs: found.append(measure(seqs)) or found[-1])
    with jax.enable_x64(x64):
        shared = generate(SHARED_MIXED, decoding="greedy", max_new_tokens=6, model=tiny)
        chunked = generate(SHARED_MIXED, decoding="greedy", max_new_tokens=6, model=tiny, memory_budget=1)
        monkeypatch.setattr(prompts, "SHARED_PREFIX_MIN", 10**9)  # every prompt prefilled whole
        whole = generate(SHARED_MIXED, decoding="greedy", max_new_tokens=6, model=tiny)
    assert found == [24, 24, 0]  # the whole 24-token prefix is shared (a multiple of 8), then not at all
    for other in (chunked, whole):
        np.testing.assert_array_equal(shared.tokens, other.tokens)
        np.testing.assert_allclose(shared.token_payments, other.token_payments, rtol=1e-5, atol=1e-7)
    for a, auction in enumerate(SHARED_MIXED):
        n = len(auction.prompts)
        tokens, charged = reference_auction(
            model, auction.prompts, auction.bids, max_new_tokens=6, base=auction.base_prompt, base_bid=auction.base_bid
        )
        length = int(shared.lengths[a])
        np.testing.assert_array_equal(shared.tokens[a, :length], tokens)
        np.testing.assert_allclose(shared.token_payments[a, :length, :n], charged, rtol=2e-3, atol=1e-6)


def test_mixed_batch_sampled_with_per_auction_keys(tiny):
    keys = jax.random.split(jax.random.key(11), len(MIXED))
    batch = generate(MIXED, key=keys, max_new_tokens=6, model=tiny, payment="kl", rule="log_linear")
    for a in (0, 2, 4):
        alone = generate(MIXED[a], key=keys[a][None], max_new_tokens=6, model=tiny, payment="kl", rule="log_linear")
        np.testing.assert_array_equal(alone.tokens, batch.tokens[a])
        n = len(MIXED[a].prompts)
        np.testing.assert_allclose(alone.payments, batch.payments[a, :n], rtol=1e-4, atol=1e-6)


def test_prompt_form_equals_auction_form(tiny):
    bids = np.array([[1.0, 0.5, 2.0], [0.2, 3.0, 0.1]])
    swept = generate(PROMPTS, bids, decoding="greedy", max_new_tokens=6, model=tiny, base_prompt=[2, 3], base_bid=0.4)
    auctions = [Auction(PROMPTS, row, base_prompt=[2, 3], base_bid=0.4) for row in bids]
    listed = generate(auctions, decoding="greedy", max_new_tokens=6, model=tiny)
    np.testing.assert_array_equal(swept.tokens, listed.tokens)
    np.testing.assert_allclose(swept.token_payments, listed.token_payments, rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(swept.num_agents, [3, 3])


# ---------------------------------------------------------------------------------------------- broken auctions


def nan_for_marked_auctions(logits, bids):
    """The linear rule, except NaN for every auction whose first bid is exactly 7 (a broken rule)."""
    log_q = aggregation.linear(logits, bids)
    return jnp.where((bids[..., :1] == 7.0), jnp.nan, log_q)


def test_a_nan_distribution_is_flagged_not_reported_as_token_zero(tiny):
    bids = np.array([[1.0, 0.5, 2.0], [7.0, 1.0, 1.0], [0.2, 3.0, 0.0]])
    result = generate(PROMPTS, bids, rule=nan_for_marked_auctions, decoding="greedy", max_new_tokens=6, model=tiny)
    np.testing.assert_array_equal(result.valid, [True, False, True])
    assert np.all(np.isnan(result.payments[1])) and result.lengths[1] == 0 and result.texts[1] == ""
    assert np.all(result.tokens[1] == PAD)
    healthy = generate(PROMPTS, bids[[0, 2]], decoding="greedy", max_new_tokens=6, model=tiny)
    np.testing.assert_array_equal(result.tokens[[0, 2]], healthy.tokens)
    np.testing.assert_allclose(result.payments[[0, 2]], healthy.payments, rtol=2e-3, atol=1e-6)


def test_nan_weights_flag_every_auction(tiny):
    model, tokenizer = tiny
    graphdef, state = nnx.split(model)
    broken = nnx.merge(graphdef, jax.tree.map(lambda x: x * jnp.nan if x.ndim == 2 else x, state))
    result = generate(PROMPTS, [[1.0, 1.0, 1.0], [2.0, 0.0, 1.0]], max_new_tokens=4, model=(broken, tokenizer))
    assert not result.valid.any() and np.all(np.isnan(result.payments))
    assert np.all(result.lengths == 0)


# ---------------------------------------------------------------------------------------------- memory budget


# ---------------------------------------------------------------------------------------------- bad input


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
