"""`squeeze bench MODEL [MODEL ...]`: measured latency, and the CI regression gate (--against / --baseline)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from squeeze import api
from squeeze.api import SqueezeError
from squeeze.cli.common import (BatchSizeOpt, InputShape, KeyOpt, MinRepeatMsOpt, NoCache, RepeatOpt, RpcOpt, TargetOpt, TrackerOpt,
                                TrustModel, WarmupOpt, Weights, handles_errors, model_options, out, parse_fraction,
                                rpc_flags)


@handles_errors
def bench(
    models: List[str] = typer.Argument(..., help="Models to compare; speedups are relative to the first."),
    target: str = TargetOpt,
    against: Optional[str] = typer.Option(None, "--against", help="Gate mode: compare NEW (the one MODEL) with this OLD model."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="Gate mode against a stored `bench --json` result from this machine (less robust than --against)."),
    max_regression: str = typer.Option("5%", "--max-regression", help="Gate: allowed slowdown of NEW over OLD."),
    confidence: float = typer.Option(0.99, "--confidence", min=0.5, max=0.9999, help="Gate: confidence of the ratio interval."),
    max_time: float = typer.Option(60.0, "--max-time", min=1.0, help="Gate: seconds of sampling before an undecided gate passes as inconclusive."),
    max_noise: str = typer.Option("10%", "--max-noise", help="Gate: above this robust CV of either model, a FAIL must also hold at 99.9% confidence (more rounds); noise never turns a clear FAIL into a pass."),
    fail_on_inconclusive: bool = typer.Option(False, "--fail-on-inconclusive", help="Gate: exit 1 also when no verdict was reached (strict CI on a dedicated machine)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the full result (with raw samples) to this file."),
    repeat: Optional[int] = RepeatOpt,
    warmup: Optional[int] = WarmupOpt,
    min_repeat_ms: Optional[float] = MinRepeatMsOpt,
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Intra-op threads (default: the target's; 1 for the --against gate)."),
    batch_size: Optional[int] = BatchSizeOpt,
    exporter: str = typer.Option("dynamo", "--exporter", help="dynamo (default) or torchscript; the other is tried if one fails."),
    input_shape: Optional[str] = InputShape,
    weights: Optional[str] = Weights,
    trust_model: bool = TrustModel,
    no_cache: bool = NoCache,
    rpc: Optional[str] = RpcOpt,
    tracker: Optional[str] = TrackerOpt,
    key: Optional[str] = KeyOpt,
) -> None:
    """Measure latency on a target (interleaved, one run), or gate a regression for CI (exit 1 on failure)."""
    from squeeze.report.render import bench_view, gate_view

    if json_out is not None:
        api.check_writable(json_out, "--json")  # before minutes of measuring, not after
    if exporter not in ("dynamo", "torchscript"):
        raise SqueezeError(f"--exporter {exporter} is not known.", "Use dynamo or torchscript.")
    with rpc_flags(target, rpc, tracker, key):
        tgt = api.load_target(target)
    protocol = api.Protocol.for_target(tgt, repeat=repeat, warmup=warmup, min_repeat_ms=min_repeat_ms, threads=threads,
                                   batch_size=batch_size)
    opts = model_options(input_shape, weights, trust_model, exporter)
    if against is None and baseline is None:
        rows = api.bench(models, tgt, opts, protocol, use_cache=not no_cache)
        out.print(bench_view(rows, tgt))
        if json_out:
            api.write_json(json_out, {"target": tgt.name, "models": [r.to_json() for r in rows]})
        return
    if len(models) != 1 or (against is not None and baseline is not None):
        raise SqueezeError("Gate mode compares exactly one NEW model with either --against OLD or --baseline FILE.",
                           "Example: squeeze bench new.pt --against old.pt --target host-cpu --max-regression 5%.")
    threshold = parse_fraction(max_regression, "--max-regression")
    cfg = api.GateConfig(max_regression=threshold, confidence=confidence, max_time_s=max_time,
                     max_noise=parse_fraction(max_noise, "--max-noise"))
    if against is not None and threads is None:
        # Intra-op threads wait on each other when another process takes a core: at load 5 on 2 cores, rounds
        # of 2 threads spread by 25% and read a 10% slowdown as 6%, one thread by 2% and read 11%. A stored
        # baseline keeps its own threads.
        protocol = protocol.model_copy(update={"threads": 1})
    result = api.gate(models[0], tgt, opts, protocol, cfg, old_spec=against, baseline=baseline)
    out.print(gate_view(result))
    if json_out:
        api.write_json(json_out, result.to_json())
    if result.failed or (fail_on_inconclusive and result.verdict == "inconclusive"):
        raise typer.Exit(1)
