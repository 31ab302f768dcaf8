"""The paper's demonstration: Alpha Airlines and Beta Resort bid for a joint ad for "Vacations in Hawaii".

Duetting et al. (WWW 2024), the paper's Hawaii demonstration. The bid moves from Beta Resort (share 0) to Alpha Airlines
(share 1) in 11 points; every point is one token auction among the two advertisers' LLM agents
(the bundled SmolLM2-135M-Instruct, each conditioned on its advertiser's prompt), under the linear
and the log-linear rule, each charged the payment it justifies: second-price payments under the
(monotone) linear rule, KL (Myerson) payments under the log-linear rule, where a second-price payment
has no incentive meaning (jaxauction.sweep.rule_config). All points of a rule run as one batch in one
compiled decode loop.

Greedy decoding gives one ad per bid point and an abrupt switch between the advertisers. The demo then
draws ``--sampled`` ads per point (default 8, at ``--sampled-points`` = 6 bid points, up to
``--sampled-tokens`` = 24 tokens) with sampled decoding (exact draws from ``q``, one batch of 48 auctions
per rule) and plots the share of ads that mention each advertiser against
the bid share for both rules: the paper's smooth transition (``outputs/hawaii_sampled.png``).

    python experiments/hawaii_ads.py                 # what `make demo` runs
    python experiments/hawaii_ads.py --points 21 --samples 4 --model PATH_OR_HUB_ID
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "experiments" / "configs" / "hawaii.toml"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="TOML auction configuration")
    parser.add_argument("--points", type=int, default=11)
    parser.add_argument("--samples", type=int, default=1, help="ads drawn per point")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="override the configuration's max_new_tokens")
    parser.add_argument(
        "--decoding", choices=["sample", "greedy"], default=None, help="override the configuration's decoding"
    )
    parser.add_argument(
        "--sampled", type=int, default=8, help="ads sampled per point for the mention-share plot (0: skip; default 8)"
    )
    parser.add_argument("--sampled-points", type=int, default=6, help="bid points of the sampled sweep (default 6)")
    parser.add_argument("--sampled-tokens", type=int, default=24, help="max new tokens of the sampled ads (default 24)")
    parser.add_argument("--out", default="outputs", help="folder for the plot and the JSON")
    parser.add_argument("--model", default=None, help="checkpoint folder or hub id (default: bundled)")
    args = parser.parse_args(argv)

    from jaxauction import models
    from jaxauction.config import ConfigError, load_config
    from jaxauction.outputs import write_json
    from jaxauction.sweep import format_table, payment_note, plot_sweep, run_sweep

    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    overrides = {}
    if args.max_new_tokens is not None:
        overrides["max_new_tokens"] = args.max_new_tokens
    if args.decoding is not None:
        overrides["decoding"] = args.decoding
    config = config.replace(**overrides)

    start = time.perf_counter()
    model = models.load(args.model)
    loaded = time.perf_counter()
    print(f"model loaded in {loaded - start:.1f} s")
    result = run_sweep(config, points=args.points, samples=args.samples, model=model)
    swept = time.perf_counter()
    print(
        f"\nquery: {config.query!r}; advertisers: {', '.join(config.names)}; decoding: {config.decoding}, "
        f"temperature {config.temperature}\n{payment_note(result)}\n"
    )
    print(format_table(result))
    out = Path(args.out)
    plot_sweep(result, out / "hawaii_sweep.png")
    write_json(out / "hawaii_sweep.json", {"config": str(args.config), "query": config.query, **result.to_json()})
    print(
        f"\nsweep: {len(result.rules)} rules x {args.points} points x {args.samples} samples in "
        f"{swept - loaded:.1f} s (compilation included)"
    )
    print(f"saved {out / 'hawaii_sweep.png'} and {out / 'hawaii_sweep.json'}")
    if args.sampled > 0:
        sampled_config = config.replace(decoding="sample", max_new_tokens=args.sampled_tokens)
        begin = time.perf_counter()
        sampled = run_sweep(sampled_config, points=args.sampled_points, samples=args.sampled, model=model)
        took = time.perf_counter() - begin
        print(f"\nsampled decoding, {args.sampled} ads per point: share of ads that mention each advertiser")
        header = "".join(f"{rule + ': ' + name:>28}" for rule in sampled.rules for name in sampled.names)
        print(f"{'bid share':>10}{header}")
        for p, share in enumerate(sampled.shares):
            cells = "".join(
                f"{sampled.mentions[rule][p, :, i].mean():>28.2f}"
                for rule in sampled.rules
                for i in range(len(sampled.names))
            )
            print(f"{share:>10.2f}{cells}")
        plot_sweep(sampled, out / "hawaii_sampled.png")
        write_json(
            out / "hawaii_sampled.json", {"config": str(args.config), "query": config.query, **sampled.to_json()}
        )
        print(
            f"sampled sweep: {len(sampled.rules)} rules x {args.sampled_points} points x {args.sampled} ads in {took:.1f} s; "
            f"saved {out / 'hawaii_sampled.png'} and {out / 'hawaii_sampled.json'}"
        )
    print(f"whole demo: {time.perf_counter() - start:.1f} s after installation (model load included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
