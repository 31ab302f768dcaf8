"""Auction generation and the command line on the bundled SmolLM2-135M-Instruct.

The reference for the model's own continuations is transformers + PyTorch, recorded once in
tests/fixtures/smollm2_reference.npz by experiments/record_model_fixture.py.
"""

import json

import numpy as np
import pytest
from models_conftest import bundled, reference

from jaxauction import cli
from jaxauction.generation import generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm():
    model, tokenizer, _ = bundled()
    return model, tokenizer


def test_lone_bidder_auction_writes_the_models_own_greedy_text(llm):
    """Bids (1, 0) and (0, 1): each auction is one agent's greedy decoding, and nobody pays."""
    ref = reference()
    prompts = [ref["prompt0_ids"].tolist(), ref["prompt4_ids"].tolist()]
    result = generate(prompts, [[1.0, 0.0], [0.0, 1.0]], decoding="greedy", max_new_tokens=12, model=llm)
    for auction, name in enumerate(("prompt0_greedy", "prompt4_greedy")):
        length = int(result.lengths[auction])
        np.testing.assert_array_equal(result.tokens[auction, :length], ref[name][:length])
    np.testing.assert_array_equal(result.payments, np.zeros((2, 2)))


def write_config(tmp_path, max_new_tokens=6):
    text = f"""
query = "Vacations in Hawaii"
decoding = "greedy"
max_new_tokens = {max_new_tokens}

[[advertisers]]
name = "Alpha Airlines"
bid = 2.0
prompt = "Write a short ad for {{query}} by {{name}}."

[[advertisers]]
name = "Beta Resort"
bid = 1.0
prompt = "Write a short ad for {{query}} by {{name}}."
"""
    path = tmp_path / "hawaii.toml"
    path.write_text(text)
    return path


def test_cli_run_prints_the_ad_and_writes_json(llm, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load_model", lambda source: llm)
    out = tmp_path / "run.json"
    assert cli.main(["run", str(write_config(tmp_path)), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["text"] and data["text"] in printed
    assert [a["name"] for a in data["advertisers"]] == ["Alpha Airlines", "Beta Resort"]
    assert len(data["tokens"]) == len(data["token_payments"]) <= 6
    total = np.sum(data["token_payments"], axis=0)
    np.testing.assert_allclose([a["payment"] for a in data["advertisers"]], total, rtol=1e-5)
    assert all(a["payment"] > 0 for a in data["advertisers"])  # both bid, both compete
    assert "Alpha Airlines" in printed and "payment" in printed


def test_cli_sweep_writes_plot_and_table(llm, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load_model", lambda source: llm)
    plot, out = tmp_path / "sweep.png", tmp_path / "sweep.json"
    argv = [
        "sweep",
        str(write_config(tmp_path, 4)),
        "--points",
        "3",
        "--rules",
        "linear",
        "--plot",
        str(plot),
        "--json",
        str(out),
    ]
    assert cli.main(argv) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(out.read_text())
    assert data["shares"] == [0.0, 0.5, 1.0] and len(data["points"]) == 3
    ends = [data["points"][0]["samples"][0]["payments"], data["points"][2]["samples"][0]["payments"]]
    assert ends[0] == {"Alpha Airlines": 0.0, "Beta Resort": 0.0}  # a lone bidder pays nothing
    assert ends[1] == {"Alpha Airlines": 0.0, "Beta Resort": 0.0}
    assert "share Alpha" in capsys.readouterr().out
