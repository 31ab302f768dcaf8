"""experiments/bench_accelerator.py --tiny, run as a script (a subprocess: experiments/ is not an API):
it writes the JSON the accelerator check reports (bandwidth, decode speed against its floor per model
and capacity, compile times, loop overhead, simulate against its floor), and says which sizes ran."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tiny_run_writes_every_figure(tmp_path):
    path = tmp_path / "out" / "bench_accelerator.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    script = REPO / "experiments" / "bench_accelerator.py"
    done = subprocess.run(
        [sys.executable, str(script), "--tiny", "--repeats", "1", "--json", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(path.read_text())
    assert out["profile"] == "tiny" and out["backend"] == "cpu" and out["device_kind"]
    assert out["skipped"] == [] and out["capacities"] == [4]
    assert len(out["host"]["load_average_at_start"]) == 3 and len(out["host"]["load_average_at_end"]) == 3
    assert out["bandwidth"]["bytes_per_s"] > 0
    assert out["loop_overhead_per_token_s"] > 0
    assert set(out["models"]) == {"smollm2", "llama3_8b"}
    for model in out["models"].values():
        assert {"config", "parameters", "weight_bytes_read_per_step", "kv_bytes_per_row_token"} <= set(model)
        config = model["config"]
        assert (
            model["kv_bytes_per_row_token"]
            == 2 * config["num_layers"] * config["num_kv_heads"] * config["head_dim"] * 2
        )
        (case,) = model["decode"]
        assert case["capacity"] == 4 and case["auctions"] == 2
        for key in ("step_s", "tokens_per_s_per_auction", "floor_step_s", "share_of_floor", "first_call_s"):
            assert case[key] > 0, key
        assert (
            abs(case["tokens_per_s_aggregate"] - 2 * case["tokens_per_s_per_auction"])
            < 1e-6 * case["tokens_per_s_aggregate"]
        )
        assert (
            abs(case["floor_step_s"] * out["bandwidth"]["bytes_per_s"] - case["bytes_per_step"])
            < 1e-6 * case["bytes_per_step"]
        )
        assert isinstance(case["compile_s"], dict)
    # The first model compiled the engine's programs; the second (the same tiny shape) reused them.
    assert "_model_program" in out["models"]["smollm2"]["decode"][0]["compile_s"]
    sim = out["simulate"]
    assert sim["auctions"] == 64 and sim["auctions_per_s"] > 0 and 0 < sim["share_of_floor"]
    assert "device" in done.stdout and "of floor" in done.stdout and "load average" in done.stdout
