"""What a measurement ran on, recorded with every result."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
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


# numpy's run-time CPUID detection names the instruction sets this process's kernels see (under an emulator,
# the emulated CPU's); /proc/cpuinfo adds those numpy does not name.
_CPUID_INT8 = {"AVX2": "AVX2", "AVX512F": "AVX-512", "AVX512BW": "AVX-512BW", "AVX512VNNI": "AVX-512 VNNI",
               "ASIMD": "NEON", "ASIMDDP": "NEON dot product"}
_CPUINFO_INT8 = {"avx_vnni": "AVX-VNNI", "amx_int8": "AMX-INT8", "i8mm": "NEON I8MM"}
# With one of these, 8-bit products are summed in 32 bits; without, ORT's x86 u8s8 kernels sum pairs in 16 bits.
_DOT_PRODUCT = ("AVX-512 VNNI", "AVX-VNNI", "AMX-INT8", "NEON dot product")


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


def _cpuid() -> dict[str, bool]:
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__
    return dict(__cpu_features__)


@lru_cache(maxsize=1)
def cpu_features() -> dict:
    """The CPU's int8-relevant instruction sets, and whether it has 8-bit dot products (VNNI and kin)."""
    cpuid, flags = _cpuid(), _cpu_flags()
    names = [name for key, name in _CPUID_INT8.items() if cpuid.get(key)]
    # /proc/cpuinfo describes the host: trusted only where it agrees with CPUID (not under an emulator).
    if ("avx2" in flags) == bool(cpuid.get("AVX2")) and ("avx512_vnni" in flags) == bool(cpuid.get("AVX512VNNI")):
        names += [name for flag, name in _CPUINFO_INT8.items() if flag in flags]
    return {"int8_isa": names, "int8_dot_product": any(name in names for name in _DOT_PRODUCT)}


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
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_avg_5m": round(load5, 2),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "squeeze": squeeze.__version__,
    }
