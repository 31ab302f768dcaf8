"""The family protocol: a user family runs the whole path; bad input at the boundary names the argument and the fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

import jaxauction as ja
from jaxauction import design


@struct.dataclass
class Blend:
    """q ∝ (1 - w) linear + w log-linear with w = sigmoid(a): a user family (not monotone by construction)."""

    a: jax.Array


def blend_rule(params: Blend) -> ja.Rule:
    def log_q(logits, bids):
        w = jax.nn.sigmoid(params.a)
        return jnp.logaddexp(jnp.log1p(-w) + ja.linear(logits, bids), jnp.log(w) + ja.log_linear(logits, bids))

    return ja.Rule("blend", log_q)


BLEND = design.register_family(design.Family("blend", Blend, blend_rule), overwrite=True)


@struct.dataclass
class Unknown:
    a: jax.Array


def test_a_user_family_runs_objectives_search_and_certificate():
    fit = design.dirichlet_auctions(0, 16, 3, 8, with_base=False)
    heldout = design.dirichlet_auctions(1000, 16, 3, 8, with_base=False)
    start = Blend(a=jnp.asarray(-2.0))
    assert design.family_of(start) is BLEND
    for a, reference in ((-30.0, ja.linear), (30.0, ja.log_linear)):  # the endpoints are the core rules
        np.testing.assert_allclose(
            design.aggregate(Blend(jnp.asarray(a)), fit), reference(fit.logits, fit.bids), atol=1e-5
        )
    welfare = lambda params, batch: design.welfare(params, batch, valuation="reverse")  # noqa: E731
    result = design.search(welfare, start, fit, steps=20, learning_rate=0.2, holdout=heldout, progress=False)
    assert result.certified_on == "held-out" and result.certificate is not None
    assert float(result.params.a) > -2.0  # towards log-linear, which maximises this welfare
    assert not result.monotone  # a blend with log-linear is not monotone: the held-out certificate says so
    metrics = design.evaluate(result.params, heldout)
    assert set(metrics) == {"revenue", "welfare_forward", "welfare_reverse", "violation"} and metrics["violation"] > 0
    with pytest.raises(ValueError, match="declares none"):
        design.search(welfare, start, fit, steps=1, monotone=True, holdout=heldout, progress=False)


def test_budget_zero_on_a_user_family_warns_when_the_result_is_not_monotone():
    fit = design.dirichlet_auctions(0, 16, 3, 8)
    constraint = design.Constraint(design.violation, budget=0.0)
    with pytest.warns(design.CertificateWarning, match="fails the strict certificate"):
        design.search(design.revenue, Blend(jnp.asarray(0.0)), fit, steps=2, constraint=constraint, progress=False)


def test_params_of_no_family_name_the_argument_and_the_fix():
    batch = design.dirichlet_auctions(0, 2, 2, 4)
    for call in (
        lambda: design.evaluate(Unknown(jnp.asarray(1.0)), batch),
        lambda: design.certify_rule(Unknown(jnp.asarray(1.0)), batch),
        lambda: design.fixed_rule(Unknown(jnp.asarray(1.0))),
        lambda: design.bind({"rho": 1.0}),
        lambda: design.search(design.revenue, Unknown(jnp.asarray(1.0)), batch, steps=1, progress=False),
    ):
        with pytest.raises(
            ValueError, match=r"params is a (Unknown|dict), the parameters of no registered family.*register_family"
        ):
            call()


def test_a_rule_map_that_returns_no_rule_is_refused_with_the_fix():
    @struct.dataclass
    class Bad:
        a: jax.Array

    design.register_family(
        design.Family("bad", Bad, lambda params: lambda logits, bids: logits[..., 0, :]), overwrite=True
    )
    with pytest.raises(
        ValueError, match=r"family 'bad'.*returned .*not a jaxauction.Rule. Fix: return jaxauction.Rule"
    ):
        design.fixed_rule(Bad(jnp.asarray(1.0)))
    with pytest.raises(ValueError, match="Family.params_type"):
        design.Family("x", "Bad", blend_rule)
    with pytest.raises(ValueError, match="register_family: Blend already belongs to family 'blend'"):
        design.register_family(design.Family("other", Blend, blend_rule))


def test_bounds_of_the_wrong_structure_are_refused_with_the_fix():
    batch = design.dirichlet_auctions(0, 4, 2, 4, with_base=True)
    params = design.MonotoneWeightParams.power()
    wrong = design.Bounds.create()  # a power-mean box for learned parameters
    with pytest.raises(
        ValueError, match=r"bounds.lower has the structure .* but params has .* Fix: build bounds like params"
    ):
        design.search(design.revenue, params, batch, steps=1, bounds=wrong, progress=False)
    short = design.Bounds(lower=params.replace(steps=jnp.zeros(3)), upper=params)
    with pytest.raises(ValueError, match=r"bounds.lower.steps has shape \(3,\), but the parameter has shape \(9,\)"):
        design.search(design.revenue, params, batch, steps=1, bounds=short, progress=False)
    with pytest.raises(TypeError, match="batch must be a jaxauction.design.AuctionBatch"):
        design.evaluate(params, {"logits": 1})


def test_bind_appends_the_base_for_any_family():
    """bind(params, base_logits) is the family's rule with the base as the last agent at the family's base bid."""
    batch = design.dirichlet_auctions(0, 4, 3, 6, with_base=True)
    for params in (design.PowerMeanParams.create(gamma=2.0, base_bid=0.3), design.MonotoneWeightParams.power(2.0, 0.3)):
        bound = design.bind(params, batch.base_logits)
        assert isinstance(bound, ja.Rule)
        np.testing.assert_allclose(bound(batch.logits, batch.bids), design.aggregate(params, batch), atol=1e-6)
    np.testing.assert_allclose(  # the two families agree on their common member b^gamma (with a base)
        design.bind(design.MonotoneWeightParams.power(2.0, 0.3), batch.base_logits)(batch.logits, batch.bids),
        design.bind(design.PowerMeanParams.create(gamma=2.0, base_bid=0.3), batch.base_logits)(
            batch.logits, batch.bids
        ),
        atol=1e-6,
    )
