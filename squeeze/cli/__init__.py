"""The `squeeze` command line: one module per command; each parses, calls squeeze.api, renders.

`main` is the entry point. It stays light, and Ctrl-C at any moment (start-up, where importing torch takes
seconds, parsing, or a command) ends the process at once with exit 130: the measurement workers are killed and
an output folder being written is removed first, so nothing is left. Deciding in the signal handler, not by
letting KeyboardInterrupt unwind, leaves no moment where an interrupt in library code ends differently.
"""

import os
import signal
import sys

# Before torch loads: idle OpenMP threads of the search process otherwise spin on the cores that the
# measurement worker is timing (a HAQ search on 2 cores took 273 s instead of 18 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

INTERRUPTED = "interrupted; nothing was written."


def exit_interrupted(signum=None, frame=None) -> None:
    # Only modules already imported can hold workers or unfinished outputs.
    for name, cleanup in (("squeeze.measure.worker", "kill_all"), ("squeeze.outputs", "remove_unfinished")):
        module = sys.modules.get(name)
        if module is not None:
            getattr(module, cleanup)()
    sys.stderr.write(INTERRUPTED + "\n")
    sys.stderr.flush()
    os._exit(130)


def main() -> None:
    signal.signal(signal.SIGINT, exit_interrupted)
    from squeeze.cli.app import app

    app()
