"""How the cost of token auctions grows: agents, batch of auctions, vocabulary.

Measured in one run on this machine:
- mechanism only (aggregation + second-price payments, jit): auctions/s as the number of agents
  (2..16), the batch of auctions (1..1024) and the vocabulary grow;
- generation with the bundled LLM (sampled, one key per auction, so auctions do not share model rows):
  time per generated token as the batch of auctions (1..64) and the
  number of agents grow;
- this machine's floors, measured in the same run: memory bandwidth (a large array copy) and
  matmul throughput (float32), and what they imply per auction / per token.
Writes a JSON and a PNG plot of cost against each axis.

    python experiments/bench_scaling.py --json outputs/bench_scaling.json
    python experiments/bench_scaling.py --quick          # smaller grids, a minute or two
"""

from __future__ import annotations

import argparse
import sys
import time

import hostinfo
import numpy as np


def best_time(fn, repeats: int = 3) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def machine_floors() -> dict:
    """Copy bandwidth (bytes/s) and float32 matmul throughput (FLOP/s) measured with JAX."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((64 * 2**20,), jnp.float32)  # 256 MiB
    copy = jax.jit(lambda a: a + 1.0)
    seconds = best_time(lambda: copy(x).block_until_ready())
    bandwidth = 2 * x.nbytes / seconds  # read + write
    a = jnp.ones((1024, 1024), jnp.float32)
    matmul = jax.jit(lambda m: m @ m)
    seconds = best_time(lambda: matmul(a).block_until_ready())
    flops = 2 * 1024**3 / seconds
    return {"bandwidth_bytes_per_s": bandwidth, "matmul_flop_per_s": flops}


def mechanism_case(n: int, batch: int, vocab: int, seed: int = 0) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxauction import TokenAuction
    from jaxauction.payments import Quadrature

    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(batch, n, vocab)) * 3, jnp.float32)
    bids = jnp.asarray(rng.lognormal(size=(batch, n)), jnp.float32)
    auction = TokenAuction()
    run = jax.jit(lambda l, b: auction(l, b))
    seconds = best_time(lambda: jax.block_until_ready(run(logits, bids)))
    # Rule evaluations: one for q, n for q(0, b_-i) and n * Q forward-mode ones (value and tangent)
    # for the payments, each at least one floating-point operation per agent and token.
    evaluations = 1 + n + 2 * n * Quadrature().size
    return {
        "n": n,
        "batch": batch,
        "vocab": vocab,
        "seconds": seconds,
        "auctions_per_second": batch / seconds,
        "input_bytes": batch * n * vocab * 4,
        "flops": evaluations * n * vocab * batch,
    }


def generation_case(model, n: int, auctions: int, tokens: int) -> dict:
    from jaxauction.engine import generate

    prompts = [[{"role": "user", "content": f"Write a short ad for shop number {i} in Hawaii."}] for i in range(n)]
    bids = np.ones((auctions, n))

    def go():
        # Sampled, one key per auction: the auctions' texts differ, so they do not share model rows
        # (identical greedy auctions would all decode as one).
        return generate(prompts, bids, decoding="sample", max_new_tokens=tokens, model=model, payment="second_price")

    # An auction can stop early at EOS; tokens actually run = max length.
    result = go()
    steps = int(np.max(result.lengths))
    seconds = best_time(go, repeats=2)
    return {
        "n": n,
        "auctions": auctions,
        "rows": n * auctions,
        "steps": steps,
        "seconds": seconds,
        "ms_per_token_step": 1e3 * seconds / steps,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="outputs/bench_scaling.json")
    parser.add_argument("--plot", default="outputs/bench_scaling.png")
    parser.add_argument("--quick", action="store_true", help="smaller grids")
    parser.add_argument("--no-generation", action="store_true")
    args = parser.parse_args(argv)

    import jax

    from jaxauction.outputs import write_json

    floors = machine_floors()
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; copy bandwidth "
        f"{floors['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; float32 matmul "
        f"{floors['matmul_flop_per_s'] / 1e9:.1f} GFLOP/s"
    )

    if args.quick:
        agents, batches, vocabs = [2, 4, 8], [1, 16, 128], [1024, 8192]
        gen_auctions, gen_agents, gen_tokens = [1, 8], [2, 4], 8
    else:
        agents, batches, vocabs = [2, 4, 8, 16], [1, 4, 16, 64, 256, 1024], [1024, 4096, 16384, 49152]
        gen_auctions, gen_agents, gen_tokens = [1, 4, 16, 64], [2, 4, 8, 16], 16
    print(f"host: {hostinfo.line(hostinfo.load_average())}")
    report = {
        "host": hostinfo.describe(hostinfo.load_average()),
        "floors": floors,
        "mechanism": {"agents": [], "batch": [], "vocab": []},
        "generation": {"auctions": [], "agents": []},
    }

    def show(kind, case):
        # Floors: reading the inputs once at the copy bandwidth, and the operation count at the
        # float32 matmul throughput (a generous peak for elementwise work with exp and log).
        floor_s = max(
            case["input_bytes"] / floors["bandwidth_bytes_per_s"], case["flops"] / floors["matmul_flop_per_s"]
        )
        case["floor_seconds"] = floor_s
        print(
            f"  {kind:<7} n={case['n']:>2} batch={case['batch']:>5} V={case['vocab']:>6}: "
            f"{case['auctions_per_second']:>10.1f} auctions/s  ({case['seconds'] / floor_s:5.1f}x "
            "the floor)"
        )

    print("mechanism only (aggregation + second-price payments):")
    for n in agents:
        case = mechanism_case(n, 16, 4096)
        show("agents", case)
        report["mechanism"]["agents"].append(case)
    for batch in batches:
        case = mechanism_case(2, batch, 4096)
        show("batch", case)
        report["mechanism"]["batch"].append(case)
    for vocab in vocabs:
        case = mechanism_case(2, 16, vocab)
        show("vocab", case)
        report["mechanism"]["vocab"].append(case)

    if not args.no_generation:
        from jaxauction import models

        model = models.load()
        # The parameters, as bench_model.py counts them: a step reads every layer and the LM head once
        # (the embedding table only at the token rows, the head through its [D, V] copy of equal size).
        weight_bytes = model[0].config.num_parameters() * np.dtype(model[0].dtype).itemsize
        token_floor = weight_bytes / floors["bandwidth_bytes_per_s"]
        report["generation"]["weight_bytes"] = weight_bytes
        report["generation"]["token_floor_seconds"] = token_floor
        print(
            f"generation (bundled model, {weight_bytes / 2**20:.0f} MiB of weights: one decode step "
            f"costs at least {1e3 * token_floor:.1f} ms at this bandwidth):"
        )
        for auctions in gen_auctions:
            case = generation_case(model, 2, auctions, gen_tokens)
            print(
                f"  auctions={auctions:>3} n=2: {case['ms_per_token_step']:8.1f} ms per token step "
                f"({case['ms_per_token_step'] / auctions:6.2f} ms per auction-token)"
            )
            report["generation"]["auctions"].append(case)
        for n in gen_agents:
            case = generation_case(model, n, 1, gen_tokens)
            print(f"  agents={n:>3} A=1: {case['ms_per_token_step']:8.1f} ms per token step")
            report["generation"]["agents"].append(case)

    report["host"]["load_average_end"] = list(hostinfo.load_average())
    print(f"host: {hostinfo.line(report['host']['load_average_start'], report['host']['load_average_end'])}")
    write_json(args.json, report)
    plot(report, args.plot)
    print(f"wrote {args.json} and {args.plot}")
    return 0


def plot(report, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxauction.outputs import save_figure

    has_generation = bool(report["generation"]["auctions"])
    columns = 5 if has_generation else 3
    figure, axes = plt.subplots(1, columns, figsize=(4 * columns, 3.6), constrained_layout=True)
    mech = report["mechanism"]
    for axis, key, label in zip(axes, ("agents", "batch", "vocab"), ("n", "batch", "vocab")):
        cases = mech[key]
        x = [c[label] for c in cases]
        per_auction = [c["seconds"] / c["batch"] for c in cases]
        floor = [c["floor_seconds"] / c["batch"] for c in cases]
        axis.loglog(x, per_auction, "o-", label="measured")
        axis.loglog(x, floor, "k--", label="bandwidth / compute floor")
        axis.set(xlabel=f"mechanism: {label}", ylabel="seconds per auction")
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=8)
    if has_generation:
        gen = report["generation"]
        for axis, key, label in ((axes[3], "auctions", "auctions"), (axes[4], "agents", "n")):
            cases = gen[key]
            axis.loglog([c[label] for c in cases], [c["ms_per_token_step"] for c in cases], "o-", label="measured")
            axis.axhline(1e3 * gen["token_floor_seconds"], color="k", ls="--", label="weight-read floor")
            axis.set(xlabel=f"generation: {label}", ylabel="ms per token step")
            axis.grid(alpha=0.3, which="both")
            axis.legend(fontsize=8)
    save_figure(figure, path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
