"""What a measurement ran on, recorded with every result."""

from __future__ import annotations

import os
import platform
from functools import lru_cache

import squeeze

__all__ = ["environment", "cpu_features"]


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


# /proc/cpuinfo flags that decide int8 kernels: x86 (`flags`) and arm64 (`Features`).
_INT8_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512bw": "AVX-512BW", "avx512_vnni": "AVX-512 VNNI",
               "avx_vnni": "AVX-VNNI", "amx_int8": "AMX-INT8", "asimd": "NEON", "asimddp": "NEON dot product",
               "i8mm": "NEON I8MM"}
# With one of these, 8-bit products are summed in 32 bits; without, ORT's x86 u8s8 kernels sum pairs in 16 bits.
_DOT_PRODUCT = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass  # not Linux: no flags known
    return frozenset()


def cpu_features() -> dict:
    """The CPU's int8-relevant instruction sets, and whether it has 8-bit dot products (VNNI and kin)."""
    flags = _cpu_flags()
    return {"int8_isa": [name for flag, name in _INT8_FLAGS.items() if flag in flags],
            "int8_dot_product": any(flag in flags for flag in _DOT_PRODUCT)}


def environment(runtime: str, runtime_version: str, providers: list[str], threads: int) -> dict:
    load1, load5, _ = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "runtime": runtime,
        "runtime_version": runtime_version,
        "providers": providers,
        "threads": threads,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_int8": cpu_features(),
        "load_avg_1m": round(load1, 2),
        "load_avg_5m": round(load5, 2),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "squeeze": squeeze.__version__,
    }
