"""The accelerator check: decode speed against the memory-bandwidth floor, on whatever device JAX finds.

    python experiments/bench_accelerator.py --json outputs/bench_accelerator.json          # GPU/TPU: full sizes
    python experiments/bench_accelerator.py --quick --json outputs/bench_accelerator.json  # CPU sizes (auto on CPU)
    python experiments/bench_accelerator.py --tiny                                         # seconds (the test)

Everything goes through the public API: random-weight ``jaxauction.models.Llama(LlamaConfig(...),
dtype=jnp.bfloat16, rngs=...)``, ``jaxauction.generate`` (greedy, linear rule, second-price payments)
and ``jaxauction.simulation.simulate``. Measured:

* **copy bandwidth**: a jitted ``x + 1`` over a large bfloat16 array (``--copy-mb``, 2 GiB on an
  accelerator) reads and writes it once: bandwidth = 2 x bytes / best time. This is the floor's
  denominator (on an H100 SXM about 3.0 of the nominal 3.35 TB/s).
* **decode** for a SmolLM2-135M-shaped and a Llama-3-8B-shaped model at 4, 64 and 256 cache rows
  (``capacity/2`` auctions of 2 agents with distinct random prompts, so every row is live every step,
  and no EOS token, so every auction runs to the end). A decode step's time is the difference of two
  ``generate`` calls that share their compiled programs (``max_new_tokens`` ``8k + 1`` and ``8k + 8``:
  the same token slots) over their 7 extra tokens, best of ``--repeats``: prefill and the host's
  result handling cancel. Per auction: 1 token per step; aggregate: auctions per step.
  Floor: the bytes one step must read (the layers' weights and the ``[D, V]`` LM head, plus the KV
  cache at the current length: ``2 L K hd`` x 2 bytes per row and token) over the copy bandwidth;
  ``share_of_floor = floor / step``: 1.0 is the memory-bound ideal.
* **compile seconds** of each engine program (``jaxauction.engine.runtime.compile_seconds``) for the
  first call of every capacity, with the persistent compilation cache off.
* **loop overhead per token**: the step time of a 1-layer, 64-wide model at 4 rows, where the model and
  auction programs take microseconds: what the engine's host loop costs per token (an upper bound).
* **simulate**: auctions/s over ``[K, 2, V]`` float32 logits (V = SmolLM2's 49152), against its floor:
  each auction reads its ``2 V`` logits once (``2 V`` x 4 bytes over the copy bandwidth); chunks of
  2048 auctions on an accelerator, the default 256 elsewhere.

Sizes: full on an accelerator; on a CPU (or with ``--quick``) both shapes shrink (fewer layers, the 8B
narrower and with a smaller vocabulary) and the capacities become 4, 16 and 64; ``--tiny`` shrinks
everything to run in seconds (both models then take the 1-layer overhead model's shape). The JSON's ``profile`` and each model's ``config`` say what ran. The
whole run stops starting new cases past ``--max-seconds`` (default 420: at most 7 minutes) and lists
the cases it skipped. Prints a table, the device kind and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAXAUCTION_CACHE_DIR", "off")  # compile times are measured, not loaded from disk

import hostinfo  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import jaxauction as ja  # noqa: E402
from jaxauction import simulation  # noqa: E402
from jaxauction.engine import runtime  # noqa: E402
from jaxauction.models import Llama, LlamaConfig  # noqa: E402

SMOLLM2 = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
    head_dim=64, max_position_embeddings=8192, rope_theta=100_000.0, tie_word_embeddings=True,
)  # fmt: skip
LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
    head_dim=128, max_position_embeddings=8192, rope_theta=500_000.0, tie_word_embeddings=False,
)  # fmt: skip
OVERHEAD = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4, num_kv_heads=2,
    head_dim=16, max_position_embeddings=512,
)  # fmt: skip

# Per profile: each shape's overrides, the capacities (cache rows), the prompt length, the decode
# window (max_new_tokens 8k+1 and 8k+8), the auctions of simulate and its logits sets, the copy size.
PROFILES = {
    "full": dict(
        smollm2={}, llama3_8b={}, capacities=(4, 64, 256), prompt=32, window=3, sim_auctions=16384, sim_sets=64, sim_chunk=2048,
        copy_mb=2048,
    ),
    "quick": dict(
        smollm2=dict(num_layers=4),
        llama3_8b=dict(num_layers=1, hidden_size=1024, intermediate_size=3584, num_heads=8, num_kv_heads=2,
                       vocab_size=16384),
        capacities=(4, 16, 64), prompt=16, window=1, sim_auctions=1024, sim_sets=16, copy_mb=256,
    ),
    # The plumbing only (the test): both models take the overhead model's shape, so one set of
    # programs compiles and the run takes seconds.
    "tiny": dict(
        smollm2=None, llama3_8b=None, capacities=(4,), prompt=8, window=0, sim_auctions=64, sim_sets=4,
        sim_vocab=512, copy_mb=16,
    ),
}  # fmt: skip


class RandomTokenizer:
    """The tokenizer protocol ``generate`` needs, with no EOS token: every auction runs to the end."""

    pad_token_id, eos_token_id = 0, None

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __len__(self):
        return self.vocab

    def decode(self, ids, skip_special_tokens=True):
        return ""


def copy_bandwidth(megabytes: int, repeats: int = 5) -> dict:
    """Bytes per second of a jitted ``x + 1`` over ``megabytes`` MiB of bfloat16 (read once, written once)."""
    x = jnp.zeros((megabytes * 2**20 // 2,), jnp.bfloat16)
    step = jax.jit(lambda a: a + jnp.bfloat16(1))
    step(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return {"megabytes": megabytes, "seconds": best, "bytes_per_s": 2 * x.nbytes / best}


def build(shape: dict) -> tuple[Llama, RandomTokenizer, dict]:
    """A random bfloat16 Llama of ``shape`` (LlamaConfig fields), its tokenizer and its sizes."""
    config = LlamaConfig(**shape, pad_token_id=0)
    start = time.perf_counter()
    model = Llama(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    jax.block_until_ready(nnx.state(model))
    layers = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model.layers)))
    read = layers + model.head_transposed[...].nbytes + model.final_norm.weight[...].nbytes
    sizes = {
        "config": shape,
        "parameters": sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))),
        "weight_bytes_read_per_step": read,
        "kv_bytes_per_row_token": 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2,
        "build_s": time.perf_counter() - start,
    }
    return model, RandomTokenizer(config.vocab_size), sizes


def _requests(vocab: int, capacity: int, prompt: int, seed: int = 0):
    """``capacity // 2`` auctions of 2 agents with distinct random prompts (``capacity`` cache rows)."""
    rng = np.random.default_rng(seed)
    auctions = []
    for _ in range(max(1, capacity // 2)):
        prompts = [rng.integers(2, vocab, prompt).tolist() for _ in range(2)]
        auctions.append(ja.Auction(prompts, rng.uniform(0.5, 2.0, 2).tolist()))
    return auctions


def _timed_generate(auctions, model, tokens: int) -> float:
    start = time.perf_counter()
    result = ja.generate(auctions, model=model, decoding="greedy", max_new_tokens=tokens, memory_budget="64GB")
    elapsed = time.perf_counter() - start
    assert int(np.min(result.lengths)) == tokens, "every auction runs to max_new_tokens (no EOS)"
    return elapsed


def decode_case(model, tokenizer, sizes: dict, capacity: int, profile: dict, bandwidth: float, repeats: int) -> dict:
    """One capacity's step time (the difference of a ``long`` and a ``short`` call over their extra
    tokens; by default ``8k + 8`` and ``8k + 1``, which share their programs), compile time and floor."""
    auctions = _requests(tokenizer.vocab, capacity, profile["prompt"])
    short, long = profile.get("tokens", (8 * profile["window"] + 1, 8 * profile["window"] + 8))
    before = runtime.compile_seconds()
    first = _timed_generate(auctions, (model, tokenizer), long)
    compile_s = {k: v - before.get(k, 0.0) for k, v in runtime.compile_seconds().items() if v > before.get(k, 0.0)}
    _timed_generate(auctions, (model, tokenizer), short)  # compiles nothing when the calls share programs
    best_short = min(_timed_generate(auctions, (model, tokenizer), short) for _ in range(repeats))
    best_long = min(_timed_generate(auctions, (model, tokenizer), long) for _ in range(repeats))
    step = max(best_long - best_short, 1e-9) / (long - short)
    mean_length = profile["prompt"] + (short + long) / 2
    step_bytes = sizes["weight_bytes_read_per_step"] + capacity * sizes["kv_bytes_per_row_token"] * mean_length
    floor = step_bytes / bandwidth
    num_auctions = len(auctions)
    return {
        "capacity": capacity,
        "auctions": num_auctions,
        "step_s": step,
        "tokens_per_s_per_auction": 1 / step,
        "tokens_per_s_aggregate": num_auctions / step,
        "floor_step_s": floor,
        "floor_tokens_per_s_per_auction": 1 / floor,
        "floor_tokens_per_s_aggregate": num_auctions / floor,
        "share_of_floor": floor / step,
        "bytes_per_step": step_bytes,
        "first_call_s": first,
        "compile_s": compile_s,
        "calls_s": {"short": best_short, "long": best_long, "tokens": [short, long]},
    }


def simulate_case(vocab: int, profile: dict, bandwidth: float, repeats: int) -> dict:
    """``simulate``'s auctions/s (second-price payments, linear rule) against reading each auction's logits once."""
    rng = np.random.default_rng(0)
    num, chunk = profile["sim_auctions"], profile.get("sim_chunk", 256)
    logits = rng.normal(size=(profile["sim_sets"], 2, vocab)).astype(np.float32) * 3
    bids = rng.uniform(0.1, 2.0, (num, 2))
    index = rng.integers(0, profile["sim_sets"], num)
    start = time.perf_counter()
    simulation.simulate(logits, bids, index=index, chunk_size=chunk, progress=False)
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        simulation.simulate(logits, bids, index=index, chunk_size=chunk, progress=False)
        best = min(best, time.perf_counter() - start)
    floor = num * 2 * vocab * 4 / bandwidth
    return {
        "auctions": num,
        "vocab": vocab,
        "agents": 2,
        "chunk_size": chunk,
        "seconds": best,
        "first_call_s": first,
        "auctions_per_s": num / best,
        "floor_auctions_per_s": num / floor,
        "share_of_floor": floor / best,
    }


def choose_profile(args) -> str:
    if args.tiny:
        return "tiny"
    if args.quick or jax.default_backend() == "cpu":
        return "quick"
    return "full"


def _models(profile: dict) -> dict:
    """Each model's LlamaConfig fields: the full shape with the profile's overrides (None: the overhead model)."""
    return {
        name: OVERHEAD if profile[name] is None else {**base, **profile[name]}
        for name, base in (("smollm2", SMOLLM2), ("llama3_8b", LLAMA3_8B))
    }


def run(args) -> dict:
    started = time.perf_counter()
    name = choose_profile(args)
    profile = PROFILES[name]
    device = jax.devices()[0]
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "profile": name,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "jaxauction": ja.__version__,
        "host": {**hostinfo.describe(), "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
        "capacities": list(profile["capacities"]),
        "skipped": [],
    }
    out["bandwidth"] = copy_bandwidth(args.copy_mb or profile["copy_mb"])
    bandwidth = out["bandwidth"]["bytes_per_s"]
    print(f"device {device.device_kind} ({jax.default_backend()}), profile {name}: copy {bandwidth / 1e9:.1f} GB/s")
    built = {}  # the models built, by shape (the tiny profile's three share one)
    built[repr(OVERHEAD)] = model, tokenizer, sizes = build(OVERHEAD)
    # 1 and 64 tokens: 63 steps of a model that costs microseconds (two program sets, both warmed up).
    overhead = decode_case(model, tokenizer, sizes, 4, {**profile, "tokens": (1, 64)}, bandwidth, args.repeats)
    out["loop_overhead_per_token_s"] = overhead["step_s"]
    out["overhead_case"] = {**sizes, **overhead}
    out["simulate"] = simulate_case(profile.get("sim_vocab", SMOLLM2["vocab_size"]), profile, bandwidth, args.repeats)
    out["models"] = {}
    for model_name, shape in _models(profile).items():
        if time.perf_counter() - started > args.max_seconds:
            out["skipped"].append(f"{model_name}: past --max-seconds before it started")
            continue
        if repr(shape) not in built:
            model = tokenizer = None
            built.clear()  # one large model in memory at a time
            built[repr(shape)] = build(shape)
        model, tokenizer, sizes = built[repr(shape)]
        cases = []
        for capacity in profile["capacities"]:
            if time.perf_counter() - started > args.max_seconds:
                out["skipped"].append(f"{model_name} capacity {capacity}: past --max-seconds")
                continue
            cases.append(decode_case(model, tokenizer, sizes, capacity, profile, bandwidth, args.repeats))
            print(_row(model_name, cases[-1]), flush=True)
        out["models"][model_name] = {**sizes, "decode": cases}
    out["host"]["load_average_at_end"] = os.getloadavg()
    out["total_s"] = time.perf_counter() - started
    return out


HEADER = (
    f"{'model':<10} {'rows':>5} {'auctions':>8} {'step ms':>9} {'tok/s/auction':>13} {'tok/s all':>10} "
    f"{'floor ms':>9} {'of floor':>8} {'compile s':>9}"
)


def _row(name: str, case: dict) -> str:
    return (
        f"{name:<10} {case['capacity']:>5} {case['auctions']:>8} {case['step_s'] * 1e3:>9.2f} "
        f"{case['tokens_per_s_per_auction']:>13.1f} {case['tokens_per_s_aggregate']:>10.1f} "
        f"{case['floor_step_s'] * 1e3:>9.3f} {case['share_of_floor']:>8.1%} {sum(case['compile_s'].values()):>9.1f}"
    )


def report(out: dict) -> str:
    lines = [
        f"jaxauction accelerator check, {out['date']}: {out['device_kind']} x{out['device_count']} "
        f"({out['backend']}), profile {out['profile']}",
        f"copy bandwidth {out['bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s; loop overhead per token "
        f"{out['loop_overhead_per_token_s'] * 1e3:.2f} ms (1-layer, 64-wide model at 4 rows)",
        HEADER,
    ]
    for name, model in out["models"].items():
        lines += [_row(name, case) for case in model["decode"]]
    sim = out["simulate"]
    lines.append(
        f"simulate: {sim['auctions_per_s']:.0f} auctions/s ({sim['auctions']} auctions, V = {sim['vocab']}), "
        f"floor {sim['floor_auctions_per_s']:.0f}/s: {sim['share_of_floor']:.1%} of it"
    )
    lines.append(
        f"host: {hostinfo.cpu_text()}; load average at start {out['host']['load_average_at_start']}, "
        f"end {out['host']['load_average_at_end']}"
    )
    if out["skipped"]:
        lines.append(f"skipped: {out['skipped']}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU sizes (automatic on a CPU)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: seconds (the test)")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per measurement (best kept)")
    parser.add_argument("--max-seconds", type=float, default=420.0, help="start no new case after this")
    parser.add_argument("--copy-mb", type=int, default=0, help="copy size for the bandwidth (default per profile)")
    args = parser.parse_args(argv)
    out = run(args)
    print(report(out))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
