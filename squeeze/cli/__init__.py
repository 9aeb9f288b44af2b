"""The `squeeze` command line: one module per command; each parses, calls squeeze.api, renders."""

import os

# Before torch loads: idle OpenMP threads of the search process otherwise spin on the cores that the
# measurement worker is timing (a HAQ search on 2 cores took 273 s instead of 18 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
