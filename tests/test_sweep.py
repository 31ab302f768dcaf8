"""The sweep's table (``format_table``), JSON (``SweepResult.to_json`` through ``write_json``), bid grid and
up-front checks, on hand-made results (no LLM needed). Expected outputs are written out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

import jaxauction.sweep
from jaxauction.config import parse_config
from jaxauction.outputs import write_json
from jaxauction.sweep import SweepResult, format_table, run_sweep, sweep_bids


def hand_made(dtype=np.float64) -> SweepResult:
    """Two rules, two points, two samples per point."""
    return SweepResult(
        names=["Alpha Airlines", "Beta Resort"],
        shares=np.array([0.0, 1.0]),
        bids=np.array([[0.0, 1.5], [1.5, 0.0]]),
        rules=["linear", "log_linear"],
        texts={
            "linear": [["Fly Beta.", "Stay at Beta."], ["Fly Alpha.", "Alpha and Beta."]],
            "log_linear": [["Beta.", "Nothing."], ["Alpha.", "Alpha!"]],
        },
        mentions={
            "linear": np.array([[[False, True], [False, True]], [[True, False], [True, True]]]),
            "log_linear": np.array([[[False, True], [False, False]], [[True, False], [True, False]]]),
        },
        payments={
            "linear": np.array([[[0.0, 0.25], [0.0, 0.125]], [[0.5, 0.0], [0.75, 0.0]]], dtype),
            "log_linear": np.array([[[0.0, 1.0], [0.0, 2.0]], [[3.0, 0.0], [0.0625, 0.0]]], dtype),
        },
        payment_kinds={"linear": "second_price", "log_linear": "kl"},
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_format_table_by_hand(dtype):
    lines = format_table(hand_made(dtype)).splitlines()
    header = "rule        share Alpha  mentions           pay Alpha    pay Beta  ad"
    assert lines[0] == header
    assert lines[1] == "-" * len(header)
    assert lines[2:] == [
        "linear             0.00  Beta                  0.0000      0.2500  Fly Beta.",
        "linear             0.00  Beta                  0.0000      0.1250  Stay at Beta.",
        "linear             1.00  Alpha                 0.5000      0.0000  Fly Alpha.",
        "linear             1.00  Alpha,Beta            0.7500      0.0000  Alpha and Beta.",
        "log_linear         0.00  Beta                  0.0000      1.0000  Beta.",
        "log_linear         0.00  -                     0.0000      2.0000  Nothing.",
        "log_linear         1.00  Alpha                 3.0000      0.0000  Alpha.",
        "log_linear         1.00  Alpha                 0.0625      0.0000  Alpha!",
    ]


def test_format_table_wraps_long_ads_under_the_ad_column():
    result = hand_made()
    result.texts["linear"][0][0] = "one two three four five six seven eight nine ten eleven twelve\nthirteen"
    lines = format_table(result, width=90).splitlines()
    indent = 10 + 1 + 12 + 2 + 16 + 2 * 12 + 2  # rule, share, mentions, two payments, gap
    assert lines[2].endswith("0.2500  one two three four five")  # max(20, 90 - 67) = 23 characters per line
    assert lines[3] == " " * indent + "six seven eight nine"
    assert lines[4] == " " * indent + "ten eleven twelve"
    assert lines[5] == " " * indent + "thirteen"
    assert lines[6].startswith("linear             0.00  Beta")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_to_json_written_through_write_json(tmp_path, dtype):
    path = write_json(tmp_path / "deep" / "sweep.json", hand_made(dtype).to_json())
    data = json.loads(path.read_text(encoding="utf-8"))
    alpha, beta = "Alpha Airlines", "Beta Resort"

    def sample(text, mentioned, paid):
        return {
            "text": text,
            "mentions": dict(zip((alpha, beta), mentioned)),
            "payments": dict(zip((alpha, beta), paid)),
        }

    assert data == {
        "names": [alpha, beta],
        "shares": [0.0, 1.0],
        "bids": [[0.0, 1.5], [1.5, 0.0]],
        "rules": ["linear", "log_linear"],
        "payment_kinds": {"linear": "second_price", "log_linear": "kl"},
        "points": [
            {
                "rule": "linear",
                "payment": "second_price",
                "share": 0.0,
                "bids": [0.0, 1.5],
                "samples": [
                    sample("Fly Beta.", [False, True], [0.0, 0.25]),
                    sample("Stay at Beta.", [False, True], [0.0, 0.125]),
                ],
            },
            {
                "rule": "linear",
                "payment": "second_price",
                "share": 1.0,
                "bids": [1.5, 0.0],
                "samples": [
                    sample("Fly Alpha.", [True, False], [0.5, 0.0]),
                    sample("Alpha and Beta.", [True, True], [0.75, 0.0]),
                ],
            },
            {
                "rule": "log_linear",
                "payment": "kl",
                "share": 0.0,
                "bids": [0.0, 1.5],
                "samples": [sample("Beta.", [False, True], [0.0, 1.0]), sample("Nothing.", [False, False], [0.0, 2.0])],
            },
            {
                "rule": "log_linear",
                "payment": "kl",
                "share": 1.0,
                "bids": [1.5, 0.0],
                "samples": [
                    sample("Alpha.", [True, False], [3.0, 0.0]),
                    sample("Alpha!", [True, False], [0.0625, 0.0]),
                ],
            },
        ],
    }
    assert [p.name for p in path.parent.iterdir()] == ["sweep.json"]  # no temporary file left


CONFIG = {
    "query": "q",
    "advertisers": [
        {"name": "A", "bid": 3.0, "prompt": "{query}"},
        {"name": "B", "bid": 1.0, "prompt": "{query}"},
        {"name": "C", "bid": 0.5, "prompt": "{query}"},
    ],
}


def test_sweep_bids_by_hand():
    shares, bids = sweep_bids(parse_config(CONFIG), 3)
    np.testing.assert_array_equal(shares, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(bids, [[0.0, 4.0, 0.5], [2.0, 2.0, 0.5], [4.0, 0.0, 0.5]])


def test_run_sweep_checks_decoding_and_arguments_before_generating(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("generate must not run")

    monkeypatch.setattr(jaxauction.sweep, "generate", never)
    two = {**CONFIG, "advertisers": CONFIG["advertisers"][:2], "decoding": "stable"}
    with pytest.raises(ValueError, match=r"rules: <config>: decoding 'stable' .* rule 'log_linear'"):
        run_sweep(parse_config(two), points=3, rules=["linear", "log_linear"], progress=False)
    with pytest.raises(ValueError, match="samples: expected a positive integer, got 2.5"):
        run_sweep(parse_config(CONFIG), samples=2.5, progress=False)
    with pytest.raises(ValueError, match="rules: expected a sequence of rule names"):
        run_sweep(parse_config(CONFIG), rules="linear", progress=False)
    with pytest.raises(ValueError, match="points: a sweep needs at least 2 points"):
        run_sweep(parse_config(CONFIG), points=1, progress=False)
