"""The `squeeze` command line: one module per command; each parses, calls squeeze.api, renders.

`main` is the entry point. It stays light: Ctrl-C during start-up (importing torch takes seconds) or argument
parsing ends the process at once with exit 130, since nothing has been written yet; inside a command,
`handles_errors` turns it into KeyboardInterrupt so that workers are ended and staged outputs removed.
"""

import os
import signal
import sys

# Before torch loads: idle OpenMP threads of the search process otherwise spin on the cores that the
# measurement worker is timing (a HAQ search on 2 cores took 273 s instead of 18 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

INTERRUPTED = "interrupted; nothing was written."


def exit_interrupted(signum=None, frame=None) -> None:
    sys.stderr.write(INTERRUPTED + "\n")
    sys.stderr.flush()
    os._exit(130)


def main() -> None:
    signal.signal(signal.SIGINT, exit_interrupted)
    from squeeze.cli.app import app

    try:
        app()
    except KeyboardInterrupt:  # one that got past a command's handling: Python would exit by SIGINT (-2)
        exit_interrupted()
