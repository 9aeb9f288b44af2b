"""In-context lookup-table entries: layers timed inside the whole model, from ONNX Runtime's profile.

A standalone entry times a layer as a one-layer model, which pays what the layer does not pay inside a model:
ORT runs convolutions in its blocked NCHWc layout, and a one-layer model reorders its input into it and its
output back, which for a depthwise conv, cheap in itself, is a large part of its time (MobileNetV2's table was
13.6% off after recalibration). Inside the model tensors stay blocked from one conv to the next.

An in-context entry is a layer's share of the model's kernel time in a profiled run, times the model's
latency in the table's time base. Profiling slows a run about 2x, mostly in per-node bookkeeping between
kernels, so profiled times are good for shares only; the latency they are scaled to is measured with
profiling off, interleaved with the table's anchor layer as standalone entries are, so that both kinds share
one time base and add up in one sum. A layer's share includes the nodes charged to it (the Add, pooling or
reorder consuming its output: squeeze.measure.profile), so a model's in-context entries add up to the model.

Entries belong to one reference model (its fingerprint scopes them in the table's SQLite file, apart from
the standalone entries) and are keyed by layer and configuration. The profiled configurations are the
reference's and those of the pruned models measured whole by `TableOracle.recalibrate` (table+recalibrate
searches do that every few steps, so the widths a search visits get profiled).

A layer at a width never profiled is priced from the nearest profiled configuration of that layer that the
runtime runs the same way. ORT runs a conv in the blocked layout only at some widths (on AVX2 a depthwise conv
needs a multiple of the block, 8), and in context ShuffleNet's 58-channel depthwise conv took 4-5x the time of
a 56-channel one: scaled across that cliff, depthwise layers came out 30-50% too high. Which way is asked of ORT
itself, from its optimized graph of the one-layer model (`layout`); it agreed with the whole model's graph for
every layer of five ShuffleNet plans. The layers reading its output must run as they did too: where they
change layout, ORT reorders the tensor between the two, and the reorder is charged to this layer (a pruned
RegNet-like's grouped convs leave the blocked layout, and its 1x1 convs then paid 700 us of reorders where the
reference paid 8, a tenth of the profile). From that configuration a depthwise conv is scaled by its work (its
standalone entry is mostly the reorders into and out of the blocked layout, which it does not pay in context),
any other layer by its latency as a one-layer model at the two widths, each less a one-layer model's per-call
overhead (which does not shrink with the width; on a 2-core EPYC 16 us a layer, 13% of MobileNetV2's standalone
sum). The two are timed side by side in one run (LatencyTable.ratios), not taken from two standalone entries:
those come from runs at different moments, and under contention that comes and goes a memory-bound layer's
entry moves by up to 2x against the anchor, which put ShuffleNet-like's table 18% off its profile where the
same widths timed side by side put it 2% off. Failing that, the nearest configuration where the layer alone
runs the same way, else the nearest one, which the ratio then carries across the layout change.
"""

from __future__ import annotations

import functools
import math
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from squeeze.export.onnx import export_onnx
from squeeze.measure.lut import IN_CONTEXT, SCALED, STANDALONE, LatencyTable, LayerConfig, LutEntry
from squeeze.measure.profile import PAIRING, layer_consumers
from squeeze.measure.protocol import CONTENTION_TRIES
from squeeze.model.loading import LoadedModel

__all__ = ["InContext", "context_key", "layout", "WHOLE_KEY"]

WHOLE_KEY = "model"  # the reference's whole latency in the table's time base (layer keys all hold an "@")


def context_key(layer: str, cfg: LayerConfig) -> str:
    """`features.2.conv.1.0@conv2d_in96x112x112_out96_k3x3_s2x2_p1x1_g96`."""
    return f"{layer}@{cfg.key}"


def _distance(a: LayerConfig, b: LayerConfig) -> float:
    """How far apart two widths (and resolutions) of one layer are, in log ratios."""
    return sum(abs(math.log(x / y)) for x, y in ((a.c_in, b.c_in), (a.c_out, b.c_out), (a.h, b.h), (a.w, b.w)))


def _depthwise(cfg: LayerConfig) -> bool:
    return cfg.op.startswith("conv") and cfg.groups > 1 and cfg.groups == cfg.c_in == cfg.c_out


def _work(cfg: LayerConfig) -> float:
    """A depthwise conv's work up to its kernel and stride, which are the same at every width of one layer."""
    return cfg.c_in * cfg.h * cfg.w * max(cfg.t, 1)


@functools.lru_cache(maxsize=None)
def layout(cfg: LayerConfig, providers: tuple[str, ...]) -> frozenset[tuple[str, str]]:
    """How the runtime runs a layer: the (domain, op) of the nodes of its one-layer model as ORT optimizes it
    (a conv in the blocked layout is a `com.microsoft.nchwc` Conv between reorders, an unaligned depthwise one a
    FusedConv). ORT decides this per node from the node's own shapes, so the one-layer model tells the whole's."""
    from squeeze.export.ort import open_session

    module, shape = cfg.build()
    artifact = export_onnx(LoadedModel(cfg.key, "factory", shape, module), exporter="torchscript")
    with tempfile.TemporaryDirectory(prefix="squeeze-layout-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        open_session(artifact, providers, optimized_model_filepath=str(optimized))
        return frozenset((n.domain, n.op_type) for n in onnx.load(str(optimized)).graph.node)


@dataclass(frozen=True)
class _Pricing:
    """How one layer of a model is priced (InContext._plan)."""

    source: str  # IN_CONTEXT | SCALED | STANDALONE (its standalone entry)
    cfg: LayerConfig
    ms: float = 0.0  # the in-context figure it starts from
    factor: float = 1.0  # times this
    near: LayerConfig | None = None  # and times cfg's latency over near's, timed side by side (LatencyTable.ratios)


class InContext:
    """In-context entries of one reference model and of pruned versions of it (the same layer names)."""

    def __init__(self, table: LatencyTable, reference: LoadedModel, configs: dict[str, LayerConfig],
                 runs: int = 20) -> None:
        self.table, self.runs = table, runs
        self.scope = f"{table.scope}/in-context/v{PAIRING}/{reference.fingerprint}"
        self._entries: dict[str, LutEntry | None] = {}  # looked up already (None: not stored)
        # layer -> (config, its in-context ms, how it and its readers run)
        self._profiled: dict[str, list[tuple[LayerConfig, float, tuple]]] = defaultdict(list)
        self._providers = tuple(table.target.providers)
        self.uncovered: list[str] = []  # the reference's layers its profile did not find (then none is in context)
        exported = export_onnx(reference, exporter="torchscript")
        self._readers = layer_consumers(onnx.load(str(exported.path)))  # the same in every pruned version
        keys = [WHOLE_KEY, *(context_key(n, c) for n, c in configs.items())]
        stored = table.stored(keys, self.scope)
        if len(stored) == len(keys):
            self.reference_ms = stored[WHOLE_KEY].median_ms
            self._entries.update(stored)
            self._add_profiled(configs)
            return
        table.drop(self.scope)  # entries of pruned models stored before are in the old figure's time base
        self.reference_ms = table.whole_ms(exported)
        table.store([LutEntry(WHOLE_KEY, table.protocol.repeat, self.reference_ms, 0.0, self.reference_ms,
                               IN_CONTEXT)], self.scope)
        self.uncovered = self.record(reference, configs, self.reference_ms)

    def record(self, model: LoadedModel, configs: dict[str, LayerConfig], total_ms: float) -> list[str]:
        """Profile `model` (latency `total_ms` in the table's time base) and store its layers' in-context
        entries. Returns the layers its profile could not find: then nothing is stored, as their time would
        be charged to their neighbours and counted twice."""
        profile = _profile(model, self.table, self.runs)
        missing = [n for n in configs if n not in profile.layer_runs_us]
        if missing:
            return missing
        # ms per profiled microsecond: the shares of the profile, in the measured latency
        scale = total_ms / profile.total_us
        entries = []
        for name, cfg in configs.items():
            runs = np.asarray(profile.layer_runs_us[name]) * scale
            entries.append(LutEntry(context_key(name, cfg), profile.runs, float(runs.mean()), float(runs.var()),
                                    float(np.median(runs)), IN_CONTEXT))
        self.table.store(entries, self.scope)
        self._entries.update({e.key: e for e in entries})
        self._add_profiled(configs)
        return []

    def _add_profiled(self, configs: dict[str, LayerConfig]) -> None:
        for name, cfg in configs.items():
            entry = self._entries[context_key(name, cfg)]
            self._profiled[name].append((cfg, entry.median_ms, self._ways(name, configs)))

    def price(self, models: list[dict[str, LayerConfig]]) -> list[tuple[dict[str, float], dict[str, str]]]:
        """Per model, per layer: its latency and where it came from (IN_CONTEXT, SCALED, or STANDALONE where this
        layer was never profiled). Missing side-by-side ratios and standalone entries are measured in one go."""
        keys = {context_key(name, c) for configs in models for name, c in configs.items()}
        unseen = [k for k in keys if k not in self._entries]
        if unseen:
            stored = self.table.stored(unseen, self.scope)
            self._entries.update({k: stored.get(k) for k in unseen})
        plans = [{name: self._plan(name, cfg, configs) for name, cfg in configs.items()} for configs in models]
        ratios = self.table.ratios([(p.near, p.cfg) for plan in plans for p in plan.values() if p.near])
        alone = self.table.entries([p.cfg for plan in plans for p in plan.values() if p.source == STANDALONE])
        return [({name: (alone[p.cfg.key].median_ms if p.source == STANDALONE else
                         p.ms * p.factor * (ratios[(p.near.key, p.cfg.key)] if p.near else 1.0))
                  for name, p in plan.items()}, {name: p.source for name, p in plan.items()}) for plan in plans]

    def _plan(self, name: str, cfg: LayerConfig, configs: dict[str, LayerConfig]) -> _Pricing:
        """How layer `name` at `cfg` is priced: its in-context entry; else scaled from the nearest profiled
        configuration where it and its readers run the same way, else where it does, else the nearest; else its
        standalone entry."""
        entry, profiled = self._entries[context_key(name, cfg)], self._profiled.get(name)
        if entry is not None:
            return _Pricing(IN_CONTEXT, cfg, entry.median_ms)
        if not profiled:
            return _Pricing(STANDALONE, cfg)
        ways = self._ways(name, configs)
        same = [p for p in profiled if p[2] == ways] or [p for p in profiled if p[2][0] == ways[0]]
        near, ctx_ms, _ = min(same or profiled, key=lambda p: _distance(p[0], cfg))
        if same and _depthwise(cfg):
            return _Pricing(SCALED, cfg, ctx_ms, _work(cfg) / _work(near))
        return _Pricing(SCALED, cfg, ctx_ms, near=near)

    def _ways(self, name: str, configs: dict[str, LayerConfig]) -> tuple:
        """How the runtime runs layer `name` of a model of these `configs`, and the layers reading its output: a
        reorder between layouts is charged to the layer it reads (squeeze.measure.profile)."""
        readers = frozenset(self._layout(configs[r]) for r in self._readers.get(name, ()) if r in configs)
        return self._layout(configs[name]), readers

    def _layout(self, cfg: LayerConfig) -> frozenset | None:
        """How the runtime runs a conv at `cfg` (`layout`); None for other layers, whose way is one at all widths."""
        return layout(cfg, self._providers) if cfg.op.startswith("conv") else None

    def to_json(self) -> list[dict]:
        """The entries stored for this reference so far, each labelled in-context."""
        return self.table.to_json([k for k, e in self._entries.items() if e is not None], self.scope)


def _profile(model: LoadedModel, table: LatencyTable, runs: int):
    """ORT's profile of the model per layer, each node's time less what the profiler adds to it (3-6 us a node
    on a 2-core EPYC, ten times a Reshape's run), the quietest (least total time) of CONTENTION_TRIES, one after
    another. A contended profile skews the shares, not only the total: EfficientNet-like's read 1.5x its
    quietest total in 2 of 8 profiles on a 2-core EPYC, its depthwise convs 41-42% of it instead of 37%."""
    from squeeze.measure.profile import profile_artifacts, profiler_overhead_us

    artifact = export_onnx(model, exporter="torchscript")
    providers = table.target.providers
    overhead = profiler_overhead_us(tuple(providers), table.protocol.threads)
    tries = [profile_artifacts([artifact], providers, table.protocol, runs, overhead)[0]
             for _ in range(CONTENTION_TRIES)]
    return min(tries, key=lambda p: p.total_us)
