"""Benchmark the JAX model against transformers + PyTorch on the same weights, in the same run.

    .venv-bench/bin/python experiments/bench_model.py --json outputs/bench_model.json

Needs torch (the project's ``bench`` extra: ``pip install -e '.[bench]'``). Both sides run float32
on the CPU with the bundled SmolLM2-135M-Instruct, dequantized from the GGUF file once and handed to
transformers as a safetensors folder (``jaxauction.models.export_hf``), so both use identical weights.
Measured per batch size (default 1, 4, 22):

  prefill   tokens/s for a batch of ``--prompt-tokens``-token prompts (KV cache filled),
  decode    ms per greedy step with the KV cache, averaged over ``--steps`` steps.

PyTorch runs in a worker process (one process with both runtimes lets their thread pools fight
over the cores) with ``OMP_WAIT_POLICY=PASSIVE`` (its best setting on a shared machine; override by
setting the variable). The two are measured alternately, one idle while the other runs, and the
median of the repetitions is reported, so load from other processes hits both alike.

The memory-bandwidth floor of a decode step is the bytes of the weights a step reads, as the model
holds them (the bundled model's layers as Q4_1 blocks, the LM head as float32; the embedding table,
from which a step gathers one row per token, left out), divided by the copy bandwidth of a large
numpy copy (bytes read + written per second): no decode step can stream those weights faster.
PyTorch gets the float32 weights (its own floor would be higher). At larger batches a step is bound by arithmetic instead: the compute floor is the
step's 2 * parameters * batch FLOPs divided by the FLOP/s of a 1024^3 float32 matmul. Also reported:
load time and peak memory of ``jaxauction.models.load()`` in a fresh subprocess, and the first-call
(compile) time. Speed claims of the project come from this script only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import hostinfo
import numpy as np


def copy_bandwidth(num_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes moved (read + written) per second by ``np.copyto`` of a large float32 array (best of ``repeats``)."""
    source = np.ones(num_bytes // 4, np.float32)
    target = np.empty_like(source)
    np.copyto(target, source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best


def streamed_weight_bytes(model) -> int:
    """Bytes of the weights a decode step reads: the model's arrays as held, less the embedding table
    (and the ``[V, D]`` LM head, which the step reads through its ``[D, V]`` copy)."""
    import jax
    from flax import nnx

    total = sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model)))
    unread = model.embedding[...].nbytes + (0 if model.lm_head is None else model.lm_head[...].nbytes)
    return total - unread


def matmul_throughput(size: int = 1024, repeats: int = 60) -> float:
    """FLOP/s of a large float32 matrix product under ``jax.jit`` (best of ``repeats``): the compute roof.

    Each product takes about 10 ms, so many repeats keep one busy moment of the shared machine from
    lowering the roof (7 repeats once measured 110 instead of 210 GFLOP/s, which nearly doubled the floor)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), jnp.float32)
    product = jax.jit(lambda a, b: a @ b)
    product(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        product(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


LOAD_SNIPPET = """
import json, resource, time
start = time.perf_counter()
import jaxauction.models as jm
imported = time.perf_counter()
model, tokenizer = jm.load()
done = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:  # VmHWM: ru_maxrss of a child on Linux also counts the parent's resident memory at fork time
    peak = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])
except (OSError, IndexError):
    pass
print(json.dumps({'import_s': imported - start, 'load_s': done - imported, 'peak_rss_mb': peak / 1024}))
"""


def measure_load() -> dict:
    """Load time and peak memory of ``jaxauction.models.load()`` in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", LOAD_SNIPPET], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------- PyTorch worker


def torch_worker(folder: str, threads: int) -> None:
    """Serve timing requests (JSON lines on stdin) with transformers + PyTorch on ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    info = {
        "ready": True,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        prompt = torch.tensor(request["prompt"], dtype=torch.long)
        steps = request["steps"]
        with torch.inference_mode():
            start = time.perf_counter()
            out = model(prompt, use_cache=True)
            prefill = time.perf_counter() - start
            cache, logits = out.past_key_values, out.logits[:, -1]
            out = model(logits.argmax(-1, keepdim=True), past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1]
            start = time.perf_counter()
            for _ in range(steps):
                out = model(logits.argmax(-1, keepdim=True), past_key_values=cache, use_cache=True)
                cache, logits = out.past_key_values, out.logits[:, -1]
            decode = (time.perf_counter() - start) / steps
        top = logits.argmax(-1).tolist()
        print(
            json.dumps(
                {"prefill": prefill, "decode": decode, "last_argmax": top, "last_logits_head": logits[:, :64].tolist()}
            ),
            flush=True,
        )


class TorchWorker:
    def __init__(self, folder: str, threads: int):
        # Passive OpenMP waiting: with the default spin-waiting, PyTorch steps on a machine whose cores
        # are shared with other processes were up to 8x slower here (threads spin while their peers are descheduled).
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--torch-worker", folder, "--threads", str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
        )
        self.info = self._read()

    def _read(self) -> dict:
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError("the PyTorch worker exited")
            if line.startswith("{"):
                return json.loads(line)

    def run(self, prompt: np.ndarray, steps: int) -> dict:
        self.process.stdin.write(json.dumps({"prompt": prompt.tolist(), "steps": steps}) + "\n")
        return self._read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


# ---------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 22])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16, help="decode steps per timed repetition")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch intra-op threads")
    parser.add_argument("--torch-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_worker:
        torch_worker(args.torch_worker, args.threads)
        return

    load_stats = measure_load()
    print(
        f"load(): {load_stats['load_s']:.2f} s (+ import {load_stats['import_s']:.2f} s), "
        f"peak memory {load_stats['peak_rss_mb']:.0f} MB",
        flush=True,
    )

    import jax
    import jax.numpy as jnp

    import jaxauction.models as jm

    model, tokenizer = jm.load()
    compiled = jm.CompiledLlama(model)
    config = model.config
    folder = tempfile.TemporaryDirectory()
    jm.export_hf(model, tokenizer, folder.name)
    worker = TorchWorker(folder.name, args.threads)

    weight_bytes = streamed_weight_bytes(model)
    bandwidth = copy_bandwidth()
    floor_ms = weight_bytes / bandwidth * 1e3
    flops_roof = matmul_throughput()
    print(
        f"weights read per step {weight_bytes / 1e6:.0f} MB ({model.quantization or 'float32'} layers); copy bandwidth {bandwidth / 1e9:.2f} GB/s "
        f"(read + write); decode floor {floor_ms:.1f} ms/step; 1024^3 matmul {flops_roof / 1e9:.1f} GFLOP/s",
        flush=True,
    )

    rng = np.random.default_rng(0)
    results = []
    for batch in args.batches:
        prompt = rng.integers(100, config.vocab_size - 100, size=(batch, args.prompt_tokens)).astype(np.int32)
        max_length = args.prompt_tokens + args.steps + 1
        mask = np.ones_like(prompt, dtype=bool)

        def jax_run():
            cache = compiled.init_cache(batch, max_length)
            start = time.perf_counter()
            logits, cache = compiled.prefill(prompt, mask, cache)
            logits.block_until_ready()
            prefill = time.perf_counter() - start
            logits, cache = compiled.decode(jnp.argmax(logits, -1), cache)  # first step outside the timer
            logits.block_until_ready()
            start = time.perf_counter()
            for _ in range(args.steps):
                logits, cache = compiled.decode(jnp.argmax(logits, -1), cache)
            logits.block_until_ready()
            return {
                "prefill": prefill,
                "decode": (time.perf_counter() - start) / args.steps,
                "last_argmax": np.asarray(logits.argmax(-1)).tolist(),
                "last_logits_head": np.asarray(logits[:, :64]).tolist(),
            }

        start = time.perf_counter()
        jax_run()  # compiles prefill and decode for this shape
        first_call = time.perf_counter() - start
        worker.run(prompt, args.steps)  # warm-up
        jax_times, torch_times = [], []
        for _ in range(args.repeats):
            jax_times.append(jax_run())
            torch_times.append(worker.run(prompt, args.steps))
        jax_head, torch_head = (np.array(t[-1]["last_logits_head"]) for t in (jax_times, torch_times))
        agree = float(np.abs(jax_head - torch_head).max())
        same_tokens = jax_times[-1]["last_argmax"] == torch_times[-1]["last_argmax"]
        jax_prefill = statistics.median(t["prefill"] for t in jax_times)
        torch_prefill = statistics.median(t["prefill"] for t in torch_times)
        jax_decode = statistics.median(t["decode"] for t in jax_times)
        torch_decode = statistics.median(t["decode"] for t in torch_times)
        tokens = batch * args.prompt_tokens
        row = {
            "batch": batch,
            "prompt_tokens": args.prompt_tokens,
            "decode_steps": args.steps,
            "jax_first_call_s": first_call,
            "jax_prefill_tokens_per_s": tokens / jax_prefill,
            "torch_prefill_tokens_per_s": tokens / torch_prefill,
            "prefill_speedup_vs_torch": torch_prefill / jax_prefill,
            "jax_decode_ms": jax_decode * 1e3,
            "torch_decode_ms": torch_decode * 1e3,
            "decode_speedup_vs_torch": torch_decode / jax_decode,
            "decode_floor_ms": floor_ms,
            "jax_decode_over_floor": jax_decode * 1e3 / floor_ms,
            "torch_decode_over_floor": torch_decode * 1e3 / floor_ms,
            "jax_decode_gflops": 2 * config.num_parameters() * batch / jax_decode / 1e9,
            "decode_compute_floor_ms": 2 * config.num_parameters() * batch / flops_roof * 1e3,
            "jax_decode_over_compute_floor": jax_decode / (2 * config.num_parameters() * batch / flops_roof),
            "jax_decode_ms_all": [t["decode"] * 1e3 for t in jax_times],
            "torch_decode_ms_all": [t["decode"] * 1e3 for t in torch_times],
            "same_greedy_tokens_last_step": same_tokens,
            "max_abs_logit_diff_last_step": agree,
        }
        results.append(row)
        print(
            f"B={batch:2d}  prefill JAX {row['jax_prefill_tokens_per_s']:6.0f} tok/s  torch "
            f"{row['torch_prefill_tokens_per_s']:6.0f} tok/s  (JAX x{row['prefill_speedup_vs_torch']:.2f})  |  "
            f"decode JAX {row['jax_decode_ms']:6.1f} ms  torch {row['torch_decode_ms']:6.1f} ms  "
            f"(JAX x{row['decode_speedup_vs_torch']:.2f})  floor {floor_ms:.1f} ms: "
            f"JAX {row['jax_decode_over_floor']:.2f}x"
            f"  torch {row['torch_decode_over_floor']:.2f}x  compute floor {row['decode_compute_floor_ms']:.1f} ms: "
            f"JAX {row['jax_decode_over_compute_floor']:.2f}x  |  first call {first_call:.1f} s  "
            f"same tokens {same_tokens}  |dlogits| {agree:.1e}",
            flush=True,
        )
    worker.close()
    folder.cleanup()

    report = {
        "command": " ".join(sys.argv),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "host": hostinfo.describe(load_end=hostinfo.load_average()),
            "jax": jax.__version__,
            "torch": worker.info["torch"],
            "torch_threads": worker.info["threads"],
            "torch_omp_wait_policy": worker.info["omp_wait_policy"],
        },
        "model": {
            "name": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32)",
            "parameters": config.num_parameters(),
        },
        "load": load_stats,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "weight_bytes": weight_bytes,
        "decode_floor_ms": floor_ms,
        "matmul_gflops": flops_roof / 1e9,
        "results": results,
    }
    print(f"host: {hostinfo.line(load_end=hostinfo.load_average())}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
