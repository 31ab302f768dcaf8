"""Design search over every family (power mean, learned monotone weights): claims certified on held-out auctions.

Two kinds of search, each maximising (a) expected second-price revenue and (b) the log-linear rule's
welfare ``sum_i b_i (-KL(q || p_i))``:

* the full family (rho, gamma, base bid, temperature) with the smooth violation penalty (docs/maths.md §4) held
  within a budget, a fraction of the log-linear rule's violation, by an augmented Lagrangian;
* the monotone part (``design.search(..., monotone=True)``: rho = 1 and temperature = 1 fixed; gamma and
  base bid free; monotone by construction, docs/maths.md §3).

* the learned monotone family (``design.MonotoneWeightParams``: weights ``∝ g(b / u)``, ``g`` increasing for
  every parameter, the unit ``u`` the base bid; docs/maths.md §3), started at the power mean's monotone
  optimum of the same objective (so it starts where the power weights end and can only improve the fit).

On two kinds of data (``--data``, default both): Dirichlet auctions (fitted seed 0, held out seed 1000) and
auctions built from the bundled LLM's next-token distributions (``design.llm_auctions``): fitted on the
first ``--llm-queries`` queries of ``experiments/configs/benchmark_queries.toml``, held out on the NEXT ones
(other queries, other advertisers, other bids). On the LLM data only the monotone searches run.

Every rule in the table (linear, log-linear, each searched rule) carries the strict certificate
(docs/maths.md §4, :func:`jaxauction.design.certify_rule`) on held-out auctions drawn with another seed, and
its revenue and welfare there (each search certifies its own result on them: ``holdout=``); a rule is
called monotone only if its certificate share is 1.0. The penalty budget is not a certificate: a small
penalty can hide failures on many pairs, and a budget-0 search whose rule fails warns
(``design.CertificateWarning``, recorded in the JSON). The plain
power-mean curve (rho from -0.5 to 1.5, other parameters at their defaults) goes to the JSON and plot.

Prints a table per data set and writes ``design_search.json``, ``design_search.png`` (revenue and welfare
against the violation) and ``learned_g.png`` (the learned ``g`` next to ``b^gamma``) to ``--out``
(atomically); search checkpoints go to ``--out/checkpoints`` so an interrupted run resumes, the LLM auctions
are cached under ``--out/llm``.

    python experiments/design_search.py                      # Dirichlet and LLM auctions
    python experiments/design_search.py --data dirichlet     # synthetic Dirichlet auctions only
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
import time
import tomllib
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
    parser.add_argument("--data", default="dirichlet,llm", help="comma-separated: dirichlet, llm")
    parser.add_argument("--llm-queries", type=int, default=6, help="LLM: queries fitted (and as many others held out)")
    parser.add_argument("--llm-steps", type=int, default=4, help="LLM: auctions (tokens) per advertiser group")
    parser.add_argument("--llm-profiles", type=int, default=4, help="LLM: bid profiles per auction")
    parser.add_argument("--learned-steps", type=int, default=150, help="optimiser steps of the learned family")
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
    args.data = [kind.strip() for kind in args.data.split(",") if kind.strip()]
    if not args.data or set(args.data) - {"dirichlet", "llm"}:
        parser.error(f"--data must name dirichlet and/or llm, got {args.data}")
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


QUERY_FILE = Path(__file__).resolve().parent / "configs" / "benchmark_queries.toml"


def llm_batch(args, queries: list[dict], seed: int, name: str) -> design.AuctionBatch:
    """The LLM's auctions of ``queries`` (one cached ``design.llm_auctions`` call each), concatenated."""
    batches = []
    for i, query in enumerate(queries):
        advertisers = [
            f"{query['text']}: write a one-sentence ad for {a['name']}, {a['description']}."
            for a in query["advertisers"]
        ]
        print(f"  LLM auctions ({name}) {i + 1}/{len(queries)}: {query['text']!r}", flush=True)
        batches.append(
            design.llm_auctions(
                args.out / "llm" / f"{name}_{i}.npz",
                advertisers=advertisers,
                query=query["text"],
                steps=args.llm_steps,
                num_bid_profiles=args.llm_profiles,
                seed=seed + i,
            )  # fmt: skip
        )
    return design.make_batch(
        np.concatenate([b.logits for b in batches]),
        np.concatenate([b.bids for b in batches]),
        np.concatenate([b.base_logits for b in batches]),
        dtype=np.float32,
    )


def load_auctions(args, kind: str, held_out: bool) -> tuple[design.AuctionBatch, dict]:
    """Dirichlet auctions of ``--seed`` (held out: ``--heldout-seed``), or the LLM's auctions of the first
    ``--llm-queries`` benchmark queries (held out: the next ``--llm-queries`` queries)."""
    seed = args.heldout_seed if held_out else args.seed
    if kind == "llm":
        queries = tomllib.loads(QUERY_FILE.read_text())["query"]
        k = args.llm_queries
        chosen = queries[k : 2 * k] if held_out else queries[:k]
        batch = llm_batch(args, chosen, seed, "heldout" if held_out else "fit")
        settings = {"data": "llm", "seed": seed, "queries": [q["text"] for q in chosen], "steps": args.llm_steps}
        settings["profiles"] = args.llm_profiles
    else:
        batch = design.dirichlet_auctions(
            seed, args.auctions, args.agents, args.vocab, concentration=args.concentration, with_base=True
        )
        settings = {key: getattr(args, key) for key in ("auctions", "agents", "vocab", "concentration")}
        settings.update(data="dirichlet", seed=seed)
    settings["shape"] = list(batch.logits.shape)
    return batch, settings


def assess(params, batch, heldout, certificate=None) -> dict:
    """Training metrics, held-out metrics and the held-out certificate of one rule (a search's own, if given)."""
    certificate = design.certify_rule(params, heldout) if certificate is None else certificate
    return {
        "params": design.describe(params),
        "family": design.family_of(params).name,
        **design.evaluate(params, batch),
        "heldout": design.evaluate(params, heldout),
        "certificate": certificate.to_dict(),
    }


def run_search(args, name, kind, budget, start, batch, heldout, common, scale) -> tuple[dict, object]:
    """One search (``kind``: "penalty", "monotone" or "learned"), its warnings, metrics and history."""
    fingerprint = common["tag"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", design.CertificateWarning)
        if kind == "penalty":  # a budget of 0 asks for a monotone rule: a failing certificate warns

            def relative_violation(params, data):
                return objectives.violation(params, data) / scale

            extra = dict(constraint=design.Constraint(relative_violation, budget=budget, penalty=args.penalty))
            stem, description = f"{name}_budget{budget:g}", f"{name} penalty budget {budget:g}"
        else:  # the monotone part (power mean: rho = 1, temperature = 1 frozen) or the learned family
            extra = dict(monotone=True)
            stem, description = f"{name}_{kind}", f"{name} {kind}"
        if kind == "learned":  # the base bid (the unit) stays at the start's: the shift moves the knots instead
            trainable = jax.tree.map(lambda _: True, start).replace(base_bid=False)
            extra.update(steps=args.learned_steps, trainable=trainable)
            common = {**common, "bounds": None}  # the family's domain
        result = design.search(
            objective=OBJECTIVES[name], params=start, data=batch, description=description,
            checkpoint=args.out / "checkpoints" / f"{stem}_{fingerprint}.npz", **{**common, **extra},
        )  # fmt: skip
    metrics = assess(result.params, batch, heldout, result.certificate)
    warned = [str(w.message) for w in caught if issubclass(w.category, design.CertificateWarning)]
    for message in warned:
        print(f"CertificateWarning: {message}", file=sys.stderr)
    record = {
        "objective": name,
        "kind": kind,
        "budget": budget,
        "multiplier": result.multiplier,
        "certificate_warning": warned[0] if warned else None,
        **metrics,
        "relative_violation": metrics["violation"] / scale,
        "history": {key: result.history[key].tolist() for key in ("objective", "constraint", "multiplier")},
    }
    return record, result.params


def learned_start(power: design.PowerMeanParams) -> design.MonotoneWeightParams:
    """The learned family at the power mean's monotone optimum: ``g = b^gamma`` (steps 0), the base bid kept
    (at least 1e-3: the unit must be positive; at 1e-3 the base weighs ``1e-3^gamma`` of a unit bid) and the
    knots moved to ``log b = -4..4`` (shift = -log u). The search keeps this base bid (Adam's steps of about the
    learning rate would move a bid of 1e-3 by orders of magnitude) and trains gamma, the steps and the shift."""
    base_bid = max(float(power.base_bid), 1e-3)
    return design.MonotoneWeightParams.create(gamma=float(power.gamma), base_bid=base_bid, shift=-np.log(base_bid))


def run_data(args, kind: str) -> dict:
    """References, searches and the summary on one kind of data."""
    started = time.time()
    batch, data_settings = load_auctions(args, kind, held_out=False)
    heldout, heldout_settings = load_auctions(args, kind, held_out=True)
    fingerprint = hashlib.sha256(json.dumps(data_settings, sort_keys=True).encode()).hexdigest()[:12]
    print(f"[{kind}] auctions: {data_settings}\n[{kind}] held-out: {heldout_settings}")
    linear, log_linear = design.PowerMeanParams.linear(), design.PowerMeanParams.log_linear()
    references = {"linear": assess(linear, batch, heldout), "log_linear": assess(log_linear, batch, heldout)}
    scale = references["log_linear"]["violation"]
    if not scale > 0:
        raise SystemExit(f"[{kind}] log-linear is monotone on these auctions: nothing to trade off.")
    curve = []
    for rho in np.linspace(-0.5, 1.5, 9):
        curve.append({"rho": float(rho), **design.evaluate(design.PowerMeanParams.create(rho=float(rho)), batch)})
    common = dict(
        steps=args.steps, optimizer=adam(args.learning_rate), checkpoint_every=25, progress=not args.no_progress, tag=fingerprint,
        holdout=heldout,  # each search's result carries its held-out certificate
        bounds=design.Bounds.create(rho=(-1.0, 3.0), gamma=(0.0, 4.0), base_bid=(0.0, 10.0), temperature=(0.25, 4.0)),
    )  # fmt: skip
    start = design.PowerMeanParams.create(base_bid=0.05)  # linear, with a little base weight to explore
    plans = [(name, "penalty", budget) for name in OBJECTIVES for budget in args.budgets] if kind == "dirichlet" else []
    searches = []
    for name, search_kind, budget in plans + [(name, "monotone", None) for name in OBJECTIVES]:
        searches.append(run_search(args, name, search_kind, budget, start, batch, heldout, common, scale)[0])
    for name in OBJECTIVES:  # the learned family, from the power mean's monotone optimum of the same objective
        power = next(s for s in searches if s["objective"] == name and s["kind"] == "monotone")["params"]
        begin = learned_start(design.PowerMeanParams.create(**power))
        record, params = run_search(args, name, "learned", None, begin, batch, heldout, common, scale)
        record["start"] = assess(begin, batch, heldout)
        record["g"] = g_curve(params)
        searches.append(record)
    summary = summarise(references, searches)
    print_table(kind, references, searches, scale, summary)
    return {
        "data": data_settings,
        "heldout_data": heldout_settings,
        "log_linear_violation": scale,
        "references": references,
        "power_mean_curve": curve,
        "searches": searches,
        "summary": summary,
        "seconds": time.time() - started,
    }


@functools.cache
def adam(learning_rate: float) -> optax.GradientTransformation:
    """One optimiser object per rate: every search of a family reuses one compiled step."""
    return optax.adam(learning_rate)


def g_curve(params: design.MonotoneWeightParams) -> dict:
    """``log g`` of the learned rule over bids ``b`` (``log b`` from -4 to 4), normalised to 0 at ``b = 1``."""
    log_b = np.linspace(-4.0, 4.0, 161)
    x = log_b - np.log(float(params.base_bid))
    log_g = np.asarray(params.log_g(x)) - float(params.log_g(-np.log(float(params.base_bid))))
    return {"log_b": log_b.tolist(), "log_g": log_g.tolist(), "gamma": float(params.gamma)}


def main(argv=None) -> int:
    args = parse_args(argv)
    started, load_start = time.time(), os.getloadavg()
    print(f"CPU: {cpu_model()}, {len(os.sched_getaffinity(0))} core(s); load average {load_start}")
    runs = {kind: run_data(args, kind) for kind in args.data}
    seconds = time.time() - started
    results = {
        "runs": runs,
        "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        "violation_unit": "mean over auctions of sum_i sum_t max(0, -(p_i(t) - q_t) dq_t/db_i) (docs/maths.md §4)",
        "certificate": "share of held-out (auction, agent) pairs passing the strict check of docs/maths.md §4 "
        "(bids raised by 1.01, 1.1, 2; every token; float-rounding tolerance); monotone iff share == 1.0",
        "seconds": seconds,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "cpu": cpu_model(),
        "backend": jax.default_backend(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    outputs.write_json(args.out / "design_search.json", results)
    first = runs[args.data[0]]
    plot(first["references"], first["power_mean_curve"], first["searches"], first["log_linear_violation"],
         args.out / "design_search.png")  # fmt: skip
    plot_g(runs, args.out / "learned_g.png")
    print(f"wrote {args.out / 'design_search.json'}, {args.out / 'design_search.png'} and {args.out / 'learned_g.png'}")
    print(f"total {seconds:.0f} s; load average {load_start} at the start, {os.getloadavg()} at the end")
    return 0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def plot_g(runs: dict, path: Path) -> None:
    """The learned ``log g`` next to ``gamma log b`` (the power mean's optimum), per data set and objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4.2), squeeze=False)
    for axis, (kind, run) in zip(axes[0], runs.items()):
        for i, search in enumerate(s for s in run["searches"] if s["kind"] == "learned"):
            curve, power = search["g"], search["start"]["params"]["gamma"]
            log_b = np.asarray(curve["log_b"])
            axis.plot(log_b, curve["log_g"], "-", color=f"C{i}", label=f"learned g, max {search['objective']}")
            axis.plot(log_b, power * log_b, "--", color=f"C{i}", label=f"b^gamma, gamma = {power:.2f} (power optimum)")
        axis.set_xlabel("log bid")
        axis.set_ylabel("log g(b) - log g(1)")
        axis.set_title(f"{kind} auctions")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    outputs.save_figure(figure, path, dpi=130)
    plt.close(figure)


def label(search: dict) -> str:
    if search["kind"] == "learned":
        return f"max {search['objective']}, learned g"
    if search["kind"] == "monotone":
        return f"max {search['objective']}, monotone=True"
    return f"max {search['objective']}, penalty <= {search['budget']:g}"


def summarise(references: dict, searches: list[dict]) -> dict:
    """The monotone rule (certificate share 1.0) with the most held-out revenue, against linear; and the learned
    family against the power mean's monotone optimum it started from (held out)."""
    rows = [("linear", references["linear"]), ("log-linear", references["log_linear"])]
    rows += [(label(s), s) for s in searches]
    monotone = [(name, row) for name, row in rows if row["certificate"]["monotone"]]
    best_name, best = max(monotone, key=lambda item: item[1]["heldout"]["revenue"])
    base = references["linear"]["heldout"]
    learned = {
        s["objective"]: {
            "fit_gain_over_power": gain(s[metric_of(s)], s["start"][metric_of(s)]),
            "heldout_power": s["start"]["heldout"],
            "heldout_learned": s["heldout"],
        }
        for s in searches
        if s["kind"] == "learned"
    }
    return {
        "best_monotone_rule": best_name,
        "best_monotone_params": best["params"],
        "best_monotone_heldout_revenue": best["heldout"]["revenue"],
        "linear_heldout_revenue": base["revenue"],
        "relative_gain_over_linear": best["heldout"]["revenue"] / base["revenue"] - 1.0,
        "monotone_rules": [name for name, _ in monotone],
        "learned_vs_power": learned,
    }


def metric_of(search: dict) -> str:
    return "revenue" if search["objective"] == "revenue" else "welfare_reverse"


def gain(value: float, reference: float) -> float:
    """``(value - reference) / |reference|``: positive when ``value`` is better (welfare is negative)."""
    return (value - reference) / abs(reference)


def short_params(params: dict) -> str:
    """``rho gamma base tau`` of a power mean; ``gamma``, base and the steps' total of a learned rule."""
    if "rho" in params:
        p = params
        return f"rho {p['rho']:.3f} gamma {p['gamma']:.3f} base {p['base_bid']:.3f} tau {p['temperature']:.2f}"
    return f"learned: gamma {params['gamma']:.3f} base {params['base_bid']:.3g} sum(a) {sum(params['steps']):.2f}"


def print_table(kind, references, searches, scale, summary) -> None:
    header = (
        f"{'rule':<34}{'parameters':<52}{'rev fit':>9}{'rev held':>9}{'W rev held':>11}{'viol/LL':>9}{'cert':>7}"
        f"{'worst':>9}  monotone"
    )
    print(f"\n[{kind}]")
    print(header)
    print("-" * len(header))
    rows = [("linear", references["linear"]), ("log-linear", references["log_linear"])]
    rows += [(label(s), s) for s in searches]
    for name, row in rows:
        certificate = row["certificate"]
        print(
            f"{name:<34}{short_params(row['params']):<52}{row['revenue']:>9.4f}{row['heldout']['revenue']:>9.4f}"
            f"{row['heldout']['welfare_reverse']:>11.4f}{row['violation'] / scale:>9.3f}{certificate['share']:>7.3f}"
            f"{certificate['worst']:>9.2e}  {'yes' if certificate['monotone'] else 'no'}"
        )
    print(
        f"(rev fit: revenue on the fitted auctions; held: on held-out auctions; W rev: welfare -KL(q||p_i), held out; "
        f"viol/LL: fitted violation relative to log-linear's, {scale:.3g}; cert: share of held-out (auction, agent) "
        "pairs passing the strict check; worst: largest violation in probability units; monotone iff cert = 1.000)"
    )
    print(
        f"best monotone rule on held-out revenue: {summary['best_monotone_rule']} "
        f"({summary['best_monotone_heldout_revenue']:.4f} vs linear {summary['linear_heldout_revenue']:.4f}, "
        f"{100 * summary['relative_gain_over_linear']:+.1f}%)"
    )
    for objective, row in summary["learned_vs_power"].items():
        metric = "revenue" if objective == "revenue" else "welfare_reverse"
        power, learned = row["heldout_power"][metric], row["heldout_learned"][metric]
        print(
            f"learned g vs b^gamma (max {objective}): fit {100 * row['fit_gain_over_power']:+.2f}%, held-out "
            f"{metric} {learned:.4f} vs {power:.4f} ({100 * gain(learned, power):+.2f}%)"
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
            (s for s in searches if s["objective"] == objective and s["kind"] == "penalty"), key=lambda s: s["budget"]
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
        for kind, marker, color, size, label in (
            ("learned", "*", "C5", 11, "learned g"),
            ("monotone", "D", "C4", 8, "monotone=True"),
        ):
            chosen = [s for s in searches if s["objective"] == objective and s["kind"] == kind]
            axis.plot(
                [s["relative_violation"] for s in chosen],
                [s[metric] for s in chosen],
                marker,
                color=color,
                markersize=size,
                label=f"max {objective}, {label}",
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
