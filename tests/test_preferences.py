"""Robust preferences and monotonicity (docs/maths.md §4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from references import random_auction, ref_linear, ref_log_linear, ref_probs

from jaxauction import aggregation, preferences

violation = jax.jit(preferences.monotonicity_violation, static_argnums=0)
SPEC_P1 = np.array([0.30, 0.01, 0.69])
SPEC_P2 = np.array([0.29, 0.70, 0.01])


def ref_violation(reference_rule, logits, bids, step=1e-6):
    """docs/maths.md §4 by central finite differences of the float64 reference rule."""
    p = ref_probs(logits)
    q = reference_rule(logits, bids)
    out = []
    for i in range(len(bids)):
        up, down = bids.copy(), bids.copy()
        up[i] += step
        down[i] -= step
        dq = (reference_rule(logits, up) - reference_rule(logits, down)) / (2 * step)
        out.append(np.maximum(0.0, -(p[i] - q) * dq).sum())
    return np.array(out)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(-3, 3), masked=st.booleans())
def test_linear_rule_is_monotone(seed, scale, masked):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(2, 3, 5)) * 3
    if masked:
        mask = (rng.random(logits.shape) < 0.4) & (np.arange(5) != rng.integers(0, 5, (2, 3, 1)))
        logits = np.where(mask, -np.inf, logits)
    bids = rng.uniform(0, 1, (2, 3)) * 10.0**scale
    v = violation(aggregation.linear, jnp.asarray(logits, jnp.float32), jnp.asarray(bids, jnp.float32))
    assert v.shape == (2, 3)
    # exact arithmetic gives 0; float32 rounding leaves at most eps-sized products of order 1/sum(b)
    np.testing.assert_allclose(v * bids.sum(-1, keepdims=True), 0.0, atol=1e-6)


def test_spec_counterexample_is_detected(x64):
    logits = jnp.log(jnp.asarray(np.stack([SPEC_P1, SPEC_P2])))
    bids = jnp.array([0.3, 0.7])
    v = violation(aggregation.log_linear, logits, bids)
    assert v[0] > 1e-3
    np.testing.assert_allclose(v, ref_violation(ref_log_linear, np.asarray(logits), np.asarray(bids)), rtol=1e-6)
    # and the discrete move of docs/maths.md §4 is not weakly preferred by agent 1
    q_low = jnp.exp(aggregation.log_linear(logits, bids))
    q_high = jnp.exp(aggregation.log_linear(logits, jnp.array([0.5, 0.5])))
    assert not preferences.prefers(jnp.asarray(SPEC_P1), q_high, q_low)


@pytest.mark.parametrize("rule,reference", [(aggregation.linear, ref_linear), (aggregation.log_linear, ref_log_linear)])
def test_violation_equals_finite_difference_definition(rule, reference, x64):
    logits, bids = random_auction(np.random.default_rng(11), 4, 6, scale=1.5)
    got = violation(rule, jnp.asarray(logits), jnp.asarray(bids))
    np.testing.assert_allclose(got, ref_violation(reference, logits, bids), rtol=1e-5, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), factor=st.floats(1.01, 100.0))
def test_raising_a_bid_under_the_linear_rule_is_weakly_preferred(seed, factor):
    rng = np.random.default_rng(seed)
    logits, bids = random_auction(rng, 3, 5, scale=3)
    i = int(rng.integers(0, 3))
    raised = bids.copy()
    raised[i] *= factor
    q_old = ref_linear(logits, bids)
    q_new = np.exp(np.asarray(aggregation.linear(jnp.asarray(logits), jnp.asarray(raised)), np.float64))
    assert bool(preferences.prefers(ref_probs(logits)[i], q_new, q_old))
    assert not bool(preferences.prefers(ref_probs(logits)[i], q_old, q_new)) or np.allclose(q_old, q_new, atol=1e-6)


def test_prefers_is_the_betweenness_order():
    p = jnp.array([0.6, 0.3, 0.1])
    q = jnp.array([0.2, 0.3, 0.5])
    between = 0.5 * p + 0.5 * q
    assert preferences.prefers(p, between, q) and preferences.prefers(p, p, q) and preferences.prefers(p, q, q)
    assert not preferences.prefers(p, q, between)
    # incomparable: one token moves towards p, another away from it
    other = jnp.array([0.5, 0.1, 0.4])
    assert not preferences.prefers(p, other, q) and not preferences.prefers(p, q, other)
    batch = preferences.prefers(p, jnp.stack([between, q]), jnp.stack([q, between]))
    np.testing.assert_array_equal(batch, [True, False])
    assert preferences.prefers(p, q + 1e-3, q, atol=2e-3) and not preferences.prefers(p, q + 1e-3, q)
    with pytest.raises(ValueError, match="probabilities"):
        preferences.prefers(jnp.log(p), q, q)


# --- The strict certificate (docs/maths.md §4) -----------------------------------------------------------------


def _precision(dtype):
    """float64 enabled for the body when ``dtype`` is float64 (float32 is JAX's default)."""
    return jax.enable_x64(dtype == "float64")


def ref_certificate(reference_rule, logits, bids, factors=preferences.DEFAULT_FACTORS):
    """Brute force in NumPy float64: for each agent the largest excess outside [min(q, p_i), max(q, p_i)]."""
    p = ref_probs(logits)
    q = reference_rule(logits, bids)
    excess = np.zeros(bids.shape)
    for index in np.ndindex(bids.shape):
        auction, agent = index[:-1], index[-1]
        for factor in factors:
            raised = bids[auction].copy()
            raised[agent] *= factor
            q_new = reference_rule(logits[auction], raised)
            low = np.minimum(q[auction], p[auction][agent])
            high = np.maximum(q[auction], p[auction][agent])
            worst = max(0.0, float(np.max(low - q_new)), float(np.max(q_new - high)))
            excess[index] = max(excess[index], worst)
    return excess


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("masked", [False, True])
def test_certify_passes_the_linear_rule_everywhere(dtype, masked):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(64, 4, 12)) * 4
    if masked:
        keep = np.arange(12) == rng.integers(0, 12, (64, 4, 1))
        logits = np.where((rng.random(logits.shape) < 0.4) & ~keep, -np.inf, logits)
    bids = rng.uniform(0, 1, (64, 4)) * 10.0 ** rng.uniform(-3, 3, (64, 1))
    with _precision(dtype):
        certificate = preferences.certify(
            aggregation.linear, jnp.asarray(logits, dtype), jnp.asarray(bids, dtype), factors=(1.01, 1.1, 2.0, 50.0)
        )
    assert certificate.passed.shape == (64, 4) and certificate.passed.all()
    assert certificate.share == 1.0 and certificate.monotone
    assert 0.0 <= certificate.worst <= certificate.atol
    assert certificate.atol == 16 * float(np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_certify_fails_log_linear_on_the_spec_counterexample(dtype):
    logits = np.log(np.stack([SPEC_P1, SPEC_P2]))
    bids = np.array([0.3, 0.7])
    with _precision(dtype):
        # docs/maths.md §4: lambda_1 from 0.3 to 0.5 is b_1 from 0.3 to 0.7, a factor 7/3
        certificate = preferences.certify("log_linear", jnp.asarray(logits, dtype), jnp.asarray(bids, dtype))
        spec_move = preferences.certify(
            "log_linear", jnp.asarray(logits, dtype), jnp.asarray(bids, dtype), factors=(7 / 3,)
        )
    assert not certificate.passed[0] and certificate.share < 1.0 and not certificate.monotone
    # q(token 0) rises from 0.5588 to 0.6389 away from p_1(token 0) = 0.30: excess 0.6389 - 0.5588
    np.testing.assert_allclose(spec_move.excess[0], 0.6389 - 0.5588, atol=2e-4)
    np.testing.assert_allclose(certificate.excess, ref_certificate(ref_log_linear, logits, bids), atol=1e-5)


def ref_tempered_linear(tau):
    def rule(logits, bids):
        q = ref_linear(logits, bids) ** (1.0 / tau)
        return q / q.sum(-1, keepdims=True)

    return rule


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("tau", [0.9, 1.1, 2.0])
def test_certify_fails_the_tempered_linear_rule_on_the_spec_counterexample(dtype, tau):
    from jaxauction import design

    with np.errstate(divide="ignore"):
        logits = np.log(np.array([[0.65, 0.35, 0.0], [0.66, 0.02, 0.32]]))
    bids = np.array([1.0, 4.0])
    with _precision(dtype):
        rule = design.fixed_rule(design.PowerMeanParams.create(temperature=tau))
        certificate = preferences.certify(rule, jnp.asarray(logits, dtype), jnp.asarray(bids, dtype), factors=(1.2,))
        untempered = preferences.certify(
            design.fixed_rule(design.PowerMeanParams.create()), jnp.asarray(logits, dtype), jnp.asarray(bids, dtype)
        )
    reference = ref_certificate(ref_tempered_linear(tau), logits, bids, factors=(1.2,))
    assert reference[0] > 1e-4  # the reference itself fails agent 1 (docs/maths.md §2)
    assert not certificate.passed[0] and not certificate.monotone
    np.testing.assert_allclose(certificate.excess, reference, atol=1e-5)
    if tau == 1.1:  # docs/maths.md §2's numbers: q(token 0) from 0.6324 to 0.6316
        np.testing.assert_allclose(certificate.excess[0], 0.6324 - 0.6316, atol=1e-4)
    assert untempered.monotone


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_certify_matches_a_brute_force_reference_on_random_auctions(dtype):
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(40, 3, 6)) * 2
    bids = rng.lognormal(size=(40, 3))
    with _precision(dtype):
        certificate = preferences.certify(aggregation.log_linear, jnp.asarray(logits, dtype), jnp.asarray(bids, dtype))
    reference = ref_certificate(ref_log_linear, logits, bids)
    tolerance = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(certificate.excess, reference, atol=tolerance)
    clear = np.abs(reference - certificate.atol) > tolerance  # not on the tolerance's edge
    np.testing.assert_array_equal(certificate.passed[clear], (reference <= certificate.atol)[clear])
    assert 0.0 < certificate.share < 1.0  # log-linear fails some pairs and passes others here
    np.testing.assert_allclose(certificate.share, np.mean(certificate.passed))
    np.testing.assert_allclose(certificate.worst, reference.max(), atol=tolerance)


def test_certify_checks_only_the_first_agents_and_validates_its_inputs():
    logits = jnp.log(jnp.asarray(np.stack([SPEC_P1, SPEC_P2])))
    bids = jnp.array([0.3, 0.7])
    assert preferences.certify("log_linear", logits[::-1], bids[::-1], n_checked=1).monotone  # agent 1 checked last
    assert preferences.certify("log_linear", logits, bids, n_checked=1).share == 0.0
    for bad in [(), (1.0,), (0.5, 2.0), (float("nan"),), "x"]:
        with pytest.raises(ValueError, match="factors"):
            preferences.certify("linear", logits, bids, factors=bad)
    for bad in [0, 3, 1.5, True]:
        with pytest.raises(ValueError, match="n_checked"):
            preferences.certify("linear", logits, bids, n_checked=bad)
    with pytest.raises(ValueError, match="atol"):
        preferences.certify("linear", logits, bids, atol=float("nan"))
    with pytest.raises(ValueError, match="logits"):
        preferences.certify("linear", logits.at[0, 0].set(jnp.nan), bids)
    with pytest.raises(ValueError, match="largest accepted bid"):
        preferences.certify("linear", logits, jnp.array([3e38, 1.0]))
    with pytest.raises(ValueError, match="overflows"):  # an accepted bid, raised by a factor past float32's max
        preferences.certify("linear", logits, jnp.array([3e30, 1.0]), factors=(1e10,))
    with pytest.raises(ValueError, match="rule"):
        preferences.certify("no_such_rule", logits, bids)
    with pytest.raises(ValueError, match="outside jax.jit"):
        jax.jit(lambda l, b: preferences.certify("linear", l, b).share)(logits, bids)


def test_a_nan_outcome_fails_its_pair():
    def broken(logits, bids):
        return jnp.where(bids[..., :1] > 0.5, jnp.nan, aggregation.linear(logits, bids))

    certificate = preferences.certify(broken, jnp.zeros((2, 3)), jnp.array([0.4, 1.0]))
    assert not certificate.passed[0] and np.isnan(certificate.worst)


class CompileCounter:
    """Counts XLA compilations through ``jax.monitoring`` (a public listener API)."""

    def __init__(self):
        self.count = 0

    def __call__(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


@pytest.mark.parametrize(
    "rule,vocab", [("linear", 16), (aggregation.log_linear, 17), (jax.jit(aggregation.linear), 18)]
)
def test_eager_calls_with_the_same_shapes_compile_once(rule, vocab):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(8, 3, vocab)), jnp.float32)
    bids = jnp.asarray(rng.uniform(0.5, 2, (8, 3)), jnp.float32)
    for function in (preferences.monotonicity_violation, preferences.certify):
        jax.block_until_ready(jax.tree.leaves(function(rule, logits, bids)))  # compiles
        with CompileCounter() as counter:
            for _ in range(2):
                other = jnp.asarray(rng.uniform(0.5, 2, (8, 3)), jnp.float32)
                jax.block_until_ready(jax.tree.leaves(function(rule, logits, other)))
        assert counter.count == 0, f"{function.__name__} recompiled {counter.count} times"
    with CompileCounter() as counter:  # the counter does see compilations: a new shape compiles
        preferences.monotonicity_violation(rule, logits[:, :, : vocab - 1], bids)
    assert counter.count >= 1


def test_an_unhashable_callable_rule_still_works():
    class Unhashable:  # eq without hash: cannot be a static jit argument
        def __eq__(self, other):
            return isinstance(other, Unhashable)

        __hash__ = None

        def __call__(self, logits, bids):
            return aggregation.linear(logits, bids)

    logits = jnp.log(jnp.asarray(np.stack([SPEC_P1, SPEC_P2])))
    bids = jnp.array([0.3, 0.7])
    np.testing.assert_allclose(
        preferences.monotonicity_violation(Unhashable(), logits, bids),
        preferences.monotonicity_violation("linear", logits, bids),
    )
    assert preferences.certify(Unhashable(), logits, bids).monotone
