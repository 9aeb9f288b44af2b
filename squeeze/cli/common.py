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

from squeeze import api
from squeeze.api import SqueezeError
from squeeze.cli.progress import reporter_for

__all__ = ["out", "err", "state", "handles_errors", "parse_fraction", "parse_ratio", "InputShape", "Weights",
           "TrustModel", "model_options", "TargetOpt", "NoCache", "Force", "Resume", "RpcOpt", "TrackerOpt", "KeyOpt", "rpc_flags",
           "NormalizeOpt", "ResizeOpt", "LatencyOpt", "LatencyMsOpt", "MacsOpt", "SizeBytesOpt", "RepeatOpt", "WarmupOpt",
           "MinRepeatMsOpt", "BatchSizeOpt", "JsonReportOpt", "check_json_out", "show_report"]

out = Console()
err = Console(stderr=True)
# Set by the root callback on every invocation: --debug (or $SQUEEZE_DEBUG), --quiet.
state = {"debug": False, "quiet": False}


def _disk_full(exc: OSError) -> None:
    where = f" writing {exc.filename}" if exc.filename else ""
    err.print(f"[bold red]error:[/] the disk is full{escape(where)} ({exc.strerror}); nothing was written. Free some "
              "space, or write the outputs (--out, --json) and the cache (SQUEEZE_CACHE_DIR) elsewhere.",
              highlight=False, soft_wrap=True)


def handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A SqueezeError becomes one paragraph on stderr and exit code 2 (a full disk too); Ctrl-C exits 130;
    other errors exit 3. With --debug the traceback is shown instead. The core's long steps show their progress on
    stderr while the command runs (bars on a terminal, plain lines otherwise, nothing with --quiet).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            reporter = reporter_for(err, state["quiet"])
            with api.reporting(reporter) if reporter else contextlib.nullcontext():
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


RATIO_HINT = "Write it as 0.5x, 0.5 or 50% of the original."


def parse_ratio(text: str | None, flag: str) -> float | None:
    """'0.5x' / '0.5' / '50%' -> 0.5, in (0, 1]; None stays None (the flag was not given)."""
    if text is None:
        return None
    value = parse_fraction(text, flag, "ratio", RATIO_HINT)
    if not 0 < value <= 1:
        raise SqueezeError(f"{flag} `{text}` is not a ratio in (0, 1]: pruning makes models smaller.", RATIO_HINT)
    return value


# Model options: how the models named on the command line are loaded.
InputShape = typer.Option(None, "--input-shape", help="Input shape, batch first (e.g. 1,3,224,224), where the file does not record it.")
Weights = typer.Option(None, "--weights", help="state_dict or squeeze checkpoint for the zoo:/package.module:factory model(s); MODEL@FILE gives one model its own.")
TrustModel = typer.Option(False, "--trust-model", help="Allow loading a pickled nn.Module (unpickling runs code from the file).")


def model_options(input_shape: str | None, weights: str | None, trust_model: bool,
                  exporter: str = "dynamo") -> api.ModelOptions:
    """--input-shape/--weights/--trust-model (and bench's --exporter) as the API's ModelOptions."""
    return api.ModelOptions(api.parse_input_shape(input_shape), weights, trust_model, exporter)


TargetOpt = typer.Option("host-cpu", "--target", "-t", help="Target name (squeeze targets list) or a target YAML file.")
NoCache = typer.Option(False, "--no-cache", help="Re-export and re-measure instead of using cached results.")
Force = typer.Option(False, "--force", help="Write into an --out folder that already holds files (replacing the ones this command writes).")
Resume = typer.Option(False, "--resume", help="Continue a stopped search (netadapt) from the progress kept in <out>.partial/; give the same arguments as the stopped run.")
RpcOpt = typer.Option(None, "--rpc", help="TVM RPC targets: HOST:PORT of the board's rpc_server (overrides SQUEEZE_RPC_HOST/PORT and the target file).")
TrackerOpt = typer.Option(None, "--tracker", help="TVM RPC targets: HOST:PORT of an rpc_tracker; use with --key.")
KeyOpt = typer.Option(None, "--key", help="TVM RPC targets: the device key the board registered with the tracker.")
# Preprocessing: how --data is fed to the model (api.parse_preprocessing reads the two).
NormalizeOpt = typer.Option(
    None, "--normalize", help="How --data pixels in [0, 1] are normalized, as the model was trained: data (the train "
    "split's mean/std; digits and folders default), imagenet, none (data functions default), MEAN,STD for all channels "
    "(0.5,0.5) or per channel M1,M2,M3:S1,S2,S3. Default: what the model's checkpoint recorded, else the default.")
ResizeOpt = typer.Option(
    None, "--resize", help="How digits and folder images are fitted to the model's HxW: bilinear (default), bicubic, "
    "nearest or none (images must have the model's size). Default: the model's record, else bilinear.")


# Budgets: what compression must reach.
LatencyOpt = typer.Option(None, "--latency", help="Latency budget as a ratio of the original's measured latency (0.5x).")
LatencyMsOpt = typer.Option(None, "--latency-ms", help="Latency budget in milliseconds.")
MacsOpt = typer.Option(None, "--macs", help="MACs budget as a ratio of the original (0.5x).")
SizeBytesOpt = typer.Option(None, "--size-bytes", help="Model size budget in bytes.")

# Measurement overrides of the target's protocol.
RepeatOpt = typer.Option(None, "--repeat", min=3, help="Timed samples per model (default: the target's).")
WarmupOpt = typer.Option(None, "--warmup", min=0)
MinRepeatMsOpt = typer.Option(None, "--min-repeat-ms", min=0.0)
BatchSizeOpt = typer.Option(None, "--batch-size", min=1, help="Images per measured inference (default: the target's, "
                            "1); latency budgets, ratios and lookup tables are all at this batch.")


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
    if rpc and tracker:
        raise SqueezeError("--rpc and --tracker are two ways to reach a board; give one.",
                           "--rpc HOST:PORT for a board's rpc_server, or --tracker HOST:PORT --key KEY.")
    tgt = api.load_target(target)
    if tgt.tvm is None or tgt.tvm.runner != "rpc":
        raise SqueezeError(f"--rpc/--tracker/--key apply to targets that run on a board over TVM RPC; `{tgt.name}` "
                           "does not.", "Use them with such a target, e.g. --target arm-a72.")
    values: dict[str, str | None] = {}
    if rpc:
        host, port = api.parse_host_port(rpc, "--rpc")
        values.update(SQUEEZE_RPC_HOST=host, SQUEEZE_RPC_PORT=str(port), SQUEEZE_RPC_TRACKER=None)
    if tracker:
        api.parse_host_port(tracker, "--tracker")
        values.update(SQUEEZE_RPC_TRACKER=tracker, SQUEEZE_RPC_HOST=None, SQUEEZE_RPC_PORT=None)
    if key:
        values["SQUEEZE_RPC_KEY"] = key
    saved = {k: os.environ.get(k) for k in api.RPC_ENV}
    try:
        _set_env(values)
        api.load_target(target)  # an inconsistent combination fails here, naming the flags
        yield
    finally:
        _set_env(saved)


JsonReportOpt = typer.Option(None, "--json", help="Also write the report JSON to this file; `--json -` prints it "
                                                 "to stdout instead of the tables.")


def check_json_out(json_out: str | None) -> None:
    """Before any work: a --json file that could not be written fails now, not after the search."""
    if json_out not in (None, "-"):
        api.check_writable(Path(json_out), "--json")


def show_report(report: dict[str, Any], json_out: str | None, *views: Any) -> None:
    """The result as tables on stdout, or as JSON (`-`: stdout only the JSON, for a pipe), or both (a file);
    then the verdict: a result that misses its budget exits 1, its files written for a look."""
    if json_out == "-":
        print(json.dumps(report, indent=2, default=str))
    else:
        if json_out is not None:
            api.write_json(json_out, report)
        for view in views:
            out.print(view)
    budget = report.get("budget")
    if budget and not budget["met"]:
        missed = ", ".join(f"{k} {budget['final'][k]:.4g} > {budget['limits'][k]:.4g}" for k in budget["missed"])
        folder, size_from = Path(report["artifact"]["path"]).parent, budget.get("size_from", "the shipped ONNX file")
        err.print("[bold red]budget missed:[/] " + escape(
            f"the result misses its budget: {missed} (latency measured on {report['target']} interleaved with the "
            f"original, met within {100 * (api.LATENCY_TOLERANCE - 1):.0f}% of it; MACs counted; size {size_from}). "
            f"Its model and report are written to {folder} for a look (budget.met is false in report.json). To "
            "meet it, ask for a tighter budget; where a latency reading missed by a little, measure again on a "
            "quieter machine (squeeze bench)." + (f" This one was contended: the original ran "
                                                  f"{report['latency']['contention']:.2f}x slower than at its quietest."
                                                  if report["latency"].get("warning") else "")),
            highlight=False, soft_wrap=True)
        raise typer.Exit(1)
