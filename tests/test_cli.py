"""The command line on bad input: exit status 2, one ``error:`` line, and no model loaded for anything that can
be checked before loading (configuration, options, output paths). No LLM is needed: ``cli.load_model`` is
replaced by a stub that records whether it was called."""

from __future__ import annotations

import json

import numpy as np
import pytest

import jaxauction.sweep
from jaxauction import cli
from jaxauction.sweep import SweepResult

CONFIG = """\
query = "Vacations in Hawaii"
{top}
[[advertisers]]
name = "Alpha Airlines"
bid = 1.0
prompt = "Ad for {{query}} by {{name}}."

[[advertisers]]
name = "Beta Resort"
bid = 0.5
prompt = "Ad for {{query}} by {{name}}."
"""


class ModelLoaded(RuntimeError):
    """Raised by the stub model loader: the command got past every up-front check."""


@pytest.fixture
def no_model(monkeypatch):
    calls = []

    def fail(source):
        calls.append(source)
        raise ModelLoaded("the model would load now")

    monkeypatch.setattr(cli, "load_model", fail)
    return calls


def write_config(tmp_path, top="", name="auction.toml", text=None):
    path = tmp_path / name
    path.write_text(CONFIG.format(top=top) if text is None else text)
    return path


def error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def fails(argv, capsys, *expected) -> str:
    assert cli.main([str(a) for a in argv]) == 2
    line = error_line(capsys)
    for text in expected:
        assert text in line, line
    return line


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_bad_output_paths_fail_before_the_model_loads(tmp_path, capsys, no_model, command):
    config = write_config(tmp_path)
    folder = tmp_path / "a folder"
    folder.mkdir()
    fails([command, config, "--json", ""], capsys, "--json", "empty")
    fails([command, config, "--json", folder], capsys, "--json", "is a folder")
    fails([command, config, "--json", config], capsys, "--json", "also an input")
    fails([command, config, "--json", config.parent / "." / config.name], capsys, "--json", "also an input")
    fails([command, config, "--json", config / "out.json"], capsys, "--json", "is a file, not a folder")
    fails([command, config, "--json", "/proc/jaxauction-test/out.json"], capsys, "--json", "cannot write")
    model_file = tmp_path / "model.gguf"
    model_file.write_bytes(b"GGUF")
    fails([command, config, "--model", model_file, "--json", model_file], capsys, "--json", "also an input")
    assert no_model == []
    assert config.read_text() == CONFIG.format(top="") and model_file.read_bytes() == b"GGUF"


def test_bad_plot_paths_fail_before_the_model_loads(tmp_path, capsys, no_model):
    config = write_config(tmp_path)
    out = tmp_path / "out"
    fails(["sweep", config, "--plot", out / "sw.txt", "--json", out / "sw.json"], capsys, "--plot", "'.txt'", ".png")
    fails(["sweep", config, "--plot", out / "sweep"], capsys, "--plot", "(none)")
    fails(["sweep", config, "--plot", ""], capsys, "--plot", "empty")
    fails(["sweep", config, "--plot", out / "x.png", "--json", out / "x.png"], capsys, "--plot", "another output")
    fails(["sweep", config, "--plot", config], capsys, "--plot", "also an input")
    assert no_model == [] and not out.exists()


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_good_output_paths_in_missing_folders_pass_the_checks(tmp_path, no_model, command):
    config = write_config(tmp_path)
    argv = [command, str(config), "--json", str(tmp_path / "new" / "deeper" / "r.json")]
    if command == "sweep":
        argv += ["--plot", str(tmp_path / "new" / "plot.PDF")]
    with pytest.raises(ModelLoaded):
        cli.main(argv)
    assert len(no_model) == 1
    assert not (tmp_path / "new").exists()  # the check creates nothing; the writer creates the folders


def hand_made_sweep() -> SweepResult:
    return SweepResult(
        names=["Alpha Airlines", "Beta Resort"],
        shares=np.array([0.0, 1.0]),
        bids=np.array([[0.0, 1.5], [1.5, 0.0]]),
        rules=["linear"],
        texts={"linear": [["Fly Beta."], ["Fly Alpha."]]},
        mentions={"linear": np.array([[[False, True]], [[True, False]]])},
        payments={"linear": np.array([[[0.0, 0.25]], [[0.5, 0.0]]])},
    )


def test_a_failing_plot_does_not_lose_the_json(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path)
    monkeypatch.setattr(cli, "load_model", lambda source: None)
    monkeypatch.setattr(jaxauction.sweep, "run_sweep", lambda config, **kwargs: hand_made_sweep())

    def broken_plot(result, path):
        raise OSError("disk full while saving the plot")

    monkeypatch.setattr(jaxauction.sweep, "plot_sweep", broken_plot)
    out = tmp_path / "out" / "sweep.json"
    assert cli.main(["sweep", str(config), "--json", str(out), "--plot", str(tmp_path / "sweep.png")]) == 2
    assert "disk full" in capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["names"] == ["Alpha Airlines", "Beta Resort"] and len(data["points"]) == 2


def test_sweep_with_stable_decoding_checks_every_rule_first(tmp_path, capsys, no_model):
    config = write_config(tmp_path, top='decoding = "stable"')
    line = fails(["sweep", config, "--points", "3"], capsys, "--rules", "decoding 'stable'", "rule 'log_linear'")
    assert str(config) in line
    with pytest.raises(ModelLoaded):  # the linear rule alone is a valid stable sweep
        cli.main(["sweep", str(config), "--rules", "linear", "--plot", str(tmp_path / "p.png")])
    three = CONFIG.format(top='decoding = "stable"') + '\n[[advertisers]]\nname = "Gamma"\nbid = 1.0\nprompt = "x"\n'
    fails(["run", write_config(tmp_path, text=three, name="three.toml")], capsys, "'decoding'", "3 agents")
    fails(["run", write_config(tmp_path, top='decoding = "stable"\nrule = "log_linear"', name="ll.toml")], capsys)
    assert len(no_model) == 1


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            lambda t: t.replace('"Ad for {query} by {name}."', '"Ad for {query by {name}."', 1),
            "'advertisers[0].prompt'",
        ),
        (lambda t: t.replace('name = "Beta Resort"', 'name = ""'), "'advertisers[1].name'"),
        (lambda t: t.replace("bid = 0.5", "bid = 1e300"), "'advertisers[1].bid'"),
        (lambda t: t.replace('query = "Vacations in Hawaii"', 'query = "x"\ntemperature = 1e-40'), "'temperature'"),
        (lambda t: t.replace('query = "Vacations in Hawaii"', 'query = "x"\nrule = "cubic"'), "'rule'"),
    ],
)
def test_bad_configs_fail_before_the_model_loads(tmp_path, capsys, no_model, edit, expected):
    config = write_config(tmp_path, text=edit(CONFIG.format(top="")))
    for command in ("run", "sweep"):
        fails([command, config], capsys, expected, f"{config}:")
    assert no_model == []


def test_non_utf8_config_names_the_file(tmp_path, capsys, no_model):
    path = tmp_path / "latin1.toml"
    path.write_bytes(CONFIG.format(top="").replace("Alpha", "Alph\u00e4").encode("latin-1"))
    fails(["run", path], capsys, str(path), "not UTF-8", "0xe4")
    assert no_model == []


def test_unknown_rule_option_lists_the_registry(tmp_path, capsys, no_model):
    from jaxauction import base

    line = fails(["sweep", write_config(tmp_path), "--rules", "linear,cubic"], capsys, "--rules", "cubic")
    assert str(list(base.rule_names())) in line
    assert no_model == []


def test_braces_in_prompts_reach_the_model_literally(tmp_path, monkeypatch):
    import jaxauction.engine

    text = CONFIG.format(top="").replace(
        '"Ad for {query} by {name}."', """'Reply as JSON like {"headline": "..."} for {query}; {foo} { {{name}}'""", 1
    )
    seen = []

    def fake_generate(prompts, bids, **kwargs):
        seen.append(prompts)
        raise ModelLoaded("stop before decoding")

    monkeypatch.setattr(cli, "load_model", lambda source: None)
    monkeypatch.setattr(jaxauction.engine, "generate", fake_generate)
    with pytest.raises(ModelLoaded):
        cli.main(["run", str(write_config(tmp_path, text=text))])
    [[alpha, beta]] = seen
    expected = 'Reply as JSON like {"headline": "..."} for Vacations in Hawaii; {foo} { {Alpha Airlines}'
    assert alpha == [{"role": "user", "content": expected}]
    assert beta == [{"role": "user", "content": "Ad for Vacations in Hawaii by Beta Resort."}]


def test_check_output_path_python_api(tmp_path):
    from jaxauction.outputs import check_output_path

    assert check_output_path("--out", None) is None
    target = tmp_path / "missing" / "Plot.SVG"
    assert check_output_path("--out", str(target), suffixes=(".svg",)) == target
    assert not target.parent.exists()
    with pytest.raises(ValueError, match=r"--out: expected a file path \(str or os.PathLike\), got int 3"):
        check_output_path("--out", 3)
    with pytest.raises(ValueError, match=r"--out: .* is also an input or another output"):
        check_output_path("--out", tmp_path / "a.json", inputs=[None, "", tmp_path / "x" / ".." / "a.json"])
