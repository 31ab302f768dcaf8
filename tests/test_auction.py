"""TokenAuction: the mechanism object as a pytree under jit, vmap and grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import random_auction, ref_linear, ref_linear_closed_form, ref_log_linear, ref_payment

import jaxauction
from jaxauction import AuctionOutcome, TokenAuction, aggregation

call = jax.jit(lambda auction, logits, bids: auction(logits, bids))
QUADRATURE = jaxauction.payments.Quadrature()


def _case(seed=0, n=3, vocab=6):
    logits, bids = random_auction(np.random.default_rng(seed), n, vocab)
    return logits, bids, jnp.asarray(logits, jnp.float32), jnp.asarray(bids, jnp.float32)


def test_default_auction_is_linear_with_second_price_payments():
    logits, bids, jl, jb = _case()
    out = call(TokenAuction(), jl, jb)
    assert isinstance(out, AuctionOutcome) and out.log_q.shape == (6,) and out.payments.shape == (3,)
    np.testing.assert_allclose(np.exp(out.log_q), ref_linear(logits, bids), rtol=1e-5)
    np.testing.assert_allclose(out.payments, ref_linear_closed_form(logits, bids), rtol=2e-4)


def test_base_distribution_takes_part_and_is_never_charged():
    logits, bids, jl, jb = _case(1, n=4)
    for base_bid in (0.0, 0.9, 4.5):
        out = call(TokenAuction(base_logits=jl[3], base_bid=base_bid), jl[:3], jb[:3])
        as_agent = np.concatenate([bids[:3], [base_bid]])  # the base as a fourth agent ...
        np.testing.assert_allclose(np.exp(out.log_q), ref_linear(logits, as_agent), rtol=1e-5)
        assert out.payments.shape == (3,)  # ... that is never charged, but counts in everybody's B
        np.testing.assert_allclose(out.payments, ref_linear_closed_form(logits, as_agent)[:3], rtol=2e-4)


def test_auction_is_a_pytree_with_static_rule_and_payment():
    _, _, jl, _ = _case()
    auction = TokenAuction(rule=aggregation.log_linear, payment="kl", base_logits=jl[0], base_bid=0.5)
    leaves, treedef = jax.tree_util.tree_flatten(auction)
    assert len(leaves) == 2
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.rule is aggregation.log_linear and rebuilt.payment == "kl"
    out = call(auction, jl, jnp.ones(3))
    assert jax.tree_util.tree_structure(out).num_leaves == 2


def test_vmap_over_mechanisms_and_auctions():
    logits, bids, jl, jb = _case(2)
    base_bids = jnp.array([0.0, 0.5, 2.0])
    auctions = TokenAuction(base_logits=jl[0], base_bid=base_bids)
    axes = TokenAuction(base_logits=None, base_bid=0)
    batched = jax.jit(jax.vmap(lambda a, l, b: a(l, b), in_axes=(axes, None, None)))(auctions, jl[1:], jb[1:])
    assert batched.payments.shape == (3, 2)
    for k, base_bid in enumerate(np.asarray(base_bids)):
        single = call(TokenAuction(base_logits=jl[0], base_bid=base_bid), jl[1:], jb[1:])
        np.testing.assert_allclose(batched.log_q[k], single.log_q, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(batched.payments[k], single.payments, rtol=1e-4, atol=1e-7)


def test_payment_kinds():
    logits, bids, jl, jb = _case(3)
    none = call(TokenAuction(payment=None), jl, jb)
    np.testing.assert_array_equal(none.payments, 0.0)
    kl = call(TokenAuction(payment="kl"), jl, jb)
    expected = [ref_payment(ref_linear, logits, bids, i, "forward_kl") for i in range(3)]
    np.testing.assert_allclose(kl.payments, expected, rtol=1e-4)
    with pytest.raises(ValueError, match="payment"):
        TokenAuction(payment="first_price")(jl, jb)


def test_gradient_with_respect_to_the_base_bid_is_finite():
    _, _, jl, jb = _case(4)
    revenue = lambda base_bid: TokenAuction(base_logits=jl[0], base_bid=base_bid)(jl[1:], jb[1:]).payments.sum()
    grad = jax.jit(jax.grad(revenue))(jnp.float32(0.3))
    assert np.isfinite(grad) and grad != 0


def test_exports():
    assert jaxauction.TokenAuction is TokenAuction
    assert jaxauction.__version__ == "0.1.0"
    for module in ("aggregation", "payments", "preferences", "sampling"):
        assert hasattr(jaxauction, module)


@pytest.mark.filterwarnings(
    "ignore::jaxauction.mechanism.PaymentWarning"
)  # second_price under a rule that is not monotone
def test_rule_may_be_a_name_a_rule_or_a_user_function():
    logits, bids, jl, jb = _case(5)
    expected = TokenAuction(rule=jaxauction.log_linear, payment="kl")(jl, jb)
    user = lambda l, b: aggregation.log_linear(l, b)  # a plain function: KL needs the rule's valuation
    for rule in ("log_linear", aggregation.log_linear, jax.jit(jaxauction.log_linear)):
        out = TokenAuction(rule=rule, payment="kl")(jl, jb)
        np.testing.assert_allclose(out.payments, expected.payments, rtol=1e-6)
    with pytest.raises(ValueError, match=r"^TokenAuction: payment: 'kl' needs the rule's valuation"):
        TokenAuction(rule=user, payment="kl")(jl, jb)
    out = TokenAuction(rule=user)(jl, jb)
    np.testing.assert_allclose(np.exp(out.log_q), ref_log_linear(logits, bids), rtol=1e-5)
    expected = [ref_payment(ref_log_linear, logits, bids, i, "robust") for i in range(3)]
    np.testing.assert_allclose(out.payments, expected, rtol=1e-4)


def test_payment_kinds_have_one_home():
    assert jaxauction.mechanism.PAYMENTS == ("second_price", "kl", None)
    with pytest.raises(ValueError, match=r"^TokenAuction: payment: expected one of \['second_price', 'kl', None\]"):
        TokenAuction(payment="none")(*_case()[2:])


def test_invalid_auctions_under_jit_get_nan_as_the_engine_flags_them():
    """TokenAuction runs the engine's per-token step: where it is not ok, log_q and payments are NaN."""
    _, _, jl, jb = _case(6)
    logits = jnp.stack([jl, jl.at[0, 2].set(jnp.nan), jl, jnp.full_like(jl, -jnp.inf)])
    bids = jnp.stack([jb, jb, jb.at[1].set(jnp.inf), jb])
    out = call(TokenAuction(), logits, bids)
    assert np.all(np.isfinite(out.payments[0])) and np.all(out.log_q[0] <= 0)
    for a in (1, 2, 3):  # a NaN logit, an infinite bid, no token with positive probability
        assert np.all(np.isnan(out.log_q[a])) and np.all(np.isnan(out.payments[a])), a
    step = jax.jit(lambda l, b: jaxauction.auction.token_outcome(jaxauction.linear, "robust", QUADRATURE, l, b, 3))
    _, charged, ok = step(logits, bids)
    np.testing.assert_array_equal(ok, [True, False, False, False])
    np.testing.assert_allclose(charged[0], out.payments[0])
