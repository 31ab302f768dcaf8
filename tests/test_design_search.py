"""The design search: known optima, the constraint budget, frozen parameters, bounds, and
checkpoints that resume an interrupted search to the same final parameters."""

import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxauction.design import (
    Bounds,
    CertificateWarning,
    Constraint,
    PowerMeanParams,
    augmented_lagrangian,
    bind,
    certify_rule,
    checkpoint,
    dirichlet_auctions,
    objectives,
    search,
    trainable_mask,
)

TARGET = {"a": jnp.asarray(1.5), "b": jnp.asarray([-0.5, 2.0])}


def quadratic(params, data):
    """Maximised at TARGET (value 0)."""
    return -((params["a"] - TARGET["a"]) ** 2) - jnp.sum((params["b"] - TARGET["b"]) ** 2)


def cap_a(params, data):
    return params["a"]


START = {"a": jnp.asarray(0.0), "b": jnp.zeros(2)}


def test_search_recovers_the_optimum_of_a_quadratic():
    result = search(quadratic, START, steps=300, learning_rate=0.05, progress=False)
    np.testing.assert_allclose(result.params["a"], 1.5, atol=1e-3)
    np.testing.assert_allclose(result.params["b"], [-0.5, 2.0], atol=1e-3)
    assert result.step == 300
    assert set(result.history) == {"step", "loss", "objective", "constraint", "multiplier", "param['a']"}
    assert all(len(values) == 300 for values in result.history.values())
    np.testing.assert_array_equal(result.history["step"], np.arange(300))
    assert result.history["objective"][-1] > result.history["objective"][0]
    np.testing.assert_allclose(result.history["objective"], -result.history["loss"])


def test_constrained_search_stops_at_the_budget_with_the_kkt_multiplier():
    """max -(a - 1.5)^2 s.t. a <= 1: optimum a = 1, multiplier = d/da of the objective there = 1."""
    constraint = Constraint(cap_a, budget=1.0, penalty=10.0, multiplier_every=20)
    result = search(quadratic, START, steps=500, learning_rate=0.05, constraint=constraint, progress=False)
    np.testing.assert_allclose(result.params["a"], 1.0, atol=1e-3)
    np.testing.assert_allclose(result.params["b"], [-0.5, 2.0], atol=1e-3)
    np.testing.assert_allclose(result.multiplier, 1.0, atol=1e-2)
    np.testing.assert_allclose(result.history["constraint"][-1], float(result.history["param['a']"][-1]))


def test_augmented_lagrangian_matches_its_definition():
    for slack, multiplier, penalty in [(-1.0, 0.0, 2.0), (0.5, 0.3, 4.0), (-0.05, 1.0, 10.0)]:
        want = (max(0.0, multiplier + penalty * slack) ** 2 - multiplier**2) / (2 * penalty)
        np.testing.assert_allclose(augmented_lagrangian(jnp.asarray(slack), jnp.asarray(multiplier), penalty), want)


def test_frozen_parameters_and_bounds():
    result = search(
        quadratic,
        START,
        steps=200,
        learning_rate=0.1,
        trainable={"a": True, "b": False},
        bounds=({"a": jnp.asarray(-1.0), "b": jnp.full(2, -1.0)}, {"a": jnp.asarray(1.2), "b": jnp.full(2, 1.0)}),
        progress=False,
    )
    np.testing.assert_array_equal(result.params["b"], [0.0, 0.0])
    np.testing.assert_allclose(result.params["a"], 1.2)


def test_search_recovers_a_power_mean_from_its_outputs():
    """Minimising the KL to a rule of the family, from the linear rule, finds that rule's parameters."""
    batch = dirichlet_auctions(0, 32, 3, 8)
    truth = PowerMeanParams.create(rho=0.4, gamma=1.5, temperature=0.8)
    reference = bind(truth)
    result = search(
        lambda params, data: objectives.distance(params, data, reference=reference),
        PowerMeanParams.linear(),
        batch,
        steps=400,
        maximize=False,
        optimizer=optax.adam(0.03),
        trainable=trainable_mask(("rho", "gamma", "temperature")),
        bounds=Bounds.create(),
        progress=False,
    )
    found = result.params.to_dict()
    for name in ("rho", "gamma", "temperature"):
        np.testing.assert_allclose(found[name], truth.to_dict()[name], atol=0.02, err_msg=name)
    assert found["base_bid"] == 0.0
    assert result.history["objective"][-1] < 1e-5


class Interrupt(Exception):
    pass


def reverse_welfare(params, batch):
    return objectives.welfare(params, batch, valuation="reverse")


ADAM = optax.adam(0.02)  # one object: repeated searches reuse one compiled step


def constrained_design_search(batch, path=None, callback=None, steps=30):
    """Log-linear's welfare (maximised at rho = 0, which is not monotone) under a violation budget,
    with minibatches, bounds and frozen parameters: every part of the search state."""
    return search(
        reverse_welfare,
        PowerMeanParams.create(rho=0.5, base_bid=0.2),
        batch,
        steps=steps,
        constraint=Constraint(objectives.violation, budget=1e-6, penalty=1e3, multiplier_every=4),
        optimizer=ADAM,
        trainable=trainable_mask(("rho", "gamma", "base_bid")),
        bounds=Bounds.create(),
        batch_size=6,
        seed=7,
        checkpoint=path,
        checkpoint_every=10,
        progress=False,
        callback=callback,
    )


def test_resuming_an_interrupted_search_gives_the_same_final_parameters(tmp_path):
    batch = dirichlet_auctions(1, 12, 2, 6, with_base=True)
    uninterrupted = constrained_design_search(batch)

    path, killed = tmp_path / "search.npz", tmp_path / "killed.npz"

    def stop_at_23(step, record):
        if step == 23:
            shutil.copy(path, killed)  # what a hard kill would leave: the periodic checkpoint of step 20
            raise Interrupt

    with pytest.raises(Interrupt):
        constrained_design_search(batch, path, stop_at_23)
    assert checkpoint.load(path, *template(batch)).step == 23  # written on the way out
    assert checkpoint.load(killed, *template(batch)).step == 20

    for resumed in (constrained_design_search(batch, path), constrained_design_search(batch, killed)):
        assert resumed.step == 30
        for name, value in uninterrupted.params.to_dict().items():
            assert resumed.params.to_dict()[name] == value, name
        for name, values in uninterrupted.history.items():
            np.testing.assert_array_equal(resumed.history[name], values, err_msg=name)
        assert resumed.multiplier == uninterrupted.multiplier
    assert uninterrupted.multiplier > 0  # the budget binds: the multiplier path is exercised
    saved = checkpoint.load(path, *template(batch))
    assert saved.step == 30 and len(saved.history["loss"]) == 30

    # A finished search resumes to itself; asking for more steps continues it.
    again = constrained_design_search(batch, path)
    assert again.params.to_dict() == uninterrupted.params.to_dict()
    longer = constrained_design_search(batch, path, steps=32)
    assert longer.step == 32 and len(longer.history["step"]) == 32


def template(batch):
    """Parameters and optimiser state with the structure of constrained_design_search's."""
    params = PowerMeanParams.create(rho=0.5, base_bid=0.2)
    labels = jax.tree.map(lambda flag: "train" if flag else "frozen", trainable_mask(("rho", "gamma", "base_bid")))
    optimizer = optax.multi_transform({"train": ADAM, "frozen": optax.set_to_zero()}, labels)
    return params, optimizer.init(params)


def test_checkpoint_of_another_search_is_refused(tmp_path):
    path = tmp_path / "quadratic.npz"
    search(quadratic, START, steps=3, checkpoint=path, progress=False)
    with pytest.raises(ValueError, match="settings"):
        search(quadratic, START, steps=5, checkpoint=path, seed=1, progress=False)
    with pytest.raises(ValueError, match="structure"):
        search(lambda p, d: -jnp.sum(p["b"] ** 2), {"b": jnp.zeros(2)}, steps=5, checkpoint=path, progress=False)
    (tmp_path / "garbage.npz").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.npz"):
        search(quadratic, START, steps=5, checkpoint=tmp_path / "garbage.npz", progress=False)


def test_invalid_settings_raise():
    with pytest.raises(ValueError, match="steps"):
        search(quadratic, START, steps=-1)
    with pytest.raises(ValueError, match="batch_size"):
        search(quadratic, START, {"x": jnp.zeros((4, 2))}, steps=1, batch_size=5)
    with pytest.raises(ValueError, match="penalty"):
        Constraint(cap_a, budget=1.0, penalty=0.0)
    with pytest.raises(ValueError, match="budget"):
        Constraint(cap_a, budget=float("nan"))


def test_progress_bar_reports_to_stderr(capsys):
    search(quadratic, START, steps=5, progress=True, description="quadratic")
    assert "quadratic" in capsys.readouterr().err


# --- Robustness: nothing non-finite reaches a checkpoint; bad settings and files fail clearly --------


def _no_temporaries(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    "case",
    ["float16 params", "nan learning rate", "nan objective", "bfloat16 params", "nan params"],
)
def test_non_finite_searches_stop_with_a_clear_error_and_write_no_nan(tmp_path, case):
    path = tmp_path / "search.npz"
    start = START
    objective = quadratic
    kwargs = {}
    if case == "float16 params":
        start = {"a": jnp.asarray(0.0, jnp.float16), "b": jnp.zeros(2, jnp.float16)}
    elif case == "bfloat16 params":
        start = {"a": jnp.asarray(0.0, jnp.bfloat16), "b": jnp.zeros(2, jnp.bfloat16)}
    elif case == "nan params":
        start = {"a": jnp.asarray(jnp.nan), "b": jnp.zeros(2)}
    elif case == "nan learning rate":
        kwargs["learning_rate"] = float("nan")
    elif case == "nan objective":

        def objective(params, data):  # finite for 4 steps, then NaN
            return quadratic(params, data) + jnp.where(params["a"] > 0.15, jnp.nan, 0.0)

    if case == "nan objective":
        with pytest.raises(FloatingPointError, match=r"step \d+ gave a non-finite"):
            search(objective, start, steps=50, checkpoint=path, learning_rate=0.05, progress=False, **kwargs)
        saved = checkpoint.load(path, START, optax.adam(0.05).init(START))  # last finite state
        assert 0 < saved.step < 50
        assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(saved.params))
    else:
        match = "learning_rate" if case == "nan learning rate" else "parameter"
        with pytest.raises(ValueError, match=match):
            search(objective, start, steps=5, checkpoint=path, progress=False, **kwargs)
        assert not path.exists()
    assert _no_temporaries(tmp_path) == []


def test_checkpoint_save_refuses_non_finite_parameters(tmp_path):
    state = checkpoint.SearchState({"a": jnp.asarray(jnp.nan)}, (), 3, 0.0, {})
    with pytest.raises(FloatingPointError, match="step 3"):
        checkpoint.save(tmp_path / "x.npz", state)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["truncated zip", "foreign npz", "npy file", "bad meta", "json list meta"])
def test_corrupt_or_foreign_checkpoints_name_the_file(tmp_path, kind):
    path = tmp_path / "search.npz"
    search(quadratic, START, steps=2, checkpoint=path, progress=False)
    if kind == "truncated zip":
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "foreign npz":
        np.savez(path, weights=np.zeros(3))
    elif kind == "npy file":
        with open(path, "wb") as file:
            np.save(file, np.zeros(3))
    else:
        meta = "{not json" if kind == "bad meta" else "[1, 2]"
        with open(path, "wb") as file:
            np.savez(file, meta=np.asarray(meta))
    with pytest.raises(ValueError, match="search.npz"):
        search(quadratic, START, steps=4, checkpoint=path, progress=False)


def test_stale_temporary_files_are_removed_on_the_next_save(tmp_path):
    path = tmp_path / "search.npz"
    stale = [tmp_path / ".search.npz.abc123.tmp", tmp_path / ".search.npz.k2j3h4.npz"]
    for file in stale:
        file.write_bytes(b"left by a SIGKILL")
    other = tmp_path / ".other.npz.abc.tmp"  # another file's temporary is left alone
    other.write_bytes(b"x")
    search(quadratic, START, steps=2, checkpoint=path, progress=False)
    assert not any(file.exists() for file in stale) and other.exists()
    assert checkpoint.load(path, START, optax.adam(0.05).init(START)).step == 2


def test_steps_must_be_an_int_and_data_none_is_explained():
    for bad in (2.5, "3", True, None):
        with pytest.raises(ValueError, match="steps"):
            search(quadratic, START, steps=bad, progress=False)
    with pytest.raises(ValueError, match="checkpoint_every"):
        search(quadratic, START, steps=2, checkpoint_every=1.5, progress=False)
    with pytest.raises(ValueError, match="data=None"):
        search(objectives.revenue, PowerMeanParams.create(), None, steps=2, progress=False)
    assert search(quadratic, START, steps=3, progress=False).step == 3  # objectives without data still work


def test_without_bounds_the_search_stays_in_the_family_domain():
    batch = dirichlet_auctions(2, 6, 2, 5, with_base=True)

    def pull_out(params, data):  # pushes gamma, base_bid and temperature below zero
        return -((params.gamma + 3.0) ** 2) - (params.base_bid + 3.0) ** 2 - (params.temperature + 3.0) ** 2

    result = search(pull_out, PowerMeanParams.create(base_bid=0.5), batch, steps=60, learning_rate=0.2, progress=False)
    found = result.params.to_dict()
    assert found["gamma"] == 0.0 and found["base_bid"] == 0.0
    assert found["temperature"] == pytest.approx(Bounds.domain().lower.temperature)
    assert found["temperature"] > 0
    assert np.isfinite(objectives.revenue(result.params, batch))


# ---- issue 26: a search asked for a monotone rule keeps its word ----

FITTED = dict(seed=0, num_auctions=24, num_agents=3, vocab_size=16, with_base=True)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_monotone_search_returns_a_rule_certified_on_fresh_held_out_auctions(dtype):
    """Revenue search in the monotone part (rho = 1, tau = 1 frozen) from a non-monotone start; the held-out
    auctions are drawn with another seed, and the certificate recomputed from scratch agrees."""
    with jax.enable_x64(dtype == "float64"):
        batch = dirichlet_auctions(**FITTED, dtype=dtype)
        holdout = dirichlet_auctions(**{**FITTED, "seed": 4242, "num_auctions": 48}, dtype=dtype)
        start = PowerMeanParams.create(rho=0.6, temperature=1.3, base_bid=0.05, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CertificateWarning)
            result = search(
                objectives.revenue,
                start,
                batch,
                steps=12,
                learning_rate=0.1,
                monotone=True,
                holdout=holdout,
                progress=False,
            )
        found = result.params.to_dict()
        assert found["rho"] == 1.0 and found["temperature"] == 1.0
        assert found["gamma"] > 1.1  # revenue pushes gamma up from 1 (the search moved)
        assert np.all(np.diff(result.history["objective"]) > -1e-3)  # revenue does not drop along the way
        assert result.certified_on == "held-out" and result.monotone
        assert result.certificate.share == 1.0 and result.certificate.passed.shape == (48, 3)
        again = certify_rule(result.params, holdout)
        assert again.share == 1.0 and again.worst == result.certificate.worst
        # the rule found carries the fast closed-form payment
        assert bind(result.params).closed_form_payment is not None


def test_budget_zero_search_that_ends_non_monotone_warns_and_says_so():
    """The issue's first case: a budget of 0 on the full family that does not reach a monotone rule
    (here: 2 steps from log-linear) returns with a warning and a failing certificate, never silently."""
    batch = dirichlet_auctions(**FITTED)
    holdout = dirichlet_auctions(**{**FITTED, "seed": 99})
    constraint = Constraint(objectives.violation, budget=0.0, penalty=20.0, multiplier_every=10)
    with pytest.warns(CertificateWarning, match=r"fails the strict certificate on the held-out .*monotone=True"):
        result = search(
            reverse_welfare, PowerMeanParams.log_linear(), batch, steps=2, constraint=constraint, holdout=holdout,
            progress=False,
        )  # fmt: skip
    assert not result.monotone and result.certificate.share < 1.0 and result.certified_on == "held-out"
    # without a holdout the fitted auctions certify (and the result says so)
    with pytest.warns(CertificateWarning, match="fitted"):
        fitted = search(
            reverse_welfare, PowerMeanParams.log_linear(), batch, steps=2, constraint=constraint, progress=False
        )
    assert fitted.certified_on == "fitted" and not fitted.monotone


def test_every_power_mean_search_carries_its_certificate_and_plain_searches_none():
    batch = dirichlet_auctions(1, 8, 2, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CertificateWarning)  # not asked for a monotone rule: no warning
        result = search(reverse_welfare, PowerMeanParams.create(rho=0.5), batch, steps=2, progress=False)
    assert result.certified_on == "fitted"
    assert result.certificate.share == certify_rule(result.params, batch).share
    plain = search(quadratic, START, steps=2, progress=False)
    assert plain.certificate is None and plain.certified_on is None and not plain.monotone


def test_monotone_search_refuses_what_it_cannot_keep():
    batch = dirichlet_auctions(1, 8, 2, 6)
    start = PowerMeanParams.create()
    with pytest.raises(ValueError, match="PowerMeanParams"):
        search(quadratic, START, steps=1, monotone=True, progress=False)
    with pytest.raises(ValueError, match=r"trainable trains \['rho'\]"):
        search(
            reverse_welfare, start, batch, steps=1, monotone=True, trainable=trainable_mask(("rho",)), progress=False
        )
    with pytest.raises(ValueError, match="contain 1"):
        search(
            reverse_welfare, start, batch, steps=1, monotone=True, bounds=Bounds.create(rho=(0.0, 0.5)), progress=False
        )
    with pytest.raises(ValueError, match="nothing to certify"):
        search(lambda params, data: params.gamma, start, {"x": jnp.zeros(3)}, steps=1, monotone=True, progress=False)
    with pytest.raises(ValueError, match="AuctionBatch"):
        search(reverse_welfare, start, batch, steps=1, holdout={"logits": 1}, progress=False)
