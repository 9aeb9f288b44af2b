"""Per-target latency lookup tables (ProxylessNAS / NetAdapt style).

A network's latency is predicted from the sum of its layers' latencies, each measured once per target as
a small standalone model, plus a constant for everything else (pooling, adds, concatenations), anchored on
a measurement of the whole original model (see TableOracle). Runtimes fuse conv+bn+relu(+add), so
additivity is an assumption: `squeeze lut check` measures how wrong it is. A one-layer model also pays what the
layer does not pay inside a model (layout reorders, mostly: see squeeze.measure.incontext), so on ONNX Runtime a
TableOracle prices its reference's layers, and pruned widths of them, from in-context entries where it has them.

Layers in the table: Conv2d/Conv3d, Linear, and BatchNorm2d/3d that cannot be folded into a preceding conv
(pre-activation nets such as DenseNet run those as separate kernels); and the average pooling and resize
modules that run a conv at a reduced resolution (multi-dimensional pruning marks them `lut_priced`), so a
model pruned that way is priced as a sum of entries too. Other pooling stays in the table's constant.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
import weakref
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from squeeze.export.onnx import export_onnx
from squeeze.measure.cache import MeasurementCache
from squeeze.measure.oracle import LatencyOracle, Quietest, interleaved
from squeeze.measure.protocol import CONTENDED, QUIET_FIT, Protocol
from squeeze.measure.stats import paired_ratio
from squeeze.measure.runtimes import get_runtime
from squeeze.model.loading import LoadedModel
from squeeze.target import Target

__all__ = ["LayerConfig", "LutEntry", "Prediction", "layer_configs", "LatencyTable", "TableOracle",
           "fit_table_constant", "priced", "resize"]

_log = logging.getLogger("squeeze.measure")
# Standalone layers are measured in batches, one worker process per batch.
_BATCH = 24


@dataclass(frozen=True)
class LayerConfig:
    op: str  # "linear" | "conv2d" | "bn2d" | "avgpool2d" | "resize2d", and the 3D ones ("conv3d", ...)
    c_in: int
    c_out: int
    h: int = 1  # input height / width (1 for linear)
    w: int = 1
    kernel: tuple[int, ...] = (1, 1)  # per dim the op slides over: (kh, kw), or (kt, kh, kw) for 3D
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    groups: int = 1
    out_size: tuple[int, ...] = ()  # resize: the output size per dim
    mode: str = ""  # resize: nearest | bilinear | trilinear
    t: int = 0  # 3D ops: input frames (0: a 2D op)
    reparam: str = ""  # a conv2d replaced by a Ghost or Lego module: its spec's key (squeeze.reparam.modules)

    @property
    def key(self) -> str:
        """Readable and stable: `conv2d_in64x56x56_out128_k3x3_s2x2_p1x1_g1`."""
        if self.op == "linear":
            return f"linear_in{self.c_in}_out{self.c_out}"
        size = "x".join(map(str, (*((self.t,) if self.t else ()), self.h, self.w)))
        if self.op.startswith("bn"):
            return f"{self.op}_relu_in{self.c_in}x{size}"
        if self.op.startswith("avgpool"):
            return f"{self.op}_in{self.c_in}x{size}_k{_x(self.kernel)}"
        if self.op.startswith("resize"):
            form = "_4d" if self.t else ""  # entries of Resize's 4-D form, not of a 5-D Resize op
            return f"{self.op}_{self.mode}{form}_in{self.c_in}x{size}_out{_x(self.out_size)}"
        k, s, p = (_x(v) for v in (self.kernel, self.stride, self.padding))
        reparam = f"_{self.reparam}" if self.reparam else ""
        return f"{self.op}_in{self.c_in}x{size}_out{self.c_out}_k{k}_s{s}_p{p}_g{self.groups}{reparam}"

    def build(self) -> tuple[nn.Module, tuple[int, ...]]:
        """The layer as a tiny model (conv + ReLU: ORT fuses the activation into the conv kernel)."""
        torch.manual_seed(0)
        if self.op == "linear":
            return nn.Sequential(nn.Linear(self.c_in, self.c_out)).eval(), (1, self.c_in)
        three = bool(self.t)
        shape = (1, self.c_in, *((self.t,) if three else ()), self.h, self.w)
        if self.op.startswith("bn"):
            return nn.Sequential((nn.BatchNorm3d if three else nn.BatchNorm2d)(self.c_in), nn.ReLU()).eval(), shape
        if self.op.startswith("avgpool"):
            pool = (nn.AvgPool3d if three else nn.AvgPool2d)(self.kernel, self.kernel)
            return nn.Sequential(priced(pool)).eval(), shape
        if self.op.startswith("resize"):
            return nn.Sequential(priced(resize(self.out_size, self.mode))).eval(), shape
        conv = (nn.Conv3d if three else nn.Conv2d)(self.c_in, self.c_out, self.kernel, self.stride, self.padding,
                                                     groups=self.groups)
        if self.reparam:
            from squeeze.reparam.modules import build_replacement, spec_from_key

            conv = build_replacement(conv, spec_from_key(self.reparam))
            with torch.no_grad():  # values do not change fp32 kernel times; all-zero weights should not be timed
                for p in conv.parameters():
                    p.normal_(0, 0.1)
        return nn.Sequential(conv, nn.ReLU()).eval(), shape


def _x(values) -> str:
    return "x".join(map(str, values))


class Resize(nn.Upsample):
    """A resize to a fixed output size; a 5-D one runs as two 4-D resizes: time on (N, C, T, H*W), then space
    on (N, C*T, H, W). ONNX Runtime's 5-D Resize is a generic kernel: (1, 32, 4, 16, 16) -> (8, 32, 32)
    nearest took 2.97 ms on a 2-core EPYC against 0.16 ms for the 4-D form. Nearest and linear resizing are
    separable per axis, so the two forms give the same output (an axis kept at its size is an identity)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            return super().forward(x)
        import torch.nn.functional as F

        mode = "nearest" if self.mode == "nearest" else "bilinear"
        n, c, t, h, w = x.shape
        t_out, h_out, w_out = self.size
        if t_out != t:
            x = F.interpolate(x.reshape(n, c, t, h * w), size=(t_out, h * w), mode=mode,
                              align_corners=self.align_corners).reshape(n, c, t_out, h, w)
        if (h_out, w_out) != (h, w):
            x = F.interpolate(x.reshape(n, c * t_out, h, w), size=(h_out, w_out), mode=mode,
                              align_corners=self.align_corners).reshape(n, c, t_out, h_out, w_out)
        return x


def resize(size: tuple[int, ...], mode: str) -> Resize:
    """A resize to a fixed output size (nearest, or (bi/tri)linear without corner alignment)."""
    return Resize(size=tuple(size), mode=mode, align_corners=None if mode == "nearest" else False)


def priced(m: nn.Module) -> nn.Module:
    """Mark a pooling or resize module as a layer of the table (see the module docstring)."""
    m.lut_priced = True
    return m


# Measured in every batch so that entries from different runs share one time base.
ANCHOR = LayerConfig("conv2d", 32, 32, 28, 28, (3, 3), (1, 1), (1, 1), 1)
# The cheapest layer: what any one-layer model pays per call (on a 2-core EPYC 16 us, 13% of MobileNetV2's
# standalone sum), which does not shrink with a layer's width.
OVERHEAD = LayerConfig("conv2d", 1, 1, 1, 1, (1, 1), (1, 1), (0, 0), 1)
# The fastest run of the anchor alone (LatencyTable.contention) in any process of the last QUIET_MEMORY_S: what
# this machine reads when quiet. A spell of contention lasts minutes and may begin before a process does; a day,
# so that a cache moved to a slower machine does not call it contended for ever. Alone, not in a batch: on a
# 2-core EPYC the anchor alone read 0.078 ms, and 0.107 ms between other layers.
QUIETEST = f"quietest/{ANCHOR.key}"
QUIET_MEMORY_S = 24 * 3600


def _less(samples_ms: list[float], per_call_ms: np.ndarray) -> np.ndarray:
    """A one-layer model's samples less the per-call overhead of the same rounds (at least a fifth of each:
    samples are noisy)."""
    samples = np.asarray(samples_ms)
    return np.maximum(samples - per_call_ms, 0.2 * samples)


STANDALONE = "standalone"  # an entry timed as a one-layer model
IN_CONTEXT = "in-context"  # timed inside a whole model (squeeze.measure.incontext)
SCALED = "scaled"  # from the in-context entry at the nearest profiled width run alike (squeeze.measure.incontext)


@dataclass(frozen=True)
class LutEntry:
    key: str
    count: int  # timed samples
    mean_ms: float
    var_ms: float
    median_ms: float
    source: str = STANDALONE  # or IN_CONTEXT


@dataclass(frozen=True)
class Prediction:
    total_ms: float
    layers_ms: float
    constant_ms: float
    per_layer_ms: dict[str, float]
    sources: dict[str, str] = field(default_factory=dict)  # layer -> STANDALONE | IN_CONTEXT | SCALED


def _tuple(v, dims: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims


_CONVS = (nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm2d, nn.BatchNorm3d)
_POOLS = (nn.AvgPool2d, nn.AvgPool3d)


def _sizes(x: torch.Tensor) -> dict[str, int]:
    """The input size fields of a (N, C, H, W) or (N, C, T, H, W) tensor."""
    return {"t": x.shape[2], "h": x.shape[3], "w": x.shape[4]} if x.dim() == 5 else {"h": x.shape[2], "w": x.shape[3]}


def layer_configs(module: nn.Module, example_input: torch.Tensor) -> dict[str, LayerConfig]:
    """Module name -> its layer configuration, found by running the model once with forward hooks."""
    configs: dict[str, LayerConfig] = {}
    # A BN reading a conv's output folds into that conv. Weak references, because a freed tensor's id is
    # reused by later tensors.
    conv_outputs: dict[int, weakref.ref] = {}

    def hook(name: str):
        def fn(m: nn.Module, inputs, output) -> None:
            x = inputs[0]
            if isinstance(m, nn.Linear):
                configs[name] = LayerConfig("linear", m.in_features, m.out_features)
                return
            d = x.dim() - 2  # 2 or 3 dims the op slides over
            if isinstance(m, _CONVS):
                conv_outputs[id(output)] = weakref.ref(output)
                configs[name] = LayerConfig(f"conv{d}d", m.in_channels, m.out_channels, kernel=tuple(m.kernel_size),
                                            stride=tuple(m.stride), padding=tuple(m.padding), groups=m.groups,
                                            **_sizes(x))
            elif isinstance(m, _BNS) and ((ref := conv_outputs.get(id(x))) is None or ref() is not x):
                configs[name] = LayerConfig(f"bn{d}d", m.num_features, m.num_features, **_sizes(x))
            elif isinstance(m, _POOLS):
                configs[name] = LayerConfig(f"avgpool{d}d", x.shape[1], x.shape[1], kernel=_tuple(m.kernel_size, d),
                                            stride=_tuple(m.stride, d), **_sizes(x))
            elif isinstance(m, nn.Upsample):
                configs[name] = LayerConfig(f"resize{d}d", x.shape[1], x.shape[1], out_size=tuple(output.shape[2:]),
                                            mode=m.mode, **_sizes(x))

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in module.named_modules()
               if isinstance(m, (*_CONVS, nn.Linear, *_BNS))
               or (isinstance(m, (*_POOLS, nn.Upsample)) and getattr(m, "lut_priced", False))]
    try:
        with torch.no_grad():
            module.eval()(example_input)
    finally:
        for h in handles:
            h.remove()
    return configs


class LatencyTable:
    """Layer latencies for one target + protocol, stored in the measurement SQLite file; measured on demand.

    Without a protocol, the table's own sampling at `batch_size`: a search's table must time layers at the batch
    its whole-model measurements use (the run protocol's), or the two disagree by the batch's factor."""

    def __init__(self, target: Target, protocol: Protocol | None = None, *, batch_size: int = 1) -> None:
        self.target = target
        self.protocol = protocol or Protocol.for_target(target, repeat=10, warmup=3, min_repeat_ms=5,
                                                        batch_size=batch_size)
        runtime = get_runtime(target)
        scope = json.dumps([target.model_dump(mode="json"), runtime.version(), self.protocol.model_dump()])
        self.scope = hashlib.sha256(scope.encode()).hexdigest()[:16]
        self.path = MeasurementCache().path
        self.profiles = target.runtime == "onnxruntime"  # in-context entries come from ORT's profiler
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS lut (scope TEXT, key TEXT, count INTEGER, mean_ms REAL, "
                       "var_ms REAL, median_ms REAL, created REAL, PRIMARY KEY (scope, key))")
            db.execute("CREATE TABLE IF NOT EXISTS lut_ratio (scope TEXT, a TEXT, b TEXT, ratio REAL, count INTEGER, "
                       "created REAL, PRIMARY KEY (scope, a, b))")  # LatencyTable.ratios
            row = db.execute("SELECT median_ms FROM lut WHERE scope = ? AND key = ? AND created > ?",
                             (self.scope, QUIETEST, time.time() - QUIET_MEMORY_S)).fetchone()
        self._quietest = Quietest()  # the anchor's fastest run in a batch here
        self._quietest_alone_ms = row[0] if row else float("inf")  # QUIETEST

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def stored(self, keys: list[str], scope: str | None = None) -> dict[str, LutEntry]:
        """Stored standalone entries; with `scope`, the in-context entries stored under it (never mixed)."""
        source = STANDALONE if scope is None else IN_CONTEXT
        with self._connect() as db:
            rows = db.execute(f"SELECT key, count, mean_ms, var_ms, median_ms FROM lut WHERE scope = ? AND key IN "
                              f"({','.join('?' * len(keys))})", (scope or self.scope, *keys)).fetchall()
        return {r[0]: LutEntry(*r, source) for r in rows}

    def _anchor_ms(self) -> float:
        """The anchor layer's latency in this table's time base: its first measurement, stored."""
        stored = self.stored([ANCHOR.key]).get(ANCHOR.key)
        if stored is not None:
            return stored.median_ms
        (m,) = self._run([ANCHOR])
        self.store([LutEntry(ANCHOR.key, m.stats.n, m.stats.mean_ms, (m.stats.cv * m.stats.mean_ms) ** 2,
                             m.stats.median_ms)])
        return m.stats.median_ms

    def _artifact(self, cfg: LayerConfig):
        module, shape = cfg.build()
        return export_onnx(LoadedModel(cfg.key, "factory", shape, module), exporter="torchscript")

    def _run(self, configs: list[LayerConfig]):
        return interleaved([self._artifact(c) for c in configs], self.target, self.protocol)

    def _quiet(self, anchor, artifacts: list) -> list:
        """An interleaved run of the `anchor` layer's artifact and `artifacts`, taken again while the anchor ran
        contended (protocol.CONTENDED). Entries are ratios to the anchor, and on a contended machine the small
        anchor slows more than most layers."""
        run, _ = self._quietest.least_contended(lambda: interleaved([anchor, *artifacts], self.target, self.protocol),
                                                lambda r: r[0].stats.median_ms)
        return run

    def contention(self) -> float:
        """How much slower the machine runs now than at its quietest: a run of the anchor layer alone over the
        fastest such run (QUIETEST, in any process). 1.0 on a fleet, whose boards differ in speed and are not
        shared."""
        if get_runtime(self.target).devices(self.target) > 1:
            return 1.0
        (m,) = self._run([ANCHOR])
        ms = m.stats.median_ms
        if ms < self._quietest_alone_ms:
            self._quietest_alone_ms = ms
            self.store([LutEntry(QUIETEST, m.stats.n, ms, 0.0, ms)])
        return ms / self._quietest_alone_ms

    def store(self, entries: list[LutEntry], scope: str | None = None) -> None:
        """Write entries: standalone ones, or with `scope` in-context ones (squeeze.measure.incontext)."""
        with self._connect() as db:
            db.executemany("INSERT OR REPLACE INTO lut VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [(scope or self.scope, e.key, e.count, e.mean_ms, e.var_ms, e.median_ms, time.time())
                            for e in entries])

    def drop(self, scope: str) -> None:
        """Delete the in-context entries stored under `scope`."""
        with self._connect() as db:
            db.execute("DELETE FROM lut WHERE scope = ?", (scope,))

    def whole_ms(self, artifact) -> float:
        """A whole model's latency in this table's time base: its median ratio to the anchor, interleaved."""
        anchor_ms = self._anchor_ms()
        anchor, whole = self._quiet(self._artifact(ANCHOR), [artifact])
        return anchor_ms * paired_ratio(anchor.samples_ms, whole.samples_ms).ratio

    def _batches(self, what: str, batches: list[list[LayerConfig]], probe: LayerConfig,
                 quiet: bool = False) -> list[list]:
        """Each batch run interleaved after the `probe` layer, spread over the target's boards: per batch, the
        probe's measurement and then the batch's, all from one board."""
        from squeeze import progress
        from squeeze.measure.fleet import run_batches

        devices = get_runtime(self.target).devices(self.target)
        # Exported here, in turn: the exporter's tracing is not thread-safe, and only the runs spread over boards.
        first, artifacts = self._artifact(probe), {id(b): [self._artifact(c) for c in b] for b in batches}
        # `quiet`: on one device a batch timed with the anchor is run again while contended; a fleet's boards
        # differ in speed, so their anchors do not tell contention apart from a slower board (and a board is not
        # shared).
        run = ((lambda b: self._quiet(first, artifacts[id(b)])) if quiet and devices <= 1 else
               (lambda b: interleaved([first, *artifacts[id(b)]], self.target, self.protocol)))
        count = sum(map(len, batches))
        with progress.task(f"lookup table: {what.format(count)} on {self.target.name}"
                           + (f" ({devices} boards)" if devices > 1 else ""), total=count, unit="layers") as step:
            return run_batches(batches, run, devices, lambda b: step.advance(len(b)))

    def measure(self, configs: list[LayerConfig]) -> list[LutEntry]:
        """Measure layers in batches, each interleaved with the anchor layer, and store them.

        An entry is its median ratio to the anchor (paired samples of one run) times the anchor's stored
        latency, so entries measured at different moments, under different load, stay comparable.
        """
        anchor_ms = self._anchor_ms()
        entries = []
        batches = [configs[start:start + _BATCH] for start in range(0, len(configs), _BATCH)]
        timed = self._batches("measuring {} layers", batches, ANCHOR, quiet=True)
        for batch, (anchor, *measured) in zip(batches, timed):
            for cfg, m in zip(batch, measured):
                scale = anchor_ms * paired_ratio(anchor.samples_ms, m.samples_ms).ratio / m.stats.median_ms
                s = m.stats
                entries.append(LutEntry(cfg.key, s.n, s.mean_ms * scale, (s.cv * s.mean_ms * scale) ** 2,
                                        s.median_ms * scale))
        self.store(entries)
        return entries

    def ratios(self, pairs: list[tuple[LayerConfig, LayerConfig]]) -> dict[tuple[str, str], float]:
        """Per pair (a, b) of configurations of one layer, b's latency over a's, each less a one-layer model's
        per-call overhead (OVERHEAD), all three timed in one interleaved run; stored, measured where not stored.

        The ratio of two entries is that of two runs, and on a machine with contention that comes and goes
        a memory-bound layer's entry moves against the anchor: ShuffleNet-like's 58-channel 1x1 conv at 56x56
        read 1.2 anchors in one run and 2.0 in another on a 2-core EPYC. Timed side by side, a layer's two
        widths meet the same load."""
        wanted = {(a.key, b.key): (a, b) for a, b in pairs if a.key != b.key}
        have = self._stored_ratios(list(wanted))
        groups: dict[LayerConfig, list[LayerConfig]] = {}
        for key, (a, b) in wanted.items():
            if key not in have:
                groups.setdefault(a, []).append(b)
        # batches of up to _BATCH layers, in parts: a configuration, then the ones timed against it
        parts = [[a, *others[i:i + _BATCH - 1]] for a, others in groups.items()
                 for i in range(0, len(others), _BATCH - 1)]
        batches: list[list[list[LayerConfig]]] = []
        for part in parts:
            if not batches or sum(map(len, batches[-1])) + len(part) > _BATCH:
                batches.append([])
            batches[-1].append(part)
        flat = [[c for part in batch for c in part] for batch in batches]
        measured, timed = [], self._batches("timing {} layers side by side", flat, OVERHEAD) if flat else []
        for batch, (overhead, *runs) in zip(batches, timed):
            per_call, i = np.asarray(overhead.samples_ms), 0
            for base, *others in batch:
                net = _less(runs[i].samples_ms, per_call)
                measured += [(base.key, cfg.key, float(np.median(_less(m.samples_ms, per_call) / net)), len(net))
                             for cfg, m in zip(others, runs[i + 1:])]
                i += 1 + len(others)
        with self._connect() as db:
            db.executemany("INSERT OR REPLACE INTO lut_ratio VALUES (?, ?, ?, ?, ?, ?)",
                           [(self.scope, *m, time.time()) for m in measured])
        return have | {(a, b): r for a, b, r, _ in measured}

    def _stored_ratios(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
        firsts = sorted({a for a, _ in keys})
        if not firsts:
            return {}
        with self._connect() as db:
            rows = db.execute(f"SELECT a, b, ratio FROM lut_ratio WHERE scope = ? AND a IN "
                              f"({','.join('?' * len(firsts))})", (self.scope, *firsts)).fetchall()
        wanted = set(keys)
        return {(a, b): r for a, b, r in rows if (a, b) in wanted}

    def entries(self, configs: list[LayerConfig]) -> dict[str, LutEntry]:
        """Entries for all configs, measuring only the ones not stored yet."""
        unique = {c.key: c for c in configs}
        have = self.stored(list(unique))
        missing = [c for k, c in unique.items() if k not in have]
        if missing:
            have.update({e.key: e for e in self.measure(missing)})
        return have

    def layers_ms(self, module: nn.Module, example_input: torch.Tensor) -> dict[str, float]:
        configs = layer_configs(module, example_input)
        table = self.entries(list(configs.values()))
        return {name: table[c.key].median_ms for name, c in configs.items()}

    def to_json(self, keys: list[str], scope: str | None = None) -> list[dict]:
        """The stored entries of `keys`, each with its source (standalone, or in-context under `scope`)."""
        return [asdict(e) for e in self.stored(keys, scope).values()]


def fit_table_constant(layers_ms: float, reference_layers_ms: float, measured_ratio: float,
                       current_ms: float = 0.0) -> float:
    """C with (layers_ms + C) / (reference_layers_ms + C) = measured_ratio: what a table's layers miss
    (pooling, adds, per-call overhead), fitted to a model's measured ratio to its reference. Within 2% of 1
    the fit divides noise by noise, so `current_ms` is kept; C is held within [-0.5, 10] x reference_layers_ms.
    A model the layers call faster that measures slower (or the reverse) is a cliff the runtime takes at those
    widths (a layout or kernel change), not a missing constant: fitted, C would skew every other prediction, so
    `current_ms` is kept then too."""
    table_ratio = layers_ms / reference_layers_ms
    if abs(measured_ratio - 1) <= 0.02 or (measured_ratio - 1) * (table_ratio - 1) < 0:
        return current_ms
    c = (layers_ms - measured_ratio * reference_layers_ms) / (measured_ratio - 1)
    return min(max(c, -0.5 * reference_layers_ms), 10 * reference_layers_ms)


class TableOracle(LatencyOracle):
    """Latency predicted from the table as a ratio to a reference model, times its measured latency.

        predicted(m) = reference_ms * (layers(m) + C) / (layers(ref) + C)

    `layers` sums table entries (one time base); `reference_ms` is a measurement (another moment). Using
    the table only for ratios keeps load drift between the two out of the prediction. C stands for what
    the layers miss (pooling, adds, per-call overhead): 0 at first (the rest scales with the layers), then
    fitted by `recalibrate(model)` to a measured ratio, so a search can correct the table every few steps.

    On a table that `profiles` (ONNX Runtime), unless `in_context` is off, every layer is priced in context
    (squeeze.measure.incontext): the reference is profiled here, and each model `recalibrate` measures too.
    """

    def __init__(self, table: LatencyTable, reference: LoadedModel, measured: LatencyOracle | None = None,
                 in_context: bool = True) -> None:
        from squeeze.measure.oracle import RelativeOracle

        self.target = table.target
        self.table = table
        self.measured = measured or RelativeOracle(reference, table.target)
        self.reference_ms = self.measured.latency_ms(reference)
        configs = layer_configs(reference.module, reference.example_input())
        self.context = None
        if in_context and getattr(table, "profiles", False):  # a table without a profiler (a stand-in): standalone
            from squeeze.measure.incontext import InContext

            self.context = InContext(table, reference, configs)
        self.constant_ms = 0.0
        self.recalibrations = 0  # measurements fitted (one of a contended machine is not)
        self.reference_layers_ms = sum(self._price([configs])[0][0].values())

    def recalibrate(self, model: LoadedModel) -> float:
        """Measure `model` (and profile it: in-context entries at its widths); fit C so that its predicted ratio
        equals the measured one. Returns the measurement. A measurement of a contended machine fits nothing: one
        whose runs read the original over QUIET_FIT x its fastest (the measuring oracle's `contention`; at a search's
        first recalibration, against its first few runs), or when the table's anchor, run now, reads over
        CONTENDED x its fastest in any process (which sees a spell that began before the search)."""
        measured_ms = self.measured.latency_ms(model)
        run, anchor = getattr(self.measured, "contention", 1.0), getattr(self.table, "contention", lambda: 1.0)()
        if run > QUIET_FIT or anchor > CONTENDED:
            _log.warning(f"the table is not recalibrated on {model.name}: it was measured while the machine ran "
                         f"{max(run, anchor):.2f}x slower than at its quietest, and a busy machine slows a small "
                         f"model more than a large one; a recalibration needs a reading within {QUIET_FIT}x (on a "
                         "RegNet-like, readings at 1.12-1.14x put later plans 3-13% too slow). The next "
                         "recalibration on a quiet machine fits the table.")
            return measured_ms
        self.recalibrations += 1
        rho = measured_ms / self.reference_ms
        configs = layer_configs(model.module, model.example_input())
        if self.context is not None and not self.context.uncovered:
            self.context.record(model, configs, rho * self.context.reference_ms)
        layers = sum(self._price([configs])[0][0].values())
        self.constant_ms = fit_table_constant(layers, self.reference_layers_ms, rho, self.constant_ms)
        return measured_ms

    def _price(self, models: list[dict[str, LayerConfig]]) -> list[tuple[dict[str, float], dict[str, str]]]:
        """Per model, per layer: its latency and its source; missing entries (and, in context, side-by-side
        ratios) are measured in one go."""
        if self.context is not None:
            return self.context.price(models)
        table = self.table.entries([c for configs in models for c in configs.values()])
        return [({name: table[c.key].median_ms for name, c in configs.items()}, dict.fromkeys(configs, STANDALONE))
                for configs in models]

    def predict(self, model: LoadedModel) -> Prediction:
        return self.predict_configs([layer_configs(model.module, model.example_input())])[0]

    def predict_configs(self, models: list[dict[str, LayerConfig]]) -> list[Prediction]:
        """Predictions for models given as layer configurations."""
        out = []
        for per_layer, sources in self._price(models):
            layers = sum(per_layer.values())
            ratio = (layers + self.constant_ms) / (self.reference_layers_ms + self.constant_ms)
            out.append(Prediction(self.reference_ms * ratio, layers, self.constant_ms, per_layer, sources))
        return out

    def latency_ms(self, model: LoadedModel) -> float:
        return self.predict(model).total_ms
