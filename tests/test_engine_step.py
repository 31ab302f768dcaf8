"""engine/step.py: the engine's per-token step is TokenAuction's (auction.token_outcome), then the draw."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import random_auction

from jaxauction import TokenAuction
from jaxauction.engine import auction_step
from jaxauction.mechanism import MechanismSpec

call = jax.jit(lambda auction, logits, bids: auction(logits, bids))


def _case(seed=0, n=3, vocab=6):
    logits, bids = random_auction(np.random.default_rng(seed), n, vocab)
    return jnp.asarray(logits, jnp.float32), jnp.asarray(bids, jnp.float32)


@pytest.mark.parametrize("payment", ["second_price", "kl", None])
def test_the_engine_step_is_the_token_auction(payment):
    """engine.auction_step runs TokenAuction's step: its payments and validity, then the draw from q."""
    jl, jb = _case(7, n=3, vocab=8)
    logits = jnp.stack([jl, jl.at[1, 4].set(jnp.nan), jl.at[2].set(-jnp.inf)])  # the last: an absent agent
    bids = jnp.stack([jb, jb, jb.at[2].set(0.0)])
    keys = jax.random.split(jax.random.key(0), 3)
    outcome = call(TokenAuction(payment=payment), logits, bids)
    for decoding in ("greedy", "sample"):
        mechanism = MechanismSpec.create(payment=payment, decoding=decoding)
        step = jax.jit(lambda l, b, k: auction_step(l, b, k, mechanism=mechanism, num_charged=3))
        token, charged, ok = step(logits, bids, keys)
        np.testing.assert_array_equal(ok, [True, False, True])
        np.testing.assert_array_equal(charged[ok], outcome.payments[ok])
        assert np.all(np.isnan(outcome.payments[1])) and np.all(np.isnan(outcome.log_q[1]))
        if decoding == "greedy":
            np.testing.assert_array_equal(token[ok], np.argmax(outcome.log_q[ok], axis=-1))
        else:
            drawn = jax.vmap(jax.random.categorical)(keys, outcome.log_q)
            np.testing.assert_array_equal(token[ok], drawn[ok])


def test_stable_decoding_charges_the_realized_threshold_payments():
    """decoding='stable' (two agents, the linear rule): the token comes from the stable sampler and the
    payments are its realized threshold payments, not TokenAuction's expected ones; both finite."""
    from jaxauction import sampling

    jl, jb = _case(3, n=2, vocab=8)
    logits, bids = jnp.stack([jl, jl]), jnp.stack([jb, 2 * jb])
    keys = jax.random.split(jax.random.key(1), 2)
    mechanism = MechanismSpec.create(decoding="stable")
    token, charged, ok = jax.jit(lambda l, b, k: auction_step(l, b, k, mechanism=mechanism, num_charged=2))(
        logits, bids, keys
    )
    expected_token, expected_charged = jax.vmap(sampling.stable_sample_two)(keys, logits, bids)
    np.testing.assert_array_equal(token, expected_token)
    np.testing.assert_array_equal(charged, expected_charged)
    assert np.all(ok) and np.all(np.isfinite(charged)) and np.all(charged >= 0)
