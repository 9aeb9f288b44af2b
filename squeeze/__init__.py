"""squeeze: hardware-aware model compression, proven by measurement on the target."""

__all__ = ["__version__"]
__version__ = "0.1.0"
