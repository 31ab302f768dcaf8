"""How far a bfloat16 model moves greedy tokens and payments from the float32 model's.

    .venv/bin/python experiments/precision_bfloat16.py --json outputs/precision_bfloat16.json

Loads the bundled model twice (``dtype=float32`` and ``dtype=bfloat16``: bfloat16 weights and KV
cache, float32 attention scores, logits and mechanism), runs the same greedy auctions on both and
prints: the logits' dtype and largest difference on the prompts, the auctions whose tokens are
identical, the first token where the others differ, and the payments' difference relative to each
auction's largest payment (over the auctions with identical tokens, and over all), with the 1-minute
load average.
"""

from __future__ import annotations

import argparse
import os

PROMPTS = [
    "Recommend a laptop for a student.",
    "What should I cook tonight?",
    "Suggest a weekend trip.",
    "Which running shoes are good for beginners?",
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--auctions", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)

    import jax.numpy as jnp
    import numpy as np

    import jaxauction as ja
    import jaxauction.models as jm
    from jaxauction import prompts as prompts_lib

    rng = np.random.default_rng(0)
    ads = ("Mention FastBook.", "Mention LightPad.")
    auctions = [
        ja.Auction([f"{PROMPTS[a % len(PROMPTS)]} {ad}" for ad in ads], rng.exponential(size=2) + 0.1)
        for a in range(args.auctions)
    ]
    results, logits = {}, {}
    for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        model, tokenizer = jm.load(dtype=dtype)
        ids = [prompts_lib.encode_prompt(tokenizer, p) for p in PROMPTS]
        batch, mask = prompts_lib.left_pad(ids, prompts_lib.pad_id(tokenizer), width=max(map(len, ids)))
        logits[name] = np.asarray(jm.jit_forward(model, batch, mask)[:, -1])
        results[name] = ja.generate(auctions, model=(model, tokenizer), decoding="greedy", max_new_tokens=args.tokens)
    one, half = results["float32"], results["bfloat16"]
    same = np.all(one.tokens == half.tokens, axis=1)
    first = [int(np.argmax(a != b)) for a, b in zip(one.tokens, half.tokens) if not np.array_equal(a, b)]
    largest = np.abs(one.payments).max(axis=1)
    relative = np.abs(half.payments - one.payments).max(axis=1) / largest
    report = {
        "logits_dtype": str(logits["bfloat16"].dtype),
        "logits_max_abs_diff": float(np.abs(logits["bfloat16"] - logits["float32"]).max()),
        "logits_max_abs": float(np.abs(logits["float32"]).max()),
        "top_token_same": float(np.mean(logits["bfloat16"].argmax(-1) == logits["float32"].argmax(-1))),
        "auctions": args.auctions,
        "tokens": args.tokens,
        "identical_tokens": int(same.sum()),
        "first_divergence": first,
        "payment_rel_diff_identical_max": float(relative[same].max()) if same.any() else None,
        "payment_rel_diff_all_max": float(relative.max()),
        "payment_rel_diff_all_median": float(np.median(relative)),
        "payment_rel_diff_per_auction": [round(float(r), 4) for r in relative],
        "load_average": os.getloadavg()[0],
    }
    for key, value in report.items():
        print(f"{key}: {value}")
    if args.json:
        import json

        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
