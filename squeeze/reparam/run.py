"""Re-parameterizing a trained model, layer by layer, only where the target runs the replacement faster.

1. Candidates: every Conv2d with groups=1 the options' `layers` patterns select (by default all but the stem,
   the conv reading the model input, which GhostNet and LegoNet keep too).
2. Each candidate's original and replacement are timed on the target as lookup-table entries of their own
   (standalone, each batch interleaved with the table's anchor layer), with MACs and bytes counted; and, with
   `in_model` (the default), inside the whole model: the model with only that layer replaced against the
   original, interleaved in one run. A conv's BatchNorm is folded into its replacement (a Ghost module ends in
   a channel Gather, past which the runtime cannot fold it as it does for the original conv).
3. Choice: a replacement measured faster is taken (in the model: the ratio's 95% interval wholly below 1;
   standalone only: at least `min_speedup`); under a latency budget the largest savings first, until the budget
   is predicted met; a MACs or size budget may also take slower ones, largest savings first; `force` takes
   every candidate. A budget that the allowed layers cannot reach is refused before any fitting.
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

from squeeze.errors import DataError, SqueezeError
from squeeze.measure.protocol import LATENCY_TOLERANCE
from squeeze.reparam.modules import GhostSpec, LegoConv2d, LegoSpec, build_replacement, replaceable

if TYPE_CHECKING:
    from squeeze.methods.base import ModelState, PassContext
    from squeeze.model.loading import LoadedModel
    from squeeze.target import Target

__all__ = ["LayerChoice", "NotFasterError", "candidates", "choose", "measure_layers", "measure_in_model",
           "run_reparam"]

log = logging.getLogger("squeeze")


class NotFasterError(SqueezeError):
    """No replacement is faster on the target: nothing is handed back."""

    exit_code = 1

Fitter = Callable[[nn.Conv2d, Any], tuple[nn.Module, dict[str, Any]]]  # (conv, LayerData) -> module, fit record


@dataclass
class LayerChoice:
    """One candidate layer: its costs before and after on the target, and what was decided."""

    name: str
    original_ms: float  # standalone, lookup-table entries
    replacement_ms: float
    original_macs: int
    replacement_macs: int
    original_bytes: int
    replacement_bytes: int
    in_model: dict[str, Any] | None = None  # the whole model with only this layer replaced / the original
    chosen: bool = False
    reason: str = ""
    fit: dict[str, Any] | None = None

    @property
    def speedup(self) -> float:
        """Standalone: original / replacement."""
        return self.original_ms / self.replacement_ms

    def faster(self, min_speedup: float) -> bool:
        """In the model where measured there (the interval wholly below 1), else standalone."""
        return self.in_model["high"] < 1 if self.in_model else self.speedup >= min_speedup

    def saving_ms(self, model_ms: float) -> float:
        return (1 - self.in_model["ratio"]) * model_ms if self.in_model else self.original_ms - self.replacement_ms

    def describe(self) -> str:
        if not self.in_model:
            return f"{self.speedup:.2f}x standalone"
        r = self.in_model
        return f"{self.speedup:.2f}x standalone, whole model {r['ratio']:.3f}x [{r['low']:.3f}, {r['high']:.3f}]"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": round(self.speedup, 4)}


@dataclass
class Candidates:
    names: list[str]  # the convs to consider, in model order
    skipped: dict[str, str]  # the convs left out, with why
    absorbs: dict[str, str]  # conv -> the BatchNorm reading its output, folded into the replacement


def _trace(module: nn.Module, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One forward pass of `x` (eval mode): every Conv2d's input, and the BatchNorm2d reading each conv's output."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[int, str] = {}
    bn_after: dict[str, str] = {}

    def conv_hook(name: str):
        def record(_m, args, out) -> None:  # returning a value would replace the layer's output
            inputs[name] = args[0]
            outputs[id(out)] = name

        return record

    def bn_hook(name: str):
        def record(_m, args, _out) -> None:
            conv = outputs.get(id(args[0]))
            if conv is not None and inputs.get(conv) is not None:
                bn_after[conv] = name

        return record

    handles = []
    for n, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook(n)))
        elif type(m) is nn.BatchNorm2d:
            handles.append(m.register_forward_hook(bn_hook(n)))
    try:
        with torch.no_grad():
            module.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return inputs, bn_after


def candidates(module: nn.Module, x: torch.Tensor, spec: GhostSpec | LegoSpec, patterns: list[str] | None
               ) -> Candidates:
    """The convs to consider and the BatchNorms their replacements absorb (a Ghost module ends in a channel
    Gather, after which a runtime cannot fold a BatchNorm into a conv as it does for the original)."""
    inputs, bn_after = _trace(module, x)
    found = Candidates([], {}, {})
    for name, m in module.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        if patterns is not None and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        stem = patterns is None and inputs.get(name) is x
        why = replaceable(m, spec) or ("the stem (reads the model input)" if stem else None)
        if why:
            found.skipped[name] = why
            continue
        found.names.append(name)
        if name in bn_after:
            found.absorbs[name] = bn_after[name]
    return found


def folded(module: nn.Module, conv: str, bn: str | None) -> nn.Conv2d:
    """The conv with the BatchNorm that follows it folded in (eval statistics), or the conv itself."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    c = module.get_submodule(conv)
    return c if bn is None else fuse_conv_bn_eval(copy.deepcopy(c).eval(), module.get_submodule(bn).eval())


def replaced_module(module: nn.Module, replacements: dict[str, nn.Module], absorbs: dict[str, str]) -> nn.Module:
    """`module` (in place) with the named convs replaced and the BatchNorms they absorb removed."""
    from squeeze.reparam.plan import replace_layers

    return replace_layers(module, {**replacements, **{absorbs[n]: nn.Identity() for n in replacements
                                                      if n in absorbs}})


def _cost(module: nn.Module, shape: tuple[int, ...]) -> tuple[int, int]:
    """(MACs, bytes) of one layer at batch 1: what its forward computes and what its state holds."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module.eval()(torch.zeros(shape))
    size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    return counter.get_total_flops() // 2, size


def measure_layers(module: nn.Module, x: torch.Tensor, found: Candidates, spec: GhostSpec | LegoSpec,
                   target: Target, batch_size: int = 1) -> list[LayerChoice]:
    """Each candidate conv and its replacement timed standalone on `target` (lookup-table entries), with MACs
    and bytes (a replacement that absorbs a BatchNorm against the conv with it folded, as the runtime runs it)."""
    from squeeze.measure.lut import LatencyTable, layer_configs

    configs = layer_configs(module, x)
    inputs, _ = _trace(module, x)
    originals = {n: configs[n] for n in found.names}
    replaced = {n: c.__class__(**{**asdict(c), "reparam": spec.key}) for n, c in originals.items()}
    entries = LatencyTable(target, batch_size=batch_size).entries([*originals.values(), *replaced.values()])
    rows = []
    for n in found.names:
        shape = tuple(inputs[n].shape)
        conv = folded(module, n, found.absorbs.get(n))
        macs, size = _cost(conv, shape)
        new_macs, new_size = _cost(build_replacement(conv, spec), shape)
        rows.append(LayerChoice(n, entries[originals[n].key].median_ms, entries[replaced[n].key].median_ms,
                                macs, new_macs, size, new_size))
    return rows


def measure_in_model(original: LoadedModel, found: Candidates, spec: GhostSpec | LegoSpec, target: Target,
                     protocol, batch: int = 8) -> dict[str, Any]:
    """Per candidate: the whole model with only that conv replaced (random weights: fp32 kernel times do not
    depend on them) against the original, timed interleaved (batches of `batch` models, each with the
    original). A standalone layer misses what the runtime does around it in the model (fusing a conv with its
    BatchNorm and activation, per-op overheads that dominate a small model)."""
    from squeeze.export.onnx import export_onnx
    from squeeze.measure.oracle import interleaved
    from squeeze.measure.stats import paired_ratio
    from squeeze.model.loading import LoadedModel

    base = export_onnx(original, exporter="torchscript")
    ratios = {}
    for start in range(0, len(found.names), batch):
        names = found.names[start:start + batch]
        artifacts = []
        for n in names:
            module = copy.deepcopy(original.module)
            new = build_replacement(folded(module, n, found.absorbs.get(n)), spec)
            torch.manual_seed(0)  # the same weights every run: the export cache serves them again
            with torch.no_grad():
                for p in new.parameters():
                    p.normal_(0, 0.05)
            replaced_module(module, {n: new}, found.absorbs)
            model = LoadedModel(f"{original.name}-{n}-{spec.key}", "factory", original.input_shape, module.eval())
            artifacts.append(export_onnx(model, exporter="torchscript"))
        reference, *measured = interleaved([base, *artifacts], target, protocol)
        for n, m in zip(names, measured):
            ratios[n] = paired_ratio(reference.samples_ms, m.samples_ms).to_json()
    return ratios


def choose(rows: list[LayerChoice], opts, budget) -> None:
    """Mark the chosen layers (see the module docstring). `budget`: None or (resource, original, target)."""
    from squeeze.prune.budget import BudgetError

    if opts.force:
        for r in rows:
            r.chosen, r.reason = True, f"forced ({r.describe()})"
        return
    faster = [r for r in rows if r.faster(opts.min_speedup)]
    for r in rows:
        r.reason = f"kept: not measured faster ({r.describe()})"
    if budget is None:
        for r in faster:
            r.chosen, r.reason = True, f"faster: {r.describe()}"
        return
    resource, original, target = budget
    saving = {"latency_ms": lambda r: r.saving_ms(original),
              "macs": lambda r: r.original_macs - r.replacement_macs,
              "size_bytes": lambda r: r.original_bytes - r.replacement_bytes}[resource]
    faster.sort(key=lambda r: r.saving_ms(original), reverse=True)
    value = original
    order = faster + ([] if resource == "latency_ms" else
                      sorted((r for r in rows if r not in faster), key=saving, reverse=True))
    for r in order:
        if value <= target:
            r.reason = f"kept: the budget is met without it ({r.describe()})"
            continue
        r.chosen = True
        r.reason = f"faster: {r.describe()}" if r in faster else f"for the {resource} budget, though {r.describe()}"
        value -= saving(r)
    if value > target:
        allowed = "every layer measured faster" if resource == "latency_ms" else "every candidate layer"
        raise BudgetError(
            f"The budget cannot be reached by re-parameterization: replacing {allowed} predicts {value:.4g} "
            f"{resource} against the budget {target:.4g} ({value / original:.2f}x of the original, asked "
            f"{target / original:.2f}x).",
            "Loosen the budget, add --replace-all to replace layers that are not faster, or prune first "
            "(a recipe can chain prune -> reparam).")


def run_reparam(state: ModelState, ctx: PassContext, opts, spec: GhostSpec | LegoSpec, fitter: Fitter
                ) -> tuple[ModelState, dict[str, Any]]:
    from squeeze import progress
    from squeeze.model.loading import LoadedModel
    from squeeze.reparam.fit import LayerData, capture, effective_conv
    from squeeze.reparam.plan import plan_json
    from squeeze.train import evaluate, fine_tune

    if ctx.data is None:
        raise DataError(f"Re-parameterizing with {spec.type} needs data (--data): the replacements are fitted to "
                        "the trained layers' responses on training images, then fine-tuned.",
                        "Pass --data digits, fashion-mnist, a folder of class sub-folders, or package.module:function.")
    original: LoadedModel = state.model
    x = original.example_input()
    found = candidates(original.module, x, spec, opts.layers)
    if not found.names:
        raise DataError(f"No layer can take a {spec.type} replacement: "
                        + ("; ".join(f"{n}: {why}" for n, why in found.skipped.items())
                           or "no Conv2d matches --layers") + ".", "Name Conv2d layers with groups=1 in --layers.")
    budget = _budget(ctx, original)
    with progress.task(f"timing {len(found.names)} layers and their {spec.type} replacements, standalone and in "
                       "the model", total=None, unit="step"):
        rows = measure_layers(original.module, x, found, spec, ctx.target, ctx.protocol.batch_size)
        if opts.in_model:
            in_model = measure_in_model(original, found, spec, ctx.target, ctx.protocol)
            for r in rows:
                r.in_model = in_model[r.name]
    choose(rows, opts, budget)
    chosen = [r for r in rows if r.chosen]
    if not chosen:
        raise NotFasterError(
            f"No layer runs faster on `{ctx.target.name}` as a {spec.type} replacement, so nothing was replaced "
            "and nothing written: " + "; ".join(f"{r.name} {r.describe()}" for r in rows) + ".",
            "Keep the original, try the other method, or add --replace-all to replace the layers anyway.")
    data = ctx.data
    n_fit = min(opts.fit_images, len(data.train))
    images = torch.stack([data.train[i][0] for i in range(n_fit)])
    check = torch.stack([data.val[i][0] for i in range(min(opts.check_images, len(data.val)))])
    module = copy.deepcopy(original.module).eval()
    started = time.perf_counter()
    if chosen:
        with progress.task(f"fitting {len(chosen)} {spec.type} layers", total=len(chosen), unit="layer") as step:
            for r in chosen:  # in model order: each on its inputs in the model as replaced so far
                conv = folded(original.module, r.name, found.absorbs.get(r.name))
                before = capture(original.module, [r.name], images, check)[r.name]
                now = capture(module, [r.name], images, check)[r.name]
                with torch.no_grad():  # the targets: what the conv and its absorbed BatchNorm output
                    layer = LayerData(now.x, conv(before.x), now.x_check, conv(before.x_check))
                new, r.fit = fitter(effective_conv(conv, layer), layer)
                replaced_module(module, {r.name: new}, found.absorbs)
                step.advance(1, layer=r.name, error=f"{r.fit['relative_error']:.3f}")
    fit_seconds = time.perf_counter() - started
    val = data.val
    record: dict[str, Any] = {"method": spec.type, "spec": asdict(spec), "skipped": found.skipped,
                              "layers": [r.to_json() for r in rows], "fit_seconds": round(fit_seconds, 2),
                              "val_top1": {"original": evaluate(original.module, val).top1,
                                           "initialised": evaluate(module, val).top1}}
    if opts.fine_tune is not None:
        legos = [m for m in module.modules() if isinstance(m, LegoConv2d)]
        for m in legos:
            m.learn_selection()
        result = fine_tune(module, data.train, opts.fine_tune, teacher=original.module if opts.distill else None,
                           val_ds=val)
        for m in legos:
            m.freeze_selection()
        record["fine_tune"] = result.to_json()
        record["val_top1"]["fine_tuned"] = evaluate(module, val).top1
    plan = plan_json({r.name: spec for r in chosen}, found.absorbs)
    record["plan"] = plan
    state.model = LoadedModel(original.name, original.kind, original.input_shape, module.eval(), arch=original.arch,
                              plans=[*original.plans, plan], metadata=dict(original.metadata),
                              preprocessing=original.preprocessing)
    state.artifact = None
    if budget is not None:
        record["budget"] = _confirm(budget, original, state.model, ctx)
    log.info(f"reparam.{spec.type}: {len(chosen)} of {len(rows)} layers replaced: "
             + ", ".join(f"{r.name} ({r.describe()})" for r in chosen))
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
    met = value <= target * (LATENCY_TOLERANCE if resource == "latency_ms" else 1.0)
    if not met:
        log.warning(f"the result's {resource} ({value:.4g}) is above the budget ({target:.4g}); the report says so")
    return {"resource": resource, "original": before, "target": target, "final": value, "budget_met": met}
