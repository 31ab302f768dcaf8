"""experiments/benchmark.py --quick on a tiny random Llama (the tiny_llama3 fixture with a longer context)."""

import dataclasses
import importlib.util
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

import jaxauction.models as jm

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "tiny_llama3"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "experiments" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny fixture model with a context long enough for the benchmark's chat prompts."""
    model, tokenizer = jm.load(FIXTURE)
    model.config = dataclasses.replace(model.config, max_position_embeddings=1024)
    return jm.export_hf(model, tokenizer, tmp_path_factory.mktemp("tiny") / "model")


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


def test_quick_run_writes_every_ad_of_every_mechanism(tiny_folder, tmp_path):
    """Two queries with two advertisers each (few shapes to compile), the --quick path otherwise."""
    bench = load_benchmark()
    out, plot, queries = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "queries.toml"
    queries.write_text(QUERIES)
    argv = ["--quick", "--query-file", str(queries), "--max-new-tokens", "3", "--candidates", "2"]
    argv += ["--model", str(tiny_folder), "--decoding", "greedy"]
    result = bench.main(argv + ["--json", str(out), "--plot", str(plot)])
    saved = json.loads(out.read_text())
    assert plot.stat().st_size > 0
    assert set(saved["ads"]) == set(bench.MECHANISMS)
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
    assert result["settings"]["queries"] == 2
    table = bench.format_table(result["summary"])
    assert all(m in table for m in bench.MECHANISMS)


def test_batched_runs_give_the_per_query_ads(tiny_folder):
    """One heterogeneous batch (2 and 3 advertisers) gives what per-query calls give with the same keys:
    the token auction against ``jaxauction.generate(prompts, bids [P, n], key=query key)`` (sampled, the
    certified power-mean rule, so padded agents meet a custom rule), the single winner against
    ``jaxauction.compare.single_winner`` (ads and payments)."""
    from jaxauction import compare, generate

    bench = load_benchmark()
    model = jm.load(tiny_folder)
    advertisers = [
        [{"name": "Alpha Air", "description": "an airline"}, {"name": "Beta Inn", "description": "a hotel"}],
        [{"name": "Gamma", "description": "a store"}, {"name": "Delta", "description": "a shop"}]
        + [{"name": "Epsilon", "description": "a brand"}],
    ]
    prompt_sets = [[bench.agent_prompt(q, a) for a in ads] for q, ads in zip(("Hawaii trips", "Shoes"), advertisers)]
    profiles = [np.array([[0.5, 0.5], [0.2, 0.8]]), np.array([[0.3, 0.3, 0.4], [0.6, 0.1, 0.3]])]
    rule, _ = bench.load_certified_rule(REPO / "experiments" / "configs" / "benchmark_certified_rule.toml")
    seed, common = 3, dict(max_new_tokens=3, model=model, decoding="sample")
    token_m, single_m = bench.MECHANISMS.index("token_certified"), bench.MECHANISMS.index("single_winner")
    batched = bench.run_token_auctions(
        prompt_sets,
        profiles,
        rule=rule,
        payment="second_price",
        keys=bench.auction_keys(seed, token_m, [2, 2]),
        **common,
    )
    singles = bench.run_single_winner(prompt_sets, profiles, keys=bench.auction_keys(seed, single_m, [2, 2]), **common)
    for q, (prompts, bids) in enumerate(zip(prompt_sets, profiles)):
        alone = generate(
            prompts, bids, rule=rule, payment="second_price", key=bench.query_key(seed, q, token_m), **common
        )
        ads, paid, valid = batched[q]
        assert ads == [list(map(int, t[:n])) for t, n in zip(alone.tokens, alone.lengths)] and valid.all()
        np.testing.assert_allclose(paid, alone.payments, rtol=1e-5, atol=1e-7)
        winner = compare.single_winner(prompts, bids, key=bench.query_key(seed, q, single_m), **common)
        ads, paid, valid = singles[q]
        assert ads == [list(map(int, t[:n])) for t, n in zip(winner.tokens, winner.lengths)] and valid.all()
        np.testing.assert_allclose(paid, winner.payments, rtol=1e-12)
