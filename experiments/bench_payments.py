"""What the payments cost in generation, against the same rule without payments and against a floor (issue 37).

    python experiments/bench_payments.py --json outputs/bench_payments.json          # full (some minutes)
    python experiments/bench_payments.py --points 3 --max-new-tokens 8 --mixed-limit 4 --repeats 1   # quick

**Table.** For each rule in {linear, log_linear} and payment in {None, "second_price", "kl"}, on two
workloads built by ``bench_generation.py``'s helpers (the same prompts, bids and options):

* the Hawaii sweep (``experiments/configs/hawaii.toml``, ``--points`` 11 auctions x 2 agents, at most
  ``--max-new-tokens`` 48 tokens, greedy, float32, one ``generate(prompts, bids)`` call);
* the mixed batch (``experiments/configs/mixed_queries.jsonl``: 18 queries of 2 to 4 agents and a base
  prompt, one ``generate(auctions)`` call).

Every case is warmed up once (compilation excluded), then the cases run in turn, round after round,
``--repeats`` times (so load from other processes hits them alike); min and median seconds are printed
with the ratio to the same rule and workload with ``payment=None`` ("x none"), and the payment overhead
(the median minus the ``None`` median) against the two floors below. Greedy tokens do not depend on the
payment, so the cases of one rule generate the same tokens.

**Floor.** The machine's exponential rate is measured in the same run: one fused ``jax.jit`` pass that
computes ``--floor-elements`` exponentials on the fly (``exp(a_k * x_t)`` over a ``[K, V]`` grid, no input
of that size) and sums them, ns per element (NumPy's ``exp`` over a float32 array in place for
reference). The work the payments must do, in exponentials:

* (a) the installed method's: ``K`` exponentials per token and charged agent (:func:`method_nodes`: the
  log-linear robust path's Gauss-Kronrod nodes, 21 a row and 42 more for up to one row in 8: 26.25; 1 for
  a closed form: linear, log-linear KL;
  on code before those, the generic path's ``payments.Quadrature().size``, 80) x ``V`` tokens x charged
  agents, per auction and step;
* (b) the least any exact method must touch: one pass over every agent's vocabulary, ``m x V`` per
  auction and step (``m`` rows, base row included).

Both are printed per decode step (every auction live) in ms and per run (summed over each auction's own
generated tokens) in seconds, at the fused rate; for (a) also per run as today's engine schedules it (the
auction program runs on every auction until the longest one ends). The table's last columns are the
measured overhead over each floor's per-run seconds (own tokens).

**Profile.** One decode step of the sweep on real logits: the model's next-token logits of every
(auction, agent) row after ``--profile-step`` tokens of the log-linear greedy run (``[A, m, V]``, the
sweep's bids). For each rule of ``--profile-rules`` (default log_linear) it times, alternately, the
auction program (``jaxauction.engine.step.auction_step``: rule, payments, argmax) with each payment kind,
the payments alone (``payments.charged_payments``), the payments with fewer quadrature nodes and other
``chunk_elements`` (where the installed ``charged_payments`` takes those arguments: the script checks its
signature, so it runs on today's code and on later code), and for the KL allocation the integrand at all
nodes as a plain forward pass against its jvp (both built from public functions here). Beside each:
the share of the auction program, the largest relative payment difference against the default, and the
XLA cost analysis (``compiled.cost_analysis()``) of the integrand at one node: transcendentals and flops
per token (a ``lax.map`` body is counted once by XLA, so whole programs are not analysed).

``--model`` loads another model (the tests use a tiny one). The host (CPU model and vendor, cores, load
average before and after: ``experiments/hostinfo.py``) is printed beside the tables and stored in the JSON.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import math
import statistics
import sys
import time
from pathlib import Path

import bench_generation as generation
import hostinfo
import numpy as np
from ab import alternate_medians

TODAYS_NODES = 80  # payments.Quadrature().size on 2026-12-07: floor (a)'s nodes where the installed code has no size
RULES = ("linear", "log_linear")
PAYMENTS = (None, "second_price", "kl")
ALLOCATIONS = {"second_price": "robust", "kl": "kl"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--json", help="write the results to this file (atomically)")
    parser.add_argument("--model", default=None, help="model path or hub id (default: the bundled SmolLM2-135M)")
    parser.add_argument("--config", default=str(generation.DEFAULT_CONFIG), help="TOML of the sweep")
    parser.add_argument("--points", type=int, default=11, help="sweep points = auctions (default 11)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="token limit per auction (default 48)")
    parser.add_argument("--mixed-config", default=str(generation.DEFAULT_MIXED), help="JSONL of the mixed batch")
    parser.add_argument("--mixed-limit", type=int, default=0, help="only the first N mixed auctions (0: all)")
    parser.add_argument("--no-mixed", action="store_true", help="the sweep only")
    parser.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds over all cases (default 3)")
    parser.add_argument(
        "--floor-elements", type=float, default=0, help="exponentials of the floor pass (0: a decode step's (a) work)"
    )
    parser.add_argument("--floor-repeats", type=int, default=10, help="timed floor passes (default 10)")
    parser.add_argument("--profile-step", type=int, default=8, help="tokens generated before the profiled step")
    parser.add_argument("--profile-rules", nargs="*", choices=RULES, default=["log_linear"])
    parser.add_argument("--profile-repeats", type=int, default=5, help="timed calls per profiled program")
    args = parser.parse_args(argv)
    if args.points < 2 or args.max_new_tokens < 1 or min(args.repeats, args.floor_repeats, args.profile_repeats) < 1:
        parser.error("--points must be >= 2; --max-new-tokens and every --*repeats >= 1")
    return args


# ---------------------------------------------------------------------------------------- floor


def default_nodes() -> int:
    """Nodes of the installed default quadrature (``payments.Quadrature().size``), else :data:`TODAYS_NODES`."""
    from jaxauction import payments

    try:
        return int(payments.Quadrature().size)
    except (AttributeError, TypeError, ValueError):
        return TODAYS_NODES


def method_nodes(rule: str, payment) -> int:
    """Floor (a)'s exponentials per token and charged agent for ``(rule, payment)`` on the installed code."""
    from jaxauction import payments

    structured = hasattr(payments, "ROBUST_PANELS")  # issue 37's Gauss-Kronrod robust path and KL closed form
    if rule == "linear" or (structured and payment == "kl"):
        return 1
    if not structured:
        return default_nodes()
    # one panel of Gauss-Kronrod nodes a row, and up to one row in _REFINED_SHARE again with ROBUST_PANELS panels
    panel = len(payments.gauss_kronrod_21()[0])
    return panel * (1 + payments.ROBUST_PANELS / getattr(payments, "_REFINED_SHARE", math.inf))


def exp_rates(elements: int, vocab: int, repeats: int) -> dict:
    """Nanoseconds per exponential: a fused jit pass over ``[ceil(elements / vocab), vocab]`` computed on
    the fly and summed (``"jax_ns"``), and NumPy's ``exp`` over a float32 array in place (``"numpy_ns"``)."""
    import jax
    import jax.numpy as jnp

    rows = max(1, -(-elements // vocab))
    a = jnp.linspace(0.5, 1.0, rows, dtype=jnp.float32)
    x = jnp.linspace(-30.0, 0.0, vocab, dtype=jnp.float32)
    fused = jax.jit(lambda a, x: jnp.sum(jnp.exp(a[:, None] * x[None, :])))
    jax.block_until_ready(fused(a, x))
    jax_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fused(a, x))
        jax_times.append(time.perf_counter() - start)
    array = np.linspace(-30.0, 0.0, min(rows * vocab, 1 << 23), dtype=np.float32)
    out = np.empty_like(array)
    np.exp(array, out=out)
    numpy_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.exp(array, out=out)
        numpy_times.append(time.perf_counter() - start)
    return {
        "elements": rows * vocab,
        "jax_seconds": jax_times,
        "jax_ns": 1e9 * min(jax_times) / (rows * vocab),
        "numpy_elements": array.size,
        "numpy_ns": 1e9 * min(numpy_times) / array.size,
    }


def floors(nodes: int, vocab: int, charged, rows, lengths, ns: float) -> dict:
    """The two floors of one workload (module docs): ``charged [A]`` agents, ``rows [A]`` (base included),
    ``lengths [A]`` generated tokens per auction; exponentials per step (all auctions live) and per run,
    and their time at ``ns`` nanoseconds per exponential."""
    charged, rows, lengths = (np.asarray(v, np.int64) for v in (charged, rows, lengths))
    out = {}
    for name, per_auction in (("a", nodes * vocab * charged), ("b", vocab * rows)):
        step, run = int(per_auction.sum()), int((per_auction * lengths).sum())
        out[name] = {
            "exps_per_step": step,
            "exps_per_run": run,
            "ms_per_step": step * ns * 1e-6,
            "s_per_run": run * ns * 1e-9,
            # today's engine runs the auction program on every auction until the longest one ends
            "s_per_run_every_auction_every_step": step * int(lengths.max()) * ns * 1e-9,
        }
    return out


# ---------------------------------------------------------------------------------------- table


def timed_rounds(cases: dict, repeats: int) -> tuple[dict, dict]:
    """Warm each ``name: run()`` up once, then time them in turn ``repeats`` rounds: ``(seconds lists, outputs)``."""
    outputs = {}
    for name, run in cases.items():
        start = time.perf_counter()
        outputs[name] = run()
        print(f"warm-up {name}: {time.perf_counter() - start:.2f} s", flush=True)
    times = {name: [] for name in cases}
    for repeat in range(repeats):
        for name, run in cases.items():
            start = time.perf_counter()
            outputs[name] = run()
            times[name].append(time.perf_counter() - start)
            print(f"run {repeat + 1}/{repeats} {name}: {times[name][-1]:.3f} s", flush=True)
    return times, outputs


def table_rows(times: dict, outputs: dict, workloads: dict, nodes: int, vocab: int, ns: float) -> list[dict]:
    """One row per (workload, rule, payment): seconds, ratio to ``payment=None``, overhead over the floors."""
    rows = []
    for (workload, rule, payment), seconds in times.items():
        result = outputs[(workload, rule, payment)]
        charged, row_counts = workloads[workload]["charged"], workloads[workload]["rows"]
        floor = floors(
            method_nodes(rule, payment) if payment else nodes, vocab, charged, row_counts, result.lengths, ns
        )
        floor["a"]["nodes"] = method_nodes(rule, payment) if payment else nodes
        none = statistics.median(times[(workload, rule, None)])
        median = statistics.median(seconds)
        overhead = median - none
        rows.append(
            {
                "workload": workload,
                "rule": rule,
                "payment": payment,
                "seconds_min": min(seconds),
                "seconds_median": median,
                "seconds_all": seconds,
                "ratio_vs_none": median / none,
                "overhead_seconds": overhead,
                "overhead_vs_floor_a": overhead / floor["a"]["s_per_run"],
                "overhead_vs_floor_b": overhead / floor["b"]["s_per_run"],
                "floors": floor,
                "generated_tokens": int(np.sum(result.lengths)),
                "steps": int(np.max(result.lengths)),
                "payments_total": float(np.nansum(result.payments)),
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'workload':<8}{'rule':<12}{'payment':<14}{'min s':>8}{'median s':>10}{'x none':>8}"
        f"{'overhead s':>12}{'/ floor a':>11}{'/ floor b':>11}{'tokens':>8}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        paid = r["payment"] is not None
        print(
            f"{r['workload']:<8}{r['rule']:<12}{str(r['payment']):<14}{r['seconds_min']:>8.2f}{r['seconds_median']:>10.2f}"
            f"{r['ratio_vs_none']:>7.2f}x{r['overhead_seconds']:>12.2f}"
            + (f"{r['overhead_vs_floor_a']:>10.2f}x{r['overhead_vs_floor_b']:>10.1f}x" if paid else f"{'':>22}")
            + f"{r['generated_tokens']:>8d}"
        )


def print_floors(rates: dict, rows: list[dict], nodes: int, vocab: int) -> None:
    print(
        f"\nexp rate: fused jax pass {rates['jax_ns']:.2f} ns/element ({rates['elements'] / 1e6:.1f} M exps, best "
        f"{1e3 * min(rates['jax_seconds']):.1f} ms); numpy exp {rates['numpy_ns']:.2f} ns/element"
    )
    print(f"floors at the fused rate: (a) the method's K exponentials x V={vocab} x charged agents per auction;")
    print("(b) one pass over every row's vocabulary, m x V per auction (per step: every auction live)")
    for r in rows:
        if r["payment"] is None:
            continue
        a, b = r["floors"]["a"], r["floors"]["b"]
        print(
            f"  {r['workload']:<7}{r['rule']:<11}{r['payment']:<13} (a) K={a['nodes']:<6.2f}"
            f"{a['exps_per_step'] / 1e6:7.1f} M exps/step = {a['ms_per_step']:7.1f} "
            f"ms/step, {a['s_per_run']:6.2f} s/run ({a['s_per_run_every_auction_every_step']:.2f} s with every "
            f"auction every step);  (b) {b['exps_per_step'] / 1e6:5.2f} M = {b['ms_per_step']:5.2f} "
            f"ms/step, {b['s_per_run']:6.3f} s/run"
        )


# ---------------------------------------------------------------------------------------- profile


def step_logits(llm, sequences: list[list[int]], pad_id: int, temperature: float):
    """The model's next-token logits ``[R, V]`` after each of ``sequences`` (left-padded, one prefill)."""
    import jax.numpy as jnp

    from jaxauction import models

    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, np.int32)
    mask = np.zeros((len(sequences), width), np.int32)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = seq
        mask[row, width - len(seq) :] = 1
    compiled = getattr(models, "CompiledLlama", None)
    runner = compiled(llm) if compiled is not None and isinstance(llm, models.Llama) else llm
    logits, _ = runner.prefill(jnp.asarray(ids), jnp.asarray(mask), runner.init_cache(len(sequences), width))
    return jnp.asarray(logits, jnp.float32) / temperature


def integrand_programs(rule, valuation, logits, bids, n: int, chunk_elements: int):
    """The KL integrand ``x_i(lambda(u))`` of every auction, charged agent and node ``u`` of the default
    quadrature (``Quadrature().nodes``), as a plain forward pass and as the jvp in the own-bid direction
    (docs/maths.md §5): ``{name: (jitted program, args)}``.

    ``"forward"``, ``"jvp"``: all auctions, looped like today's payments (``lax.map`` over auctions and
    agents, nodes in batches of ``chunk_elements // V``). ``"one_node_*"``, ``"two_nodes_*"``: one
    auction, all ``n`` agents, the first 1 or 2 nodes, without loops (XLA's cost analysis counts a loop
    body once; the difference of the two is the cost of one node). ``logits: [A, m, V]``,
    ``bids: [A, m]``. The profile is ``(1 - e^{-u}) e_i + e^{-u} w`` with ``w`` the others' shares and
    the direction ``e_i - w``, the parametrisation payments.py documents; built here from public
    functions so that it runs on any version of the payments.
    """
    import jax
    import jax.numpy as jnp

    from jaxauction import payments

    m, vocab = logits.shape[-2:]
    quadrature = payments.Quadrature()
    batch = max(1, chunk_elements // vocab)

    def per_auction(logits_a, bids_a, derivative: bool, node_count: int, loops: bool):
        log_p = jax.nn.log_softmax(logits_a, axis=-1)

        def per_agent(i):
            is_self = jnp.arange(m) == i
            others = jnp.where(is_self, 0.0, bids_a)
            total = jnp.maximum(jnp.sum(others), 1e-30)
            shares, direction = others / total, jnp.where(is_self, 1.0, -others / total)
            value = lambda b: valuation(log_p[i], rule(logits_a, b))
            u = quadrature.nodes(jnp.log1p(bids_a[i] / total))[0][:node_count]

            def at(u):
                profile = jnp.where(is_self, -jnp.expm1(-u), shares * jnp.exp(-u))
                return jax.jvp(value, (profile,), (direction,))[1] if derivative else value(profile)

            return jax.lax.map(at, u, batch_size=batch) if loops else jax.vmap(at)(u)

        agents = jnp.arange(n)
        return jax.lax.map(per_agent, agents) if loops else jax.vmap(per_agent)(agents)

    def program(derivative: bool, node_count: int, auctions: int):
        loops = auctions > 1
        one = lambda ab: per_auction(*ab, derivative, node_count, loops)
        f = (lambda lg, b: jax.lax.map(one, (lg, b))) if loops else (lambda lg, b: jax.vmap(one)((lg, b)))
        return jax.jit(f), (logits[:auctions], bids[:auctions])

    nodes = quadrature.size
    programs = {"forward": program(False, nodes, logits.shape[0]), "jvp": program(True, nodes, logits.shape[0])}
    for count, label in ((1, "one_node"), (2, "two_nodes")):
        for kind, derivative in (("forward", False), ("jvp", True)):
            programs[f"{label}_{kind}"] = program(derivative, count, 1)
    return programs


def per_token_cost(program, args, vocab: int) -> dict | None:
    """XLA's cost analysis of ``program(*args)`` (no loop inside) per vocabulary token, or None."""
    try:
        analysis = program.lower(*args).compile().cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    if not analysis:
        return None
    keys = {"flops": "flops", "transcendentals": "transcendentals", "bytes accessed": "bytes"}
    return {name: float(analysis.get(key, 0.0)) / vocab for key, name in keys.items()}


def profile_programs(rule_name: str, logits, bids, n: int) -> dict:
    """``name: (jitted program, args)`` of one decode step's pieces for ``rule_name`` (module docs)."""
    import jax

    from jaxauction import base, payments
    from jaxauction.engine import step
    from jaxauction.mechanism import MechanismSpec

    rule = base.as_rule(rule_name)
    key = jax.random.split(jax.random.key(0), logits.shape[0])
    programs = {}
    auction_step = getattr(step, "auction_step", None)
    for payment in PAYMENTS:
        if auction_step is not None:
            spec = MechanismSpec(rule, payment, "greedy")
            run = jax.jit(functools.partial(auction_step, mechanism=spec, num_charged=n))
            programs[f"auction program, payment {payment}"] = (run, (logits, bids, key))
    accepts = inspect.signature(payments.charged_payments).parameters
    nodes = default_nodes()
    chunk_default = getattr(payments, "DEFAULT_CHUNK_ELEMENTS", None)
    for payment, allocation in ALLOCATIONS.items():
        variants = {f"payments alone ({payment})": {}}
        if "quadrature" in accepts:
            for order in (4, 2):
                try:  # today's Quadrature: 10 panels of `order` nodes; later code may differ
                    quadrature = payments.Quadrature(order=order)
                    variants[f"  {payment}, {quadrature.size} nodes"] = {"quadrature": quadrature}
                except (AttributeError, TypeError, ValueError):
                    pass
        if "chunk_elements" in accepts and chunk_default:
            for shift in (-2, 2, 5):
                size = int(chunk_default * 2.0**shift)
                variants[f"  {payment}, chunk 2^{size.bit_length() - 1}"] = {"chunk_elements": size}
        for name, extra in variants.items():
            f = functools.partial(payments.charged_payments, rule, num_charged=n, allocation=allocation, **extra)
            programs[name] = (jax.jit(f), (logits, bids))
    if rule.valuation is not None and hasattr(payments.Quadrature, "nodes"):
        integrand = integrand_programs(rule, rule.valuation, logits, bids, n, chunk_default or 1 << 19)
        programs[f"  kl integrand forward, {nodes} nodes (no jvp)"] = integrand["forward"]
        programs[f"  kl integrand jvp, {nodes} nodes"] = integrand["jvp"]
        programs["_one_node"] = integrand
    return programs


def run_profile(rule_name: str, logits, bids, n: int, repeats: int, ns: float) -> dict:
    """Times the pieces of one decode step alternately (``ab.alternate_medians``) and prints the table."""
    import jax

    programs = profile_programs(rule_name, logits, bids, n)
    integrand = programs.pop("_one_node", None)
    outputs = {name: jax.block_until_ready(program(*args)) for name, (program, args) in programs.items()}  # compile
    medians = alternate_medians(programs, repeats)
    vocab = logits.shape[-1]
    costs = {}
    if integrand is not None:
        for kind in ("forward", "jvp"):
            one, two = (per_token_cost(*integrand[f"{label}_{kind}"], vocab * n) for label in ("one_node", "two_nodes"))
            if one and two:  # per node and token: two nodes minus one node, over n agents x V tokens
                costs[kind] = {key: two[key] - one[key] for key in one}
    floor_nodes = method_nodes(rule_name, "second_price")
    floor_ms = floor_nodes * vocab * n * logits.shape[0] * ns * 1e-6
    reference = {p: f"payments alone ({p})" for p in ALLOCATIONS}
    rows = []
    for name in programs:
        ms = medians[name + "_ms"]
        kind = next((p for p in ALLOCATIONS if p in name), None)
        diff = None
        if name.strip().startswith(("payments", "second_price", "kl,")) and kind and reference[kind] in outputs:
            ref, out = np.asarray(outputs[reference[kind]], np.float64), np.asarray(outputs[name], np.float64)
            diff = float(np.max(np.abs(out - ref) / np.maximum(np.abs(ref), 1e-30)))
        rows.append({"piece": name, "ms_median": ms, "max_rel_diff_vs_default": diff})
    print(f"\nprofile of one decode step, {rule_name}: logits {list(logits.shape)}, {n} charged agents")
    header = f"{'piece':<46}{'ms (median)':>12}{'of program':>12}{'rel diff':>10}"
    print(header + "\n" + "-" * len(header))
    for r in rows:  # the share of the auction program with the row's payment kind (kl for the others)
        kind = next((p for p in ALLOCATIONS if p in r["piece"]), "kl")
        program_ms = medians.get(f"auction program, payment {kind}_ms")
        r["share_of_program"] = r["ms_median"] / program_ms if program_ms else None
        share = f"{r['share_of_program']:>11.0%}" if program_ms else f"{'':>11}"
        diff = "" if r["max_rel_diff_vs_default"] is None else f"{r['max_rel_diff_vs_default']:>10.1e}"
        print(f"{r['piece']:<46}{r['ms_median']:>12.1f} {share}{diff}")
    print(f"{f'  floor (a), second_price, K={floor_nodes:.2f}, fused exp':<46}{floor_ms:>12.1f}")
    for kind, cost in costs.items():
        if cost:
            print(
                f"integrand {kind}, XLA cost per node and token: {cost['transcendentals']:.1f} transcendentals, "
                f"{cost['flops']:.1f} flops, {cost['bytes']:.0f} bytes"
            )
    load = (medians["load_before"], medians["load_after"])
    print(f"(1-minute load {load[0]:.2f} before, {load[1]:.2f} after)")
    return {
        "rule": rule_name,
        "logits_shape": list(logits.shape),
        "rows": rows,
        "floor_a_ms": floor_ms,
        "integrand_cost_per_token": costs,
        "load_before_after": load,
    }


def profile_inputs(llm, tokenizer, sequences, bids, result, step: int, temperature: float):
    """Real logits ``[A, m, V]`` of the sweep after ``step`` tokens of ``result`` (capped at each auction's
    length - 1) and the bids ``[A, m]``, for the profile."""
    import jax.numpy as jnp

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for a in range(len(bids)):
        k = max(0, min(step, int(result.lengths[a]) - 1))
        rows += [list(seq) + [int(t) for t in result.tokens[a, :k]] for seq in sequences]
    logits = step_logits(llm, rows, int(pad_id), temperature)
    return logits.reshape(len(bids), len(sequences), -1), jnp.asarray(bids, jnp.float32)


# ---------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    load_at_start = hostinfo.load_average()
    import jax

    from jaxauction import generate, models
    from jaxauction.outputs import write_json
    from jaxauction.prompts import encode_prompt

    model = models.load(args.model) if args.model else models.load()
    llm, tokenizer = model
    vocab = int(llm.config.vocab_size)
    config, prompts, base_prompt, shares, bids = generation.sweep_workload(args.config, args.points)
    sweep_rows = len(prompts) + (base_prompt is not None)
    workloads = {"sweep": {"charged": [len(prompts)] * len(bids), "rows": [sweep_rows] * len(bids)}}
    lines, auctions = ([], []) if args.no_mixed else generation.mixed_workload(args.mixed_config, args.mixed_limit)
    if auctions:
        charged = [len(e.prompts) for e in lines]
        workloads["mixed"] = {
            "charged": charged,
            "rows": [c + (e.base_prompt is not None) for c, e in zip(charged, lines)],
        }
    nodes = default_nodes()
    print(
        f"jax {jax.__version__} on {jax.default_backend()}; sweep {len(bids)} auctions x {len(prompts)} agents, mixed "
        f"{len(auctions)} auctions; <= {args.max_new_tokens} tokens, greedy, float32; V = {vocab}; quadrature {nodes} nodes"
    )
    print(f"host: {hostinfo.line(load_at_start)}", flush=True)

    cases = {}
    for rule in args.rules:
        for payment in PAYMENTS:
            options = generation.sweep_options(config, args.max_new_tokens, model, rule=rule, payment=payment)
            cases[("sweep", rule, payment)] = functools.partial(generate, prompts, bids, **options)
            if auctions:
                mixed = {k: v for k, v in options.items() if k not in ("base_prompt", "base_bid")}
                cases[("mixed", rule, payment)] = functools.partial(generate, auctions, **mixed)
    named = {f"{w} {r} {p}": run for (w, r, p), run in cases.items()}
    start = time.perf_counter()
    times_named, outputs_named = timed_rounds(named, args.repeats)
    table_seconds = time.perf_counter() - start
    times = {case: times_named[f"{case[0]} {case[1]} {case[2]}"] for case in cases}
    outputs = {case: outputs_named[f"{case[0]} {case[1]} {case[2]}"] for case in cases}

    step_exps = nodes * vocab * sum(workloads["sweep"]["charged"])
    rates = exp_rates(int(args.floor_elements) or step_exps, vocab, args.floor_repeats)
    rows = table_rows(times, outputs, workloads, nodes, vocab, rates["jax_ns"])
    load_after_table = hostinfo.load_average()
    print_table(rows)
    print_floors(rates, rows, nodes, vocab)
    print(f"host: {hostinfo.line(load_at_start, load_after_table)}; the table took {table_seconds:.0f} s")

    profiles = []
    if args.profile_rules:
        sequences = [encode_prompt(tokenizer, p) for p in prompts]
        if base_prompt is not None:
            sequences.append(encode_prompt(tokenizer, base_prompt))
        all_bids = bids if base_prompt is None else np.concatenate([bids, np.full((len(bids), 1), config.base_bid)], 1)
        source = outputs.get(("sweep", "log_linear", None)) or next(iter(outputs.values()))
        logits, step_bids = profile_inputs(
            llm, tokenizer, sequences, all_bids, source, args.profile_step, config.temperature
        )
        for rule in args.profile_rules:
            profiles.append(run_profile(rule, logits, step_bids, len(prompts), args.profile_repeats, rates["jax_ns"]))
    load_at_end = hostinfo.load_average()
    print(f"\nhost: {hostinfo.line(load_at_start, load_at_end)}")
    if args.json:
        write_json(
            args.json,
            {
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "jax": jax.__version__,
                "backend": jax.default_backend(),
                "host": hostinfo.describe(load_at_start, load_at_end),
                "load_average_after_table": list(load_after_table),
                "settings": {k: v for k, v in vars(args).items() if k != "json"},
                "vocab": vocab,
                "quadrature_nodes": nodes,
                "table_seconds": table_seconds,
                "exp_rate": rates,
                "cases": rows,
                "profiles": profiles,
            },
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
