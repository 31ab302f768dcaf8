"""Design search over the power-mean family: revenue and welfare, with claims certified on held-out auctions.

Two kinds of search, each maximising (a) expected second-price revenue and (b) the log-linear rule's
welfare ``sum_i b_i (-KL(q || p_i))``:

* the full family (rho, gamma, base bid, temperature) with the smooth violation penalty (docs/maths.md §4) held
  within a budget, a fraction of the log-linear rule's violation, by an augmented Lagrangian;
* the monotone part (``design.search(..., monotone=True)``: rho = 1 and temperature = 1 fixed; gamma and
  base bid free; monotone by construction, docs/maths.md §3).

Every rule in the table (linear, log-linear, each searched rule) carries the strict certificate
(docs/maths.md §4, :func:`jaxauction.design.certify_rule`) on held-out auctions drawn with another seed, and
its revenue and welfare there (each search certifies its own result on them: ``holdout=``); a rule is
called monotone only if its certificate share is 1.0. The penalty budget is not a certificate: a small
penalty can hide failures on many pairs, and a budget-0 search whose rule fails warns
(``design.CertificateWarning``, recorded in the JSON). The plain
power-mean curve (rho from -0.5 to 1.5, other parameters at their defaults) goes to the JSON and plot.

Prints the table and writes ``design_search.json`` and ``design_search.png`` to ``--out``
(atomically); search checkpoints go to ``--out/checkpoints`` so an interrupted run resumes.

    python experiments/design_search.py                 # synthetic Dirichlet auctions, a few minutes
    python experiments/design_search.py --data llm      # the bundled LLM's ad distributions (cached)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import optax

from jaxauction import design, outputs
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
    parser.add_argument("--seed", type=int, default=0, help="seed of the auctions and bids the search fits")
    parser.add_argument(
        "--heldout-seed", type=int, default=None, help="seed of the held-out auctions (default: --seed + 1000)"
    )
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
    if args.heldout_seed is None:
        args.heldout_seed = args.seed + 1000
    if args.heldout_seed == args.seed:
        parser.error("--heldout-seed must differ from --seed (held-out auctions are not the ones fitted)")
    return args


def load_auctions(args, seed: int) -> tuple[design.AuctionBatch, dict]:
    """The Dirichlet auctions of ``seed``; for ``--data llm`` the LLM's auctions with bid profiles of ``seed``
    (the LLM's distributions are the same for both seeds: only the bids are held out)."""
    if args.data == "llm":
        batch = design.llm_auctions(args.out / f"llm_auctions_seed{seed}.npz", seed=seed)
        settings = {"data": "llm", "seed": seed}
    else:
        batch = design.dirichlet_auctions(
            seed, args.auctions, args.agents, args.vocab, concentration=args.concentration, with_base=True
        )
        settings = {key: getattr(args, key) for key in ("auctions", "agents", "vocab", "concentration")}
        settings.update(data="dirichlet", seed=seed)
    settings["shape"] = list(batch.logits.shape)
    return batch, settings


def assess(params: design.PowerMeanParams, batch, heldout, certificate=None) -> dict:
    """Training metrics, held-out metrics and the held-out certificate of one rule (a search's own, if given)."""
    certificate = design.certify_rule(params, heldout) if certificate is None else certificate
    return {
        "params": params.to_dict(),
        **design.evaluate(params, batch),
        "heldout": design.evaluate(params, heldout),
        "certificate": certificate.to_dict(),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    batch, data_settings = load_auctions(args, args.seed)
    heldout, heldout_settings = load_auctions(args, args.heldout_seed)
    fingerprint = hashlib.sha256(json.dumps(data_settings, sort_keys=True).encode()).hexdigest()[:12]
    print(f"auctions: {data_settings}\nheld-out: {heldout_settings}")

    linear, log_linear = design.PowerMeanParams.linear(), design.PowerMeanParams.log_linear()
    references = {"linear": assess(linear, batch, heldout), "log_linear": assess(log_linear, batch, heldout)}
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
    plans = [(name, "penalty", budget) for name in OBJECTIVES for budget in args.budgets]
    plans += [(name, "monotone", None) for name in OBJECTIVES]
    searches = []
    for name, kind, budget in plans:
        common = dict(
            steps=args.steps,
            optimizer=optimizer,
            bounds=bounds,
            checkpoint_every=25,
            progress=not args.no_progress,
            tag=fingerprint,
            holdout=heldout,  # the search's result carries its held-out certificate
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", design.CertificateWarning)
            if kind == "penalty":  # a budget of 0 asks for a monotone rule: a failing certificate warns
                result = design.search(
                    objective=OBJECTIVES[name],
                    params=start,
                    data=batch,
                    constraint=design.Constraint(
                        relative_violation, budget=budget, penalty=args.penalty, multiplier_every=10
                    ),
                    checkpoint=args.out / "checkpoints" / f"{name}_budget{budget:g}_{fingerprint}.npz",
                    description=f"{name} penalty budget {budget:g}",
                    **common,
                )
            else:  # the monotone part: rho = 1, temperature = 1 frozen (docs/maths.md §3)
                result = design.search(
                    objective=OBJECTIVES[name],
                    params=start,
                    data=batch,
                    monotone=True,
                    checkpoint=args.out / "checkpoints" / f"{name}_monotone_{fingerprint}.npz",
                    description=f"{name} monotone part",
                    **common,
                )
        metrics = assess(result.params, batch, heldout, result.certificate)
        warned = [str(w.message) for w in caught if issubclass(w.category, design.CertificateWarning)]
        for message in warned:
            print(f"CertificateWarning: {message}", file=sys.stderr)
        at_bounds = [
            field
            for field, value in result.params.to_dict().items()
            if np.isclose(value, float(getattr(bounds.lower, field)))
            or np.isclose(value, float(getattr(bounds.upper, field)))
        ]
        searches.append(
            {
                "objective": name,
                "family": "full, violation penalty" if kind == "penalty" else "monotone part (rho=1, tau=1)",
                "budget": budget,
                "at_bounds": at_bounds,
                "multiplier": result.multiplier,
                "certificate_warning": warned[0] if warned else None,
                **metrics,
                "relative_violation": metrics["violation"] / scale,
                "history": {key: result.history[key].tolist() for key in ("objective", "constraint", "multiplier")},
            }
        )

    summary = summarise(references, searches)
    print_table(references, searches, scale, summary)
    results = {
        "data": data_settings,
        "heldout_data": heldout_settings,
        "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        "violation_unit": "mean over auctions of sum_i sum_t max(0, -(p_i(t) - q_t) dq_t/db_i) (docs/maths.md §4)",
        "certificate": "share of held-out (auction, agent) pairs passing the strict check of docs/maths.md §4 "
        "(bids raised by 1.01, 1.1, 2; every token; float-rounding tolerance); monotone iff share == 1.0",
        "log_linear_violation": scale,
        "references": references,
        "power_mean_curve": curve,
        "searches": searches,
        "summary": summary,
        "seconds": time.time() - started,
        "backend": jax.default_backend(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    outputs.write_json(args.out / "design_search.json", results)
    plot(references, curve, searches, scale, args.out / "design_search.png")
    print(
        f"wrote {args.out / 'design_search.json'} and {args.out / 'design_search.png'} in {time.time() - started:.0f} s"
    )
    return 0


def label(search: dict) -> str:
    if search["budget"] is None:
        return f"max {search['objective']}, monotone=True"
    return f"max {search['objective']}, penalty <= {search['budget']:g}"


def summarise(references: dict, searches: list[dict]) -> dict:
    """The monotone rule (certificate share 1.0) with the most held-out revenue, against linear."""
    rows = [("linear", references["linear"]), ("log-linear", references["log_linear"])]
    rows += [(label(s), s) for s in searches]
    monotone = [(name, row) for name, row in rows if row["certificate"]["monotone"]]
    best_name, best = max(monotone, key=lambda item: item[1]["heldout"]["revenue"])
    base = references["linear"]["heldout"]["revenue"]
    return {
        "best_monotone_rule": best_name,
        "best_monotone_params": best["params"],
        "best_monotone_heldout_revenue": best["heldout"]["revenue"],
        "linear_heldout_revenue": base,
        "relative_gain_over_linear": best["heldout"]["revenue"] / base - 1.0,
        "monotone_rules": [name for name, _ in monotone],
    }


def print_table(references, searches, scale, summary) -> None:
    header = (
        f"{'rule':<36}{'rho':>7}{'gamma':>7}{'base':>7}{'tau':>6}{'rev fit':>9}{'rev held':>9}{'W rev held':>11}"
        f"{'viol/LL':>9}{'cert':>7}{'worst':>9}  monotone"
    )
    print(header)
    print("-" * len(header))
    rows = [("linear", references["linear"]), ("log-linear", references["log_linear"])]
    rows += [(label(s), s) for s in searches]
    for name, row in rows:
        params, certificate = row["params"], row["certificate"]
        print(
            f"{name:<36}{params['rho']:>7.3f}{params['gamma']:>7.3f}{params['base_bid']:>7.3f}"
            f"{params['temperature']:>6.2f}{row['revenue']:>9.4f}{row['heldout']['revenue']:>9.4f}"
            f"{row['heldout']['welfare_reverse']:>11.4f}{row['violation'] / scale:>9.3f}{certificate['share']:>7.3f}"
            f"{certificate['worst']:>9.2e}  {'yes' if certificate['monotone'] else 'no'}"
        )
    print(
        f"(rev fit: revenue on the fitted auctions; held: on held-out auctions; viol/LL: fitted violation penalty "
        f"relative to log-linear's, {scale:.3g}; cert: share of held-out (auction, agent) pairs passing the strict "
        "check; worst: largest violation in probability units; monotone iff cert = 1.000)"
    )
    print(
        f"best monotone rule on held-out revenue: {summary['best_monotone_rule']} "
        f"({summary['best_monotone_heldout_revenue']:.4f} vs linear {summary['linear_heldout_revenue']:.4f}, "
        f"{100 * summary['relative_gain_over_linear']:+.1f}%)"
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
        best = sorted(
            (s for s in searches if s["objective"] == objective and s["budget"] is not None), key=lambda s: s["budget"]
        )
        axis.plot(
            [s["relative_violation"] for s in best],
            [s[metric] for s in best],
            "o-",
            color="C0",
            label=f"max {objective} within penalty budget",
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
        monotone = [s for s in searches if s["objective"] == objective and s["budget"] is None]
        axis.plot(
            [s["relative_violation"] for s in monotone],
            [s[metric] for s in monotone],
            "D",
            color="C4",
            markersize=8,
            label=f"max {objective}, monotone=True",
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
    outputs.save_figure(figure, path, dpi=130)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
