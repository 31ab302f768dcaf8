"""experiments/bench_payments.py on a tiny random Llama (the tiny_llama3 fixture with a longer context for
the chat prompts), 2 sweep points, 2 mixed queries, 2 tokens, run as a script (a subprocess: experiments/ is
not an API): every (rule, payment) pair of both workloads gets its seconds, its ratio to ``payment=None`` and
to the floors, the floors follow from the counts of the workload, and the profile and the host are there."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_quick_run_writes_every_pair_floor_and_profile(tiny_folder, tmp_path):
    out = tmp_path / "out" / "bench_payments.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    argv = ["--model", str(tiny_folder), "--points", "2", "--max-new-tokens", "2", "--mixed-limit", "2"]
    argv += ["--repeats", "1", "--floor-elements", "100000", "--floor-repeats", "2", "--profile-repeats", "1"]
    script = REPO / "experiments" / "bench_payments.py"
    done = subprocess.run(
        [sys.executable, str(script), *argv, "--json", str(out)], capture_output=True, text=True, env=env, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads(out.read_text())
    vocab, nodes = saved["vocab"], saved["quadrature_nodes"]
    pairs = {(c["workload"], c["rule"], c["payment"]) for c in saved["cases"]}
    assert pairs == {
        (w, r, p) for w in ("sweep", "mixed") for r in ("linear", "log_linear") for p in (None, "second_price", "kl")
    }
    mixed_agents = [
        len(json.loads(line)["prompts"])
        for line in (REPO / "experiments" / "configs" / "mixed_queries.jsonl").read_text().splitlines()[:2]
    ]
    for case in saved["cases"]:
        assert case["seconds_min"] > 0 and case["seconds_median"] >= case["seconds_min"]
        if case["payment"] is None:
            assert case["ratio_vs_none"] == 1.0
        assert case["ratio_vs_none"] == pytest.approx(
            case["seconds_median"] / (case["seconds_median"] - case["overhead_seconds"])
        )
        a, b = case["floors"]["a"], case["floors"]["b"]
        charged = 2 * 2 if case["workload"] == "sweep" else sum(mixed_agents)  # 2 auctions of 2 agents
        rows = charged if case["workload"] == "sweep" else charged + 2  # the mixed queries have a base prompt
        # floor (a): the method's exponentials per token and agent (closed forms 1; log-linear robust 21 Gauss-Kronrod
        # nodes and 42 more for up to one row in 8), the generic path's nodes for the rows without payments
        method = {"second_price": 21 * (1 + 2 / 8) if case["rule"] == "log_linear" else 1, "kl": 1, None: nodes}
        assert a["nodes"] == method[case["payment"]] and nodes == 80
        assert (
            a["exps_per_step"] == int(method[case["payment"]] * vocab * charged) and b["exps_per_step"] == vocab * rows
        )
        assert a["s_per_run"] == pytest.approx(a["exps_per_run"] * saved["exp_rate"]["jax_ns"] * 1e-9)
        assert a["s_per_run_every_auction_every_step"] == pytest.approx(a["ms_per_step"] * case["steps"] * 1e-3)
        assert case["overhead_vs_floor_a"] == pytest.approx(case["overhead_seconds"] / a["s_per_run"])
        assert 1 <= case["steps"] <= 2
    assert saved["exp_rate"]["jax_ns"] > 0 and saved["exp_rate"]["numpy_ns"] > 0
    host = saved["host"]
    assert host["cpu_model"] and host["cores"] >= 1 and len(host["load_average_end"]) == 3
    (profile,) = saved["profiles"]
    pieces = {r["piece"].strip() for r in profile["rows"]}
    assert {"auction program, payment None", "auction program, payment kl", "payments alone (kl)"} <= pieces
    assert all(r["ms_median"] > 0 for r in profile["rows"])
    assert "host: " in done.stdout and "load average" in done.stdout and "floor" in done.stdout
