"""What a measurement ran on, recorded with every result."""

from __future__ import annotations

import os
import platform
from functools import lru_cache

import squeeze

__all__ = ["environment"]


@lru_cache(maxsize=1)
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: platform.processor() below
    return platform.processor() or platform.machine()


def environment(runtime: str, runtime_version: str, providers: list[str], threads: int) -> dict:
    load1, load5, _ = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "runtime": runtime,
        "runtime_version": runtime_version,
        "providers": providers,
        "threads": threads,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(load1, 2),
        "load_avg_5m": round(load5, 2),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "squeeze": squeeze.__version__,
    }
