"""prompts.py: prompts to token ids (chat template), left padding, the shared prompt prefix, end tokens."""

import types

import numpy as np
import pytest
from tiny_llm import TinyTokenizer

from jaxauction import prompts

TOKENIZER = TinyTokenizer(16)


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


def test_left_pad_rounds_the_width_up_to_the_bucket():
    ids, mask = prompts.left_pad([[5, 6, 7], [8]], 0, bucket=2)
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
    ids, _ = prompts.left_pad([[5] * 33], 1)
    assert ids.shape == (1, 2 * prompts.PROMPT_BUCKET) and ids.dtype == np.int32
    assert prompts.left_pad([[5] * 3], 1, bucket=1)[0].shape == (1, 3)


def test_encode_prompt_forms():
    """A string is one user message through the chat template; messages go through it as given; token
    ids (a list, tuple or NumPy array) are used exactly."""
    user = TOKENIZER.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompts.encode_prompt(TOKENIZER, "hi") == user
    assert prompts.encode_prompt(TOKENIZER, [{"role": "user", "content": "hi"}]) == user
    assert prompts.encode_prompt(TOKENIZER, [3, 4]) == [3, 4]
    assert prompts.encode_prompt(TOKENIZER, np.array([3, 4])) == [3, 4]

    class DictTemplate(TinyTokenizer):  # transformers may return a BatchEncoding
        def apply_chat_template(self, messages, **kwargs):
            return {"input_ids": super().apply_chat_template(messages, **kwargs)}

    assert prompts.encode_prompt(DictTemplate(16), "hi") == user


@pytest.mark.parametrize(
    "prompt, match",
    [
        ([], r"^p\[2\]: each prompt must be a non-empty string"),
        ([3, 16], r"^p\[2\]: token ids \[16\] are outside the vocabulary \[0, 16\)"),
        ([3, -1], r"token ids \[-1\] are outside"),
        ([3.0, 4.0], r"each prompt must be"),
        ([{"role": "user"}], r"^p\[2\]\[0\]: a chat message must be a dict with string 'role' and 'content'"),
        (None, r"each prompt must be"),
    ],
)
def test_encode_prompt_errors_name_the_argument(prompt, match):
    with pytest.raises(ValueError, match=match):
        prompts.encode_prompt(TOKENIZER, prompt, argument="p[2]")


def test_pad_id_and_eos_ids():
    assert prompts.pad_id(types.SimpleNamespace(pad_token_id=0, eos_token_id=2)) == 0
    assert prompts.pad_id(types.SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    tokenizer = types.SimpleNamespace(eos_token_id=2)
    llm = types.SimpleNamespace(config=types.SimpleNamespace(eos_token_ids=(7, 2), eos_token_id=None))
    assert prompts.eos_ids(llm, tokenizer) == (2, 7)
    llm = types.SimpleNamespace(config=types.SimpleNamespace(eos_token_id=np.int64(5)))
    assert prompts.eos_ids(llm, types.SimpleNamespace(eos_token_id=None)) == (5,)
