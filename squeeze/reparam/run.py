"""Re-parameterizing a trained model, layer by layer, only where the target runs the replacement faster.

1. Candidates: every Conv2d with groups=1 the options' `layers` patterns select (by default all but the stem,
   the conv reading the model input, which GhostNet and LegoNet keep too).
2. Each candidate's original and replacement are timed on the target as lookup-table entries of their own
   (standalone, each batch interleaved with the table's anchor layer), with MACs and bytes counted.
3. Choice: a replacement measured at least `min_speedup` faster is taken (under a latency budget: the fastest
   gains first, until the budget is predicted met); a MACs or size budget may also take slower ones, largest
   savings first; `force` takes every candidate. A budget that the allowed layers cannot reach is refused
   before any fitting.
4. The chosen layers are initialised from the trained convs (squeeze.reparam.fit), then the model is fine-tuned
   with distillation from the original. The harness exports it and measures it against the original.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from squeeze.errors import DataError
from squeeze.reparam.modules import GhostSpec, LegoConv2d, LegoSpec, build_replacement, replaceable

if TYPE_CHECKING:
    from squeeze.methods.base import ModelState, PassContext
    from squeeze.model.loading import LoadedModel

__all__ = ["LayerChoice", "candidates", "run_reparam"]

log = logging.getLogger("squeeze")

Fitter = Callable[[nn.Conv2d, Any], tuple[nn.Module, dict[str, Any]]]  # (conv, LayerData) -> module, fit record


@dataclass
class LayerChoice:
    """One candidate layer: its costs before and after on the target, and what was decided."""

    name: str
    original_ms: float
    replacement_ms: float
    original_macs: int
    replacement_macs: int
    original_bytes: int
    replacement_bytes: int
    chosen: bool = False
    reason: str = ""
    fit: dict[str, Any] | None = None

    @property
    def speedup(self) -> float:
        return self.original_ms / self.replacement_ms

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": round(self.speedup, 4)}


def _conv_inputs(module: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every Conv2d's input on one forward pass of `x` (eval mode)."""
    inputs: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_m, args, _out) -> None:  # returning a value would replace the layer's output
            inputs[name] = args[0]

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            module.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return inputs


def candidates(module: nn.Module, x: torch.Tensor, spec: GhostSpec | LegoSpec, patterns: list[str] | None
               ) -> tuple[list[str], dict[str, str]]:
    """The convs to consider, in model order, and the ones left out with why."""
    inputs = _conv_inputs(module, x)
    chosen, skipped = [], {}
    for name, m in module.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        if patterns is not None and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        stem = patterns is None and inputs.get(name) is x
        why = replaceable(m, spec) or ("the stem (reads the model input)" if stem else None)
        if why:
            skipped[name] = why
        else:
            chosen.append(name)
    return chosen, skipped


def _cost(module: nn.Module, shape: tuple[int, ...]) -> tuple[int, int]:
    """(MACs, bytes) of one layer at batch 1: what its forward computes and what its state holds."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module.eval()(torch.zeros(shape))
    size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    return counter.get_total_flops() // 2, size


def _measure_layers(module: nn.Module, x: torch.Tensor, names: list[str], spec, ctx: PassContext
                    ) -> list[LayerChoice]:
    from squeeze.measure.lut import LatencyTable, layer_configs

    configs = layer_configs(module, x)
    shapes = {n: tuple(t.shape) for n, t in _conv_inputs(module, x).items()}
    originals = {n: configs[n] for n in names}
    replaced = {n: c.__class__(**{**asdict(c), "reparam": spec.key}) for n, c in originals.items()}
    table = LatencyTable(ctx.target)
    entries = table.entries([*originals.values(), *replaced.values()])
    rows = []
    for n in names:
        conv = module.get_submodule(n)
        macs, size = _cost(conv, shapes[n])
        new_macs, new_size = _cost(build_replacement(conv, spec), shapes[n])
        rows.append(LayerChoice(n, entries[originals[n].key].median_ms, entries[replaced[n].key].median_ms,
                                macs, new_macs, size, new_size))
    return rows


def choose(rows: list[LayerChoice], opts, budget) -> None:
    """Mark the chosen layers (see the module docstring). `budget`: None or (resource, original, target)."""
    from squeeze.prune.budget import BudgetError

    if opts.force:
        for r in rows:
            r.chosen, r.reason = True, f"forced ({r.speedup:.2f}x on the target)"
        return
    faster = sorted((r for r in rows if r.speedup >= opts.min_speedup),
                    key=lambda r: r.original_ms - r.replacement_ms, reverse=True)
    for r in rows:
        r.reason = f"kept: {r.speedup:.2f}x on the target, below the {opts.min_speedup:.2f}x asked"
    if budget is None:
        for r in faster:
            r.chosen, r.reason = True, f"faster: {r.speedup:.2f}x on the target"
        return
    resource, original, target = budget
    saving = {"latency_ms": lambda r: r.original_ms - r.replacement_ms,
              "macs": lambda r: r.original_macs - r.replacement_macs,
              "size_bytes": lambda r: r.original_bytes - r.replacement_bytes}[resource]
    value = original
    order = faster + ([] if resource == "latency_ms" else
                      sorted((r for r in rows if r not in faster), key=saving, reverse=True))
    for r in order:
        if value <= target:
            r.reason = f"kept: the budget is met without it ({r.speedup:.2f}x on the target)"
            continue
        r.chosen = True
        r.reason = (f"faster: {r.speedup:.2f}x on the target" if r in faster
                    else f"for the {resource} budget, though {r.speedup:.2f}x on the target")
        value -= saving(r)
    if value > target:
        allowed = "every layer measured faster" if resource == "latency_ms" else "every candidate layer"
        raise BudgetError(
            f"The budget cannot be reached by re-parameterization: replacing {allowed} predicts {value:.4g} "
            f"{resource} against the budget {target:.4g} ({value / original:.2f}x of the original, asked "
            f"{target / original:.2f}x).",
            "Loosen the budget, add --force to replace layers that are not faster, or prune first "
            "(a recipe can chain prune -> reparam).")


def run_reparam(state: ModelState, ctx: PassContext, opts, spec: GhostSpec | LegoSpec, fitter: Fitter
                ) -> tuple[ModelState, dict[str, Any]]:
    from squeeze import progress
    from squeeze.model.loading import LoadedModel
    from squeeze.reparam.fit import capture
    from squeeze.reparam.plan import plan_json, replace_layers
    from squeeze.train import evaluate, fine_tune

    if ctx.data is None:
        raise DataError(f"Re-parameterizing with {spec.type} needs data (--data): the replacements are fitted to "
                        "the trained layers' responses on training images, then fine-tuned.",
                        "Pass --data digits, fashion-mnist, a folder of class sub-folders, or package.module:function.")
    original: LoadedModel = state.model
    x = original.example_input()
    names, skipped = candidates(original.module, x, spec, opts.layers)
    if not names:
        raise DataError(f"No layer can take a {spec.type} replacement: "
                        + ("; ".join(f"{n}: {why}" for n, why in skipped.items()) or "no Conv2d matches --layers")
                        + ".", "Name Conv2d layers with groups=1 in --layers.")
    budget = _budget(ctx, original)
    with progress.task(f"timing {len(names)} layers and their {spec.type} replacements", total=None, unit="step"):
        rows = _measure_layers(original.module, x, names, spec, ctx)
    choose(rows, opts, budget)
    chosen = [r for r in rows if r.chosen]
    data = ctx.data
    n_fit = min(opts.fit_images, len(data.train))
    images = torch.stack([data.train[i][0] for i in range(n_fit)])
    check = torch.stack([data.val[i][0] for i in range(min(opts.check_images, len(data.val)))])
    module = copy.deepcopy(original.module).eval()
    started = time.perf_counter()
    if chosen:
        features = capture(original.module, [r.name for r in chosen], images, check)
        with progress.task(f"fitting {len(chosen)} {spec.type} layers", total=len(chosen), unit="layer") as step:
            for r in chosen:
                new, r.fit = fitter(original.module.get_submodule(r.name), features.pop(r.name))
                replace_layers(module, {r.name: new})
                step.advance(1, layer=r.name, error=f"{r.fit['relative_error']:.3f}")
    fit_seconds = time.perf_counter() - started
    val = data.val
    record: dict[str, Any] = {"method": spec.type, "spec": asdict(spec), "skipped": skipped,
                              "layers": [r.to_json() for r in rows], "fit_seconds": round(fit_seconds, 2),
                              "val_top1": {"original": evaluate(original.module, val).top1,
                                           "initialised": evaluate(module, val).top1}}
    if chosen and opts.fine_tune is not None:
        legos = [m for m in module.modules() if isinstance(m, LegoConv2d)]
        for m in legos:
            m.learn_selection()
        result = fine_tune(module, data.train, opts.fine_tune, teacher=original.module if opts.distill else None,
                           val_ds=val)
        for m in legos:
            m.freeze_selection()
        record["fine_tune"] = result.to_json()
        record["val_top1"]["fine_tuned"] = evaluate(module, val).top1
    plan = plan_json({r.name: spec for r in chosen})
    record["plan"] = plan
    state.model = LoadedModel(original.name, original.kind, original.input_shape, module.eval(), arch=original.arch,
                              plans=[*original.plans, plan], metadata=dict(original.metadata),
                              preprocessing=original.preprocessing)
    state.artifact = None
    if budget is not None:
        record["budget"] = _confirm(budget, original, state.model, ctx)
    log.info(f"reparam.{spec.type}: {len(chosen)} of {len(rows)} layers replaced: "
             + ", ".join(f"{r.name} ({r.speedup:.2f}x)" for r in chosen))
    return state, record


def _budget(ctx: PassContext, original: LoadedModel) -> tuple[str, float, float] | None:
    """(resource, original value, target) of the recipe's budget. Latency: the whole original measured on the
    target, from which each replacement's measured saving is subtracted (confirmed by measurement at the end)."""
    if ctx.budget is None:
        return None
    from squeeze.model.summary import summarize
    from squeeze.prune.budget import budget_resource

    resource = budget_resource(ctx.budget)
    b = ctx.budget
    if resource == "latency_ms":
        ms = ctx.oracle.latency_ms(original)
        return resource, ms, b.latency_ratio * ms if b.latency_ratio is not None else b.latency_ms
    s = summarize(original)
    if resource == "macs":
        return resource, float(s.macs), b.macs_ratio * s.macs
    return resource, float(s.size_bytes), float(b.size_bytes)


def _confirm(budget: tuple[str, float, float], original: LoadedModel, result: LoadedModel, ctx: PassContext
             ) -> dict[str, Any]:
    """The budget's resource of the result: latency measured interleaved with the original, else counted."""
    resource, before, target = budget
    if resource == "latency_ms":
        from squeeze.measure.oracle import RelativeOracle

        relative = RelativeOracle(original, ctx.target, ctx.protocol)  # the ratio, timed interleaved
        value = before * relative.latency_ms(result) / relative.reference_ms
    else:
        from squeeze.model.summary import summarize

        s = summarize(result)
        value = float(s.macs if resource == "macs" else s.size_bytes)
    met = value <= target * (1.02 if resource == "latency_ms" else 1.0)  # one model's readings vary about 2%
    if not met:
        log.warning(f"the result's {resource} ({value:.4g}) is above the budget ({target:.4g}); the report says so")
    return {"resource": resource, "original": before, "target": target, "final": value, "budget_met": met}
