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
