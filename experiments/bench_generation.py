"""Benchmark auction generation: jaxauction against transformers + PyTorch, same run, same machine.

    .venv-bench/bin/python experiments/bench_generation.py --json outputs/bench_generation.json
    .venv-bench/bin/python experiments/bench_generation.py --points 3 --max-new-tokens 8   # quick

Needs torch (the project's ``bench`` extra). The workload is the Hawaii demonstration
(``experiments/configs/hawaii.toml``, the paper's Hawaii demonstration): the two advertisers' chat prompts, the
``--points``-point bid sweep of :func:`jaxauction.sweep.sweep_bids` (default 11 auctions x 2 agents =
22 sequences), the linear rule, expected second-price payments (docs/maths.md §5) and greedy decoding
(``argmax q``, deterministic, so the implementations must produce the same tokens), at most
``--max-new-tokens`` (default 48) tokens per auction, float32 on the CPU. Three implementations:

  jaxauction batched    ``jaxauction.generate(prompts, bids [P, 2])``: one call, a host loop over the
                        compiled auction and model programs, rows shared until the auctions' tokens
                        diverge (the main case).
  (a) torch             transformers ``LlamaForCausalLM`` loaded from the same bundled GGUF file
                        (``from_pretrained(dir, gguf_file=...)``), ``torch.inference_mode``, all 22 rows
                        decoded as one batch with left padding, attention mask, position ids and
                        transformers' KV cache (a ``DynamicCache`` passed as ``cache=``, the new name
                        of ``past_key_values``), a Python loop over tokens, and per step the linear
                        aggregate ``q = sum_i lambda_i softmax(l_i)``, ``argmax q`` and the closed-form
                        payments ``z_i = B TV(p_i, q_-i) (ln(1 + b_i/B) - b_i/(b_i + B))`` in torch;
                        finished auctions keep their rows in the batch but get the pad token and zero
                        payments, and the loop stops when every auction has ended. Like jaxauction it
                        prefills the distinct prompts once and repeats the KV cache per auction
                        (``--torch-prefill rows`` prefills all 22 rows instead).
  (b) jaxauction separate  ``jaxauction.generate(prompts, bids [2])`` once per auction, ``P`` calls.

A second workload, the mixed batch (``--mixed-config``, default ``experiments/configs/mixed_queries.jsonl``
in the ``jaxauction batch`` format: 18 different queries with 2 to 4 advertisers each and a base
prompt): ``jaxauction mixed`` runs all of them as one heterogeneous ``generate(auctions)`` call;
``(a) torch mixed`` runs them the way a user of transformers would, one batched auction at a time
(each auction's rows in one batch, the same loop as (a)). JSON key ``ratio_vs_torch_mixed``.

``--no-torch`` runs only the jaxauction cases (no PyTorch needed; ratios are then null), e.g. the quick
check ``python experiments/bench_generation.py --no-torch --points 3 --max-new-tokens 4 --mixed-limit 4``.
Peak memory (``ru_maxrss``) of the JAX process and of the PyTorch worker is reported, and the host
(``experiments/hostinfo.py``: CPU model and vendor, cores, load average at the start and the end) beside
the ratios: the ratio to PyTorch depends on the CPU (issue 37: 1.41x / 2.27x on a 2-core Intel Xeon, where
PyTorch's GEMMs run 1.5-2.5x faster than on the AMD EPYC of the README's figures).

Each timed run goes from the prompts (token ids for torch) to tokens and payments on the host, prompt
prefill included. Every case is warmed up once first (JAX: the full configuration, so compilation is
excluded; PyTorch, which compiles nothing: ``min(4, max_new_tokens)`` tokens), then the cases are
measured in turn ``--repeats`` times (default 2) and the best time of each is reported. Generated
tokens = the sum over auctions of the number of tokens each auction generated (its EOS token
included), not rows x steps.

PyTorch runs in a worker process (two runtimes' thread pools in one process fight over the cores),
idle while JAX runs and vice versa. It is measured with PyTorch's default thread count (the number of
cores) and with one thread (``--torch-threads``): on a machine shared with other busy processes,
PyTorch's OpenMP threads wait for each other at every operator and the default can be several times
slower than one thread. The ratio against (a) uses the fastest PyTorch case. XLA's thread pool
suffers in the same way; ``--xla-single-thread`` runs JAX on one thread too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import hostinfo
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "experiments" / "configs" / "hawaii.toml"
DEFAULT_MIXED = REPO / "experiments" / "configs" / "mixed_queries.jsonl"


def _maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------- PyTorch side


def torch_linear_second_price(logits, bids, num_charged: int):
    """One greedy token auction per row of ``A``, linear rule, closed-form second-price payments.

    ``logits: [A, m, V]``, ``bids: [A, m]`` (the first ``num_charged = n`` rows are the agents, an
    optional base row last) -> ``(token [A], payments [A, n])``. ``B_i = sum_{j != i} b_j`` and
    ``q_-i = sum_{j != i} b_j p_j / B_i``; ``z_i = 0`` when ``B_i = 0``.
    """
    import torch

    num_rows = logits.shape[1]
    probs = torch.softmax(logits, dim=-1)
    total = bids.sum(-1, keepdim=True)
    weights = torch.where(total > 0, bids / torch.where(total > 0, total, 1.0), 1.0 / num_rows)
    q = torch.einsum("am,amv->av", weights, probs)
    token = q.argmax(-1)
    not_self = 1.0 - torch.eye(num_charged, num_rows, dtype=bids.dtype)
    others = bids[:, None, :] * not_self  # [A, n, m]
    competing = others.sum(-1)  # [A, n]
    positive = competing > 0
    safe = torch.where(positive, competing, 1.0)
    q_others = torch.einsum("anm,amv->anv", others, probs) / safe[..., None]
    tv = 0.5 * (probs[:, :num_charged] - q_others).abs().sum(-1)
    own = bids[:, :num_charged]
    z = safe * tv * (torch.log1p(own / safe) - own / (own + safe))
    return token, torch.where(positive, z, 0.0)


def torch_generate(
    model,
    sequences,
    bids,
    *,
    num_charged: int,
    max_new_tokens: int,
    pad_id: int,
    eos_ids,
    temperature: float,
    prefill: str,
) -> dict:
    """The straightforward PyTorch token auction; returns numpy ``tokens [A, T]``, ``lengths [A]``,
    ``token_payments [A, T, n]`` and the prefill time."""
    import torch

    num_auctions, rows_per_auction = bids.shape
    width = max(len(s) for s in sequences)
    ids = torch.full((rows_per_auction, width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows_per_auction, width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    auction_major = torch.arange(rows_per_auction).repeat(num_auctions)  # row a * m + j <- prompt j
    if prefill == "rows":
        ids, mask = ids[auction_major], mask[auction_major]
    start = time.perf_counter()
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
        use_cache=True,
        logits_to_keep=1,
    )
    cache, logits = out.cache, out.logits[:, -1]
    if prefill == "shared":
        cache.reorder_cache(auction_major)
        logits, mask = logits[auction_major], mask[auction_major]
    prefill_seconds = time.perf_counter() - start
    positions = mask.sum(-1, keepdim=True)
    bids_t = torch.tensor(bids, dtype=torch.float32)
    eos = torch.tensor(list(eos_ids), dtype=torch.long)
    tokens = torch.full((num_auctions, max_new_tokens), pad_id, dtype=torch.long)
    token_payments = torch.zeros((num_auctions, max_new_tokens, num_charged))
    done = torch.zeros(num_auctions, dtype=torch.bool)
    lengths = torch.zeros(num_auctions, dtype=torch.long)
    for step in range(max_new_tokens):
        vocab = logits.shape[-1]
        token, charged = torch_linear_second_price(
            (logits / temperature).view(num_auctions, rows_per_auction, vocab), bids_t, num_charged
        )
        token = torch.where(done, pad_id, token)
        tokens[:, step] = token
        token_payments[:, step] = torch.where(done[:, None], 0.0, charged)
        lengths += (~done).long()
        done |= torch.isin(token, eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype)], dim=1)
        out = model(
            input_ids=token.repeat_interleave(rows_per_auction)[:, None],
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        )
        cache, logits = out.cache, out.logits[:, -1]
        positions = positions + 1
    return {
        "tokens": tokens.numpy(),
        "lengths": lengths.numpy(),
        "token_payments": token_payments.numpy(),
        "prefill_seconds": prefill_seconds,
    }


def torch_worker(gguf: str) -> None:
    """Serves requests (JSON lines on stdin): runs the PyTorch auction and reports time and results.

    A request's ``threads`` sets ``torch.set_num_threads`` for it (0: PyTorch's default).
    """
    import torch
    from transformers import AutoModelForCausalLM

    default_threads = torch.get_num_threads()
    path = Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    print(json.dumps({"ready": True, "torch": torch.__version__, "default_threads": default_threads}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        torch.set_num_threads(request["threads"] or default_threads)
        with torch.inference_mode():
            start = time.perf_counter()
            result = torch_generate(
                model,
                request["sequences"],
                np.asarray(request["bids"], np.float32),
                num_charged=request["num_charged"],
                max_new_tokens=request["max_new_tokens"],
                pad_id=request["pad_id"],
                eos_ids=request["eos_ids"],
                temperature=request["temperature"],
                prefill=request["prefill"],
            )
            seconds = time.perf_counter() - start
        print(
            json.dumps(
                {
                    "seconds": seconds,
                    "threads": torch.get_num_threads(),
                    "maxrss_mb": _maxrss_mb(),
                    **{k: np.asarray(v).tolist() for k, v in result.items()},
                }
            ),
            flush=True,
        )


class TorchWorker:
    """This script in ``--torch-worker`` mode as a subprocess."""

    def __init__(self, gguf: Path):
        command = [sys.executable, __file__, "--torch-worker", str(gguf)]
        environment = {**os.environ, "TQDM_DISABLE": "1"}  # no GGUF conversion progress bar
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=environment
        )
        self.info: dict | None = None

    def _read(self) -> dict:
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError("the PyTorch worker exited (see its error above)")
            if line.startswith("{"):
                return json.loads(line)

    def wait_ready(self) -> dict:
        if self.info is None:
            self.info = self._read()
        return self.info

    def run(self, request: dict) -> dict:
        self.wait_ready()
        self.process.stdin.write(json.dumps(request) + "\n")
        return self._read()

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(timeout=60)


# ---------------------------------------------------------------------------------------- workloads


def sweep_workload(config_path, points: int):
    """The Hawaii sweep of ``config_path``: ``(config, prompts, base_prompt, shares [P], bids [P, n])``
    (:func:`jaxauction.sweep.sweep_bids`). Also used by ``bench_payments.py``."""
    from jaxauction.config import load_config
    from jaxauction.sweep import sweep_bids

    config = load_config(config_path)
    shares, bids = sweep_bids(config, points)
    return config, config.prompts(), config.base_messages(), shares, bids


def sweep_options(config, max_new_tokens: int, model, rule="linear", payment="second_price") -> dict:
    """The keywords of ``generate(prompts, bids, **options)`` for the sweep: greedy decoding, the
    configuration's seed, base prompt, base bid and temperature."""
    import jax

    return dict(
        rule=rule,
        payment=payment,
        decoding="greedy",
        key=jax.random.key(config.seed),
        max_new_tokens=max_new_tokens,
        model=model,
        base_prompt=config.base_messages(),
        base_bid=config.base_bid,
        temperature=config.temperature,
    )


def mixed_workload(path, limit: int = 0):
    r"""The mixed batch: ``(lines, auctions)``, the first ``limit`` (0: all) entries of the JSONL file
    ``path`` (:func:`jaxauction.batch.read_auctions`) and their :class:`jaxauction.Auction`\ s, for one
    ``generate(auctions, **options)`` call (``options`` without ``base_prompt``/``base_bid``)."""
    from jaxauction import Auction
    from jaxauction.batch import read_auctions

    lines = read_auctions(path)
    if limit > 0:
        lines = lines[:limit]
    return lines, [Auction(e.prompts, e.bids, base_prompt=e.base_prompt, base_bid=e.base_bid) for e in lines]


# ---------------------------------------------------------------------------------------- main


def _stack_single(results) -> dict:
    return {
        "tokens": np.stack([r.tokens for r in results]),
        "lengths": np.stack([r.lengths for r in results]),
        "token_payments": np.stack([r.token_payments for r in results]),
    }


def _as_arrays(result) -> dict:
    return {
        "tokens": np.asarray(result.tokens),
        "lengths": np.asarray(result.lengths),
        "token_payments": np.asarray(result.token_payments),
    }


def _compare(reference: dict, other: dict) -> dict:
    """Token agreement and payment differences of ``other`` against ``reference``."""
    same_lengths = bool(np.array_equal(reference["lengths"], other["lengths"]))
    steps = min(reference["tokens"].shape[1], other["tokens"].shape[1])
    same_tokens = same_lengths and bool(np.array_equal(reference["tokens"][:, :steps], other["tokens"][:, :steps]))
    differing = [
        int(a)
        for a in range(len(reference["lengths"]))
        if not np.array_equal(reference["tokens"][a, :steps], other["tokens"][a, :steps])
    ]
    totals = reference["token_payments"].sum(1), other["token_payments"].sum(1)
    per_token = np.abs(reference["token_payments"][:, :steps] - other["token_payments"][:, :steps])
    return {
        "same_tokens": same_tokens,
        "auctions_with_different_tokens": differing,
        "max_abs_payment_diff": float(np.abs(totals[0] - totals[1]).max()),
        "max_rel_payment_diff": float((np.abs(totals[0] - totals[1]) / np.maximum(np.abs(totals[0]), 1e-12)).max()),
        "max_abs_token_payment_diff": float(per_token.max()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--json", help="write the results to this file (atomically)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="TOML auction configuration")
    parser.add_argument("--points", type=int, default=11, help="sweep points = auctions (default 11)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="token limit per auction (default 48)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per case; the best is reported")
    parser.add_argument(
        "--torch-threads",
        type=int,
        nargs="+",
        default=[0, 1],
        help="torch.set_num_threads for each PyTorch case, 0 = PyTorch's default "
        "(default: 0 1, i.e. the default and one thread; the fastest is the baseline)",
    )
    parser.add_argument(
        "--torch-prefill",
        choices=["shared", "rows"],
        default="shared",
        help="PyTorch prefill: the distinct prompts once, cache repeated (shared, as "
        "jaxauction does) or every row of the batch (rows)",
    )
    parser.add_argument(
        "--xla-single-thread",
        action="store_true",
        help="run XLA:CPU on one thread (XLA_FLAGS --xla_cpu_multi_thread_eigen=false "
        "intra_op_parallelism_threads=1), to compare with PyTorch on one thread",
    )
    parser.add_argument("--mixed-config", default=str(DEFAULT_MIXED), help="JSONL auctions of the mixed workload")
    parser.add_argument("--mixed-limit", type=int, default=0, help="use only the first N mixed auctions (0: all)")
    parser.add_argument("--no-torch", action="store_true", help="run only the jaxauction cases (no PyTorch needed)")
    parser.add_argument("--torch-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torch_worker:
        torch_worker(args.torch_worker)
        return 0
    if args.points < 2 or args.max_new_tokens < 1 or args.repeats < 1 or min(args.torch_threads) < 0:
        parser.error("--points must be >= 2, --max-new-tokens and --repeats >= 1, --torch-threads >= 0")

    load_at_start = hostinfo.load_average()
    if args.xla_single_thread:  # before JAX starts its backend
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        ).strip()
    from jaxauction import models

    worker = None if args.no_torch else TorchWorker(models.bundled_gguf_path())  # loads while JAX loads here

    import jax

    from jaxauction import generate
    from jaxauction.outputs import write_json
    from jaxauction.prompts import encode_prompt, eos_ids

    config, prompts, base_prompt, shares, bids = sweep_workload(args.config, args.points)
    model = models.load()
    llm, tokenizer = model
    num_agents = len(prompts)
    sequences = [encode_prompt(tokenizer, p) for p in prompts]
    torch_bids = bids
    if base_prompt is not None:
        sequences.append(encode_prompt(tokenizer, base_prompt))
        torch_bids = np.concatenate([bids, np.full((len(bids), 1), config.base_bid)], axis=1)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options = sweep_options(config, args.max_new_tokens, model)
    request = {
        "sequences": sequences,
        "bids": torch_bids.tolist(),
        "num_charged": num_agents,
        "max_new_tokens": args.max_new_tokens,
        "pad_id": int(pad_id),
        "eos_ids": list(eos_ids(llm, tokenizer)),
        "temperature": config.temperature,
        "prefill": args.torch_prefill,
    }
    torch_warmup_tokens = min(4, args.max_new_tokens)

    mixed_lines, auctions = mixed_workload(args.mixed_config, args.mixed_limit)
    mixed_n_max = max(len(e.prompts) for e in mixed_lines)
    mixed_requests = []
    for e in mixed_lines:
        seqs = [encode_prompt(tokenizer, p) for p in e.prompts]
        row = list(e.bids)
        if e.base_prompt is not None:
            seqs.append(encode_prompt(tokenizer, e.base_prompt))
            row.append(e.base_bid)
        mixed_requests.append({**request, "sequences": seqs, "bids": [row], "num_charged": len(e.prompts)})
    mixed_rows = sum(len(r["sequences"]) for r in mixed_requests)
    mixed_options = {k: v for k, v in options.items() if k not in ("base_prompt", "base_bid")}

    def run_mixed(warmup: bool = False) -> dict:
        return _as_arrays(generate(auctions, **mixed_options))

    def torch_mixed_case(threads: int):
        def run(warmup: bool = False) -> dict:
            replies = [
                worker.run({**r, "threads": threads, **({"max_new_tokens": torch_warmup_tokens} if warmup else {})})
                for r in (mixed_requests[:1] if warmup else mixed_requests)
            ]
            payments = [np.asarray(r["token_payments"]) for r in replies]
            payments = [np.pad(p, ((0, 0), (0, 0), (0, mixed_n_max - p.shape[-1]))) for p in payments]
            return {
                "seconds": sum(r["seconds"] for r in replies),
                "prefill_seconds": sum(r["prefill_seconds"] for r in replies),
                "threads": replies[0]["threads"],
                "maxrss_mb": max(r["maxrss_mb"] for r in replies),
                "tokens": np.concatenate([np.asarray(r["tokens"]) for r in replies]),
                "lengths": np.concatenate([np.asarray(r["lengths"]) for r in replies]),
                "token_payments": np.concatenate(payments),
            }

        return run

    def run_batched(warmup: bool = False) -> dict:
        return _as_arrays(generate(prompts, bids, **options))

    def run_separate(warmup: bool = False) -> dict:
        return _stack_single([generate(prompts, row, **options) for row in bids])

    def torch_case(threads: int):
        def run(warmup: bool = False) -> dict:
            reply = worker.run(
                {**request, "threads": threads, **({"max_new_tokens": torch_warmup_tokens} if warmup else {})}
            )
            return {
                "seconds": reply["seconds"],
                "prefill_seconds": reply["prefill_seconds"],
                "threads": reply["threads"],
                "maxrss_mb": reply["maxrss_mb"],
                **{k: np.asarray(reply[k]) for k in ("tokens", "lengths", "token_payments")},
            }

        return run

    info = worker.wait_ready() if worker is not None else {"torch": None, "default_threads": 0}
    rows = len(bids) * len(sequences)
    print(
        f"{len(bids)} auctions x {len(sequences)} rows = {rows} sequences, <= {args.max_new_tokens} new "
        f"tokens each; prompts of {[len(s) for s in sequences]} tokens; linear rule, second-price "
        f"payments, greedy decoding, float32",
        flush=True,
    )
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} (XLA_FLAGS "
        f"{os.environ.get('XLA_FLAGS', '')!r}); torch {info['torch']} (default "
        f"{info['default_threads']} threads), torch prefill: {args.torch_prefill}",
        flush=True,
    )
    # The ratio to PyTorch depends on the CPU (issue 37: 1.41x / 2.27x on a 2-core Intel Xeon, 1.71-2.19x /
    # 4.46-5.02x on a 2-core AMD EPYC, where PyTorch's GEMMs are slower): read it with the vendor.
    print(f"host: {hostinfo.line(load_at_start)}; CPU vendor {hostinfo.cpu()['vendor']}", flush=True)

    main_name = "jaxauction batched"
    cases = {main_name: (run_batched, f"generate(prompts, bids [{len(bids)}, {num_agents}])")}
    torch_names = []
    for threads in [] if worker is None else dict.fromkeys(args.torch_threads):
        count = threads or info["default_threads"]
        name = f"(a) torch {count} thread{'s' if count > 1 else ''}" + (" (default)" if not threads else "")
        if name in cases or any(n.startswith(f"(a) torch {count} thread") for n in torch_names):
            continue
        torch_names.append(name)
        cases[name] = (
            torch_case(threads),
            f"transformers + PyTorch, {rows} rows in one batch, torch.set_num_threads({count})",
        )
    separate_name = "(b) jaxauction separate"
    cases[separate_name] = (run_separate, f"{len(bids)} x generate(prompts, bids [{num_agents}])")
    mixed_name = "jaxauction mixed"
    cases[mixed_name] = (run_mixed, f"generate({len(auctions)} Auctions, 2-{mixed_n_max} agents + base), one call")
    torch_mixed_names = []
    for name in torch_names:
        threads = int(name.split()[2])
        mixed_torch = name.replace("(a) torch", "(a) torch mixed")
        torch_mixed_names.append(mixed_torch)
        cases[mixed_torch] = (
            torch_mixed_case(0 if "(default)" in name else threads),
            "transformers + PyTorch, one auction at a time",
        )
    case_rows = {name: rows for name in cases}
    case_rows.update({n: mixed_rows for n in (mixed_name, *torch_mixed_names)})

    warmup, times, outputs = {}, {name: [] for name in cases}, {}
    for name, (run, _) in cases.items():
        start = time.perf_counter()
        run(warmup=True)
        warmup[name] = time.perf_counter() - start
        print(f"warm-up {name}: {warmup[name]:.2f} s", flush=True)
    for repeat in range(args.repeats):
        for name, (run, _) in cases.items():
            start = time.perf_counter()
            outputs[name] = run()
            elapsed = time.perf_counter() - start
            times[name].append(outputs[name].get("seconds", elapsed))
            print(f"run {repeat + 1}/{args.repeats} {name}: {times[name][-1]:.3f} s", flush=True)
    if worker is not None:
        worker.close()
    load_at_end = hostinfo.load_average()

    results = []
    for name, (_, description) in cases.items():
        out = outputs[name]
        tokens = int(out["lengths"].sum())
        best = min(times[name])
        results.append(
            {
                "name": name,
                "description": description,
                "seconds_best": best,
                "seconds_all": times[name],
                "warmup_seconds": warmup[name],
                "generated_tokens": tokens,
                "tokens_per_second": tokens / best,
                "steps": int(out["lengths"].max()),
                "rows_x_steps": case_rows[name] * int(out["lengths"].max()),
                **(
                    {
                        "torch_threads": out["threads"],
                        "prefill_seconds_last_run": out["prefill_seconds"],
                        "torch_maxrss_mb": out["maxrss_mb"],
                    }
                    if "threads" in out
                    else {}
                ),
            }
        )
    by_name = {r["name"]: r for r in results}
    main_rate = by_name[main_name]["tokens_per_second"]
    fastest_torch = max(torch_names, key=lambda n: by_name[n]["tokens_per_second"]) if torch_names else None
    ratio_vs_torch = main_rate / by_name[fastest_torch]["tokens_per_second"] if torch_names else None
    ratio_vs_torch_cases = {n: main_rate / by_name[n]["tokens_per_second"] for n in torch_names}
    ratio_vs_separate = main_rate / by_name[separate_name]["tokens_per_second"]
    mixed_rate = by_name[mixed_name]["tokens_per_second"]
    fastest_mixed = max(torch_mixed_names, key=lambda n: by_name[n]["tokens_per_second"]) if torch_mixed_names else None
    ratio_vs_torch_mixed = mixed_rate / by_name[fastest_mixed]["tokens_per_second"] if fastest_mixed else None
    jax_maxrss_mb = _maxrss_mb()
    agreement = {
        name: _compare(outputs[mixed_name if name in torch_mixed_names else main_name], outputs[name])
        for name in cases
        if name not in (main_name, mixed_name)
    }

    header = f"{'case':<34}{'best s':>9}{'tokens':>8}{'tokens/s':>10}{'batched x':>11}  runs (s)"
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        print(
            f"{r['name']:<34}{r['seconds_best']:>9.3f}{r['generated_tokens']:>8d}"
            f"{r['tokens_per_second']:>10.1f}"
            f"{(mixed_rate if r['name'] in (mixed_name, *torch_mixed_names) else main_rate) / r['tokens_per_second']:>11.2f}  "
            + ", ".join(f"{t:.3f}" for t in r["seconds_all"])
        )
    print(
        f"\ntokens counted: sum over auctions of the tokens each generated (EOS included); "
        f"steps of the longest auction: {by_name[main_name]['steps']}"
    )
    if torch_names:
        print(f"ratio jaxauction batched / (a) fastest torch [{fastest_torch}]: {ratio_vs_torch:.2f}x (goal >= 2x)")
        print(
            f"ratio jaxauction mixed / fastest torch mixed [{fastest_mixed}]: {ratio_vs_torch_mixed:.2f}x (goal >= 2x)"
        )
    print(f"peak memory (ru_maxrss): JAX process {jax_maxrss_mb:.0f} MB")
    for name in torch_names:
        print(f"ratio jaxauction batched / {name}: {ratio_vs_torch_cases[name]:.2f}x")
    print(f"ratio jaxauction batched / {separate_name}: {ratio_vs_separate:.2f}x")
    for name, check in agreement.items():
        print(
            f"agreement with {name}: same tokens {check['same_tokens']}"
            + (f" (auctions differing: {check['auctions_with_different_tokens']})" if not check["same_tokens"] else "")
            + f"; max |payment diff| {check['max_abs_payment_diff']:.2e} (relative "
            f"{check['max_rel_payment_diff']:.2e}), per token {check['max_abs_token_payment_diff']:.2e}"
        )
    print(f"host: {hostinfo.line(load_at_start, load_at_end)}; CPU vendor {hostinfo.cpu()['vendor']}")

    if args.json:
        texts = [
            tokenizer.decode(row[:n], skip_special_tokens=True).strip()
            for row, n in zip(outputs[main_name]["tokens"], outputs[main_name]["lengths"])
        ]
        write_json(
            args.json,
            {
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "config": str(args.config),
                "points": args.points,
                "max_new_tokens": args.max_new_tokens,
                "repeats": args.repeats,
                "sequences": rows,
                "rule": "linear",
                "payment": "second_price",
                "decoding": "greedy",
                "token_count": "sum over auctions of generated tokens (EOS included)",
                "cases": results,
                "ratio_vs_torch": ratio_vs_torch,
                "ratio_vs_torch_case": fastest_torch,
                "ratio_vs_torch_cases": ratio_vs_torch_cases,
                "ratio_vs_separate": ratio_vs_separate,
                "ratio_vs_torch_mixed": ratio_vs_torch_mixed,
                "ratio_vs_torch_mixed_case": fastest_mixed,
                "mixed_config": str(args.mixed_config),
                "mixed_auctions": len(auctions),
                "mixed_sequences": mixed_rows,
                "memory": {
                    "jax_maxrss_mb": jax_maxrss_mb,
                    "torch_maxrss_mb": max(
                        (r["torch_maxrss_mb"] for r in results if "torch_maxrss_mb" in r), default=None
                    ),
                },
                "agreement": agreement,
                "machine": {
                    "platform": platform.platform(),
                    "cpu_count": os.cpu_count(),
                    "load_average_start": load_at_start,
                    "load_average_end": load_at_end,
                    "jax": jax.__version__,
                    "xla_flags": os.environ.get("XLA_FLAGS", ""),
                    "torch": info["torch"],
                    "torch_default_threads": info["default_threads"],
                    "torch_prefill": args.torch_prefill,
                },
                "host": hostinfo.describe(load_at_start, load_at_end),
                "shares": shares,
                "bids": bids,
                "texts": texts,
                "payments": outputs[main_name]["token_payments"].sum(1),
            },
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
