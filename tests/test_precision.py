"""Accelerator precision: a bfloat16 model keeps its weights and cache in bfloat16 but computes its
attention scores and logits in float32, so the mechanism runs on float32 logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_llm import tiny_llama

from jaxauction.models import modeling


def _as_bfloat16(model):
    """The same model with its floating arrays cast to bfloat16 (a bfloat16 ``load`` gives such a model)."""
    graphdef, state = nnx.split(model)
    cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    half = nnx.merge(graphdef, cast)
    half.dtype = jnp.bfloat16
    return half


def test_bfloat16_model_gives_float32_logits_close_to_float32():
    model = tiny_llama(64, seed=3)
    half = _as_bfloat16(model)
    ids = jnp.asarray(np.random.default_rng(0).integers(2, 64, (3, 6)), jnp.int32)
    logits, cache = model.prefill(ids, None, model.init_cache(3, 10))
    half_logits, half_cache = half.prefill(ids, None, half.init_cache(3, 10))
    assert half_cache.k.dtype == half_cache.v.dtype == jnp.bfloat16
    assert half_logits.dtype == jnp.float32 and logits.dtype == jnp.float32
    step_logits, _ = half.decode(jnp.argmax(half_logits, -1), half_cache)
    assert step_logits.dtype == jnp.float32
    # bfloat16 weights round each weight by up to 2**-9 relative; over 2 layers and the head that moves
    # the logits by about 1% of their range here, far less than a wrong computation would.
    scale = float(jnp.abs(logits).max())
    assert float(jnp.abs(half_logits - logits).max()) < 0.03 * scale
    assert not np.array_equal(np.asarray(half_logits), np.asarray(logits))  # the weights did change


@pytest.mark.parametrize("cached", [False, True])
def test_attention_scores_are_not_rounded_to_bfloat16(cached):
    """Scores 100 and 100.25 (q . k = 200 and 200.5 before the 1/sqrt(hd) scale): rounded to
    bfloat16 (spacing 1 at 200) both become 100 and the two values get weight 1/2 each; in float32 the
    second gets ``sigmoid(0.25) = 0.562``."""
    bf16 = jnp.bfloat16
    q = jnp.asarray([1.0, 1.0, 0.0, 0.0], bf16).reshape(1, 1, 1, 1, 4)  # [B, T, K, G, hd]
    k0 = jnp.asarray([100.0, 100.0, 0.0, 0.0], bf16)
    k1 = jnp.asarray([100.0, 100.5, 0.0, 0.0], bf16)
    v0, v1 = jnp.zeros((4,), bf16), jnp.ones((4,), bf16)
    if cached:  # k0 in the cache, k1 the new token (the decoding path)
        old = (k0.reshape(1, 1, 4, 1), v0.reshape(1, 1, 1, 4), jnp.ones((1, 1, 1), bool))
        out = modeling.attend(q, k1.reshape(1, 1, 1, 4), v1.reshape(1, 1, 1, 4), jnp.ones((1, 1, 1), bool), old)
    else:  # two new tokens, the second query attends to both
        q2 = jnp.concatenate([q, q], axis=1)
        keys = jnp.stack([k0, k1]).reshape(1, 2, 1, 4)
        values = jnp.stack([v0, v1]).reshape(1, 2, 1, 4)
        out = modeling.attend(q2, keys, values, jnp.tril(jnp.ones((2, 2), bool))[None])[:, 1:]
    expected = 1 / (1 + np.exp(-0.25))
    np.testing.assert_allclose(np.asarray(out, np.float32).reshape(-1), expected, atol=4e-3)
