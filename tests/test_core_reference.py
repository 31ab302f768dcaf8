"""Checks of the shared float64 references in ``references.py`` (docs/maths.md §2, §4)."""

import numpy as np
import pytest
from references import (
    random_auction,
    ref_linear,
    ref_linear_closed_form,
    ref_log1p_minus_ratio,
    ref_log_linear,
    ref_payment,
    ref_payment_in_u,
    ref_probs,
)

# ---- checks of the references themselves ----


def test_reference_linear_is_a_mixture_of_the_agents():
    rng = np.random.default_rng(0)
    logits, bids = random_auction(rng, 3, 6)
    q = ref_linear(logits, bids)
    np.testing.assert_allclose(q.sum(), 1.0, rtol=1e-14)
    p = ref_probs(logits)
    np.testing.assert_allclose(q, sum(b / bids.sum() * p[k] for k, b in enumerate(bids)), rtol=1e-14)


def test_reference_log_linear_matches_the_spec_counterexample():
    p1 = np.array([0.30, 0.01, 0.69])
    p2 = np.array([0.29, 0.70, 0.01])
    logits = np.log(np.stack([p1, p2]))
    assert ref_log_linear(logits, [0.3, 0.7])[0] == pytest.approx(0.5588, abs=1e-4)
    assert ref_log_linear(logits, [0.5, 0.5])[0] == pytest.approx(0.6389, abs=1e-4)


def test_reference_payment_matches_closed_form():
    rng = np.random.default_rng(1)
    logits, bids = random_auction(rng, 3, 7)
    closed = ref_linear_closed_form(logits, bids)
    quad = [ref_payment(ref_linear, logits, bids, i, "robust") for i in range(3)]
    np.testing.assert_allclose(quad, closed, rtol=1e-8)


def test_reference_log1p_minus_ratio_series_and_direct_form_agree():
    for r in [1e-12, 1e-6, 0.01, 0.5, 0.99, 1.0, 10.0, 1e6, 1e12]:
        direct = np.log1p(r) - r / (1 + r)
        assert ref_log1p_minus_ratio(r) == pytest.approx(direct, rel=max(1e-12, 4e-16 / (r * r / 2)))
    assert ref_log1p_minus_ratio(1e-12) == pytest.approx(0.5e-24, rel=1e-11)


@pytest.mark.parametrize(
    "rule_name,rule,kind",
    [
        ("linear", ref_linear, "robust"),
        ("linear", ref_linear, "forward_kl"),
        ("log_linear", ref_log_linear, "robust"),
        ("log_linear", ref_log_linear, "reverse_kl"),
    ],
)
def test_reference_payment_in_u_matches_the_definition(rule_name, rule, kind):
    logits, bids = random_auction(np.random.default_rng(2), 3, 6, scale=1.5)
    for i in range(3):
        assert ref_payment_in_u(rule_name, logits, bids, i, kind) == pytest.approx(
            ref_payment(rule, logits, bids, i, kind), rel=1e-7
        )
