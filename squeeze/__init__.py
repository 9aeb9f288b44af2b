"""squeeze: hardware-aware model compression, proven by measurement on the target.

The functions a notebook calls live in `squeeze.api`: `api.prune("zoo:digits-cnn", "out", latency=0.5,
data="digits")`, `api.quantize(...)`, `api.compress(model, out, "quant.haq", ...)`, `api.run_recipe(...)`,
`api.bench(...)`, `api.info(...)`. Those whose names no subpackage takes are here too (imported on first use,
so `import squeeze` stays light); `squeeze.prune` is the pruning package, so pruning is `squeeze.api.prune`.
"""

__version__ = "0.1.0"
_API = ("quantize", "compress", "run_recipe", "bench", "gate", "info", "ModelOptions")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from squeeze import api

        return getattr(api, name)
    raise AttributeError(f"module 'squeeze' has no attribute {name!r}")
