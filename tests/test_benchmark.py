"""experiments/benchmark.py --quick on a tiny random Llama (the tiny_llama3 fixture with a longer context),
run as a script (a subprocess): experiments/ is not an API, so the tests only use its command line.

The library behaviour the script's batching relies on is tested with the library: one key split over a
prompt-form call's auctions (test_engine_request.py), a heterogeneous batch under a custom rule equal to
per-query calls (test_generation.py), the single winner's ads as one-agent auctions (test_compare.py).
"""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def test_query_file_has_enough_queries_and_advertisers():
    queries = tomllib.loads((REPO / "experiments" / "configs" / "benchmark_queries.toml").read_text())["query"]
    assert len(queries) >= 24
    assert all(2 <= len(q["advertisers"]) <= 4 for q in queries)
    names = [a["name"] for q in queries for a in q["advertisers"]]
    assert len(set(names)) == len(names)


QUERIES = """
[[query]]
text = "Vacations in Hawaii"
advertisers = [{ name = "Alpha Airlines", description = "an airline" }, { name = "Beta Resort", description = "a resort" }]

[[query]]
text = "Running shoes"
advertisers = [{ name = "Stridewell", description = "a shoe maker" }, { name = "Pace Lab", description = "a store" }]
"""


# The mechanisms the script runs by default (its --mechanisms choices).
MECHANISMS = ("token_linear", "token_log_linear", "token_certified", "reply", "single_winner", "token_learned")


def test_quick_run_writes_every_ad_of_every_mechanism(tiny_folder, tmp_path):
    """Two queries with two advertisers each (few shapes to compile), the --quick path otherwise."""
    out, plot, queries = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "queries.toml"
    queries.write_text(QUERIES)
    argv = ["--quick", "--query-file", str(queries), "--max-new-tokens", "3", "--candidates", "2"]
    argv += ["--model", str(tiny_folder), "--decoding", "greedy", "--json", str(out), "--plot", str(plot)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    script = str(REPO / "experiments" / "benchmark.py")
    done = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads(out.read_text())
    assert plot.stat().st_size > 0
    assert set(saved["ads"]) == set(MECHANISMS)
    for mechanism, ads in saved["ads"].items():
        assert len(ads) == 2 * 2  # 2 queries x 2 profiles
        for ad in ads:
            n = len(ad["names"])
            assert 2 <= n <= 4 and len(ad["values"]) == n and len(ad["mentioned"]) == n
            assert 1 <= ad["length"] <= 3 and all(z >= 0 for z in ad["payments"])
            np.testing.assert_allclose(ad["welfare"], np.dot(ad["bids"], ad["values"]), rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(ad["revenue"], sum(ad["payments"]), rtol=1e-9)
        assert saved["summary"][mechanism]["revenue"]["mean"] == pytest.approx(
            np.mean([np.mean([a["revenue"] for a in ads if a["query"] == q]) for q in (0, 1)])
        )
    # Single winner: the highest bidder pays the second bid per token; nobody else pays.
    for ad in saved["ads"]["single_winner"]:
        order = np.argsort(-np.asarray(ad["bids"]), kind="stable")
        want = np.zeros(len(ad["bids"]))
        want[order[0]] = ad["bids"][order[1]] * ad["length"]
        np.testing.assert_allclose(ad["payments"], want, rtol=1e-9)
    assert saved["settings"]["queries"] == 2
    table = done.stdout  # the summary table: one line per mechanism
    assert all(m in table for m in MECHANISMS)


def test_help_names_the_options():
    done = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "benchmark.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "--quick" in done.stdout and "--query-file" in done.stdout
