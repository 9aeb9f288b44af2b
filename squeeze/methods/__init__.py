"""Compression methods, one module each (`methods/prune/netadapt.py`, `methods/quant/haq.py`, ...): a module
holds the method's typed options, its registered pass and its implementation, and is found by the registry on
the first lookup (nothing lists it elsewhere). Module-level imports stay light (pydantic): `squeeze list` and
recipe validation import every method module; torch loads when a method runs."""

from squeeze.methods.base import (ModelState, Pass, PassContext, PassOptions, get_pass, list_passes, pass_registry,
                                  register_pass)

__all__ = ["ModelState", "Pass", "PassContext", "PassOptions", "get_pass", "list_passes", "pass_registry",
           "register_pass"]
