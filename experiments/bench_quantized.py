"""The bundled model with its Q4_1 layers held quantized (the default) against the same layers dequantized.

    .venv/bin/python experiments/bench_quantized.py --json outputs/bench_quantized.json

``jaxauction.models.load()`` keeps the GGUF file's Q4_1 projection weights as 4-bit blocks and
dequantizes each layer's inside the compiled step; ``load(keep_quantized=False)`` dequantizes them to
float32 once, at load. Prints, for both: the load time, the bytes held, whether the logits of a
prompt are identical, and for each (rows, cache slots) the compile time and the median decode-step
time (``decode_kv`` as the engine runs it), measured alternately in this process, with the ratio and
the 1-minute load average.
"""

from __future__ import annotations

import argparse
import time

import hostinfo
from ab import alternate_medians, write_json


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["4x176", "16x176", "22x49", "22x176"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import jaxauction.models as jm

    models, result = {}, {"shapes": []}
    for name, keep in (("quantized", True), ("float32", False)):
        start = time.perf_counter()
        models[name], tokenizer = jm.load(keep_quantized=keep)
        result[f"{name}_load_s"] = time.perf_counter() - start
        result[f"{name}_mb"] = sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(models[name]))) / 1e6
    ids = np.asarray([tokenizer.encode("Write an ad for Alpha Airlines, flying to Hawaii.")], np.int32)
    logits = {name: np.asarray(jm.jit_forward(model, ids)) for name, model in models.items()}
    result["identical_logits"] = bool(np.array_equal(logits["quantized"], logits["float32"]))
    print(
        f"load {result['quantized_load_s']:.2f} s quantized, {result['float32_load_s']:.2f} s float32; held "
        f"{result['quantized_mb']:.0f} MB against {result['float32_mb']:.0f} MB; identical logits: "
        f"{result['identical_logits']}",
        flush=True,
    )
    for shape in args.shapes:
        rows, slots = (int(part) for part in shape.split("x"))
        programs, row = {}, {"rows": rows, "slots": slots}
        for name, model in models.items():
            graphdef, weights = nnx.split(model)
            cache = model.init_cache(rows, slots)
            cache = cache.replace(index=jnp.int32(slots - 1), valid=cache.valid.at[:, : slots - 1].set(True))
            tokens = jnp.arange(rows, dtype=jnp.int32) + 100

            def step(weights, tokens, cache, graphdef=graphdef):
                return nnx.merge(graphdef, weights).decode_kv(tokens, cache)

            start = time.perf_counter()
            program = jax.jit(step, compiler_options=jm.compiler_options() or None).lower(weights, tokens, cache)
            programs[name] = (program.compile(), (weights, tokens, cache))
            row[f"{name}_compile_s"] = time.perf_counter() - start
        row.update(alternate_medians(programs, args.repeats, suffix="_step_ms"))
        result["shapes"].append(row)
        print(
            f"{rows:3d} rows, {slots:3d} slots: step quantized {row['quantized_step_ms']:.1f} ms, float32 "
            f"{row['float32_step_ms']:.1f} ms (quantized {row['float32_step_ms'] / row['quantized_step_ms']:.2f}x "
            f"the speed); compile {row['quantized_compile_s']:.2f} / {row['float32_compile_s']:.2f} s "
            f"(load {row['load_before']:.2f} -> {row['load_after']:.2f})",
            flush=True,
        )
    print(f"host: {hostinfo.cpu_text()}")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
