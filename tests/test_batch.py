"""The JSONL batch command end to end on a tiny checkpoint folder (tests/fixtures/tiny_llama3)."""

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxauction import cli, models
from jaxauction.engine import Auction, generate

FOLDER = Path(__file__).parent / "fixtures" / "tiny_llama3"

LINES = [
    {"prompts": ["Tell me about Hawaii.", "Where should I travel?"], "bids": [1.0, 2.0], "names": ["Alpha", "Beta"]},
    {
        "prompts": ["Buy shoes.", [{"role": "user", "content": "Sell hats."}], [5, 6, 7]],
        "bids": [0.5, 0.2, 1.5],
        "base_prompt": "Be neutral.",
        "base_bid": 0.3,
    },
    {"prompts": ["Only one advertiser."], "bids": [3.0]},
]


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_batch_command_writes_one_result_per_line_in_order(tmp_path, capsys):
    source = write_lines(tmp_path / "auctions.jsonl", [LINES[0], LINES[1], "", LINES[2]])
    out = tmp_path / "results" / "out.jsonl"
    status = cli.main(
        [
            "batch",
            str(source),
            "--out",
            str(out),
            "--model",
            str(FOLDER),
            "--decoding",
            "greedy",
            "--max-new-tokens",
            "5",
            "--seed",
            "3",
            "--memory-budget",
            "64MB",
        ]
    )
    assert status == 0, capsys.readouterr().err
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in results] == [1, 2, 4]
    assert results[0]["names"] == ["Alpha", "Beta"] and results[2]["names"] == ["agent 0"]
    model = models.load(FOLDER)
    keys = jax.random.split(jax.random.key(3), 3)
    for k, (entry, result) in enumerate(zip([LINES[0], LINES[1], LINES[2]], results)):
        auction = Auction(entry["prompts"], entry["bids"], entry.get("base_prompt"), entry.get("base_bid", 0.0))
        alone = generate(auction, key=keys[k][None], decoding="greedy", max_new_tokens=5, model=model)
        assert result["valid"] and result["text"] == alone.text
        assert result["tokens"] == alone.tokens[: int(alone.lengths)].tolist()
        np.testing.assert_allclose(result["payments"], alone.payments, rtol=1e-5, atol=1e-8)
        assert len(result["payments"]) == len(entry["prompts"])


@pytest.mark.parametrize(
    "bad, match",
    [
        ("{not json", r"auctions.jsonl:2: not valid JSON"),
        ({"bids": [1.0]}, r"auctions.jsonl:2: missing field 'prompts'"),
        ({"prompts": ["a", "b"], "bids": [1.0]}, r"auctions.jsonl:2: bids: expected a list of 2 finite numbers"),
        ({"prompts": ["a"], "bids": ["1"]}, r"auctions.jsonl:2: bids: expected a list of 1 finite numbers"),
        ({"prompts": ["a"], "bids": [1.0], "names": [""]}, r"auctions.jsonl:2: names: expected a list of 1 non-empty"),
        ({"prompts": ["a"], "bids": [1.0], "base_bid": -1}, r"auctions.jsonl:2: base_bid: expected a finite number"),
        (
            {"prompts": [[{"text": "x"}]], "bids": [1.0]},
            r"auctions.jsonl:2: prompts\[0\]\[0\]: a chat message must be a dict",
        ),
        ({"prompts": ["a"], "bids": [1.0], "seed": 3}, r"auctions.jsonl:2: unknown field\(s\) \['seed'\]"),
        (
            {"prompts": ["a\ud800"], "bids": [1.0]},
            r"auctions.jsonl:2: prompts\[0\]: character 1 .*cannot be encoded as UTF-8",
        ),
        ({"prompts": ["  "], "bids": [1.0]}, r"auctions.jsonl:2: prompts\[0\]: a prompt must be a non-empty string"),
        ([1, 2], r"auctions.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_lines_are_reported_before_the_model_loads(tmp_path, capsys, bad, match):
    source = write_lines(tmp_path / "auctions.jsonl", [LINES[0], bad, LINES[2]])
    out = tmp_path / "out.jsonl"
    # A model path that does not exist: the input error must come first.
    status = cli.main(["batch", str(source), "--out", str(out), "--model", str(tmp_path / "no_model")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(match, err[0]), err[0]
    assert not out.exists()


def test_batch_options_are_checked_first(tmp_path, capsys):
    source = write_lines(tmp_path / "auctions.jsonl", [LINES[0]])
    for argv, match in [
        (["--out", str(source)], "--out: .* is also an input"),
        (["--out", str(tmp_path)], "--out: .*folder"),
        (["--out", str(tmp_path / "o.jsonl"), "--payment", "first"], "--payment: expected one of"),
        (["--out", str(tmp_path / "o.jsonl"), "--rule", "cubic"], "--rule: unknown rule 'cubic'"),
        (["--out", str(tmp_path / "o.jsonl"), "--memory-budget", "lots"], "--memory-budget: expected a positive size"),
    ]:
        status = cli.main(["batch", str(source), *argv, "--model", str(tmp_path / "no_model")])
        err = capsys.readouterr().err
        assert status == 2 and re.search(match, err), err
