"""The decode step with the layers scanned (the model's form) against the same layers unrolled.

    .venv/bin/python experiments/bench_layers.py --json outputs/bench_layers.json

``Llama`` holds its layers' weights stacked (``[L, ...]``) and runs them as one ``lax.scan``. The
baseline, built here from the same weights copied into one array per layer, is the earlier form: a
Python loop over the ``L`` layers, which XLA compiles as ``L`` unrolled copies of the block. For each row count (default 4, 16
and 22 rows, 176 cache slots, float32 computation, the bundled SmolLM2-135M-Instruct with its Q4_1
layers, both compiled with ``jaxauction.models.compiler_options()``) it prints the compile time
and the median decode-step time of both forms, measured alternately (one idle while the other runs)
in this process, their ratios, and the 1-minute load average.
"""

from __future__ import annotations

import argparse
import time

import hostinfo
from ab import alternate_medians, write_json


def _unrolled_decode_kv(graphdef, weights, layers, token_ids, cache):
    """``Llama.decode_kv`` with a Python loop over ``layers`` (one weight pytree per layer, separate
    arrays as the model held them before) instead of the scan."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxauction.models.modeling import rope_inverse_frequencies, rope_tables

    model = nnx.merge(graphdef, weights)
    # One new token per row, no sliding window (the bundled model has none): the token sees itself and
    # every valid cached slot.
    positions = cache.positions[:, None]
    cos, sin = rope_tables(positions, rope_inverse_frequencies(model.config))
    new_mask = jnp.ones((token_ids.shape[0], 1, 1), bool)
    old_mask = cache.valid[:, None, :]
    layer_graphdef = nnx.graphdef(model.layers)
    x, keys, values = model.embed(token_ids[:, None]), [], []
    for i, layer_weights in enumerate(layers):
        layer = nnx.merge(layer_graphdef, layer_weights)
        x, k, v = layer(x, cos, sin, new_mask, (cache.k[i], cache.v[i], old_mask))
        keys.append(k[:, 0])
        values.append(v[:, 0])
    return model.logits(x[:, -1]), jnp.stack(keys), jnp.stack(values)


def _scanned_decode_kv(graphdef, weights, layers, token_ids, cache):
    from flax import nnx

    del layers  # the scan reads the stacked weights in ``weights``

    return nnx.merge(graphdef, weights).decode_kv(token_ids, cache)


def measure(rows: int, slots: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxauction import models

    llm, _ = models.default()
    assert llm.config.sliding_window is None, "the unrolled baseline assumes no sliding window"
    graphdef, weights = nnx.split(llm)
    cache = llm.init_cache(rows, slots)
    cache = cache.replace(index=jnp.int32(slots - 1), valid=cache.valid.at[:, : slots - 1].set(True))
    tokens = jnp.arange(rows, dtype=jnp.int32) + 100
    stacked = nnx.state(llm.layers)
    layers = [jax.tree.map(lambda w, i=i: jnp.array(w[i]), stacked) for i in range(llm.config.num_layers)]
    args = (weights, layers, tokens, cache)
    programs, result = {}, {"rows": rows, "slots": slots}
    for name, body in (("unrolled", _unrolled_decode_kv), ("scanned", _scanned_decode_kv)):
        start = time.perf_counter()
        jitted = jax.jit(body, static_argnums=0, compiler_options=models.compiler_options() or None)
        programs[name] = jitted.lower(graphdef, *args).compile()
        result[f"{name}_compile_s"] = time.perf_counter() - start
        jax.block_until_ready(programs[name](*args))
    outputs = {name: program(*args) for name, program in programs.items()}
    result["max_abs_logit_difference"] = float(np.max(np.abs(outputs["unrolled"][0] - outputs["scanned"][0])))
    programs = {name: (program, args) for name, program in programs.items()}
    result.update(alternate_medians(programs, repeats, suffix="_step_ms"))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[4, 16, 22])
    parser.add_argument("--slots", type=int, default=176)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    results = []
    for rows in args.rows:
        r = measure(rows, args.slots, args.repeats)
        results.append(r)
        print(
            f"{rows:3d} rows, {r['slots']} slots: compile unrolled {r['unrolled_compile_s']:.2f} s, scanned "
            f"{r['scanned_compile_s']:.2f} s ({r['unrolled_compile_s'] / r['scanned_compile_s']:.1f}x faster); "
            f"step unrolled {r['unrolled_step_ms']:.1f} ms, scanned {r['scanned_step_ms']:.1f} ms "
            f"(scanned {r['unrolled_step_ms'] / r['scanned_step_ms']:.2f}x the speed); max |logit difference| "
            f"{r['max_abs_logit_difference']:.1e} (load {r['load_before']:.2f} -> {r['load_after']:.2f})",
            flush=True,
        )
    print(f"host: {hostinfo.cpu_text()}")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
