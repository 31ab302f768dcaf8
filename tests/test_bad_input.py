"""Issue 36's remaining kinds of bad input, each at its one validator and before any model work.

Accepted and ignored (a base bid without a base prompt, seeds outside the PRNG's range, a spec built
directly, a bool count, complex numbers), tracebacks instead of errors (integers of hundreds of
digits, nesting thousands deep, an unavailable JAX platform), checks that came only after the model
loaded (the command line is given a model path that does not exist: the input's error must come
first), validation cost linear in the configuration, and the payment each rule justifies.
No LLM is needed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import jaxauction
from jaxauction import _validation, batch, cli, mechanism, sweep
from jaxauction.config import ConfigError, load_config
from jaxauction.engine import request
from jaxauction.engine.request import Auction, GenerateOptions
from jaxauction.mechanism import MechanismSpec, PaymentWarning, SpecError

REPO = Path(__file__).resolve().parents[1]
BIG = int("1" + "0" * 400)  # an integer of 401 digits: float() overflows

CONFIG = """\
query = "Vacations in Hawaii"
{top}
[[advertisers]]
name = "Alpha Airlines"
bid = {bid}
prompt = "Ad for {{query}} by {{name}}."

[[advertisers]]
name = "Beta Resort"
bid = 0.5
prompt = "Ad for {{query}} by {{name}}."
"""


def write_config(tmp_path, top="", bid="1.0", name="auction.toml") -> Path:
    path = tmp_path / name
    path.write_text(CONFIG.format(top=top, bid=bid))
    return path


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def cli_error(argv, capsys) -> str:
    """Runs the command line; asserts exit status 2 and exactly one ``error:`` line; returns it."""
    status = cli.main([str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning:")]
    assert status == 2 and len(err) == 1 and err[0].startswith("error: "), (status, err)
    return err[0]


def no_model(tmp_path) -> list[str]:
    return ["--model", str(tmp_path / "no_model")]


# --- accepted and ignored ------------------------------------------------------------------------------


def test_toml_base_bid_without_base_prompt_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"field 'base_bid': 0\.5 without a base_prompt.*add base_prompt"):
        load_config(write_config(tmp_path, top="base_bid = 0.5"))
    assert load_config(write_config(tmp_path, top="base_bid = 0")).base_bid == 0.0
    config = load_config(write_config(tmp_path, top='base_bid = 0.5\nbase_prompt = "Ad for {query}"'))
    assert config.base_bid == 0.5


def test_jsonl_base_bid_without_base_prompt_is_reported_first(tmp_path, capsys):
    source = write_lines(tmp_path / "a.jsonl", [{"prompts": ["a", "b"], "bids": [1, 1], "base_bid": 0.5}])
    line = cli_error(["batch", source, "--out", tmp_path / "o.jsonl", *no_model(tmp_path)], capsys)
    assert "a.jsonl:1: base_bid: 0.5 without a base_prompt" in line


@pytest.mark.parametrize("form", ["prompts", "auctions"])
def test_generate_base_bid_without_base_prompt_is_refused(form):
    options = GenerateOptions.create()
    if form == "prompts":
        args, keywords, where = (["a", "b"], [1.0, 2.0]), dict(base_bid=0.5), ""
    else:
        args, keywords, where = ([Auction(["a", "b"], [1.0, 2.0], base_bid=0.5)], None), {}, r"auctions\[0\]\."
    with pytest.raises(ValueError, match=rf"^{where}base_bid: 0\.5 without a {where}base_prompt"):
        # tokenizer None: the check comes before any prompt is encoded
        request.encode_request(*args, key=None, tokenizer=None, options=options, vocab=8, **keywords)


@pytest.mark.parametrize("seed", [2**32, -1, 2**63, 10**30])
def test_seeds_outside_the_prngs_range_are_refused_at_every_door(tmp_path, capsys, seed):
    with pytest.raises(ValueError, match=r"^seed: expected an integer seed in \[0, 4294967295\]"):
        _validation.check_seed(seed)
    with pytest.raises(ConfigError, match=r"field 'seed': expected an integer seed in \[0, 4294967295\]"):
        load_config(write_config(tmp_path, top=f"seed = {seed}"))
    source = write_lines(tmp_path / "a.jsonl", [{"prompts": ["a", "b"], "bids": [1, 1]}])
    line = cli_error(["batch", source, "--out", tmp_path / "o.jsonl", "--seed", seed, *no_model(tmp_path)], capsys)
    assert line.startswith("error: --seed: expected an integer seed in [0, 4294967295]"), line
    with pytest.raises(ValueError, match=r"^seed: expected an integer seed"):
        batch.run_batch(source, tmp_path / "o.jsonl", seed=seed, model=lambda: pytest.fail("model loaded"))


def test_seeds_the_prng_tells_apart_are_accepted():
    assert _validation.check_seed(0) == 0 and _validation.check_seed(np.uint32(2**32 - 1)) == 2**32 - 1
    for bad in (True, 1.0, "3", None):
        with pytest.raises(ValueError, match="^seed: expected an integer seed"):
            _validation.check_seed(bad)


@pytest.mark.parametrize(
    "build, argument",
    [
        (lambda: GenerateOptions(payment="bogus"), "payment"),
        (lambda: MechanismSpec(payment="bogus"), "payment"),
        (lambda: MechanismSpec(decoding="beam"), "decoding"),
        (lambda: MechanismSpec(temperature=0.0), "temperature"),
        (lambda: MechanismSpec(temperature="1"), "temperature"),
        (lambda: MechanismSpec(rule="cubic"), "rule"),
        (lambda: MechanismSpec(rule=lambda logits, bids: logits[..., 0, :], payment="kl"), "payment"),
        (lambda: GenerateOptions(max_new_tokens=0), "max_new_tokens"),
        (lambda: GenerateOptions(max_new_tokens=True), "max_new_tokens"),
    ],
)
def test_specs_built_directly_are_checked(build, argument):
    with pytest.raises(SpecError) as caught:
        build()
    assert caught.value.argument == argument


def test_specs_built_directly_stay_hashable_and_resolved():
    spec = GenerateOptions("log_linear", "kl", "greedy", 2, np.int64(5))
    assert spec.rule is jaxauction.log_linear and spec.temperature == 2.0 and type(spec.max_new_tokens) is int
    assert hash(spec) == hash(GenerateOptions.create("log_linear", "kl", "greedy", 2.0, 5))
    assert spec == GenerateOptions.create("log_linear", "kl", "greedy", 2.0, 5)


def test_reply_num_candidates_bool_is_refused_before_the_model():
    for bad in (True, False, 2.0, "8"):
        with pytest.raises(ValueError, match=r"^num_candidates: expected a positive integer"):
            jaxauction.reply.auction(["a", "b"], [1.0, 1.0], base_prompt="q", num_candidates=bad, model="no model")
    with pytest.raises(ValueError, match=r"^tau: expected a finite number > 0; got str"):
        jaxauction.reply.auction(["a", "b"], [1.0, 1.0], base_prompt="q", tau="1", model="no model")
    with pytest.raises(ValueError, match=r"^max_new_tokens: expected a positive integer"):
        jaxauction.reply.auction(["a", "b"], [1.0, 1.0], base_prompt="q", max_new_tokens=0, model="no model")


def test_complex_bids_and_logits_are_refused():
    logits, bids = np.log(np.full((2, 3), 1 / 3)), np.array([1.0, 2.0])
    cases = [
        (lambda: jaxauction.TokenAuction()(logits.astype(complex), bids), "TokenAuction: logits has the complex"),
        (lambda: jaxauction.TokenAuction()(logits, bids + 0j), "TokenAuction: bids has the complex"),
        (
            lambda: jaxauction.TokenAuction(base_logits=jnp.zeros(3, jnp.complex64), base_bid=1.0)(logits, bids),
            "base_logits has the complex",
        ),
        (lambda: jaxauction.payments.second_price(jaxauction.linear, logits, bids * 1j), "bids has the complex"),
        (lambda: jaxauction.payments.linear_closed_form(logits + 0j, bids), "logits has the complex"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


# --- tracebacks instead of errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "top, bid, field",
    [("", str(BIG), "advertisers[0].bid"), (f'base_prompt = "x"\nbase_bid = {BIG}', "1.0", "base_bid")],
)
def test_toml_integers_of_hundreds_of_digits_are_errors(tmp_path, capsys, top, bid, field):
    path = write_config(tmp_path, top=top, bid=bid)
    with pytest.raises(ConfigError, match=rf"field '{re.escape(field)}': the integer of 401 digits is too large; give"):
        load_config(path)
    cli_error(["run", path, *no_model(tmp_path)], capsys)


@pytest.mark.parametrize(
    "line, match",
    [
        ({"prompts": ["a", "b"], "bids": [BIG, 1]}, r"bids: expected a list of 2 finite numbers in \[0, "),
        ({"prompts": ["a", "b"], "bids": [1, 1], "base_prompt": "x", "base_bid": BIG}, r"base_bid: expected a finite"),
        ('{"prompts": ' + "[" * 100_000 + "]" * 100_000 + ', "bids": [1]}', "JSON nested too deeply"),
    ],
)
def test_jsonl_huge_numbers_and_deep_nesting_are_errors(tmp_path, capsys, line, match):
    source = write_lines(tmp_path / "a.jsonl", [line])
    message = cli_error(["batch", source, "--out", tmp_path / "o.jsonl", *no_model(tmp_path)], capsys)
    assert "a.jsonl:1: " in message and len(message) < 400, message
    assert re.search(match, message), message


@pytest.mark.parametrize("text", ["a = " + "[" * 5000 + "]" * 5000, "a = " + "{b = " * 3000 + "1" + "}" * 3000])
def test_toml_nested_thousands_deep_is_an_error(tmp_path, capsys, text):
    path = tmp_path / "deep.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(path)
    cli_error(["run", path, *no_model(tmp_path)], capsys)


def _jax_platform_run(tmp_path, platform: str) -> subprocess.CompletedProcess:
    config = write_config(tmp_path)
    env = {**os.environ, "JAX_PLATFORMS": platform, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "jaxauction", "run", str(config), "--model", str(tmp_path / "no_model")]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("platform", ["cuda", "no_such_platform"])
def test_an_unavailable_jax_platform_is_one_error_line(tmp_path, platform):
    if platform == "cuda":
        probe = "import jax, sys; sys.exit(0 if any(d.platform == 'gpu' for d in jax.devices()) else 1)"
        if subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0:
            pytest.skip("this machine has a GPU: JAX_PLATFORMS=cuda is available")
    done = _jax_platform_run(tmp_path, platform)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: JAX_PLATFORMS='{platform}': JAX cannot start"), lines
    assert "JAX_PLATFORMS=cpu" in lines[0] and "Traceback" not in done.stderr


# --- checked before the model loads --------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, match",
    [
        ({"prompts": ["a", "b"], "bids": [1e35, 1]}, r"bids: expected a list of 2 finite numbers in \[0, 3\.4e\+30\]"),
        ({"prompts": ["a", "b"], "bids": [1, 1], "names": ["\ud800", "b"]}, r"names\[0\]: .*lone UTF-16 surrogate"),
        ({"prompts": ["a", "b"], "bids": [1, 1], "base_prompt": "x", "base_bid": 1e35}, r"base_bid: expected a"),
    ],
)
def test_jsonl_values_generate_refuses_are_reported_before_the_model_loads(tmp_path, capsys, line, match):
    source = tmp_path / "a.jsonl"
    source.write_text(json.dumps(line) + "\n")
    out = tmp_path / "o.jsonl"
    message = cli_error(["batch", source, "--out", out, *no_model(tmp_path)], capsys)
    assert re.search(match, message), message
    assert not out.exists()


@pytest.mark.parametrize("command", ["run", "sweep", "batch"])
def test_memory_budget_variable_is_checked_before_the_model_loads(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setenv("JAXAUCTION_MEMORY_BUDGET", "lots")
    source = write_lines(tmp_path / "a.jsonl", [{"prompts": ["a", "b"], "bids": [1, 1]}])
    argv = {
        "run": ["run", write_config(tmp_path)],
        "sweep": ["sweep", write_config(tmp_path), "--points", "2", "--plot", tmp_path / "s.png"],
        "batch": ["batch", source, "--out", tmp_path / "o.jsonl"],
    }[command]
    line = cli_error([*argv, *no_model(tmp_path)], capsys)
    assert line.startswith("error: JAXAUCTION_MEMORY_BUDGET: expected a positive size"), line


@pytest.mark.parametrize(
    "top, match",
    [
        ("seed = 4294967296", "field 'seed'"),
        ("temperature = 0", "field 'temperature'"),
        ('decoding = "stable"\nbase_prompt = "x"', "a base prompt"),
        ("base_bid = 2.0", "field 'base_bid'"),
    ],
)
@pytest.mark.parametrize("command", ["run", "sweep"])
def test_configuration_errors_come_before_the_model(tmp_path, capsys, top, match, command):
    extra = ["--points", "2", "--plot", tmp_path / "s.png"] if command == "sweep" else []
    line = cli_error([command, write_config(tmp_path, top=top), *extra, *no_model(tmp_path)], capsys)
    assert match in line, line


# --- cost in proportion --------------------------------------------------------------------------------


def _advertisers_toml(count: int) -> str:
    tables = "".join(
        f'\n[[advertisers]]\nname = "Advertiser {i}"\nbid = {1 + i % 7}\nprompt = "Ad for {{query}} by {{name}}."\n'
        f'keywords = ["A{i}"]\n'
        for i in range(count)
    )
    return f'query = "q"\nseed = 1\n{tables}'


def _validation_seconds(tmp_path, count: int) -> float:
    path = tmp_path / f"many{count}.toml"
    path.write_text(_advertisers_toml(count))
    best = float("inf")
    for _ in range(5):  # the best of five: other processes on the machine only ever add time
        start = time.perf_counter()
        config = load_config(path)
        best = min(best, time.perf_counter() - start)
    assert len(config.advertisers) == count
    return best


def test_configuration_validation_is_linear_in_the_advertisers(tmp_path):
    small, large = _validation_seconds(tmp_path, 1000), _validation_seconds(tmp_path, 4000)
    assert large < 8 * small, f"1000 advertisers: {small:.3f} s, 4000: {large:.3f} s (quadratic: 16x)"


def test_errors_in_a_large_configuration_name_the_line(tmp_path):
    text = _advertisers_toml(3000).replace('name = "Advertiser 2500"', 'name = "Advertiser 2500"\ncolour = "red"')
    path = tmp_path / "many.toml"
    path.write_text(text)
    expected = text.splitlines().index('colour = "red"') + 1
    with pytest.raises(ConfigError, match=rf"many\.toml:{expected}: field 'advertisers\[2500\]\.colour'"):
        load_config(path)


# --- payments a rule justifies -------------------------------------------------------------------------


def test_second_price_under_a_non_monotone_rule_warns_once_at_the_boundary():
    with pytest.warns(PaymentWarning, match=r"rule 'log_linear' is not monotone.*use payment 'kl'") as caught:
        GenerateOptions.create(rule="log_linear", payment="second_price")
    assert len(caught) == 1 and issubclass(PaymentWarning, UserWarning)
    with pytest.warns(PaymentWarning, match="rule 'log_linear'"):
        MechanismSpec.create(rule=jaxauction.log_linear)
    user_rule = lambda logits, bids: jaxauction.linear(logits, bids)  # noqa: E731 - a plain function, not a Rule
    with pytest.warns(PaymentWarning, match=r"rule '<lambda>'.*payment None, or a jaxauction\.base\.Rule"):
        MechanismSpec.create(rule=user_rule)


@pytest.mark.parametrize(
    "rule, payment", [("linear", "second_price"), ("log_linear", "kl"), ("log_linear", None), ("linear", "kl")]
)
def test_justified_payments_do_not_warn(rule, payment):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PaymentWarning)
        spec = MechanismSpec.create(rule=rule, payment=payment)
    assert mechanism.payment_problem(spec.rule, spec.payment) is None


def test_the_warning_is_not_issued_inside_jit():
    import jax

    logits, bids = jnp.log(jnp.full((2, 4), 0.25)), jnp.array([1.0, 2.0])
    auction = jaxauction.TokenAuction(rule="log_linear", payment="kl")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PaymentWarning)
        jax.jit(lambda l, b: auction(l, b).payments)(logits, bids)
    assert mechanism.justified_payment(jaxauction.linear) == "second_price"
    assert mechanism.justified_payment(jaxauction.log_linear) == "kl"


def test_the_sweep_charges_each_rule_its_justified_payment(tmp_path, monkeypatch):
    calls = []

    class Fake:
        def __init__(self, count):
            self.texts = ["Alpha Airlines"] * count
            self.payments = np.zeros((count, 2))

    def fake_generate(prompts, bids, **options):
        calls.append(options)
        return Fake(len(bids))

    monkeypatch.setattr(sweep, "generate", fake_generate)
    config = load_config(write_config(tmp_path))
    assert config.payment == "second_price"
    with warnings.catch_warnings():
        warnings.simplefilter("error", PaymentWarning)
        result = sweep.run_sweep(config, points=2, model=None, progress=False)
    assert [(c["rule"], c["payment"]) for c in calls] == [("linear", "second_price"), ("log_linear", "kl")]
    assert result.payment_kinds == {"linear": "second_price", "log_linear": "kl"}
    assert sweep.payment_note(result).endswith("linear: second_price, log_linear: kl")
    assert {p["rule"]: p["payment"] for p in result.to_json()["points"]} == result.payment_kinds
    none = load_config(write_config(tmp_path, top='payment = "none"', name="none.toml"))
    assert sweep.rule_config(none, "log_linear").payment is None


def test_the_demo_charges_log_linear_kl(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import hawaii_ads
    finally:
        sys.path.remove(str(REPO / "experiments"))
    charged = []

    def fake_run_sweep(config, *, points, samples=1, rules=("linear", "log_linear"), model=None, progress=True):
        kinds = {rule: sweep.rule_config(config, rule).payment for rule in rules}
        charged.append(kinds)
        return sweep.SweepResult(
            names=config.names,
            shares=np.linspace(0, 1, points),
            bids=np.ones((points, 2)),
            rules=list(rules),
            texts={r: [["ad"] * samples for _ in range(points)] for r in rules},
            mentions={r: np.zeros((points, samples, 2), bool) for r in rules},
            payments={r: np.zeros((points, samples, 2)) for r in rules},
            payment_kinds=kinds,
        )

    monkeypatch.setattr(jaxauction.models, "load", lambda source=None: None)
    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    monkeypatch.setattr(sweep, "plot_sweep", lambda result, path: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PaymentWarning)
        assert (
            hawaii_ads.main(["--points", "2", "--sampled", "2", "--sampled-points", "2", "--out", str(tmp_path)]) == 0
        )
    assert charged == [{"linear": "second_price", "log_linear": "kl"}] * 2
    assert "payments (the one each rule justifies): linear: second_price, log_linear: kl" in capsys.readouterr().out


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: jaxauction.payments.second_price(jaxauction.linear, np.zeros((2, 3)), "1,2"), "^second_price: bids"),
        (lambda: jaxauction.payments.second_price(jaxauction.linear, "x", [1.0, 2.0]), "^second_price: logits"),
        (lambda: jaxauction.TokenAuction()(np.zeros((2, 3)), np.array([True, False])), "^TokenAuction: bids"),
        (lambda: jaxauction.aggregation.linear(np.zeros((2, 3)), "ab"), "^linear: bids"),
        (lambda: jaxauction.preferences.certify(jaxauction.linear, np.zeros((2, 3)), "b"), "^certify: bids"),
        (lambda: jaxauction.payments.max_bid("float32x"), "^dtype: expected a floating dtype"),
        (lambda: jaxauction.payments.Quadrature("8"), "^Quadrature: order: expected an integer"),
        (
            lambda: jaxauction.payments.second_price(jaxauction.log_linear, np.zeros((2, 3)), [1, 2], quadrature=8),
            "^second_price: quadrature: expected a jaxauction.payments.Quadrature",
        ),
        (
            lambda: jaxauction.TokenAuction(rule="log_linear", payment="kl", quadrature="x")(np.zeros((2, 3)), [1, 2]),
            "^TokenAuction: quadrature: expected",
        ),
        (lambda: jaxauction.payments.Quadrature(body_ratio="1"), "^Quadrature: body_ratio: expected a real number"),
        (lambda: jaxauction.design.dirichlet_auctions("0", 8, 3, 16), "^seed: expected an integer >= 0"),
        (lambda: jaxauction.design.dirichlet_auctions(0, 8, 3.5, 16), "^num_agents: expected an integer >= 1"),
        (lambda: jaxauction.design.dirichlet_auctions(0, 8, 3, 16, concentration="1"), "^concentration: expected"),
        (lambda: jaxauction.design.PowerMeanParams.create(rho="1"), "^rho: expected a real number"),
        (lambda: jaxauction.engine.parse_memory_budget(BIG), "^memory_budget: .* an integer of 401 digits"),
        (lambda: GenerateOptions.create(temperature=BIG), "^temperature: .* an integer of 401 digits"),
    ],
)
def test_strings_and_odd_values_where_numbers_belong_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_a_rule_swept_twice_is_refused(tmp_path, capsys):
    line = cli_error(["sweep", write_config(tmp_path), "--rules", "linear,linear", *no_model(tmp_path)], capsys)
    assert line.startswith("error: --rules: rule(s) ['linear'] given twice"), line


def test_a_byte_order_mark_is_not_a_syntax_error(tmp_path):
    path = write_config(tmp_path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_config(path).names == ["Alpha Airlines", "Beta Resort"]
    source = tmp_path / "a.jsonl"
    source.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompts": ["a", "b"], "bids": [1, 2]}).encode() + b"\r\n")
    assert [line.bids for line in batch.read_auctions(source)] == [[1.0, 2.0]]


def test_the_payment_warning_comes_after_the_input_is_valid(tmp_path, capsys):
    # an invalid configuration: one error line, no warning before it
    config = write_config(tmp_path, top='rule = "log_linear"\ndecoding = "stable"')
    status = cli.main(["run", str(config), *no_model(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error: "), err
    with pytest.warns(PaymentWarning, match="rule 'log_linear'"):
        load_config(write_config(tmp_path, top='rule = "log_linear"', name="ll.toml"))


def test_the_command_line_prints_the_payment_warning_as_one_line(tmp_path):
    config = write_config(tmp_path, top='rule = "log_linear"')
    command = [sys.executable, "-m", "jaxauction", "run", str(config), "--model", str(tmp_path / "no_model")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 2, done.stderr
    assert lines[0].startswith("warning: payment 'second_price' with rule 'log_linear'") and "'kl'" in lines[0]
    assert lines[1].startswith("error: ") and "no_model" in lines[1]


def test_a_checkpoint_under_a_file_is_refused_before_the_search_runs(tmp_path):
    from jaxauction import design

    (tmp_path / "a file").write_text("")
    data = design.dirichlet_auctions(0, 4, 2, 8)
    params = design.PowerMeanParams.create()
    with pytest.raises(ValueError, match=r"^checkpoint: cannot write .*a file is a file, not a folder"):
        design.search(design.revenue, params, data, steps=2, checkpoint=tmp_path / "a file" / "s.npz", progress=False)
    with pytest.raises(ValueError, match=r"^checkpoint: .* is a folder"):
        design.search(design.revenue, params, data, steps=2, checkpoint=tmp_path, progress=False)


@pytest.mark.parametrize("seed", [2**32, -1, "0"])
def test_a_search_seed_outside_the_prngs_range_is_refused(seed):
    from jaxauction import design

    data = design.dirichlet_auctions(0, 4, 2, 8)
    with pytest.raises(ValueError, match=r"^seed: expected an integer seed in \[0, 4294967295\]"):
        design.search(design.revenue, design.PowerMeanParams.create(), data, steps=1, seed=seed, progress=False)


def test_a_replaced_configuration_is_checked_as_a_loaded_one(tmp_path):
    config = load_config(write_config(tmp_path))
    with pytest.raises(ValueError, match=r"^seed: expected an integer seed"):
        config.replace(seed=2**32)
    with pytest.raises(ValueError, match=r"^base_bid: 0\.5 without a base_prompt"):
        config.replace(base_bid=0.5)
    assert config.replace(base_bid=0.5, base_prompt="Ad for {query}").base_bid == 0.5


def test_a_mechanism_base_bid_without_base_logits_is_refused():
    logits, bids = np.zeros((2, 3)), np.array([1.0, 2.0])
    with pytest.raises(ValueError, match=r"^TokenAuction: base_bid: 0\.5 without a base_logits"):
        jaxauction.TokenAuction(base_bid=0.5)(logits, bids)
    with pytest.raises(ValueError, match=r"^TokenAuction: base_bid: nonzero values without a base_logits"):
        jaxauction.TokenAuction(base_bid=np.array([0.0, 1.0]))(logits, bids)
    jaxauction.TokenAuction(base_bid=0.0)(logits, bids)  # zero: nothing ignored
