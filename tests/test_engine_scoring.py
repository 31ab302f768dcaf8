"""The teacher-forced scorer against unpadded full forward passes of a tiny random Llama, one sequence at a time."""

import jax
import numpy as np
import pytest
from test_reply import BASE, PROMPTS, VOCAB, tiny_model
from tiny_llm import EOS, TinyTokenizer

from jaxauction import reply
from jaxauction.engine import scoring
from jaxauction.models import jit_forward


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(), TinyTokenizer(VOCAB)


def test_token_log_probs_match_unpadded_forward(tiny):
    model, _ = tiny
    rows = [[2, 3, EOS], [3, 3, 2, 4]]
    got = scoring.token_log_probs(tiny, PROMPTS + [BASE], rows)
    assert got.shape == (3, 2, 4) and got.dtype == np.float32
    for j, prompt in enumerate(PROMPTS + [BASE]):
        for k, y in enumerate(rows):
            log_p = jax.nn.log_softmax(jit_forward(model, np.asarray([prompt + y]))[0], axis=-1)
            want = [float(log_p[len(prompt) - 1 + t, tok]) for t, tok in enumerate(y)]
            np.testing.assert_allclose(got[j, k, : len(y)], want, rtol=1e-5, atol=1e-5)
            assert (got[j, k, len(y) :] == 0).all()
    # an array with lengths gives the same numbers; reply re-exports the scorer
    tokens = np.array([[2, 3, EOS, 0], [3, 3, 2, 4]])
    np.testing.assert_array_equal(reply.token_log_probs(tiny, PROMPTS + [BASE], tokens, [3, 4]), got)


def test_next_token_log_probs_match_unpadded_forward(tiny):
    model, _ = tiny
    sequences = [PROMPTS[0] + [2, 3], BASE + [4, 4], PROMPTS[1]]
    got = scoring.next_token_log_probs(tiny, sequences, 3)
    assert got.shape == (3, 3, VOCAB) and got.dtype == np.float32
    for b, seq in enumerate(sequences):
        log_p = np.asarray(jax.nn.log_softmax(jit_forward(model, np.asarray([seq]))[0], axis=-1))
        np.testing.assert_allclose(got[b], log_p[-3:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m: scoring.token_log_probs(m, [BASE], [[]]), "at least one token"),
        (lambda m: scoring.token_log_probs(m, [BASE], [[VOCAB]]), r"token ids must lie in \[0, 5\)"),
        (lambda m: scoring.token_log_probs(m, [BASE], np.zeros(3, int)), r"expected shape \[K, T\]"),
        (lambda m: scoring.token_log_probs(m, [BASE * 50], [[2]]), "context of 128"),
        (lambda m: scoring.token_log_probs((m[0],), [BASE], [[2]]), r"model: expected the \(model, tokenizer\)"),
        (lambda m: scoring.next_token_log_probs(m, [[2, 3]], 3), "at least count = 3"),
        (lambda m: scoring.next_token_log_probs(m, [[2, 3]], 0), "count"),
    ],
)
def test_bad_input_is_named(tiny, call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny)
