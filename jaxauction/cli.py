"""The ``jaxauction`` command line: ``run`` one auction or ``sweep`` the bid ratio.

Bad input (an unknown rule, a negative bid, no advertisers, a missing, non-UTF-8 or malformed
configuration, a malformed ``{query}`` placeholder, a decoding the rules cannot use, an output path
that cannot be written) prints one ``error:`` line naming the file, line and field (or the option),
and exits with status 2; never a traceback. Everything that can be checked without the model is
checked before the model loads: the configuration, the options and every output path (``--json``,
``--plot``: missing parent folders are created when writing; an empty path, a folder, an unwritable
place, a ``--plot`` suffix matplotlib cannot write, or an output that is one of the inputs is refused).
The JSON is written before the plot, so a failing plot never loses it.
"""

from __future__ import annotations

import argparse
import sys

if __name__ == "__main__":  # `python -m jaxauction.cli`: through the Ctrl-C guard, before JAX is imported
    from jaxauction.console import main as _guarded_main

    sys.exit(_guarded_main())

from jaxauction._validation import check_seed  # noqa: E402
from jaxauction.config import AuctionConfig, ConfigError, load_config  # noqa: E402
from jaxauction.console import interrupted  # noqa: E402
from jaxauction.mechanism import SpecError, payment_from_text  # noqa: E402
from jaxauction.outputs import check_output_path, figure_suffixes  # noqa: E402


def load_model(source: str | None):
    from jaxauction import models

    return models.load(source)


def check_environment() -> None:
    """The environment's settings, before the model loads: ``JAXAUCTION_MEMORY_BUDGET`` parses, and JAX
    starts on the platform ``JAX_PLATFORMS`` names (``cuda`` without a GPU is a ``ValueError`` naming it)."""
    import os

    from jaxauction.engine import plan

    budget = os.environ.get("JAXAUCTION_MEMORY_BUDGET")
    if budget:  # parsed here; the devices are asked below, once JAX's platform is known to start
        plan.parse_memory_budget(budget, argument="JAXAUCTION_MEMORY_BUDGET")
    import jax

    try:
        jax.devices()
    except Exception as error:  # noqa: BLE001 - JAX raises RuntimeError or AssertionError, depending on the plugin
        platforms = os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_PLATFORM_NAME")
        setting = f"JAX_PLATFORMS={platforms!r}" if platforms else "JAX's platform"
        reason = str(error).split("\n")[0][:160] or type(error).__name__
        raise ValueError(
            f"{setting}: JAX cannot start that platform on this machine ({reason}). Fix: unset JAX_PLATFORMS "
            "(JAX picks an available device) or set JAX_PLATFORMS=cpu."
        ) from None


def _model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        metavar="PATH_OR_HUB_ID",
        default=None,
        help="a Llama-family checkpoint folder (config.json, *.safetensors, "
        "tokenizer.json) or a hub id; default: the bundled SmolLM2-135M-Instruct",
    )


def _number(text: str):
    """An int or float from a flag's text; other text is passed on, for the option's check to name it."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxauction", description="Token auctions among LLM advertisers (Duetting et al. 2024)."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run one auction and print the ad and the payments")
    run.add_argument("config", help="TOML configuration (see experiments/configs/hawaii.toml)")
    run.add_argument("--json", metavar="PATH", help="write everything machine-readable to PATH")
    _model_argument(run)

    sweep = commands.add_parser(
        "sweep", help="sweep the bid ratio between the first two advertisers, for the linear and log-linear rules"
    )
    sweep.add_argument("config", help="TOML configuration")
    sweep.add_argument("--points", type=int, default=11, help="points of the sweep (default 11)")
    sweep.add_argument(
        "--samples", type=int, default=1, help="ads drawn per point (mention shares average over them; default 1)"
    )
    sweep.add_argument(
        "--rules", default="linear,log_linear", help="comma-separated rules to sweep (default linear,log_linear)"
    )
    sweep.add_argument(
        "--plot", metavar="PNG", default="outputs/sweep.png", help="where to save the plot (default outputs/sweep.png)"
    )
    sweep.add_argument("--json", metavar="PATH", help="write everything machine-readable to PATH")
    _model_argument(sweep)

    batch = commands.add_parser(
        "batch", help="run many different auctions from a JSONL file (one auction per line) as one batch"
    )
    batch.add_argument("auctions", help="JSONL input: one {prompts, bids, names?, base_prompt?, base_bid?} per line")
    batch.add_argument("--out", required=True, metavar="PATH", help="JSONL output: one result per input line")
    batch.add_argument("--rule", default="linear", help="aggregation rule (default linear)")
    batch.add_argument("--payment", default="second_price", help="second_price, kl or none (default second_price)")
    batch.add_argument("--decoding", default="sample", help="sample, greedy or stable (default sample)")
    batch.add_argument("--max-new-tokens", type=_number, default=48, help="tokens per ad (default 48)")
    batch.add_argument("--temperature", type=_number, default=1.0, help="the agents' temperature (default 1)")
    batch.add_argument("--seed", type=int, default=0, help="PRNG seed; auction k uses split(key(seed))[k]")
    batch.add_argument(
        "--memory-budget",
        default=None,
        help="working memory per chunk, e.g. 4GB (default $JAXAUCTION_MEMORY_BUDGET or 4GB)",
    )
    _model_argument(batch)
    return parser


def _payment_table(config: AuctionConfig, result) -> str:
    lines = [f"{'advertiser':<24}{'bid':>10}{'payment':>12}{'mentioned':>11}", "-" * 57]
    for advertiser, paid in zip(config.advertisers, result.payments):
        mentioned = "yes" if advertiser.mentioned_in(result.text) else "no"
        lines.append(f"{advertiser.name:<24}{advertiser.bid:>10.4g}{float(paid):>12.5f}{mentioned:>11}")
    return "\n".join(lines)


def command_run(args) -> int:
    config = load_config(args.config)
    check_output_path("--json", args.json, inputs=[args.config, args.model])
    check_environment()

    from jaxauction.engine import generate
    from jaxauction.outputs import write_json

    model = load_model(args.model)
    result = generate(config.prompts(), config.bids, model=model, progress=True, **config.generate_options())
    print(f"query: {config.query}")
    print(f"rule: {config.rule}   payment: {config.payment}   decoding: {config.decoding}\n")
    print(result.text + "\n")
    print(_payment_table(config, result))
    if args.json:
        write_json(
            args.json,
            {
                "config": args.config,
                "query": config.query,
                "rule": config.rule,
                "payment": config.payment,
                "decoding": config.decoding,
                "seed": config.seed,
                "advertisers": [
                    {"name": a.name, "bid": a.bid, "payment": float(p), "mentioned": a.mentioned_in(result.text)}
                    for a, p in zip(config.advertisers, result.payments)
                ],
                "text": result.text,
                "tokens": result.tokens[: int(result.lengths)],
                "token_payments": result.token_payments[: int(result.lengths)],
            },
        )
        print(f"\nwrote {args.json}")
    return 0


def command_sweep(args) -> int:
    from jaxauction.sweep import check_rules

    config = load_config(args.config)
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    check_rules(config, rules, argument="--rules")
    if args.points < 2:
        raise ValueError(f"--points: a sweep needs at least 2 points, got {args.points}.")
    if args.samples < 1:
        raise ValueError(f"--samples: expected a positive integer, got {args.samples}.")
    if len(config.advertisers) < 2:
        raise ValueError(
            f"{config.path}: a sweep needs at least two advertisers; the configuration has {len(config.advertisers)}."
        )
    check_output_path("--json", args.json, inputs=[args.config, args.model])
    check_output_path("--plot", args.plot, inputs=[args.config, args.model, args.json], suffixes=figure_suffixes())
    check_environment()
    from jaxauction.outputs import write_json
    from jaxauction.sweep import format_table, payment_note, plot_sweep, run_sweep

    model = load_model(args.model)
    result = run_sweep(config, points=args.points, samples=args.samples, rules=rules, model=model)
    print(f"query: {config.query}\n{payment_note(result)}\n")
    print(format_table(result))
    if args.json:
        write_json(args.json, {"config": args.config, "query": config.query, **result.to_json()})
        print(f"\nwrote {args.json}")
    plot_sweep(result, args.plot)
    print(f"saved plot {args.plot}")
    return 0


def _batch_options(args):
    """The :class:`jaxauction.GenerateOptions` of the batch flags (``--payment none``: no payments)."""
    from jaxauction import engine

    try:  # built (and checked) here; its payment warning once the auctions fit it (batch.run_batch)
        return engine.GenerateOptions(
            rule=args.rule,
            payment=payment_from_text(args.payment),
            decoding=args.decoding,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
        )
    except SpecError as error:
        raise ValueError(f"--{error.argument.replace('_', '-')}: {error.reason}") from None


def command_batch(args) -> int:
    from jaxauction import batch, engine

    check_output_path("--out", args.out, inputs=[args.auctions, args.model])
    options = _batch_options(args)
    seed = check_seed(args.seed, "--seed")
    budget = (
        None
        if args.memory_budget is None
        else engine.parse_memory_budget(args.memory_budget, argument="--memory-budget")
    )
    lines = batch.run_batch(
        args.auctions,
        args.out,
        options,
        seed=seed,
        model=lambda: (check_environment(), load_model(args.model))[1],  # after the input's checks
        memory_budget=budget,
    )
    print(f"wrote {len(lines)} results to {args.out}")
    return 0


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """A warning at the command line: one ``warning:`` line (no source location or line)."""
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    import warnings

    formatting, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        return _main(argv)
    finally:
        warnings.formatwarning = formatting


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return command_run(args)
        if args.command == "batch":
            return command_batch(args)
        return command_sweep(args)
    except (ConfigError, ValueError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory; lower --points, --samples or the number of auctions.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return interrupted()
