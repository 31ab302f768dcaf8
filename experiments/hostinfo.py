"""The one description of the host a benchmark ran on: CPU model and vendor, cores, load average.

Every ``experiments/`` script that prints a ratio prints :func:`line` beside it and stores :func:`describe`
in its JSON: a ratio against PyTorch or a floor depends on the host (issue 37: PyTorch's GEMMs run
1.5-2.5x faster on a 2-core Intel Xeon than on the 2-core AMD EPYC of the README's figures), so a figure
without the CPU model cannot be compared. Scripts import it as ``import hostinfo`` (``experiments/`` is on
``sys.path`` when a script there runs).

    >>> start = hostinfo.load_average()
    >>> ...  # the measurement
    >>> print(hostinfo.line(start, hostinfo.load_average()))
    AMD EPYC (AuthenticAMD, family 25 model 17; avx2 avx512f), 2 cores; load average 1.20, 0.95, 0.80 at the start; ...
"""

from __future__ import annotations

import os
import platform
from functools import cache

# Instruction-set extensions that decide which CPU kernels (XLA's, oneDNN's, XNNPACK's) can run.
_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
_VENDORS = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD"}


def _cpuinfo(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's ``key: value`` fields of ``/proc/cpuinfo`` (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            for text in file:
                if not text.strip():
                    break  # the first processor's block ends at the first blank line
                key, _, value = text.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


@cache
def cpu() -> dict:
    """``{"model", "vendor", "vendor_id", "family", "model_number", "isa"}`` of this machine's CPU.

    From ``/proc/cpuinfo`` on Linux, else :mod:`platform` (``vendor`` then ``"unknown"`` unless the
    processor string names Intel or AMD). ``vendor`` is ``"Intel"``, ``"AMD"``, or the raw vendor id.
    """
    info = _cpuinfo()
    model = info.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    vendor_id = info.get("vendor_id", "")
    vendor = _VENDORS.get(vendor_id) or next((v for v in _VENDORS.values() if v in model), vendor_id or "unknown")
    flags = set(info.get("flags", "").split())
    return {
        "model": model,
        "vendor": vendor,
        "vendor_id": vendor_id,
        "family": info.get("cpu family"),
        "model_number": info.get("model"),
        "isa": [flag for flag in _ISA_FLAGS if flag in flags],
    }


def cores() -> int:
    """The cores this process may run on (its affinity where the OS reports it, else ``os.cpu_count``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> tuple[float, float, float]:
    """The 1-, 5- and 15-minute load averages (zeros where the OS has none)."""
    try:
        return tuple(os.getloadavg())
    except OSError:
        return (0.0, 0.0, 0.0)


def describe(load_start=None, load_end=None) -> dict:
    """The host as JSON: :func:`cpu` fields prefixed ``cpu_``, cores, machine, platform and the load
    averages given (``load_start``/``load_end``: :func:`load_average` tuples; left out when None)."""
    loads = {"load_average_start": load_start, "load_average_end": load_end}
    return {
        **{f"cpu_{key}": value for key, value in cpu().items()},
        "cores": cores(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **{key: list(value) for key, value in loads.items() if value is not None},
    }


def cpu_text() -> str:
    """``"AMD EPYC (AuthenticAMD, family 25 model 17; avx2 avx512f), 2 cores"``."""
    c = cpu()
    details = [c["vendor_id"] or c["vendor"]]
    if c["family"] is not None:
        details.append(f"family {c['family']} model {c['model_number']}")
    isa = f"; {' '.join(c['isa'])}" if c["isa"] else ""
    return f"{c['model']} ({', '.join(details)}{isa}), {cores()} cores"


def _load_text(load) -> str:
    return ", ".join(f"{x:.2f}" for x in load)


def line(load_start=None, load_end=None) -> str:
    """One line to print beside a ratio: the CPU (:func:`cpu_text`) and the load averages given."""
    parts = [cpu_text()]
    if load_start is not None:
        parts.append(f"load average {_load_text(load_start)} at the start")
    if load_end is not None:
        parts.append(
            f"{_load_text(load_end)} at the end" if load_start is not None else f"load average {_load_text(load_end)}"
        )
    return "; ".join(parts)
