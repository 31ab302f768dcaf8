"""Design search over the power-mean family: revenue and welfare against monotonicity violation.

For each violation budget (a fraction of the log-linear rule's violation on the same auctions) the
search maximises (a) expected second-price revenue and (b) the log-linear rule's welfare
``sum_i b_i (-KL(q || p_i))`` over all four family parameters (rho, gamma, base bid, temperature),
with the violation handled by an augmented Lagrangian. It also traces the plain power-mean curve
(rho from -0.5 to 1.5, other parameters at their defaults) and marks the linear and log-linear rules.

Prints a table and writes ``design_search.json`` and ``design_search.png`` to ``--out`` (atomically);
search checkpoints go to ``--out/checkpoints`` so an interrupted run resumes where it stopped.

    python experiments/design_search.py                 # synthetic Dirichlet auctions, a few minutes
    python experiments/design_search.py --data llm      # the bundled LLM's ad distributions (cached)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax

from jaxauction import _io, design
from jaxauction.design import objectives

OBJECTIVES = {
    "revenue": objectives.revenue,
    "welfare_reverse": lambda params, batch: objectives.welfare(params, batch, valuation="reverse"),
}
METRICS = ("revenue", "welfare_forward", "welfare_reverse", "violation")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/design_search"), help="output folder")
    parser.add_argument("--data", choices=("dirichlet", "llm"), default="dirichlet")
    parser.add_argument("--auctions", type=int, default=48, help="Dirichlet: number of auctions")
    parser.add_argument("--agents", type=int, default=3, help="Dirichlet: agents per auction")
    parser.add_argument("--vocab", type=int, default=16, help="Dirichlet: outcomes per auction")
    parser.add_argument("--concentration", type=float, default=1.0, help="Dirichlet: concentration")
    parser.add_argument("--seed", type=int, default=0, help="seed of the auctions and bids")
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps per search")
    parser.add_argument("--learning-rate", type=float, default=0.03)
    parser.add_argument("--penalty", type=float, default=20.0, help="augmented Lagrangian penalty (relative units)")
    parser.add_argument(
        "--budgets", default="0,0.1,0.3,1", help="violation budgets as fractions of log-linear's violation"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    try:
        args.budgets = [float(value) for value in args.budgets.split(",")]
    except ValueError:
        parser.error(f"--budgets must be comma-separated numbers, got {args.budgets!r}")
    if any(b < 0 for b in args.budgets) or args.steps < 1 or args.auctions < 1 or args.agents < 2 or args.vocab < 2:
        parser.error("need budgets >= 0, steps >= 1, auctions >= 1, agents >= 2 and vocab >= 2")
    return args


def load_auctions(args) -> tuple[design.AuctionBatch, dict]:
    if args.data == "llm":
        batch = design.llm_auctions(args.out / "llm_auctions.npz", seed=args.seed)
        settings = {"data": "llm", "seed": args.seed}
    else:
        batch = design.dirichlet_auctions(
            args.seed, args.auctions, args.agents, args.vocab, concentration=args.concentration, with_base=True
        )
        settings = {key: getattr(args, key) for key in ("auctions", "agents", "vocab", "concentration", "seed")}
        settings["data"] = "dirichlet"
    settings["shape"] = list(batch.logits.shape)
    return batch, settings


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    batch, data_settings = load_auctions(args)
    fingerprint = hashlib.sha256(json.dumps(data_settings, sort_keys=True).encode()).hexdigest()[:12]
    print(f"auctions: {data_settings}")

    linear, log_linear = design.PowerMeanParams.linear(), design.PowerMeanParams.log_linear()
    references = {"linear": design.evaluate(linear, batch), "log_linear": design.evaluate(log_linear, batch)}
    scale = references["log_linear"]["violation"]
    if not scale > 0:
        print("log-linear is monotone on these auctions: nothing to trade off.", file=sys.stderr)
        return 1

    def relative_violation(params, data):
        return objectives.violation(params, data) / scale

    curve = []
    for rho in np.linspace(-0.5, 1.5, 9):
        point = design.evaluate(design.PowerMeanParams.create(rho=float(rho)), batch)
        curve.append({"rho": float(rho), **point})

    optimizer = optax.adam(args.learning_rate)  # one object: every search reuses one compiled step
    bounds = design.Bounds.create(rho=(-1.0, 3.0), gamma=(0.0, 4.0), base_bid=(0.0, 10.0), temperature=(0.25, 4.0))
    start = design.PowerMeanParams.create(base_bid=0.05)  # linear, with a little base weight to explore
    searches = []
    for name, objective in OBJECTIVES.items():
        for budget in args.budgets:
            result = design.search(
                objective,
                start,
                batch,
                steps=args.steps,
                constraint=design.Constraint(
                    relative_violation, budget=budget, penalty=args.penalty, multiplier_every=10
                ),
                optimizer=optimizer,
                bounds=bounds,
                checkpoint=args.out / "checkpoints" / f"{name}_budget{budget:g}_{fingerprint}.npz",
                checkpoint_every=25,
                progress=not args.no_progress,
                description=f"{name} budget {budget:g}",
                tag=fingerprint,
            )
            metrics = design.evaluate(result.params, batch)
            at_bounds = [
                field
                for field, value in result.params.to_dict().items()
                if np.isclose(value, float(getattr(bounds.lower, field)))
                or np.isclose(value, float(getattr(bounds.upper, field)))
            ]
            searches.append(
                {
                    "objective": name,
                    "budget": budget,
                    "params": result.params.to_dict(),
                    "at_bounds": at_bounds,
                    "multiplier": result.multiplier,
                    **metrics,
                    "relative_violation": metrics["violation"] / scale,
                    "history": {key: result.history[key].tolist() for key in ("objective", "constraint", "multiplier")},
                }
            )

    print_table(references, curve, searches, scale)
    results = {
        "data": data_settings,
        "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        "violation_unit": "mean over auctions of sum_i sum_t max(0, -(p_i(t) - q_t) dq_t/db_i) (SPEC §3)",
        "log_linear_violation": scale,
        "references": references,
        "power_mean_curve": curve,
        "searches": searches,
        "seconds": time.time() - started,
        "backend": jax.default_backend(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    _io.write_json(args.out / "design_search.json", results)
    plot(references, curve, searches, scale, args.out / "design_search.png")
    print(
        f"wrote {args.out / 'design_search.json'} and {args.out / 'design_search.png'} in {time.time() - started:.0f} s"
    )
    return 0


def print_table(references, curve, searches, scale) -> None:
    header = (
        f"{'rule':<28}{'rho':>7}{'gamma':>7}{'base':>7}{'tau':>6}{'revenue':>9}{'W fwd':>9}{'W rev':>9}{'viol/LL':>9}"
    )
    print(header)
    print("-" * len(header))
    rows = [("linear", design.PowerMeanParams.linear().to_dict(), references["linear"])]
    rows.append(("log-linear", design.PowerMeanParams.log_linear().to_dict(), references["log_linear"]))
    rows += [
        (
            f"power mean rho={point['rho']:g}",
            {"rho": point["rho"], "gamma": 1.0, "base_bid": 0.0, "temperature": 1.0},
            point,
        )
        for point in curve
    ]
    rows += [(f"max {s['objective']} <= {s['budget']:g}", s["params"], s) for s in searches]
    for label, params, metrics in rows:
        print(
            f"{label:<28}{params['rho']:>7.3f}{params['gamma']:>7.3f}{params['base_bid']:>7.3f}{params['temperature']:>6.2f}"
            f"{metrics['revenue']:>9.4f}{metrics['welfare_forward']:>9.4f}{metrics['welfare_reverse']:>9.4f}"
            f"{metrics['violation'] / scale:>9.3f}"
        )
    print(
        f"(violation relative to log-linear's, {scale:.3g}; W fwd = sum_i b_i (-KL(p_i||q)), W rev = sum_i b_i (-KL(q||p_i)))"
    )


def plot(references, curve, searches, scale, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, metric, objective, title in (
        (axes[0], "revenue", "revenue", "expected second-price revenue"),
        (axes[1], "welfare_reverse", "welfare_reverse", "welfare, log-linear's valuation"),
    ):
        x = [point["violation"] / scale for point in curve]
        axis.plot(x, [point[metric] for point in curve], "-", color="0.6", label="power mean, rho in [-0.5, 1.5]")
        for point in curve:
            axis.annotate(f"{point['rho']:g}", (point["violation"] / scale, point[metric]), fontsize=7, color="0.4")
        best = sorted((s for s in searches if s["objective"] == objective), key=lambda s: s["budget"])
        axis.plot(
            [s["relative_violation"] for s in best],
            [s[metric] for s in best],
            "o-",
            color="C0",
            label=f"max {objective} within budget",
        )
        for s in best:
            axis.annotate(
                f"budget {s['budget']:g}",
                (s["relative_violation"], s[metric]),
                fontsize=7,
                color="C0",
                xytext=(4, -10),
                textcoords="offset points",
            )
        others = [s for s in searches if s["objective"] != objective]
        axis.plot(
            [s["relative_violation"] for s in others],
            [s[metric] for s in others],
            "x",
            color="C2",
            label="optima of the other objective",
        )
        axis.plot(0.0, references["linear"][metric], "s", color="C3", markersize=9, label="linear")
        axis.plot(1.0, references["log_linear"][metric], "^", color="C1", markersize=9, label="log-linear")
        axis.set_xlabel("monotonicity violation / log-linear's")
        axis.set_ylabel(metric.replace("_", " "))
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    figure.tight_layout()
    _io.save_figure(figure, path, dpi=130)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
