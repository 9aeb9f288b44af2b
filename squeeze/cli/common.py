"""What every command shares: consoles, the --debug switch, error handling, common options."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import typer
from rich.console import Console
from rich.markup import escape

from squeeze.cli.progress import reporter_for
from squeeze.errors import SqueezeError
from squeeze.progress import reporting

__all__ = ["out", "err", "state", "handles_errors", "parse_fraction", "write_json", "InputShape", "Weights",
           "TrustModel", "TargetOpt", "NoCache", "RpcOpt", "TrackerOpt", "KeyOpt", "rpc_flags", "NormalizeOpt",
           "ResizeOpt", "preprocessing_flags", "Force"]

out = Console()
err = Console(stderr=True)
state = {"debug": False}  # set by the root callback on every invocation (--debug or $SQUEEZE_DEBUG)


def _disk_full(exc: OSError) -> None:
    where = f" writing {exc.filename}" if exc.filename else ""
    err.print(f"[bold red]error:[/] the disk is full{escape(where)} ({exc.strerror}); nothing was written. Free some "
              "space, or write the outputs (--out, --json) and the cache (SQUEEZE_CACHE_DIR) elsewhere.",
              highlight=False, soft_wrap=True)


def handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A SqueezeError becomes one paragraph on stderr and exit code 2 (a full disk too); Ctrl-C exits 130;
    other errors exit 3. With --debug the traceback is shown instead. The core's long steps show as progress
    bars on stderr while the command runs (when stderr is a terminal).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            reporter = reporter_for(err)
            with reporting(reporter) if reporter else contextlib.nullcontext():
                return fn(*args, **kwargs)
        except SqueezeError as exc:
            if state["debug"]:
                if exc.detail:
                    err.print(exc.detail, markup=False, highlight=False)
                raise
            err.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # exit codes and usage errors chosen by the command itself
        except KeyboardInterrupt:  # in-process callers (tests, notebooks); the `squeeze` command exits in its handler
            from squeeze.cli import INTERRUPTED

            err.print(INTERRUPTED)
            raise typer.Exit(130) from None
        except Exception as exc:  # an unexpected bug: say so briefly, keep the traceback for --debug
            if state["debug"]:
                raise
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                _disk_full(exc)
                raise typer.Exit(2) from None
            err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc}. Re-run with --debug for the "
                      "traceback and report it.", highlight=False, soft_wrap=True)
            raise typer.Exit(3) from None

    return wrapper


def parse_fraction(text: str, what: str, noun: str = "number",
                   hint: str = "Write it as a percentage (5%) or a fraction (0.05).") -> float:
    """'5%' -> 0.05, '0.05' -> 0.05, '0.5x' -> 0.5."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%|x)?\s*", text)
    if not m:
        raise SqueezeError(f"{what} `{text}` is not a {noun}.", hint)
    return float(m.group(1)) / (100 if m.group(2) == "%" else 1)


def write_json(path: Path, data: Any) -> None:
    from squeeze.cache import atomic_write_bytes

    atomic_write_bytes(Path(path), json.dumps(data, indent=2, default=str).encode())


InputShape = typer.Option(None, "--input-shape", help="Input shape, batch first (e.g. 1,3,224,224), where the file does not record it.")
Weights = typer.Option(None, "--weights", help="state_dict or squeeze checkpoint for the zoo:/package.module:factory model(s); MODEL@FILE gives one model its own.")
TrustModel = typer.Option(False, "--trust-model", help="Allow loading a pickled nn.Module (unpickling runs code from the file).")
TargetOpt = typer.Option("host-cpu", "--target", "-t", help="Target name (squeeze targets list) or a target YAML file.")
NoCache = typer.Option(False, "--no-cache", help="Re-export and re-measure instead of using cached results.")
Force = typer.Option(False, "--force", help="Write into an --out folder that already holds files (replacing the ones this command writes).")
RpcOpt = typer.Option(None, "--rpc", help="TVM RPC targets: HOST:PORT of the board's rpc_server (overrides SQUEEZE_RPC_HOST/PORT and the target file).")
TrackerOpt = typer.Option(None, "--tracker", help="TVM RPC targets: HOST:PORT of an rpc_tracker; use with --key.")
KeyOpt = typer.Option(None, "--key", help="TVM RPC targets: the device key the board registered with the tracker.")
NormalizeOpt = typer.Option(
    None, "--normalize", help="How --data pixels in [0, 1] are normalized, as the model was trained: data (the train "
    "split's mean/std; digits and folders default), imagenet, none (data functions default), MEAN,STD for all channels "
    "(0.5,0.5) or per channel M1,M2,M3:S1,S2,S3. Default: what the model's checkpoint recorded, else the default.")
ResizeOpt = typer.Option(
    None, "--resize", help="How digits and folder images are fitted to the model's HxW: bilinear (default), bicubic, "
    "nearest or none (images must have the model's size). Default: the model's record, else bilinear.")


def preprocessing_flags(normalize: str | None, resize: str | None):
    """--normalize/--resize as a Preprocessing (None when neither is given); a bad value fails here, exit 2."""
    if normalize is None and resize is None:
        return None
    from squeeze.preprocessing import from_flags

    return from_flags(normalize, resize)


def _set_env(values: dict[str, str | None]) -> None:
    """Set each variable; None unsets it."""
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def rpc_flags(target: str, rpc: str | None, tracker: str | None, key: str | None):
    """--rpc/--tracker/--key set SQUEEZE_RPC_* for the duration of one command, so the board they name wins
    over the environment and the target file (the precedence `load_target` applies)."""
    if not (rpc or tracker or key):
        yield
        return
    from squeeze.target import RPC_ENV, load_target, parse_host_port

    if rpc and tracker:
        raise SqueezeError("--rpc and --tracker are two ways to reach a board; give one.",
                           "--rpc HOST:PORT for a board's rpc_server, or --tracker HOST:PORT --key KEY.")
    tgt = load_target(target)
    if tgt.tvm is None or tgt.tvm.runner != "rpc":
        raise SqueezeError(f"--rpc/--tracker/--key apply to targets that run on a board over TVM RPC; `{tgt.name}` "
                           "does not.", "Use them with such a target, e.g. --target arm-a72.")
    values: dict[str, str | None] = {}
    if rpc:
        host, port = parse_host_port(rpc, "--rpc")
        values.update(SQUEEZE_RPC_HOST=host, SQUEEZE_RPC_PORT=str(port), SQUEEZE_RPC_TRACKER=None)
    if tracker:
        parse_host_port(tracker, "--tracker")
        values.update(SQUEEZE_RPC_TRACKER=tracker, SQUEEZE_RPC_HOST=None, SQUEEZE_RPC_PORT=None)
    if key:
        values["SQUEEZE_RPC_KEY"] = key
    saved = {k: os.environ.get(k) for k in RPC_ENV}
    try:
        _set_env(values)
        load_target(target)  # an inconsistent combination fails here, naming the flags
        yield
    finally:
        _set_env(saved)
