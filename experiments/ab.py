"""What the A/B benchmarks share (``bench_layers``, ``bench_attention``, ``bench_quantized``): timing
compiled programs alternately in one process, and writing the results."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def alternate_medians(
    programs: dict[str, tuple[Callable, tuple]], repeats: int, suffix: str = "_ms"
) -> dict[str, float]:
    """``{name + suffix: median milliseconds}`` of ``program(*args)`` for each ``name: (program, args)``,
    with ``load_before`` and ``load_after`` (the 1-minute load average).

    The programs run in turn, one round after another (one idle while the other runs), so load from
    other processes hits them alike; each call is waited for (``jax.block_until_ready``).
    """
    import jax

    times: dict[str, list[float]] = {name: [] for name in programs}
    load_before = os.getloadavg()[0]
    for _ in range(repeats):
        for name, (program, args) in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(program(*args))
            times[name].append(time.perf_counter() - start)
    medians = {name + suffix: 1e3 * statistics.median(values) for name, values in times.items()}
    return {**medians, "load_before": load_before, "load_after": os.getloadavg()[0]}


def write_json(path: str | None, results) -> None:
    """``results`` as indented JSON at ``path`` (folders created); nothing when ``path`` is None."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=1))
