"""A worked token auction (the paper's Hawaii demonstration's Hawaii setting) on MADE-UP next-token distributions.

No language model is involved: the three distributions below are invented by hand to show the
mechanism (aggregation, payments, bid ratios). Run ``python -m jaxauction.demo_mechanism``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxauction import TokenAuction, aggregation, payments, preferences, sampling

VOCAB = ["Fly", "Enjoy", "Alpha", "Beta", "Airlines", "Resort", "Hawaii", "beaches", "flights", "<eos>"]

# Made-up next-token probabilities after the user query "Vacations in Hawaii" (each row sums to 1).
MADE_UP = {
    "Alpha Airlines": [0.34, 0.02, 0.28, 0.00, 0.12, 0.00, 0.10, 0.02, 0.11, 0.01],
    "Beta Resort": [0.02, 0.36, 0.00, 0.30, 0.00, 0.12, 0.08, 0.10, 0.01, 0.01],
    "base (query only)": [0.15, 0.15, 0.05, 0.05, 0.02, 0.02, 0.30, 0.15, 0.10, 0.01],
}


def _logits() -> jax.Array:
    probs = np.array(list(MADE_UP.values()))
    with np.errstate(divide="ignore"):
        return jnp.asarray(np.log(probs), jnp.float32)  # a probability of 0 is a masked token (-inf)


def _row(label: str, values, fmt="{:>9.3f}") -> str:
    return f"{label:<22}" + "".join(fmt.format(v) for v in values)


def main() -> None:
    logits = _logits()
    agents, base = logits[:2], logits[2]
    names = list(MADE_UP)[:2]
    print(
        "jaxauction mechanism demo: the paper's Hawaii demonstration setting, MADE-UP distributions (no LLM involved)"
    )
    print("Next-token distributions after 'Vacations in Hawaii' (invented by hand):")
    print(_row("token", VOCAB, "{:>9}"))
    for name, probs in MADE_UP.items():
        print(_row(name, probs))

    bids = jnp.array([2.0, 1.0])
    print(f"\nBids: {names[0]} {float(bids[0])}, {names[1]} {float(bids[1])} (no base distribution)")
    for rule in (aggregation.linear, aggregation.log_linear):
        q = np.exp(np.asarray(rule(agents, bids)))
        print(_row(f"q, {rule.__name__}", q))
    print("(log-linear gives 0 to every token that one advertiser gives probability 0)")

    print("\nPayments for this token (expected, per agent):")
    generic = payments.second_price(aggregation.linear, agents, bids)
    closed = payments.linear_closed_form(agents, bids)
    print(_row("second price, linear", generic) + "   (autodiff + quadrature)")
    print(_row("closed form, linear", closed) + "   (docs/maths.md §5 formula)")
    print(_row("second price, log-lin", payments.second_price(aggregation.log_linear, agents, bids)))
    print(_row("KL (Myerson), linear", payments.second_price(aggregation.linear, agents, bids, "kl")))
    print(_row("KL (Myerson), log-lin", payments.second_price(aggregation.log_linear, agents, bids, "kl")))
    rules = (aggregation.linear, aggregation.log_linear)
    violation = [preferences.monotonicity_violation(rule, agents, bids) for rule in rules]
    print(_row("violation, linear", violation[0], "{:>9.1e}") + "   (docs/maths.md §4; 0 = monotone)")
    print(_row("violation, log-lin", violation[1], "{:>9.1e}"))

    print("\nBid ratio sweep (Alpha : Beta), linear rule with the base distribution at base bid 0.5:")
    ratios = np.array([1 / 16, 1 / 4, 1.0, 4.0, 16.0])
    sweep = jnp.stack([jnp.asarray(ratios, jnp.float32), jnp.ones(len(ratios))], axis=-1)
    auction = TokenAuction(base_logits=base, base_bid=0.5)
    outcome = jax.jit(lambda a, l, b: a(l, b))(auction, agents, sweep)
    log_linear_q = aggregation.log_linear(agents, sweep)
    print(
        f"{'ratio':>7} {'top (lin)':>10} {'top (loglin)':>13} {'P(Alpha)':>9} {'P(Beta)':>8} "
        f"{'pay Alpha':>10} {'pay Beta':>9}"
    )
    for k, ratio in enumerate(ratios):
        q = np.exp(np.asarray(outcome.log_q[k]))
        print(
            f"{ratio:>7.3g} {VOCAB[int(np.argmax(q))]:>10} {VOCAB[int(np.argmax(log_linear_q[k]))]:>13} "
            f"{q[2]:>9.3f} {q[3]:>8.3f} {float(outcome.payments[k, 0]):>10.4f} {float(outcome.payments[k, 1]):>9.4f}"
        )

    keys = jax.random.split(jax.random.key(0), 20000)
    tokens, realized = jax.jit(jax.vmap(sampling.stable_sample_two, in_axes=(0, None, None)))(keys, agents, bids)
    print("\nStable sampling (docs/maths.md §5), 20000 draws at bids 2 : 1:")
    print(f"  first draws: {[VOCAB[int(t)] for t in tokens[:6]]}")
    print(_row("  mean realized payment", np.asarray(realized).mean(axis=0)) + "   (vs expected above)")


if __name__ == "__main__":
    main()
