"""Benchmark: auctions per second of linear aggregation plus second-price payments, JAX vs NumPy.

All sides compute the same maths with the same quadrature (jaxauction.payments.Quadrature's nodes):
for every agent i and node u, the own bid s = B expm1(u), the linear aggregate q(s, b_-i) in log
space, its derivative in u (JAX: jax.jvp of the rule; NumPy: the forward-mode chain rule written
out), and the robust allocation's slope sum_{p_i > q(0)} dq/du, integrated as in jaxauction.

Two NumPy baselines, both run auction by auction and agent by agent, vectorised over nodes and tokens:
* plain: docs/maths.md §2 as written, log q = logsumexp_j(log lambda_j + log p_j) at every node (scipy's
  logsumexp), derivative through it. This is the baseline of ``ratio_vs_numpy``.
* hoisted: NumPy given the same algorithm as jaxauction: p_j = exp(log p_j) is computed once per
  auction and the robust slope is differentiated in probability space (``jaxauction.linear.probabilities``),
  dq/du = (d lambda/du) @ p, a BLAS matrix product per agent. Reported as
  ``ratio_vs_numpy_hoisted`` (the stricter comparison).
JAX runs the whole batch under one jit on CPU, on the generic path (``method="quadrature"``; the
library's default for the linear rule is its closed form, about one rule evaluation per auction). NumPy is timed on fewer auctions
(--numpy-auctions); all rates are per auction.

The ``--payments`` case (issue 37) times the payments program alone, as the decode loop runs it
(``payments.charged_payments`` under ``jit``, float32, warm, best of ``--repeats``): for each (rule,
payment), the structured path (``method="auto"``), the generic autodiff path it replaces
(``method="quadrature"``) and the rule alone (``payment=None``), in one run, on the Hawaii sweep's bids
(``--auctions`` auctions x 2 agents, own share 1..0) over the bundled model's real next-token logits
(cached in ``outputs/payment_logits.npy``; built with one teacher-forced pass when absent) and over
synthetic peaked logits. The floor is the node x token exponentials the structured path needs,
timed as one fused exp-and-sum of that many elements.

Usage:
  python experiments/bench_mechanism.py --json bench_mechanism.json          # the real configuration
  python experiments/bench_mechanism.py --quick                              # a small smoke run
  python experiments/bench_mechanism.py --payments                           # issue 37: payments alone
"""

from __future__ import annotations

import argparse
import json
import os
import time

import hostinfo
import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from jaxauction import aggregation, payments
from jaxauction import rules as rules_lib

PAYMENT_LOGITS = "outputs/payment_logits.npy"


def numpy_log_probs(logits: np.ndarray) -> np.ndarray:
    return special.log_softmax(logits, axis=-1)


def numpy_linear(log_p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """log sum_i w_i p_i for log_p [n, V], weights [..., n] (same scaling as jaxauction.linear)."""
    top = log_p.max(axis=0)
    top = np.where(np.isfinite(top), top, 0.0)
    scaled = np.exp(log_p - top)
    with np.errstate(divide="ignore"):
        return np.log(weights @ scaled) + top


def numpy_nodes(quadrature: payments.Quadrature, upper: float, dtype) -> tuple[np.ndarray, np.ndarray]:
    body_x, body_w, tail_x, tail_w = (a.astype(dtype) for a in quadrature.unit_rules())
    body_end = min(upper, np.log1p(quadrature.body_ratio))
    u = np.concatenate([body_end * body_x, body_end + (upper - body_end) * tail_x])
    w = np.concatenate([body_end * body_w, (upper - body_end) * tail_w])
    return u, w


def numpy_plain_auction(logits: np.ndarray, bids: np.ndarray, quadrature: payments.Quadrature):
    """docs/maths.md §2 literally: log q = logsumexp_j(log lambda_j + log p_j) at every node (float32)."""
    n = len(bids)
    dtype = logits.dtype
    log_p = numpy_log_probs(logits).astype(dtype)

    def rule(weights):  # weights [..., n] -> log q [..., V] and the responsibilities [..., n, V]
        with np.errstate(divide="ignore"):
            a = np.log(weights)[..., None] + log_p
        log_q = special.logsumexp(a, axis=-2)
        return log_q, np.exp(a - log_q[..., None, :])

    log_q, _ = rule(bids / bids.sum())
    z = np.zeros(n, dtype)
    for i in range(n):
        others = bids.sum() - bids[i]
        if others <= 0 or bids[i] <= 0:
            continue
        without = bids.copy()
        without[i] = 0.0
        pushed_up = log_p[i] > rule(without / without.sum())[0]
        u, w = numpy_nodes(quadrature, np.log1p(bids[i] / others), dtype)
        profile = np.broadcast_to(bids, (len(u), n)).copy()
        profile[:, i] = others * np.expm1(u)
        total = profile.sum(axis=1, keepdims=True)
        weights = profile / total
        d_weights = (np.eye(n, dtype=dtype)[i] - weights) / total * (others * np.exp(u))[:, None]
        node_log_q, responsibility = rule(weights)  # [K, V], [K, n, V]
        d_log_q = np.einsum("kj,kjv->kv", d_weights / weights, responsibility)
        dq = np.exp(node_log_q) * d_log_q
        slope = np.where(pushed_up, dq, 0.0).sum(axis=1)
        z[i] = others * np.sum(w * np.expm1(u) * slope)
    return log_q, z


def numpy_auction(logits: np.ndarray, bids: np.ndarray, quadrature: payments.Quadrature):
    """The algorithm of jaxauction: p hoisted, the robust slope in probability space (float32)."""
    n = len(bids)
    dtype = logits.dtype
    log_p = numpy_log_probs(logits).astype(dtype)
    p = np.exp(log_p)
    log_q = numpy_linear(log_p, bids / bids.sum())
    z = np.zeros(n, dtype)
    for i in range(n):
        others = bids.sum() - bids[i]
        if others <= 0 or bids[i] <= 0:
            continue
        without = bids.copy()
        without[i] = 0.0
        pushed_up = log_p[i] > numpy_linear(log_p, without / without.sum())
        u, w = numpy_nodes(quadrature, np.log1p(bids[i] / others), dtype)
        profile = np.broadcast_to(bids, (len(u), n)).copy()
        profile[:, i] = others * np.expm1(u)
        total = profile.sum(axis=1, keepdims=True)
        d_weights = (np.eye(n, dtype=dtype)[i] - profile / total) / total * (others * np.exp(u))[:, None]
        dq = d_weights @ p  # [K, V]
        slope = dq @ pushed_up.astype(dtype)
        z[i] = others * np.sum(w * np.expm1(u) * slope)
    return log_q, z


def make_inputs(n_auctions: int, n_agents: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((n_auctions, n_agents, vocab)) * 3.0).astype(np.float32)
    bids = (10.0 ** rng.uniform(-2, 2, size=(n_auctions, n_agents))).astype(np.float32)
    return logits, bids


def time_jax(logits: np.ndarray, bids: np.ndarray, repeats: int):
    mechanism = jax.jit(
        lambda l, b: (aggregation.linear(l, b), payments.second_price(aggregation.linear, l, b, method="quadrature"))
    )
    jl, jb = jnp.asarray(logits), jnp.asarray(bids)
    start = time.perf_counter()
    out = jax.block_until_ready(mechanism(jl, jb))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(mechanism(jl, jb))
        times.append(time.perf_counter() - start)
    return out, compile_s, min(times)


def time_numpy(implementation, logits: np.ndarray, bids: np.ndarray, quadrature: payments.Quadrature):
    start = time.perf_counter()
    outs = [implementation(l, b, quadrature) for l, b in zip(logits, bids)]
    elapsed = time.perf_counter() - start
    return np.stack([o[0] for o in outs]), np.stack([o[1] for o in outs]), elapsed


def real_logits(path: str = PAYMENT_LOGITS, steps: int = 12) -> np.ndarray:
    """``[A, 3, V]`` float32 log-probabilities (2 advertisers and the bare query) of the bundled model along
    greedy continuations of the Hawaii advertisers (design.data's prompts), cached in ``path``."""
    if os.path.exists(path):
        return np.load(path)
    from jaxauction.design import data
    from jaxauction.engine import scoring
    from jaxauction.engine.request import validate_model

    model = validate_model(None)
    advertisers = data.DEFAULT_ADVERTISERS
    groups = [[k, (k + 1) % len(advertisers)] for k in range(len(advertisers))]
    system = f"You are a copywriter. {data.DEFAULT_QUERY}"
    prompts = [data._chat_ids(model[1], system, text) for text in advertisers]
    base = data._chat_ids(model[1], None, data.DEFAULT_QUERY)
    continuations = data._shared_continuations(model, [[prompts[a] for a in g] for g in groups], steps - 1)
    rows = [r + c for g, c in zip(groups, continuations) for r in [*(prompts[a] for a in g), base]]
    log_p = scoring.next_token_log_probs(model, rows, steps).reshape(len(groups), 3, steps, -1)
    log_p = log_p.transpose(2, 0, 1, 3).reshape(steps * len(groups), 3, -1).astype(np.float32)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, log_p)
    return log_p


def peaked_logits(auctions: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Synthetic ``[A, 2, V]`` logits: a shared heavy-tailed profile plus per-agent preferences."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(vocab) * 4.0
    return (shared + rng.standard_normal((auctions, 2, vocab)) * 2.0).astype(np.float32)


def best_of(f, args, repeats: int) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def exp_floor(elements: int, repeats: int) -> float:
    """Seconds for ``elements`` exponentials summed in one fused pass (48 nodes minor: the fused exp rate)."""
    nodes = 48
    x = jnp.asarray(np.random.default_rng(0).standard_normal((elements // nodes // 512, 512, 1)), jnp.float32)
    a = jnp.linspace(0.01, 0.99, nodes, dtype=jnp.float32)
    return best_of(jax.jit(lambda x: jnp.sum(jnp.exp(x * a), axis=1)), (x,), repeats)


def payments_case(args) -> dict:
    """Issue 37: the payments program alone, structured vs generic vs the rule alone, in one run."""
    cpu = hostinfo.cpu_text()
    share = np.linspace(1.0, 0.0, args.auctions)
    bids = jnp.asarray(np.stack([share, 1.0 - share], 1), jnp.float32)
    inputs = {"real": real_logits()[: args.auctions, :2], "peaked": peaked_logits(args.auctions, args.vocab)}
    print(
        f"payments alone: {args.auctions} auctions x 2 agents, jit, warm, best of {args.repeats}; {cpu}, "
        f"load {os.getloadavg()[0]:.1f}"
    )
    results = []
    for name, logits in inputs.items():
        logits = jnp.asarray(logits)
        for rule, allocation in (("linear", "kl"), ("log_linear", "robust"), ("log_linear", "kl")):
            resolved = rules_lib.linear if rule == "linear" else rules_lib.log_linear
            program = lambda method: jax.jit(
                lambda l, b: payments.charged_payments(
                    resolved, l, b, num_charged=2, allocation=allocation, method=method
                )
            )
            rule_s = best_of(jax.jit(resolved), (logits, bids), args.repeats)
            fast_s = best_of(program("auto"), (logits, bids), args.repeats)
            generic_s = best_of(program("quadrature"), (logits, bids), max(1, args.repeats // 2))
            fast, generic = program("auto")(logits, bids), program("quadrature")(logits, bids)
            diff = float(jnp.max(jnp.abs(fast - generic) / jnp.maximum(jnp.abs(generic), 1e-30)))
            row = dict(
                logits=name,
                rule=rule,
                payment=allocation,
                rule_ms=rule_s * 1e3,
                structured_ms=fast_s * 1e3,
                generic_ms=generic_s * 1e3,
                speedup=generic_s / fast_s,
                max_rel_diff=diff,
            )
            if rule == "log_linear" and allocation == "robust":  # 21 Gauss-Kronrod nodes a row (KL: closed form)
                row["floor_ms"] = exp_floor(2 * args.auctions * 21 * logits.shape[-1], args.repeats) * 1e3
            results.append(row)
            floor = (
                f", floor {row['floor_ms']:.1f} ms ({fast_s * 1e3 / row['floor_ms']:.1f}x)" if "floor_ms" in row else ""
            )
            print(
                f"  {name:6} {rule:10} {allocation:6}: rule alone {rule_s * 1e3:6.1f} ms, structured "
                f"{fast_s * 1e3:6.1f} ms, generic {generic_s * 1e3:7.1f} ms ({generic_s / fast_s:4.1f}x faster)"
                f"{floor}; max rel diff {diff:.1e}"
            )
    print(f"load average at the end {os.getloadavg()}")
    return dict(cases=results, cpu=cpu, load_average_at_end=os.getloadavg(), jax=jax.__version__)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--agents", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--batch", type=int, default=256, help="auctions per JAX call")
    parser.add_argument("--numpy-auctions", type=int, default=8, help="auctions timed for NumPy")
    parser.add_argument("--repeats", type=int, default=3, help="JAX timed runs (best is reported)")
    parser.add_argument("--quick", action="store_true", help="small sizes: vocab 4096, batch 32, 4 NumPy auctions")
    parser.add_argument("--payments", action="store_true", help="issue 37: the payments program alone")
    parser.add_argument("--auctions", type=int, default=11, help="--payments: auctions (the Hawaii sweep's 11)")
    args = parser.parse_args(argv)
    if args.payments:
        result = payments_case(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return result
    if args.quick:
        args.vocab, args.batch, args.numpy_auctions = 4096, 32, 4
    quadrature = payments.Quadrature()
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, numpy {np.__version__}, "
        f"{hostinfo.cpu_text()}; float32; "
        f"V={args.vocab}, JAX batch {args.batch}, NumPy timed on {args.numpy_auctions} auctions; "
        f"{quadrature.size} quadrature nodes per agent"
    )
    header = (
        f"{'n':>3} {'JAX auct/s':>11} {'NumPy plain':>12} {'NumPy hoisted':>14} {'ratio plain':>12} "
        f"{'ratio hoisted':>14} {'compile s':>10} {'max rel diff':>13}"
    )
    print(header)
    cases = []
    for n in args.agents:
        logits, bids = make_inputs(args.batch, n, args.vocab, seed=n)
        (log_q, z), compile_s, jax_s = time_jax(logits, bids, args.repeats)
        k = min(args.numpy_auctions, args.batch)
        plain_log_q, plain_z, plain_s = time_numpy(numpy_plain_auction, logits[:k], bids[:k], quadrature)
        hoisted_log_q, hoisted_z, hoisted_s = time_numpy(numpy_auction, logits[:k], bids[:k], quadrature)
        closed = np.asarray(payments.linear_closed_form(logits[:k], bids[:k]), np.float64)
        scale = np.maximum(np.abs(closed), 1e-6 * bids[:k])
        diff = max(float(np.max(np.abs(np.asarray(zz) - closed) / scale)) for zz in (z[:k], plain_z, hoisted_z))
        jax_q = np.exp(np.asarray(log_q[:k]))
        q_diff = max(float(np.max(np.abs(jax_q - np.exp(other)))) for other in (plain_log_q, hoisted_log_q))
        jax_rate = args.batch / jax_s
        case = dict(
            n_agents=n,
            vocab=args.vocab,
            jax_batch=args.batch,
            numpy_auctions=k,
            jax_seconds=jax_s,
            numpy_plain_seconds=plain_s,
            numpy_hoisted_seconds=hoisted_s,
            jax_auctions_per_s=jax_rate,
            numpy_plain_auctions_per_s=k / plain_s,
            numpy_hoisted_auctions_per_s=k / hoisted_s,
            ratio=jax_rate / (k / plain_s),
            ratio_hoisted=jax_rate / (k / hoisted_s),
            jax_compile_seconds=compile_s,
            max_rel_payment_diff_vs_closed_form=diff,
            max_abs_q_diff_jax_vs_numpy=q_diff,
        )
        cases.append(case)
        print(
            f"{n:>3} {jax_rate:>11.2f} {k / plain_s:>12.3f} {k / hoisted_s:>14.3f} {case['ratio']:>11.1f}x "
            f"{case['ratio_hoisted']:>13.1f}x {compile_s:>10.1f} {diff:>13.1e}"
        )
    result = dict(
        cases=cases,
        ratio_vs_numpy=min(c["ratio"] for c in cases),
        ratio_vs_numpy_hoisted=min(c["ratio_hoisted"] for c in cases),
        note=(
            "ratio_vs_numpy: smallest per-case ratio of auctions/s, JAX (jit, CPU) over plain NumPy (docs/maths.md "
            "formulas at every node); ratio_vs_numpy_hoisted: the same against NumPy with jaxauction's "
            "hoisting and a BLAS mixture"
        ),
        quadrature_nodes=quadrature.size,
        cpus=os.cpu_count(),
        load_average_at_end=os.getloadavg(),
        host=hostinfo.describe(load_end=hostinfo.load_average()),
        jax=jax.__version__,
        numpy=np.__version__,
    )
    print(
        f"ratio vs NumPy, smallest over cases: {result['ratio_vs_numpy']:.1f}x (plain), "
        f"{result['ratio_vs_numpy_hoisted']:.1f}x (hoisted); "
        f"host: {hostinfo.line(load_end=hostinfo.load_average())}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
