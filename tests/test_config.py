"""Configuration parsing and the command line's handling of bad input (no model needed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxauction import cli
from jaxauction.config import ConfigError, load_config
from jaxauction.outputs import atomic_path, write_json

REPO = Path(__file__).resolve().parents[1]
HAWAII = REPO / "experiments" / "configs" / "hawaii.toml"
# GOOD charges second-price payments under the log-linear rule (the payment the rule does not justify):
# the PaymentWarning it gives is tested in tests/test_bad_input.py, and filtered here only.
pytestmark = pytest.mark.filterwarnings("ignore::jaxauction.mechanism.PaymentWarning")

GOOD = """\
query = "Vacations in Hawaii"
rule = "log_linear"
seed = 3

[[advertisers]]
name = "Alpha Airlines"
bid = 2
prompt = "Ad for {query} by {name}."
keywords = ["Alpha"]

[[advertisers]]
name = "Beta Resort"
bid = 0.5
prompt = "Ad for {query} by {name}."
example = "Relax at {name}."
"""


def write(tmp_path, text, name="auction.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_bundled_hawaii_config_parses():
    config = load_config(HAWAII)
    assert config.names == ["Alpha Airlines", "Beta Resort"]
    assert config.query == "Vacations in Hawaii"
    assert all(b > 0 for b in config.bids)


def test_good_config_fields_and_messages(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert config.rule == "log_linear" and config.seed == 3 and config.bids == [2.0, 0.5]
    alpha, beta = config.prompts()
    assert alpha == [{"role": "user", "content": "Ad for Vacations in Hawaii by Alpha Airlines."}]
    assert [m["role"] for m in beta] == ["user", "assistant", "user"]
    assert beta[1]["content"] == "Relax at Beta Resort."
    assert config.advertisers[0].mentioned_in("fly ALPHA today")
    assert not config.advertisers[0].mentioned_in("Beta Resort")
    assert config.advertisers[1].mentioned_in("stay at beta resort")


@pytest.mark.parametrize(
    "edit, field, line",
    [
        (lambda t: t.replace('rule = "log_linear"', 'rule = "quadratic"'), "rule", 2),
        (lambda t: t.replace("bid = 0.5", "bid = -1.0"), "advertisers[1].bid", 13),
        (lambda t: t.replace("bid = 2\n", 'bid = "two"\n'), "advertisers[0].bid", 7),
        (lambda t: t.replace('prompt = "Ad for {query} by {name}."\nkeywords', "keywords"), "advertisers[0].prompt", 5),
        (lambda t: t.replace("seed = 3", "sed = 3"), "sed", 3),
        (lambda t: t.replace('example = "Relax at {name}."', "example = 5"), "advertisers[1].example", 15),
    ],
)
def test_bad_fields_name_file_line_and_field(tmp_path, edit, field, line):
    path = write(tmp_path, edit(GOOD))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert f"{path}:{line}" in message, message
    assert f"'{field}'" in message, message


def test_no_advertisers_and_malformed_toml(tmp_path):
    with pytest.raises(ConfigError, match="no advertisers"):
        load_config(write(tmp_path, 'query = "x"\n'))
    with pytest.raises(ConfigError, match=r"broken\.toml:2: .*malformed TOML"):
        load_config(write(tmp_path, 'query = "x"\nrule = = 3\n', "broken.toml"))
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD.replace('rule = "log_linear"', 'rule = "quadratic"'), "unknown rule 'quadratic'"),
        (GOOD.replace("bid = 0.5", "bid = -1.0"), "must be a finite number >= 0"),
        ('query = "x"\n', "no advertisers"),
        ("query = [\n", "malformed TOML"),
    ],
)
def test_cli_reports_bad_input_without_traceback(tmp_path, capsys, text, expected):
    path = write(tmp_path, text)
    for argv in (["run", str(path)], ["sweep", str(path), "--points", "3"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and "Traceback" not in err


def test_cli_missing_file_and_bad_flags(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path / "nope.toml")]) == 2
    assert "no such file" in capsys.readouterr().err
    path = write(tmp_path, GOOD)
    assert cli.main(["sweep", str(path), "--rules", "linear,cubic"]) == 2
    assert "cubic" in capsys.readouterr().err
    assert cli.main(["sweep", str(path), "--points", "1"]) == 2
    assert "--points" in capsys.readouterr().err


def test_console_script_entry_point_runs_as_a_process(tmp_path):
    path = write(tmp_path, 'query = "x"\n')
    completed = subprocess.run(
        [sys.executable, "-m", "jaxauction.cli", "run", str(path)], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 2
    assert "no advertisers" in completed.stderr and "Traceback" not in completed.stderr


def test_atomic_write_leaves_nothing_on_interrupt(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as temporary:
            temporary.write_text('{"half": ')
            raise KeyboardInterrupt
    assert json.loads(target.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["out.json"]


# ---------------------------------------------------------------------------------------- placeholders, mentions, limits


@pytest.mark.parametrize(
    "template, expected",
    [
        ('Reply as JSON like {"headline": "..."} for {query}', 'Reply as JSON like {"headline": "..."} for Q'),
        ("{foo} and a lone { and }", "{foo} and a lone { and }"),
        ("{{query}} {{ {name}", "{Q} {{ N"),
        ("{Query} {names} {queryx}", "{Query} {names} {queryx}"),
        ("", ""),
    ],
)
def test_only_query_and_name_are_substituted(template, expected):
    from jaxauction.config import fill_placeholders, malformed_placeholder

    assert malformed_placeholder(template) is None
    assert fill_placeholders(template, query="Q", name="N") == expected


@pytest.mark.parametrize("bad", ["for {query", "{ query}", "{name }", "{query!r}", "{name:>10}", "{query.upper}"])
@pytest.mark.parametrize("field", ["prompt", "system", "example", "example_query"])
def test_malformed_placeholders_name_file_line_and_field(tmp_path, bad, field):
    if field == "prompt":
        text = GOOD.replace('prompt = "Ad for {query} by {name}."\nexample', f"prompt = {json.dumps(bad)}\nexample")
    elif field == "example":
        text = GOOD.replace('example = "Relax at {name}."', f"example = {json.dumps(bad)}")
    else:
        text = GOOD + f"{field} = {json.dumps(bad)}\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="malformed placeholder") as error:
        load_config(path)
    line = max(i for i, row in enumerate(text.splitlines(), 1) if row.startswith(f"{field} = ") and bad in row)
    assert f"{path}:{line}: field 'advertisers[1].{field}'" in str(error.value)


@pytest.mark.parametrize("field", ["system", "base_prompt"])
def test_malformed_top_level_placeholders(tmp_path, field):
    path = write(tmp_path, GOOD.replace("seed = 3", f'seed = 3\n{field} = "About {{query"'))
    with pytest.raises(ConfigError, match=rf"auction\.toml:4: field '{field}': malformed placeholder"):
        load_config(path)


def test_base_prompt_braces_are_literal(tmp_path):
    config = load_config(write(tmp_path, GOOD.replace("seed = 3", 'seed = 3\nbase_prompt = "{query} as {\\"a\\": 1}"')))
    assert config.base_messages() == [{"role": "user", "content": 'Vacations in Hawaii as {"a": 1}'}]


def test_advertiser_mentioned_in_uses_whole_words(tmp_path):
    alpha, beta = load_config(write(tmp_path, GOOD)).advertisers
    assert alpha.mentioned_in("Alpha flies") and not alpha.mentioned_in("Alphabet flies")
    assert beta.mentioned_in("beta resort!") and not beta.mentioned_in("Beta Resorts")


@pytest.mark.parametrize(
    "edit, field, message",
    [
        (lambda t: t.replace('name = "Beta Resort"', 'name = ""'), "advertisers[1].name", "name is empty"),
        (lambda t: t.replace('name = "Beta Resort"', 'name = "  "'), "advertisers[1].name", "name is empty"),
        (lambda t: t.replace("bid = 0.5", "bid = 1e300"), "advertisers[1].bid", r"at most 3\.40282e\+30"),
        (lambda t: t.replace("bid = 0.5", "bid = 1e31"), "advertisers[1].bid", r"at most 3\.40282e\+30"),
        (lambda t: t.replace("seed = 3", "seed = 3\nbase_bid = 1e300"), "base_bid", r"at most 3\.40282e\+30"),
        (lambda t: t.replace("seed = 3", "seed = 3\nbase_bid = nan"), "base_bid", "finite number"),
        (lambda t: t.replace("seed = 3", "seed = 3\ntemperature = 1e-40"), "temperature", "reciprocal"),
        (lambda t: t.replace("seed = 3", "seed = 3\ntemperature = 1e40"), "temperature", "reciprocal"),
        (lambda t: t.replace("seed = 3", 'seed = 3\ndecoding = "stable"'), "decoding", "rule 'log_linear'"),
    ],
)
def test_absurd_values_name_file_line_and_field(tmp_path, edit, field, message):
    text = edit(GOOD)
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as error:
        load_config(path)
    assert f"field '{field}'" in str(error.value) and f"{path}:" in str(error.value)
    key = field.split(".")[-1]
    if key != "decoding":
        rows = text.splitlines()
        line = max(i for i, row in enumerate(rows, 1) if row.startswith(f"{key} = "))
        assert f"{path}:{line}:" in str(error.value)


def test_the_largest_bid_and_extreme_temperatures_are_accepted(tmp_path):
    text = GOOD.replace("bid = 0.5", "bid = 1e30").replace("seed = 3", "seed = 3\ntemperature = 1e-30")
    config = load_config(write(tmp_path, text))
    assert config.bids[1] == 1e30 and config.temperature == 1e-30


def test_rule_names_come_from_the_one_registry(tmp_path):
    from jaxauction import base

    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, GOOD.replace('rule = "log_linear"', 'rule = "cubic"')))
    assert str(list(base.rule_names())) in str(error.value)
    for name in base.rule_names():
        assert load_config(write(tmp_path, GOOD.replace('rule = "log_linear"', f'rule = "{name}"'))).rule == name


def test_non_utf8_config_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(GOOD.replace("Beta Resort", "B\u00eata Resort").encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.toml:12: field '<file>': not UTF-8 text \(byte 0xea"):
        load_config(path)
