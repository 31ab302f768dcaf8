"""The one "lump the tail" routine against a brute-force reference: Python loops over the tokens, float64."""

import numpy as np
import pytest

from jaxauction import simulation, vocabulary
from jaxauction.design import data


def reference(logits, mass, top_k):
    """Kept ids [K, V'] and compressed logits [K, n, V' + 1], token by token."""
    logits = np.asarray(logits, np.float64)
    num_sets, num_agents, vocab = logits.shape
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    keeps = []
    for s in range(num_sets):
        keep = set()
        if mass is not None:
            for i in range(num_agents):
                total = 0.0
                for token in sorted(range(vocab), key=lambda t: -p[s, i, t]):
                    if total >= mass:
                        break
                    keep.add(token)
                    total += p[s, i, token]
        keeps.append(keep)
    width = min(max(max(len(k) for k in keeps), top_k or 0), vocab)
    kept, out = [], []
    for s, keep in enumerate(keeps):
        by_max = sorted(range(vocab), key=lambda t: -p[s, :, t].max())
        for token in by_max:
            if len(keep) >= width:
                break
            keep.add(token)
        ids = sorted(keep)
        rest = [t for t in range(vocab) if t not in keep]
        rows = []
        for i in range(num_agents):
            lumped = np.log(sum(np.exp(logits[s, i, t]) for t in rest)) if rest else -np.inf
            rows.append([logits[s, i, t] for t in ids] + [lumped])
        kept.append(ids)
        out.append(rows)
    return np.array(kept), np.array(out)


@pytest.mark.parametrize(
    "mass, top_k", [(0.9, None), (0.5, None), (1.0, None), (None, 1), (None, 7), (None, 40), (0.8, 12)]
)
def test_compress_vocabulary_matches_the_brute_force_reference(mass, top_k):
    rng = np.random.default_rng(int(100 * (mass or 0)) + (top_k or 0))
    logits = rng.normal(size=(3, 2, 30)) * 2.5 + 1.0  # not normalised: the scale is kept
    compressed, kept = vocabulary.compress_vocabulary(logits, mass, top_k=top_k)
    want_kept, want = reference(logits, mass, top_k)
    np.testing.assert_array_equal(kept, want_kept)
    assert compressed.dtype == np.float32
    np.testing.assert_allclose(compressed, want, rtol=1e-6, atol=1e-6)
    # every agent keeps its total mass exactly
    total = np.logaddexp.reduce(logits, axis=-1)
    np.testing.assert_allclose(np.logaddexp.reduce(compressed.astype(np.float64), axis=-1), total, rtol=1e-6)
    one, one_kept = vocabulary.compress_vocabulary(logits[1], mass, top_k=top_k)  # [n, V]: one set
    assert one.shape == (2, one_kept.shape[0] + 1)
    np.testing.assert_array_equal(one_kept, reference(logits[1:2], mass, top_k)[0][0])


def test_simulation_and_design_use_the_one_routine():
    assert simulation.compress_vocabulary is vocabulary.compress_vocabulary
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(3, 20)) * 2
    log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    np.testing.assert_allclose(data.coarsen(log_probs, 6), reference(log_probs[None], None, 6)[1][0], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mass=None), "give at least one"),
        (dict(mass=1.5), r"mass: expected a number in \(0, 1\]"),
        (dict(mass=None, top_k=0), "top_k: expected a positive int"),
        (dict(mass=None, top_k=2.0), "top_k: expected a positive int"),
    ],
)
def test_bad_selection_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vocabulary.compress_vocabulary(np.zeros((2, 4)), **kwargs)


def test_keeping_every_token_leaves_a_rest_of_minus_inf():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]))
    compressed, kept = vocabulary.compress_vocabulary(logits, mass=None, top_k=5)  # at most V = 3 are kept
    np.testing.assert_array_equal(kept, [0, 1, 2])
    np.testing.assert_allclose(compressed[:, :3], logits, rtol=1e-6)
    assert (compressed[:, 3] == -np.inf).all()
