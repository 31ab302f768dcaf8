"""Auction batches for design: Dirichlet draws (moments against the Dirichlet's), validation, files,
coarsening, and the LLM path with its cache (a tiny random Llama against a plain greedy loop, and the bundled LLM)."""

import jax
import numpy as np
import pytest
from tiny_llm import EOS, TinyTokenizer, tiny_llama

from jaxauction import prompts
from jaxauction.design import data
from jaxauction.models import jit_forward


def test_dirichlet_auctions_are_reproducible_and_have_dirichlet_moments():
    alpha, vocab = 0.5, 8
    batch = data.dirichlet_auctions(3, 500, 4, vocab, concentration=alpha, bid_sigma=0.5, with_base=True)
    again = data.dirichlet_auctions(3, 500, 4, vocab, concentration=alpha, bid_sigma=0.5, with_base=True)
    other = data.dirichlet_auctions(4, 500, 4, vocab, concentration=alpha, bid_sigma=0.5, with_base=True)
    np.testing.assert_array_equal(batch.logits, again.logits)
    np.testing.assert_array_equal(batch.bids, again.bids)
    assert not np.array_equal(batch.logits, other.logits)
    assert (
        batch.logits.shape == (500, 4, vocab)
        and batch.bids.shape == (500, 4)
        and batch.base_logits.shape == (500, vocab)
    )

    p = np.exp(np.asarray(batch.logits, np.float64)).reshape(-1, vocab)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    count = p.shape[0]
    mean, variance = 1 / vocab, (1 / vocab) * (1 - 1 / vocab) / (vocab * alpha + 1)
    assert np.all(np.abs(p.mean(0) - mean) < 5 * np.sqrt(variance / count))
    # The sample variance of each component: its standard error from the 4th central moment.
    fourth = np.mean((p - p.mean(0)) ** 4, axis=0)
    assert np.all(np.abs(p.var(0) - variance) < 5 * np.sqrt((fourth - variance**2) / count))

    log_bids = np.log(np.asarray(batch.bids, np.float64)).ravel()
    assert abs(log_bids.mean()) < 5 * 0.5 / np.sqrt(log_bids.size)
    assert abs(log_bids.std() - 0.5) < 5 * 0.5 / np.sqrt(2 * log_bids.size)


def test_make_batch_validates_with_named_arguments():
    logits, bids = np.zeros((2, 3, 4)), np.ones((2, 3))
    assert data.make_batch(logits, bids).num_agents == 3
    with pytest.raises(ValueError, match=r"logits must have shape \[A, n, V\]"):
        data.make_batch(np.zeros((3, 4)), bids)
    with pytest.raises(ValueError, match=r"bids must have shape \[A, n\] = \(2, 3\)"):
        data.make_batch(logits, np.ones((2, 2)))
    with pytest.raises(ValueError, match="bids"):
        data.make_batch(logits, -bids)
    with pytest.raises(ValueError, match="NaN"):
        data.make_batch(np.full((2, 3, 4), np.nan), bids)
    with pytest.raises(ValueError, match="all -inf"):
        data.make_batch(np.full((2, 3, 4), -np.inf), bids)
    with pytest.raises(ValueError, match="base_logits"):
        data.make_batch(logits, bids, np.zeros((2, 5)))
    with pytest.raises(ValueError, match="num_agents"):
        data.dirichlet_auctions(0, 3, 0, 4)


def test_save_and_load_round_trip(tmp_path):
    batch = data.dirichlet_auctions(0, 5, 2, 3, with_base=True)
    path = data.save_batch(tmp_path / "batch.npz", batch, {"note": "x"})
    loaded, metadata = data.load_batch(path)
    for name in ("logits", "bids", "base_logits"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(batch, name))
    assert metadata == {"note": "x"}
    assert [p.name for p in tmp_path.iterdir()] == ["batch.npz"]  # no temporary file left behind
    without_base = data.save_batch(tmp_path / "plain.npz", data.dirichlet_auctions(0, 5, 2, 3))
    assert data.load_batch(without_base)[0].base_logits is None


def test_coarsen_keeps_the_top_tokens_and_lumps_the_rest():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)) * 2
    log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    coarse = data.coarsen(log_probs, 5)
    top = np.sort(np.argsort(-log_probs.max(0))[:5])  # the kept tokens, in increasing id order
    np.testing.assert_allclose(coarse[:, :5], log_probs[:, top], rtol=1e-6)
    rest = np.ones(50, bool)
    rest[top] = False
    np.testing.assert_allclose(np.exp(coarse[:, 5]), np.exp(log_probs[:, rest]).sum(-1), rtol=1e-6)
    np.testing.assert_allclose(np.exp(coarse.astype(np.float64)).sum(-1), 1.0, rtol=1e-6)


VOCAB = 24


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(VOCAB, seed=3, sharpness=4.0), TinyTokenizer(VOCAB)


class Refuses:
    def __call__(self, *args):
        raise AssertionError("the cache should have been used")


def reference_distributions(model, prompts, base_prompt, groups, steps, top_k):
    """Per step and group: a plain greedy loop on unpadded full forward passes (no cache, no batching, no
    engine), the shared token the argmax of the agents' equal-weight mixture with EOS excluded; each
    auction's rows coarsened by a token loop (top_k by the largest probability over the rows, increasing id
    order, then the lumped rest)."""
    out = {}
    for g, group in enumerate(groups):
        continuation = []
        for step in range(steps):
            rows = [prompts[a] + continuation for a in group] + [base_prompt + continuation]
            log_p = np.stack(
                [np.asarray(jax.nn.log_softmax(jit_forward(model, np.asarray([r]))[0, -1]), np.float64) for r in rows]
            )
            keep = sorted(sorted(range(VOCAB), key=lambda t: -log_p[:, t].max())[:top_k])
            rest = [t for t in range(VOCAB) if t not in keep]
            out[step, g] = np.array([[row[t] for t in keep] + [np.logaddexp.reduce(row[rest])] for row in log_p])
            mixture = np.logaddexp.reduce(log_p[:-1], axis=0)
            mixture[EOS] = -np.inf
            continuation.append(int(np.argmax(mixture)))
    return out


def test_llm_auctions_against_a_greedy_reference_and_the_cache(tmp_path, tiny):
    settings = dict(advertisers=("ad one", "ad two", "ad three"), query="q", steps=3, top_k=6, num_bid_profiles=2)
    batch = data.llm_auctions(tmp_path / "cache.npz", model=tiny, model_id="tiny", **settings)
    # 3 groups x 3 steps auctions, each with 2 bid profiles; 2 agents; top 6 tokens + "other".
    assert batch.logits.shape == (18, 2, 7) and batch.bids.shape == (18, 2) and batch.base_logits.shape == (18, 7)
    np.testing.assert_allclose(np.exp(np.asarray(batch.logits, np.float64)).sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(batch.logits[0], batch.logits[1])  # same auction, two bid profiles
    assert not np.array_equal(batch.bids[0], batch.bids[1])

    tokenizer = tiny[1]
    prompts_ids = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": "You are a copywriter. q"}, {"role": "user", "content": text}]
        )
        for text in settings["advertisers"]
    ]
    base_ids = tokenizer.apply_chat_template([{"role": "user", "content": "q"}])
    groups = [[0, 1], [1, 2], [2, 0]]
    want = reference_distributions(tiny[0], prompts_ids, base_ids, groups, 3, 6)
    for step in range(3):
        for g in range(3):
            auction = 2 * (3 * step + g)  # auction s * G + g, repeated for the 2 bid profiles
            got = np.concatenate([batch.logits[auction], batch.base_logits[auction][None]])
            np.testing.assert_allclose(np.exp(got), np.exp(want[step, g]), atol=1e-5)
    assert not np.allclose(batch.logits[0], batch.logits[6], atol=1e-3)  # the next step's distributions differ

    cached = data.llm_auctions(tmp_path / "cache.npz", model=(Refuses(), tokenizer), model_id="tiny", **settings)
    np.testing.assert_array_equal(cached.logits, batch.logits)
    np.testing.assert_array_equal(cached.bids, batch.bids)
    rebuilt = data.llm_auctions(tmp_path / "cache.npz", model=tiny, model_id="tiny", **{**settings, "seed": 1})
    assert not np.array_equal(rebuilt.bids, batch.bids)
    with pytest.raises(ValueError, match="agents_per_auction"):
        data.llm_auctions(tmp_path / "x.npz", agents_per_auction=4, **settings)


def test_llm_auctions_with_one_step_decodes_nothing(tmp_path, tiny):
    batch = data.llm_auctions(
        tmp_path / "one.npz", model=tiny, model_id="tiny", advertisers=("a", "b"), query="q", steps=1, top_k=3,
        num_bid_profiles=1,
    )  # fmt: skip
    assert batch.logits.shape == (2, 2, 4) and batch.base_logits.shape == (2, 4)


@pytest.mark.slow
def test_llm_auctions_from_the_bundled_model(tmp_path, monkeypatch):
    """The default model is loaded lazily; the first step equals a direct forward pass on the prompts."""
    from jaxauction import models
    from jaxauction.models import loader

    model, tokenizer = loader.default()
    sources = []
    monkeypatch.setattr(loader, "default", lambda: sources.append(()) or (model, tokenizer))
    settings = dict(advertisers=data.DEFAULT_ADVERTISERS[:2], steps=2, top_k=8, num_bid_profiles=1)
    batch = data.llm_auctions(tmp_path / "kv.npz", **settings)
    assert sources == [()]  # llm_auctions asked for the bundled default
    assert batch.logits.shape == (4, 2, 9) and batch.base_logits.shape == (4, 9)
    probabilities = np.exp(np.asarray(batch.logits, np.float64))
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
    assert np.abs(probabilities[0, 0] - probabilities[0, 1]).max() > 0.05  # the two ads differ
    assert not np.allclose(probabilities[0], probabilities[1], atol=1e-3)  # the next step differs

    system = f"You are a copywriter. {data.DEFAULT_QUERY}"
    rows = [
        prompts.encode_prompt(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": text}])
        for text in settings["advertisers"]
    ]
    rows.append(prompts.encode_prompt(tokenizer, data.DEFAULT_QUERY))
    input_ids, attention_mask = prompts.left_pad(rows, tokenizer.pad_token_id, bucket=1)
    logits = np.asarray(models.CompiledLlama(model)(input_ids, attention_mask)[:, -1], np.float64)
    direct = data.coarsen(logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True), 8)
    np.testing.assert_allclose(probabilities[0], np.exp(direct[:2]), atol=1e-4)
    np.testing.assert_allclose(np.exp(np.asarray(batch.base_logits[0], np.float64)), np.exp(direct[2]), atol=1e-4)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "foreign", "bad metadata"])
def test_corrupt_batch_files_name_the_file(tmp_path, kind):
    path = data.save_batch(tmp_path / "batch.npz", data.dirichlet_auctions(0, 5, 2, 3))
    if kind == "garbage":
        path.write_bytes(b"not an npz")
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:150])
    elif kind == "foreign":
        np.savez(path, weights=np.zeros(2))
    else:
        np.savez(path, logits=np.zeros((1, 2, 3)), bids=np.ones((1, 2)), metadata=np.asarray("{oops"))
    with pytest.raises(ValueError, match="batch.npz"):
        data.load_batch(path)
    with pytest.raises(ValueError, match="batch.npz"):  # a corrupt cache is reported, not half-read
        data.llm_auctions(path, model=object())
    with pytest.raises(ValueError, match="missing.npz"):
        data.load_batch(tmp_path / "missing.npz")
