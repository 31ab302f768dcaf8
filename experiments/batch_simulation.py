"""100,000 random bid profiles over the Hawaii advertisers' next-token distributions.

The agents' logits are taken along a jointly written Hawaii ad (the greedy 50/50 auction of
experiments/configs/hawaii.toml): at every one of its first ``--positions`` tokens, each agent's LLM
gives a next-token distribution, ``[K, n, V]`` in all, cached in ``--cache``. Each simulated auction
draws a position and a log-normal bid profile and runs the token auction (mechanism only, no
decoding), sharded over all devices (jaxauction.sharding). Printed: the distribution of payments,
welfare and which advertiser the outcome favours, by bid-ratio bin, for the linear and the
log-linear rule, the throughput, and the error of the vocabulary compression against the full
vocabulary on a subset. Saved: a PNG plot and a JSON table.

    python experiments/batch_simulation.py                    # 100,000 profiles
    python experiments/batch_simulation.py --profiles 2000    # a quick look
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def agent_logits_along_ad(config_path: str, positions: int, model_source=None) -> dict:
    """``[K, n, V]`` agent logits at the first K tokens of the greedy 50/50 joint ad."""
    import jax.numpy as jnp

    from jaxauction import models
    from jaxauction.config import load_config
    from jaxauction.engine import generate
    from jaxauction.prompts import encode_prompt, left_pad

    config = load_config(config_path)
    model, tokenizer = models.load(model_source)
    bids = [1.0] * len(config.advertisers)
    ad = generate(
        config.prompts(), bids, decoding="greedy", payment=None, max_new_tokens=positions, model=(model, tokenizer)
    )
    continuation = [int(t) for t in ad.tokens[: int(ad.lengths)]]
    sequences = [encode_prompt(tokenizer, p) + continuation for p in config.prompts()]
    ids, mask = left_pad(sequences, tokenizer.pad_token_id)
    logits = models.jit_forward(model, jnp.asarray(ids), jnp.asarray(mask))
    # With left padding every row ends at the same position: the logits predicting continuation
    # token k sit at position k - len(continuation) - 1 from the end.
    along = np.asarray(logits[:, -len(continuation) - 1 : -1])  # [n, K, V]
    return {"logits": along.transpose(1, 0, 2), "text": ad.text, "names": np.array(config.names)}


def binned_table(result, names, edges) -> list[dict]:
    log_ratio = np.log(result.bids[:, 0] / result.bids[:, 1])
    which = np.digitize(log_ratio, edges[1:-1])
    rows = []
    for b in range(len(edges) - 1):
        sel = which == b
        rows.append(
            {
                "log_ratio": [float(edges[b]), float(edges[b + 1])],
                "auctions": int(sel.sum()),
                **{f"payment {n}": float(result.payments[sel, i].mean()) for i, n in enumerate(names)},
                "revenue": float(result.revenue[sel].mean()),
                "welfare": float(result.welfare[sel].mean()),
                **{f"favours {n}": float((result.favoured[sel] == i).mean()) for i, n in enumerate(names)},
            }
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", type=int, default=100_000)
    parser.add_argument("--positions", type=int, default=16, help="ad tokens to take logits at")
    parser.add_argument("--config", default=str(REPO / "experiments" / "configs" / "hawaii.toml"))
    parser.add_argument("--cache", default="outputs/hawaii_agent_logits.npz")
    parser.add_argument(
        "--mass", type=float, default=0.99, help="probability kept per agent by the vocabulary compression"
    )
    parser.add_argument(
        "--check", type=int, default=128, help="profiles re-run on the full vocabulary to measure the compression error"
    )
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument(
        "--nodes",
        type=int,
        default=16,
        choices=[16, 32, 64],
        help="quadrature nodes of the payments (the library default is 64)",
    )
    parser.add_argument("--out", default="outputs")
    parser.add_argument("--model", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import jax

    from jaxauction import sharding, simulation
    from jaxauction.payments import Quadrature

    panels = {
        16: dict(zero_panels=0, body_panels=1, tail_panels=1),
        32: dict(zero_panels=1, body_panels=2, tail_panels=1),
        64: {},
    }[args.nodes]
    quadrature = Quadrature(**panels)
    from jaxauction.outputs import atomic_path, write_json

    cache = Path(args.cache)
    if cache.exists():
        data = dict(np.load(cache))
        print(f"agent logits from {cache}")
    else:
        print("computing the agents' logits along the joint ad with the LLM ...")
        data = agent_logits_along_ad(args.config, args.positions, args.model)
        with atomic_path(cache) as temporary:
            with open(temporary, "wb") as handle:
                np.savez(handle, **data)
    logits, names = data["logits"], [str(n) for n in data["names"]]
    print(f"joint ad: {str(data['text'])!r}\nlogits: {logits.shape} (positions, agents, vocab)")

    compressed, kept = simulation.compress_vocabulary(logits, args.mass)
    print(
        f"vocabulary compression: {logits.shape[-1]} -> {compressed.shape[-1]} tokens "
        f"(kept mass >= {args.mass} per agent)"
    )
    rng = np.random.default_rng(args.seed)
    bids = rng.lognormal(0.0, 1.0, size=(args.profiles, logits.shape[1]))
    index = rng.integers(0, logits.shape[0], size=args.profiles)
    mesh = sharding.auction_mesh()
    print(f"devices: {mesh.size} ({jax.devices()[0].platform})")

    edges = np.array([-np.inf, -2.0, -1.0, -0.25, 0.25, 1.0, 2.0, np.inf])
    report = {
        "profiles": args.profiles,
        "vocab": int(logits.shape[-1]),
        "nodes": args.nodes,
        "mass": args.mass,
        "compressed_vocab": int(compressed.shape[-1]),
        "devices": mesh.size,
        "rules": {},
    }
    results = {}
    for rule in ("linear", "log_linear"):
        check = min(args.check, args.profiles)
        full = simulation.simulate(
            logits, bids[:check], index=index[:check], rule=rule, chunk_size=64, mesh=mesh, progress=False
        )
        simulation.simulate(
            compressed,
            bids[: args.chunk],
            index=index[: args.chunk],
            rule=rule,
            chunk_size=args.chunk,
            mesh=mesh,
            progress=False,
            quadrature=quadrature,
        )  # compile
        start = time.perf_counter()
        result = simulation.simulate(
            compressed, bids, index=index, rule=rule, chunk_size=args.chunk, mesh=mesh, quadrature=quadrature
        )
        seconds = time.perf_counter() - start
        error = np.abs(result.payments[:check] - full.payments)
        relative = float(error.max() / max(np.abs(full.payments).max(), 1e-30))
        favoured_agree = float((result.favoured[:check] == full.favoured).mean())
        results[rule] = result
        report["rules"][rule] = {
            "seconds": seconds,
            "auctions_per_second": args.profiles / seconds,
            "compression_max_abs_payment_error": float(error.max()),
            "compression_max_payment_error_relative_to_largest_payment": relative,
            "compression_favoured_agreement": favoured_agree,
            "bins": binned_table(result, names, edges),
        }
        print(
            f"\n== {rule}: {args.profiles} auctions in {seconds:.1f} s = "
            f"{args.profiles / seconds:,.0f} auctions/s; error against the full vocabulary and "
            f"64-node payments on {check} profiles: "
            f"max |dz| = {error.max():.2e} ({relative:.1e} of the largest payment), favoured agrees "
            f"{favoured_agree:.1%}"
        )
        header = (
            f"{'log(b1/b2)':>16} {'auctions':>9}"
            + "".join(f"{'pay ' + n.split()[0]:>11}" for n in names)
            + f"{'revenue':>10}{'welfare':>10}"
            + "".join(f"{'fav ' + n.split()[0]:>11}" for n in names)
        )
        print(header)
        for row in report["rules"][rule]["bins"]:
            lo, hi = row["log_ratio"]
            print(
                f"{f'[{lo:+.2f}, {hi:+.2f})':>16} {row['auctions']:>9}"
                + "".join(f"{row[f'payment {n}']:>11.4f}" for n in names)
                + f"{row['revenue']:>10.4f}{row['welfare']:>10.4f}"
                + "".join(f"{row[f'favours {n}']:>11.1%}" for n in names)
            )

    out = Path(args.out)
    write_json(out / "batch_simulation.json", report)
    plot(results, names, edges, out / "batch_simulation.png")
    print(f"\nsaved {out / 'batch_simulation.png'} and {out / 'batch_simulation.json'}")
    return 0


def plot(results, names, edges, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxauction.outputs import save_figure

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    centers = np.linspace(-3, 3, 25)
    for rule, style in (("linear", "-"), ("log_linear", "--")):
        result = results[rule]
        log_ratio = np.log(result.bids[:, 0] / result.bids[:, 1])
        which = np.clip(np.digitize(log_ratio, centers) - 1, 0, len(centers) - 2)
        mids = (centers[1:] + centers[:-1]) / 2

        def binned(values):
            return np.array([values[which == b].mean() if np.any(which == b) else np.nan for b in range(len(mids))])

        for i, name in enumerate(names):
            axes[0].plot(mids, binned(result.payments[:, i]), style, color=f"C{i}", label=f"{name} ({rule})")
            axes[2].plot(
                mids, binned((result.favoured == i).astype(float)), style, color=f"C{i}", label=f"{name} ({rule})"
            )
        axes[1].plot(mids, binned(result.welfare), style, color="k", label=rule)
    axes[0].set(xlabel="log(b_Alpha / b_Beta)", ylabel="mean payment per token", title="Payments")
    axes[1].set(xlabel="log(b_Alpha / b_Beta)", ylabel="mean bid-weighted welfare", title="Welfare")
    axes[2].set(
        xlabel="log(b_Alpha / b_Beta)",
        ylabel="share of auctions",
        ylim=(-0.05, 1.05),
        title="Whom the outcome favours (closest agent)",
    )
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    save_figure(figure, path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
