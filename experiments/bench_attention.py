"""The decode attention as batched matrix products (the model's form) against broadcast multiply-and-sums.

    .venv/bin/python experiments/bench_attention.py --json outputs/bench_attention.json

One decode step's attention over the cache for all layers of the bundled model's shape (30 layers,
3 key/value heads of 3 queries each, head width 64), as the model runs it: a ``lax.scan`` over the
layers' cache slices. The current form is ``jaxauction.models.modeling.attend`` (two batched products
``[G, hd] @ [hd, S]`` and ``[G, S] @ [S, hd]`` per row and head); the baseline, written out here, is
the earlier form: products broadcast and summed over the head width and over the slots, which XLA:CPU
turns into windowed tree reductions for sums of 32 entries or more. For each (rows, slots) it prints
the compile time and the median time of both forms, measured alternately in one process, their ratio,
the largest difference of the outputs and the 1-minute load average.
"""

from __future__ import annotations

import argparse
import time

import hostinfo
from ab import alternate_medians, write_json

LAYERS, KV_HEADS, GROUP, HEAD_DIM = 30, 3, 3, 64
MASK_VALUE = -0.7 * 3.4028234663852886e38


def fused_attention(q, k_new, v_new, k_old, v_old, old_mask):
    """The baseline: ``q: [B, K, G, hd]``, ``k_new, v_new: [B, K, hd]``, ``k_old: [B, K, hd, S]``,
    ``v_old: [B, K, S, hd]``, ``old_mask: [B, S]`` -> ``[B, K * G * hd]``, sums over broadcast products."""
    import jax.numpy as jnp

    scale = q.shape[-1] ** -0.5
    old_scores = (q[..., None] * k_old[:, :, None]).sum(axis=-2) * scale
    old_scores = jnp.where(old_mask[:, None, None, :], old_scores, MASK_VALUE)
    self_scores = jnp.sum(q * k_new[:, :, None, :], axis=-1) * scale
    peak = jnp.maximum(old_scores.max(axis=-1), self_scores)
    old_weights = jnp.exp(old_scores - peak[..., None])
    self_weights = jnp.exp(self_scores - peak)
    total = old_weights.sum(axis=-1) + self_weights
    out = (old_weights[..., None] * v_old[:, :, None]).sum(axis=-2)
    out = (out + self_weights[..., None] * v_new[:, :, None, :]) / total[..., None]
    return out.reshape(out.shape[0], -1)


def model_attention(q, k_new, v_new, k_old, v_old, old_mask):
    """The model's decode attention through its public ``attend`` (one new token per row)."""
    import jax.numpy as jnp

    from jaxauction.models.modeling import attend

    rows = q.shape[0]
    new_mask = jnp.ones((rows, 1, 1), bool)
    return attend(q[:, None], k_new[:, None], v_new[:, None], new_mask, (k_old, v_old, old_mask[:, None]))[:, 0]


def measure(rows: int, slots: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxauction.models.modeling import compiler_options

    rng = np.random.default_rng(0)
    k_old = jnp.asarray(rng.normal(size=(LAYERS, rows, KV_HEADS, HEAD_DIM, slots)), jnp.float32)
    v_old = jnp.asarray(rng.normal(size=(LAYERS, rows, KV_HEADS, slots, HEAD_DIM)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(rows, KV_HEADS, GROUP, HEAD_DIM)), jnp.float32)
    k_new = jnp.asarray(rng.normal(size=(rows, KV_HEADS, HEAD_DIM)), jnp.float32)
    old_mask = jnp.asarray(rng.random((rows, slots)) < 0.9)

    def program(attention):
        def layers(q, k_old, v_old):
            def layer(q, cached):
                out = attention(q, k_new, k_new, *cached, old_mask)
                return q + 1e-3 * out.reshape(q.shape), None  # the next layer's query depends on this one

            return jax.lax.scan(layer, q, (k_old, v_old))[0]

        return jax.jit(layers, compiler_options=compiler_options() or None)

    args = (q, k_old, v_old)
    result, programs = {"rows": rows, "slots": slots}, {}
    for name, attention in (("sums", fused_attention), ("products", model_attention)):
        start = time.perf_counter()
        programs[name] = program(attention).lower(*args).compile()
        result[f"{name}_compile_s"] = time.perf_counter() - start
    outputs = {name: np.asarray(p(*args)) for name, p in programs.items()}
    result["max_abs_difference"] = float(np.max(np.abs(outputs["sums"] - outputs["products"])))
    result.update(alternate_medians({name: (p, args) for name, p in programs.items()}, repeats))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["4x49", "22x49", "4x176", "16x176", "22x176"])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    results = []
    for shape in args.shapes:
        rows, slots = (int(part) for part in shape.split("x"))
        r = measure(rows, slots, args.repeats)
        results.append(r)
        print(
            f"{rows:3d} rows, {slots:3d} slots, {LAYERS} layers: sums {r['sums_ms']:.2f} ms, products "
            f"{r['products_ms']:.2f} ms ({r['sums_ms'] / r['products_ms']:.2f}x the speed); compile "
            f"{r['sums_compile_s']:.2f} / {r['products_compile_s']:.2f} s; max |difference| "
            f"{r['max_abs_difference']:.1e} (load {r['load_before']:.2f} -> {r['load_after']:.2f})",
            flush=True,
        )
    print(f"host: {hostinfo.cpu_text()}")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
