"""Auction generation and the command line on the bundled SmolLM2-135M-Instruct.

The reference for the model's own continuations is transformers + PyTorch, recorded once in
tests/fixtures/smollm2_reference.npz by experiments/record_model_fixture.py.
"""

import json

import numpy as np
import pytest
from models_conftest import bundled, reference

from jaxauction import cli
from jaxauction.engine import generate

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
    monkeypatch.setattr(cli, "load_model", lambda source: llm)
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
    monkeypatch.setattr(cli, "load_model", lambda source: llm)
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


LIMIT = "import resource; resource.setrlimit(resource.RLIMIT_AS, (10_000_000_000, 10_000_000_000))"
LIMITED_SWEEP = """
import json, resource, sys
import numpy as np
import jaxauction as ja
points = int(sys.argv[1])
bids = np.stack([np.linspace(0.0, 2.0, points), np.linspace(2.0, 0.0, points)], axis=1)
prompts = ["Write an ad for Alpha Airlines.", "Write an ad for Beta Resort."]
result = ja.generate(prompts, bids, decoding="greedy", max_new_tokens=2)
print(json.dumps({"shape": list(result.tokens.shape), "valid": bool(result.valid.all()),
                  "first": result.tokens[0].tolist(), "last": result.tokens[-1].tolist(),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def test_a_large_sweep_fits_a_10_gb_address_space_limit(llm):
    """``prlimit --as=10000000000``: the default memory budget shrinks to what the limit leaves, so a
    2,000-point sweep of two tokens (which once died allocating 2.6 GB) runs in chunks."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("JAXAUCTION_MEMORY_BUDGET", None)
    done = subprocess.run(
        [sys.executable, "-c", f"{LIMIT}\n{LIMITED_SWEEP}", "2000"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["shape"] == [2000, 2] and out["valid"], out
    prompts = ["Write an ad for Alpha Airlines.", "Write an ad for Beta Resort."]
    for bids, tokens in (([0.0, 2.0], out["first"]), ([2.0, 0.0], out["last"])):
        alone = generate(prompts, bids, decoding="greedy", max_new_tokens=2, model=llm)
        assert alone.tokens.tolist() == tokens
