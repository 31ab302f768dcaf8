"""Cost of the certified rule's payment in a decode step: its closed form against the linear rule's.

The certified rule of ``experiments/benchmark.py`` is the power-mean rule at rho = 1, temperature = 1
(``q = sum_j lambda_j p_j``, ``lambda_j ∝ b_j**gamma``). Its robust second-price payment is
``z_i = b_i TV(p_i, q_-i) Psi(Y_i, gamma)`` (docs/maths.md §5, ``jaxauction.payments.PowerWeightClosedForm``):
the same work over the vocabulary as the linear rule's closed form plus a scalar integral per agent. This
times both, as the decode loop calls them (``payments.charged_payments`` under ``jit``, float32), on a
decode-step-sized input (default 22 auctions x 3 agents x 49152 tokens), interleaved, and prints the
median ratio and the load average (``os.getloadavg``) before and after. ``--generic`` also times the
certified rule on the generic autodiff + quadrature path it took before (``method="quadrature"``).

    python experiments/certified_payment_cost.py                  # ratio of the two closed forms
    python experiments/certified_payment_cost.py --generic        # and the generic path (slow)
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

from jaxauction import design, payments


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--auctions", type=int, default=22)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--gamma", type=float, default=2.7836315631866455, help="the certified rule's gamma")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls of each (interleaved)")
    parser.add_argument("--generic", action="store_true", help="also time the generic quadrature path (slow)")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    return parser.parse_args(argv)


def compiled(rule, n: int, method: str = "auto"):
    return jax.jit(lambda logits, bids: payments.charged_payments(rule, logits, bids, num_charged=n, method=method))


def seconds(function, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(function(*args))
    return time.perf_counter() - start


def main(argv=None) -> dict:
    args = parse_args(argv)
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(args.auctions, args.agents, args.vocab)) * 3, jnp.float32)
    bids = jnp.asarray(rng.dirichlet(np.ones(args.agents), size=args.auctions), jnp.float32)
    certified = design.fixed_rule(design.PowerMeanParams.create(gamma=args.gamma))
    functions = {"linear": compiled("linear", args.agents), "certified": compiled(certified, args.agents)}
    if args.generic:
        functions["certified_generic"] = compiled(certified, args.agents, "quadrature")
    load_before = os.getloadavg()
    for function in functions.values():  # compile and warm up
        jax.block_until_ready(function(logits, bids))
    times = {name: [] for name in functions}
    for _ in range(args.repeats):
        for name, function in functions.items():
            if name != "certified_generic" or len(times[name]) < 3:
                times[name].append(seconds(function, logits, bids))
    load_after = os.getloadavg()
    medians = {name: float(np.median(values)) for name, values in times.items()}
    result = {
        "shape": [args.auctions, args.agents, args.vocab],
        "gamma": args.gamma,
        "median_seconds": medians,
        "ratio_certified_to_linear": medians["certified"] / medians["linear"],
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "backend": jax.default_backend(),
        "host": hostinfo.describe(load_before, load_after),
    }
    if args.generic:
        result["ratio_generic_to_linear"] = medians["certified_generic"] / medians["linear"]
    shape = "x".join(map(str, result["shape"]))
    print(f"payments per decode step, {shape}, float32, {len(result['cpu_affinity'])} core(s):")
    for name, value in medians.items():
        print(f"  {name:<18} {1e3 * value:9.3f} ms  ({value / medians['linear']:.2f}x linear)")
    print(f"host: {hostinfo.line(load_before, load_after)}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
