"""Mechanisms compared on the same ads (issue 13, docs/maths.md §9): token auctions, the reply auction, single winner.

For every query of ``experiments/configs/benchmark_queries.toml`` (2-4 fictional advertisers each) and
several bid profiles (profile 0: equal bids; the others: Dirichlet(1) shares; bids sum to 1), each
mechanism writes one ad:

- ``token_linear``: the token auction, linear rule, second-price payments (docs/maths.md §2, §4);
- ``token_log_linear``: the token auction, log-linear rule, KL (Myerson) payments (docs/maths.md §7; the
  log-linear rule is not monotone, so the robust second-price payments do not apply to it);
- ``token_certified``: the power-mean rule of ``experiments/configs/benchmark_certified_rule.toml``
  (``jaxauction.design.fixed_rule``: rho = 1, temperature = 1, gamma = 2.78, the design search's best rule
  with a held-out strict certificate of 1.000), second-price payments in closed form (docs/maths.md §5:
  ``z_i = b_i TV(p_i, q_-i) Psi(Y_i, gamma)``, about the cost of linear's; no quadrature over the vocabulary);
- ``token_learned``: the learned monotone rule of ``experiments/configs/benchmark_learned_rule.toml``
  (``jaxauction.design.MonotoneWeightParams``: weights ``∝ g(b / u)`` with ``g`` increasing, docs/maths.md §3.1;
  the design search's best held-out revenue rule of that family, certificate 1.000), second-price payments in
  closed form (``payments.MonotoneWeightClosedForm``, docs/maths.md §5). Its unit ``u`` is the base bid, so it
  runs WITH the base prompt (the other token auctions run without a base), and since ``g`` is not a power it
  must see bids on the scale it was fitted to (log-normal bids of mean ``e^0.5`` per agent): the base bid of
  an ``n``-agent auction is the rule's ``base_bid / (e^0.5 n)`` (the profiles' bids sum to 1, mean ``1/n``),
  which is the fitted rule on the bids scaled by ``e^0.5 n``, its payments scaled back (:func:`learned_base_bid`);
- ``reply``: the reply-level auction (docs/maths.md §8), ``M`` candidates from the base prompt's LLM, Clarke
  payments; the profiles of a query share one candidate set;
- ``single_winner``: the highest bidder's prompt writes the ad alone, charged the second bid per token.

Batching: each token-auction mechanism runs every (query, profile) auction of the run in ONE heterogeneous
``jaxauction.generate`` call (a list of ``jaxauction.Auction``, padded to the largest advertiser count: one
compilation, one decode loop), and so does the single winner (one one-agent auction per (query, profile): the
winner's prompt alone). Profile ``p`` of query ``q`` uses key ``split(fold_in(fold_in(key(seed), q), m), P)[p]``
(``m`` the mechanism's index in ``MECHANISMS``), the key a per-query call gives it, so the ads do not depend
on the batching. The reply auction runs per query (its candidate sets are per query). The ads of all
mechanisms of a query are scored together (one prompt set).

Each ad is scored with :func:`jaxauction.compare.ad_metrics` (values, welfare, revenue, mentions,
user-side mean log p_0 per token). Per mechanism every metric is averaged over the profiles of a query,
then the mean and a 95% t-interval over queries are printed. ``--json`` writes every ad of every
mechanism; ``--plot`` saves revenue vs user-side closeness and mention share vs bid share.

Payments are in each mechanism's own units (token auctions and single winner: bid x probability per
token, summed over the ad; reply auction: bid x log-likelihood ratio), so revenue is comparable within a
mechanism across queries, and only roughly across mechanisms.

    python experiments/benchmark.py --quick                     # 3 queries, 2 profiles, short ads
    python experiments/benchmark.py --json bench.json --plot bench.png
    python experiments/benchmark.py --quick --decoding greedy   # argmax copy: coherent text from a 135M model
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tomllib
from pathlib import Path

import hostinfo
import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "experiments" / "configs"
MECHANISMS = ("token_linear", "token_log_linear", "token_certified", "reply", "single_winner", "token_learned")
METRICS = ("revenue", "welfare", "mean_value", "mention_rate", "user_log_prob", "length")
ANSWER = "Answer in one or two short sentences."


def load_queries(path: Path) -> list[dict]:
    """The ``[[query]]`` tables: ``text`` and 2-4 ``advertisers`` with ``name`` and ``description``."""
    queries = tomllib.loads(Path(path).read_text())["query"]
    for i, q in enumerate(queries):
        if not 2 <= len(q["advertisers"]) <= 4:
            raise ValueError(
                f"{path}: query {i} ({q['text']!r}) needs 2 to 4 advertisers; got {len(q['advertisers'])}."
            )
    return queries


def load_certified_rule(path: Path):
    """``(rule, parameters)``: the power-mean rule of the TOML parameters (:func:`jaxauction.design.fixed_rule`).

    A certified rule (``certified = true``) must be the monotone part (rho = 1, temperature = 1), which
    carries the closed-form second-price payment; anything else is refused rather than run on the slow
    generic quadrature under a "certified" label.
    """
    from jaxauction import design

    params = tomllib.loads(Path(path).read_text())
    rule = design.fixed_rule(
        design.PowerMeanParams.create(
            rho=params["rho"], gamma=params["gamma"], base_bid=params["base_bid"], temperature=params["temperature"]
        )
    )
    if params.get("certified") and not (rule.monotone and rule.closed_form_payment is not None):
        raise ValueError(
            f"{path}: certified = true needs rho = 1 and temperature = 1 (monotone by construction, with the "
            f"closed-form payment); got {rule.name}."
        )
    return rule, params


def load_learned_rule(path: Path):
    """``(rule, parameters)``: the learned monotone rule of the TOML parameters (:func:`jaxauction.design.fixed_rule`
    of :class:`jaxauction.design.MonotoneWeightParams`: monotone by construction, closed-form payment)."""
    from jaxauction import design

    params = tomllib.loads(Path(path).read_text())
    keys = ("gamma", "steps", "base_bid", "shift", "knots", "width")
    rule = design.fixed_rule(design.MonotoneWeightParams.create(**{k: params[k] for k in keys if k in params}))
    assert rule.monotone and rule.closed_form_payment is not None
    return rule, params


FITTED_MEAN_BID = float(np.exp(0.5))  # design.llm_auctions' log-normal bids (sigma 1): the learned rule's fit scale


def learned_base_bid(base_bid: float, num_agents: int) -> float:
    """The base bid that puts profiles summing to 1 (mean bid ``1/n``) on the learned rule's fitted bid scale
    (mean ``e^0.5``): all rows scaled together leave the rule unchanged and scale its payments (docs/maths.md §3.1)."""
    return base_bid / (FITTED_MEAN_BID * num_agents)


def agent_prompt(query: str, advertiser: dict) -> list[dict]:
    name, description = advertiser["name"], advertiser["description"]
    system = f"You are the copywriter of {name}, {description}. {ANSWER} Recommend {name} by name."
    return [{"role": "system", "content": system}, {"role": "user", "content": query}]


def base_prompt(query: str) -> list[dict]:
    return [{"role": "system", "content": f"You are a helpful assistant. {ANSWER}"}, {"role": "user", "content": query}]


def bid_profiles(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``[count, n]`` bid profiles summing to 1: equal bids first, then Dirichlet(1) draws."""
    profiles = [np.full(n, 1.0 / n)] + [rng.dirichlet(np.ones(n)) for _ in range(count - 1)]
    return np.asarray(profiles[:count])


TOKEN_RULES = {
    "token_linear": ("linear", "second_price"),
    "token_log_linear": ("log_linear", "kl"),
    "token_certified": ("certified", "second_price"),  # the rule of --rule-file
    "token_learned": ("learned", "second_price"),  # the rule of --learned-rule-file, with the base prompt
}


def query_key(seed: int, query: int, mechanism: int):
    """The PRNG key of one (query, mechanism): ``fold_in(fold_in(key(seed), query), mechanism)``."""
    import jax

    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), query), mechanism)


def auction_keys(seed: int, mechanism: int, num_profiles: list[int]):
    """``[A]`` keys of the (query, profile) auctions, query-major: profile ``p`` of query ``q`` gets
    ``jax.random.split(query_key(seed, q, mechanism), P_q)[p]``, the key a per-query
    ``generate(prompts, bids [P_q, n])`` call gives it, so the batch draws the same ads as per-query calls.
    """
    import jax
    import jax.numpy as jnp

    return jnp.concatenate(
        [jax.random.split(query_key(seed, q, mechanism), count) for q, count in enumerate(num_profiles)]
    )


def split_by_query(out, counts: list[int], num_profiles: list[int]):
    """Per query ``(ads, payments [P_q, n_q], valid [P_q])`` from one batched :class:`jaxauction.GenerationResult`."""
    ads, offsets = [], np.cumsum([0, *num_profiles])
    tokens, lengths = np.atleast_2d(out.tokens), np.atleast_1d(out.lengths)
    payments, valid = np.atleast_2d(out.payments), np.atleast_1d(out.valid)
    for q, n in enumerate(counts):
        rows = range(offsets[q], offsets[q + 1])
        ads.append(([[int(t) for t in tokens[a, : lengths[a]]] for a in rows], payments[rows, :n], valid[rows]))
    return ads


def run_token_auctions(
    prompt_sets, profiles, *, rule, payment, keys, max_new_tokens, model, decoding="sample", bases=None, base_bids=None
):
    """Every (query, profile) token auction of the run in ONE heterogeneous ``generate`` call.

    Args:
      prompt_sets: ``Q`` lists of the ``n_q`` advertisers' prompts.
      profiles: ``Q`` bid arrays ``[P_q, n_q]``.
      keys: ``[sum_q P_q]`` keys (:func:`auction_keys`).
      bases, base_bids: optional ``Q`` base prompts taking part with the ``Q`` bids ``base_bids`` (never charged).

    Returns:
      Per query ``(ad token lists, payments [P_q, n_q], valid [P_q])``.
    """
    from jaxauction import Auction, generate

    bases = [None] * len(prompt_sets) if bases is None else bases
    base_bids = [0.0] * len(prompt_sets) if base_bids is None else base_bids
    auctions = [
        Auction(prompts, bids, base_prompt=base, base_bid=base_bid)
        for prompts, rows, base, base_bid in zip(prompt_sets, profiles, bases, base_bids)
        for bids in rows
    ]
    out = generate(
        auctions, rule=rule, payment=payment, decoding=decoding, key=keys, max_new_tokens=max_new_tokens, model=model
    )
    return split_by_query(out, [len(p) for p in prompt_sets], [len(r) for r in profiles])


def run_single_winner(prompt_sets, profiles, *, keys, max_new_tokens, model, decoding="sample"):
    """The single-winner baseline for every (query, profile) in ONE ``generate`` call of one-agent auctions.

    Each auction is the winner's prompt alone (bid 1, linear rule: ``q = p_winner``, no payment), so the
    ad is what :func:`jaxauction.compare.single_winner` writes with the same key; the payments are
    :func:`jaxauction.compare.single_winner_payments`. Returns what :func:`run_token_auctions` returns.
    """
    from jaxauction import Auction, compare, generate

    winners = [compare.single_winner_payments(rows, np.zeros(len(rows)))[0] for rows in profiles]
    auctions = [Auction([prompts[int(w)]], [1.0]) for prompts, ws in zip(prompt_sets, winners) for w in ws]
    out = generate(
        auctions, rule="linear", payment=None, decoding=decoding, key=keys, max_new_tokens=max_new_tokens, model=model
    )
    per_query = split_by_query(out, [1] * len(prompt_sets), [len(r) for r in profiles])
    return [
        (ads, compare.single_winner_payments(rows, [len(ad) for ad in ads])[1], valid)
        for (ads, _, valid), rows in zip(per_query, profiles)
    ]


def run_reply_auction(prompts, base, bids, *, key, args, model):
    """The reply auction of one query (its profiles share one candidate set)."""
    from jaxauction import reply

    out = reply.auction(
        prompts, bids, base_prompt=base, num_candidates=args.candidates, tau=args.tau, key=key,
        max_new_tokens=args.max_new_tokens, model=model,
    )  # fmt: skip
    ads = [[int(t) for t in row[:length]] for row, length in zip(out.tokens, out.lengths)]
    return ads, np.atleast_2d(out.payments), np.ones(len(ads), bool)


def t_interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% t-interval over queries (NaN bounds for a single query)."""
    from scipy import stats

    values = np.asarray(values, np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    return mean, mean - half, mean + half


def ad_summary(record: dict) -> dict:
    return dict(
        revenue=record["revenue"],
        welfare=record["welfare"],
        mean_value=float(np.mean(record["values"])),
        mention_rate=float(np.mean(record["mentioned"])),
        user_log_prob=record["user_log_prob"],
        length=record["length"],
    )


def aggregate(ads: list[dict]) -> dict:
    """Per metric: mean and 95% interval over queries of the per-query mean over profiles."""
    queries = sorted({a["query"] for a in ads})
    per_query = {m: [] for m in METRICS}
    value_per_paid = []
    for q in queries:
        rows = [ad_summary(a) for a in ads if a["query"] == q]
        for m in METRICS:
            per_query[m].append(np.mean([r[m] for r in rows]))
        paid = np.mean([r["revenue"] for r in rows])
        value_per_paid.append(np.mean([r["welfare"] for r in rows]) / paid if paid > 0 else np.nan)
    summary = {m: dict(zip(("mean", "lo", "hi"), t_interval(per_query[m]))) for m in METRICS}
    finite = np.asarray(value_per_paid)[np.isfinite(value_per_paid)]
    summary["welfare_per_revenue"] = (
        dict(zip(("mean", "lo", "hi"), t_interval(finite))) if len(finite) else dict(mean=np.nan, lo=np.nan, hi=np.nan)
    )
    return summary


def format_table(summaries: dict) -> str:
    columns = (*METRICS, "welfare_per_revenue")
    lines = ["| mechanism | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for mech, summary in summaries.items():
        cells = []
        for c in columns:
            s = summary[c]
            cells.append(f"{s['mean']:.3g}" + ("" if np.isnan(s["lo"]) else f" [{s['lo']:.3g}, {s['hi']:.3g}]"))
        lines.append(f"| {mech} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_plot(path: Path, summaries: dict, ads_by_mechanism: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for mech, summary in summaries.items():
        x, y = summary["user_log_prob"], summary["revenue"]
        left.errorbar(
            x["mean"], y["mean"], xerr=[[x["mean"] - x["lo"]], [x["hi"] - x["mean"]]],
            yerr=[[y["mean"] - y["lo"]], [y["hi"] - y["mean"]]], fmt="o", capsize=3, label=mech,
        )  # fmt: skip
    left.set_xlabel("user side: mean log p_0 per token (higher = closer to the organic answer)")
    left.set_ylabel("revenue per ad")
    left.legend(fontsize=8)
    edges = np.linspace(0, 1, 6)
    centres = (edges[:-1] + edges[1:]) / 2
    for mech, ads in ads_by_mechanism.items():
        share = np.concatenate([np.asarray(a["bids"]) / np.sum(a["bids"]) for a in ads])
        mentioned = np.concatenate([np.asarray(a["mentioned"], float) for a in ads])
        which = np.clip(np.digitize(share, edges[1:-1]), 0, len(centres) - 1)
        rate = [mentioned[which == b].mean() if (which == b).any() else np.nan for b in range(len(centres))]
        right.plot(centres, rate, marker="o", label=mech)
    right.set_xlabel("advertiser's bid share")
    right.set_ylabel("share of ads that name the advertiser")
    right.set_ylim(-0.05, 1.05)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _finite(value):
    """NaN and inf (a one-query interval, a mechanism that charged nothing) as JSON null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 queries, 2 profiles, 16 tokens, 4 candidates")
    parser.add_argument("--queries", type=int, default=None, help="use the first N queries")
    parser.add_argument("--profiles", type=int, default=None, help="bid profiles per query (default 3; quick 2)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="ad length limit (default 48; quick 16)")
    parser.add_argument("--candidates", type=int, default=None, help="reply auction candidates M (default 16; quick 4)")
    parser.add_argument("--tau", type=float, default=1.0, help="reply auction temperature")
    parser.add_argument("--mechanisms", nargs="+", default=list(MECHANISMS), choices=MECHANISMS)
    parser.add_argument(
        "--decoding",
        default="sample",
        choices=("sample", "greedy"),
        help="token auctions and single winner: draw from q (default) or take its argmax (more coherent copy from "
        "a small model; payments are the expected ones either way). The reply auction always samples its candidates.",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="model path or hub id (default: bundled SmolLM2-135M)")
    parser.add_argument("--query-file", default=str(CONFIGS / "benchmark_queries.toml"))
    parser.add_argument("--rule-file", default=str(CONFIGS / "benchmark_certified_rule.toml"))
    parser.add_argument("--learned-rule-file", default=str(CONFIGS / "benchmark_learned_rule.toml"))
    parser.add_argument("--json", default=None, help="write every ad of every mechanism here")
    parser.add_argument("--plot", default=None, help="save the plot here (PNG)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.queries = args.queries or (3 if quick else None)
    args.profiles = args.profiles or (2 if quick else 3)
    args.max_new_tokens = args.max_new_tokens or (16 if quick else 48)
    args.candidates = args.candidates or (4 if quick else 16)
    return args


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sys.path.insert(0, str(REPO))
    from tqdm.auto import tqdm

    from jaxauction import compare, models

    start, load_before = time.perf_counter(), os.getloadavg()
    queries = load_queries(Path(args.query_file))[: args.queries]
    certified_rule, certified_params = load_certified_rule(Path(args.rule_file))
    learned_rule, learned_params = load_learned_rule(Path(args.learned_rule_file))
    model = models.load(args.model)
    rng = np.random.default_rng(args.seed)
    profiles = [bid_profiles(len(q["advertisers"]), args.profiles, rng) for q in queries]
    names = [[a["name"] for a in q["advertisers"]] for q in queries]
    prompt_sets = [[agent_prompt(q["text"], a) for a in q["advertisers"]] for q in queries]
    bases = [base_prompt(q["text"]) for q in queries]
    num_profiles = [len(rows) for rows in profiles]
    # outputs[mechanism][query] = (ad token lists, payments [P, n], valid [P])
    outputs, seconds = {}, {m: 0.0 for m in args.mechanisms}
    batched = [m for m in args.mechanisms if m != "reply"]
    bar = tqdm(total=len(batched) + len(queries) * (1 + ("reply" in args.mechanisms)), desc="benchmark", unit="run")
    for mechanism in args.mechanisms:
        mi = MECHANISMS.index(mechanism)  # the key does not depend on which mechanisms run
        tick = time.perf_counter()
        if mechanism == "reply":
            outputs[mechanism] = []
            for qi in range(len(queries)):
                bar.set_postfix_str(f"reply q{qi}")
                outputs[mechanism].append(
                    run_reply_auction(
                        prompt_sets[qi],
                        bases[qi],
                        profiles[qi],
                        key=query_key(args.seed, qi, mi),
                        args=args,
                        model=model,
                    )  # fmt: skip
                )
                bar.update()
        else:
            bar.set_postfix_str(f"{mechanism} ({sum(num_profiles)} auctions)")
            keys = auction_keys(args.seed, mi, num_profiles)
            common = dict(keys=keys, max_new_tokens=args.max_new_tokens, model=model, decoding=args.decoding)
            if mechanism == "single_winner":
                outputs[mechanism] = run_single_winner(prompt_sets, profiles, **common)
            else:
                rule, payment = TOKEN_RULES[mechanism]
                if rule == "learned":  # its unit is the base bid: it runs with the base prompt, on its fitted scale
                    base_bids = [learned_base_bid(learned_params["base_bid"], len(p)) for p in prompt_sets]
                    common.update(rule=learned_rule, bases=bases, base_bids=base_bids)
                else:
                    common.update(rule=certified_rule if rule == "certified" else rule)
                outputs[mechanism] = run_token_auctions(prompt_sets, profiles, payment=payment, **common)
            bar.update()
        seconds[mechanism] = time.perf_counter() - tick  # generation only (compilation included)
    # Scoring: per query, the ads of every mechanism in one teacher-forced batch (one prompt set).
    ads_by_mechanism = {m: [] for m in args.mechanisms}
    for qi, query in enumerate(queries):
        bar.set_postfix_str(f"scoring q{qi}")
        ads = [ad for m in args.mechanisms for ad in outputs[m][qi][0]]
        paid = np.concatenate([outputs[m][qi][1] for m in args.mechanisms])
        bids = np.concatenate([profiles[qi]] * len(args.mechanisms))
        records = compare.ad_metrics(model, prompt_sets[qi], bases[qi], bids, ads, paid, names[qi]).records()
        for mj, mechanism in enumerate(args.mechanisms):
            valid = outputs[mechanism][qi][2]
            for pi in range(num_profiles[qi]):
                record = records[mj * num_profiles[qi] + pi]
                ads_by_mechanism[mechanism].append(
                    dict(
                        query=qi, query_text=query["text"], profile=pi, names=names[qi], valid=bool(valid[pi]), **record
                    )
                )
        bar.update()
    bar.close()
    invalid = {m: sum(not a["valid"] for a in ads) for m, ads in ads_by_mechanism.items()}
    if any(invalid.values()):
        print(f"warning: invalid auctions (non-finite q or payment; NaN payments): {invalid}", file=sys.stderr)
    summaries = {m: aggregate(ads) for m, ads in ads_by_mechanism.items()}
    elapsed = time.perf_counter() - start
    print(format_table(summaries))
    print(
        f"{len(queries)} queries x {args.profiles} profiles x {len(args.mechanisms)} mechanisms, "
        f"max_new_tokens={args.max_new_tokens}, M={args.candidates}, decoding={args.decoding}: {elapsed:.1f} s "
        "(generation: " + ", ".join(f"{m} {s:.0f} s" for m, s in seconds.items()) + "); "
        f"host: {hostinfo.line(load_before, hostinfo.load_average())}"
    )
    result = dict(
        settings=dict(
            queries=len(queries), profiles=args.profiles, max_new_tokens=args.max_new_tokens,
            candidates=args.candidates, tau=args.tau, seed=args.seed, model=args.model or "bundled SmolLM2-135M",
            decoding=args.decoding, certified_rule=certified_params, learned_rule=learned_params, time_s=elapsed,
            generation_s=seconds,
            loadavg_start=load_before, loadavg_end=os.getloadavg(), cores=len(os.sched_getaffinity(0)),
            host=hostinfo.describe(load_before, hostinfo.load_average()),
        ),
        summary=summaries,
        ads=ads_by_mechanism,
    )  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(_finite(result), indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        save_plot(Path(args.plot), summaries, ads_by_mechanism)
        print(f"wrote {args.plot}")
    return result


if __name__ == "__main__":
    main()
