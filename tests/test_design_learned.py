"""The learned monotone family: it contains the power weights exactly, its closed-form payment against a float64
SciPy quadrature of the definition (bid ratios 1e-12..1e12) and against the generic autodiff path, monotone by
construction (strict certificate share 1.0 on held-out auctions, float32 and float64), its unit (the base bid),
and the whole design path (search, certificate, payments, TokenAuction)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import random_auction, ref_monotone_weight_log, ref_monotone_weight_payment

import jaxauction as ja
from jaxauction import design, payments

KNOTS = tuple(np.linspace(-4.0, 4.0, 9))
WIDE_RATIOS = 10.0 ** np.arange(-12, 13, 2)
STEPS = {  # a shape the search could find: steep in the middle, flat-ish at the ends; and a large one
    "bumps": np.array([0.0, 0.3, 1.5, 0.0, 2.0, 0.7, 0.0, 0.1, 0.0]),
    "steep": np.array([3.0, 0.0, 0.0, 4.0, 4.0, 0.0, 0.0, 0.0, 3.0]),
}


def _params(gamma, steps, dtype, base_bid=0.4):
    return design.MonotoneWeightParams.create(gamma=gamma, steps=steps, base_bid=base_bid, dtype=dtype)


def _with_base(logits, profiles, base, base_bid):
    all_logits = np.concatenate([logits, base[None]])
    return all_logits, np.concatenate([profiles, np.full((len(profiles), 1), base_bid)], axis=1)


def test_log_g_and_its_inverse_against_float64_numpy(dtype):
    params = _params(0.7, STEPS["steep"], dtype)
    x = np.linspace(-30, 30, 301)
    value, slope = ref_monotone_weight_log(x, 0.7, STEPS["steep"], KNOTS, 0.5)
    got = params.log_g(jnp.asarray(x, dtype))
    np.testing.assert_allclose(got, value, rtol={jnp.float32: 2e-6, jnp.float64: 1e-13}[dtype], atol=1e-5)
    assert np.all(slope >= 0.7) and np.all(np.diff(value) > 0)  # strictly increasing: G' >= gamma
    back = payments.monotone_weight_inverse(got, params.gamma, params.steps, KNOTS, 0.5)
    np.testing.assert_allclose(back, x, atol={jnp.float32: 2e-5, jnp.float64: 1e-12}[dtype])
    grad = jax.grad(lambda t: payments.monotone_weight_inverse(t, params.gamma, params.steps, KNOTS, 0.5))
    np.testing.assert_allclose(grad(jnp.asarray(value[150], dtype)), 1 / slope[150], rtol=1e-4)


def test_zero_steps_is_the_power_mean_at_rho_1_exactly(dtype):
    """Rule and closed-form payments of the member a = 0 equal the power mean's (rho = 1, temperature = 1)."""
    fit = design.dirichlet_auctions(3, 8, 3, 6, with_base=True, dtype=dtype)
    for gamma in (0.5, 1.0, 2.78):
        learned = design.MonotoneWeightParams.power(gamma=gamma, base_bid=0.3, dtype=dtype)
        power = design.PowerMeanParams.create(gamma=gamma, base_bid=0.3, dtype=dtype)
        np.testing.assert_allclose(design.aggregate(learned, fit), design.aggregate(power, fit), atol=1e-6, rtol=1e-5)
        z = [
            payments.second_price(design.fixed_rule(p), fit.logits, fit.bids, base_logits=fit.base_logits, base_bid=0.3)
            for p in (learned, power)
        ]
        np.testing.assert_allclose(z[0], z[1], rtol={jnp.float32: 1e-5, jnp.float64: 1e-13}[dtype], atol=1e-30)


@pytest.mark.parametrize("shape", sorted(STEPS))
@pytest.mark.parametrize("gamma", (0.5, 1.0, 2.78))
def test_closed_form_payment_matches_scipy_for_bid_ratios_1e_minus_12_to_1e12(gamma, shape, dtype):
    """Every agent's payment against references.ref_monotone_weight_payment (float64 adaptive quadrature)."""
    steps = STEPS[shape]
    rule = design.fixed_rule(_params(gamma, steps, dtype))
    assert isinstance(rule.closed_form_payment, payments.MonotoneWeightClosedForm) and rule.monotone
    rng = np.random.default_rng(1)
    logits, bids = random_auction(rng, 3, 7, mask_fraction=0.3)
    base, base_bid = rng.normal(size=7), 0.4
    others = bids[1:]
    profiles = np.concatenate(
        [WIDE_RATIOS[:, None] * (others.sum() + base_bid), np.broadcast_to(others, (len(WIDE_RATIOS), 2))], 1
    )
    got = np.asarray(
        payments.second_price(
            rule, jnp.asarray(logits, dtype), jnp.asarray(profiles, dtype), base_logits=jnp.asarray(base, dtype),
            base_bid=base_bid,
        )
    )  # fmt: skip
    all_logits, all_profiles = _with_base(logits, profiles, base, base_bid)
    gamma32 = float(rule.closed_form_payment.gamma)
    steps32 = np.asarray(rule.closed_form_payment.steps)
    expected = np.array(
        [ref_monotone_weight_payment(all_logits, b, gamma32, steps32, KNOTS, 0.5, n=3) for b in all_profiles]
    )
    assert got.dtype == dtype and np.all(np.isfinite(got)) and np.all(got >= 0)
    ok = expected / all_profiles.max(axis=-1, keepdims=True) > 1e3 * float(jnp.finfo(dtype).tiny)  # representable
    np.testing.assert_allclose(got[ok], expected[ok], rtol={jnp.float32: 2e-5, jnp.float64: 5e-7}[dtype], atol=0)
    np.testing.assert_allclose(got[~ok], expected[~ok], atol=1e4 * float(jnp.finfo(dtype).tiny) * all_profiles.max())


@pytest.mark.parametrize("shape", sorted(STEPS))
def test_closed_form_payment_equals_the_generic_autodiff_path(shape, dtype):
    """The rule depends on the ratios of its rows only (the unit is the base row), so the generic path applies."""
    rule = design.fixed_rule(_params(1.3, STEPS[shape], dtype))
    ratios = np.array([0.1, 0.3, 1.0, 3.0, 10.0])
    logits, bids = random_auction(np.random.default_rng(4), 3, 7, mask_fraction=0.3)
    base = np.random.default_rng(5).normal(size=7)
    profiles = np.concatenate([ratios[:, None] * bids[1:].sum(), np.broadcast_to(bids[1:], (5, 2))], 1)
    jl, jb = jnp.asarray(logits, dtype), jnp.asarray(profiles, dtype)
    kwargs = dict(base_logits=jnp.asarray(base, dtype), base_bid=0.4)
    fast = payments.second_price(rule, jl, jb, **kwargs)
    generic = payments.second_price(rule, jl, jb, method="quadrature", **kwargs)
    # the generic path's own error on this steep g is about 1e-5 (float64; the closed form's is 2e-7 against SciPy)
    np.testing.assert_allclose(fast, generic, rtol={jnp.float32: 1e-3, jnp.float64: 3e-5}[dtype], atol=0)


def test_scale_behaviour_is_covariance_in_the_unit_only(dtype):
    """Scaling every row (the base too) changes nothing but the payments' factor; scaling the agents alone
    against a fixed base changes the rule unless the steps are 0 (a power)."""
    rule = design.fixed_rule(_params(1.0, STEPS["bumps"], dtype))
    logits, bids = random_auction(np.random.default_rng(2), 3, 6)
    base = np.random.default_rng(3).normal(size=6)
    jl, jb, kw = jnp.asarray(logits, dtype), jnp.asarray(bids, dtype), dict(base_logits=jnp.asarray(base, dtype))
    z = payments.second_price(rule, jl, jb, base_bid=0.4, **kw)
    for c in (1e-20, 1e-3, 1e3, 1e20):
        np.testing.assert_allclose(payments.second_price(rule, jl, jb * c, base_bid=0.4 * c, **kw), z * c, rtol=2e-5)
    all_logits = jnp.asarray(np.concatenate([logits, base[None]]), dtype)
    profile = jnp.asarray(np.append(bids, 0.4), dtype)
    log_q = rule(all_logits, profile)
    np.testing.assert_allclose(rule(all_logits, profile * 1e6), log_q, atol=1e-5)
    agents_only = profile.at[:3].multiply(3.0)
    assert np.max(np.abs(rule(all_logits, agents_only) - log_q)) > 1e-2  # not invariant: g is not a power
    power = design.fixed_rule(design.MonotoneWeightParams.power(gamma=1.0, dtype=dtype))
    np.testing.assert_allclose(power(all_logits, agents_only), power(all_logits, profile.at[:3].multiply(3.0)))


@pytest.mark.parametrize("shape", sorted(STEPS))
def test_monotone_by_construction_on_held_out_auctions(shape, dtype):
    """Strict certificate share 1.0 and zero differential violation for any steps, float32 and float64."""
    heldout = design.dirichlet_auctions(1000, 48, 3, 16, with_base=True, dtype=dtype)
    params = _params(0.3, 2.0 * STEPS[shape], dtype, base_bid=0.05)
    certificate = design.certify_rule(params, heldout)
    assert certificate.share == 1.0 and certificate.monotone
    assert abs(design.evaluate(params, heldout)["violation"]) < 1e-6


def test_search_finds_a_certified_rule_that_matches_or_beats_its_power_start(dtype):
    """The README's claim in small: a learned search from b^gamma fits better and is certified held out
    (float32 and float64)."""
    fit = design.dirichlet_auctions(0, 24, 3, 12, with_base=True, dtype=dtype)
    heldout = design.dirichlet_auctions(1000, 24, 3, 12, with_base=True, dtype=dtype)
    start = design.MonotoneWeightParams.power(gamma=2.0, base_bid=0.05, dtype=dtype)
    result = design.search(
        design.revenue, start, fit, steps=30, learning_rate=0.05, monotone=True, holdout=heldout, progress=False
    )
    assert result.certified_on == "held-out" and result.certificate.share == 1.0 and result.monotone
    assert np.all(np.asarray(result.params.steps) >= 0) and float(result.params.gamma) > 0  # stayed in the domain
    assert design.evaluate(result.params, fit)["revenue"] > design.evaluate(start, fit)["revenue"]
    rule = design.fixed_rule(result.params)
    auction = ja.TokenAuction(
        rule=rule, payment="second_price", base_logits=heldout.base_logits[0], base_bid=result.params.base_bid
    )
    outcome = auction(heldout.logits[0], heldout.bids[0])
    expected = payments.second_price(
        rule, heldout.logits[0], heldout.bids[0], base_logits=heldout.base_logits[0], base_bid=result.params.base_bid
    )
    np.testing.assert_allclose(outcome.payments, expected, rtol=1e-5)


def test_bad_input_names_the_argument_and_the_fix():
    for kwargs, match in (
        (dict(gamma=0.0), "gamma"),
        (dict(base_bid=0.0), "base_bid"),
        (dict(steps=[-1.0] + [0.0] * 8), "steps"),
        (dict(steps=[0.0] * 3), "steps"),
        (dict(knots=(1.0, 0.0)), "knots"),
        (dict(width=0.0), "width"),
    ):
        with pytest.raises(ValueError, match=match):
            design.MonotoneWeightParams.create(**kwargs)
    no_base = design.dirichlet_auctions(0, 4, 2, 5)
    with pytest.raises(ValueError, match="needs a base distribution.*with_base=True"):
        design.evaluate(design.MonotoneWeightParams.power(), no_base)


def test_the_shift_moves_the_knots(dtype):
    """``shift`` is the knots' offset: the rule with shift s is the rule whose knots are c_k + s."""
    logits, bids = random_auction(np.random.default_rng(6), 3, 6)
    profile = jnp.asarray(np.append(bids, 0.3), dtype)
    all_logits = jnp.asarray(np.concatenate([logits, np.random.default_rng(7).normal(size=(1, 6))]), dtype)
    shifted = design.fixed_rule(design.MonotoneWeightParams.create(steps=STEPS["bumps"], shift=1.5, dtype=dtype))
    moved = design.fixed_rule(
        design.MonotoneWeightParams.create(steps=STEPS["bumps"], knots=np.asarray(KNOTS) + 1.5, dtype=dtype)
    )
    np.testing.assert_allclose(shifted(all_logits, profile), moved(all_logits, profile), atol=1e-6)
    z = [payments.charged_payments(rule, all_logits, profile, num_charged=3) for rule in (shifted, moved)]
    np.testing.assert_allclose(z[0], z[1], rtol=1e-5)


def test_generate_with_a_learned_rule_charges_its_closed_form_per_token():
    """generate with the learned rule and the base prompt at its base bid: every step's payments are the rule's
    closed form (the same numbers as the generic autodiff path on the same aggregate)."""
    from tiny_llm import PROMPTS, TinyTokenizer, tiny_llama

    from jaxauction.engine import generate

    tiny = tiny_llama(16, seed=3, sharpness=4.0), TinyTokenizer(16)
    params = design.MonotoneWeightParams.create(gamma=1.5, steps=STEPS["bumps"], base_bid=0.3, dtype=jnp.float32)
    rule = design.fixed_rule(params)
    common = dict(payment="second_price", decoding="greedy", max_new_tokens=3, model=tiny, base_prompt=[2, 3])
    fast = generate(PROMPTS[:2], [[1.0, 2.0]], rule=rule, base_bid=0.3, **common)
    generic = ja.Rule("generic", rule.log_aggregate, monotone=True)  # the same aggregate, no closed form
    slow = generate(PROMPTS[:2], [[1.0, 2.0]], rule=generic, base_bid=0.3, **common)
    assert fast.valid.all() and np.all(np.asarray(fast.token_payments) >= 0)
    np.testing.assert_array_equal(fast.tokens, slow.tokens)
    np.testing.assert_allclose(fast.token_payments, slow.token_payments, rtol=2e-3, atol=1e-7)


def test_payments_without_a_base_row_are_refused_with_the_fix():
    """Without the base row the last agent would be the unit, its weight path not the one the closed form
    integrates: second_price and generate refuse it before running, naming the fix."""
    from tiny_llm import PROMPTS, TinyTokenizer, tiny_llama

    from jaxauction.engine import generate

    rule = design.fixed_rule(design.MonotoneWeightParams.create(gamma=1.5, steps=STEPS["bumps"], base_bid=0.3))
    logits, bids = random_auction(np.random.default_rng(6), 3, 7)
    with pytest.raises(ValueError, match="base distribution as the last row.*base_logits= and base_bid="):
        payments.second_price(rule, jnp.asarray(logits), jnp.asarray(bids))
    tiny = tiny_llama(16, seed=3, sharpness=4.0), TinyTokenizer(16)
    with pytest.raises(ValueError, match="base_prompt= and base_bid="):
        generate(PROMPTS[:2], [[1.0, 2.0]], rule=rule, payment="second_price", max_new_tokens=2, model=tiny)
    z = payments.second_price(rule, jnp.asarray(logits), jnp.asarray(bids), base_logits=jnp.zeros(7), base_bid=0.3)
    assert np.all(np.isfinite(np.asarray(z))) and np.all(np.asarray(z) >= 0)
