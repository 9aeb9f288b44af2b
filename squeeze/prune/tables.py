"""Building and checking a target's latency lookup table for a model's pruning search space.

`build` measures the layer configurations a search will meet: every layer of the model at a sweep of
uniform widths (and, with `single_layer`, every width of each group alone, which is NetAdapt's first
iteration). `check` prunes the model to random plans, predicts each with the table and measures it end to
end, interleaved with the original, and reports the prediction error of the table alone (in-context entries
of the original only) and after recalibrating on the first plans' measurements (what `table+recalibrate` searches
do every few steps: fit the constant, and profile each plan for in-context entries at its widths), taken after
the others'. A plan measured in a spell of contention is measured again at the end. Each row says where its
layers' figures came from (standalone, in-context, or scaled: squeeze.measure.lut).
"""

from __future__ import annotations

import random
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable

from squeeze.measure.lut import LatencyTable, LayerConfig, TableOracle, layer_configs
from squeeze.measure.oracle import RelativeOracle
from squeeze.measure.protocol import CONTENDED, CONTENTION_TRIES, Protocol
from squeeze.model.loading import LoadedModel
from squeeze.prune.engine import apply_plan, make_plan
from squeeze.prune.graph import prunable_layers
from squeeze.prune.plan import round_width
from squeeze.model.summary import summarize

__all__ = ["BuildResult", "CheckRow", "CheckResult", "search_space_configs", "build_table", "check_table"]

UNIFORM_SWEEP = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25)
FIT_ON = 3


@dataclass(frozen=True)
class BuildResult:
    configs: int
    measured: int
    reused: int


@dataclass(frozen=True)
class CheckRow:
    plan: int
    macs: int
    predicted_ms: float  # the table alone
    measured_ms: float
    run_reference_ms: float  # the original's time in the run the measurement came from (RelativeOracle)
    recalibrated_ms: float | None = None  # after recalibrating on the first plans (None for those plans)
    sources: dict[str, str] = field(default_factory=dict)  # layer -> source of its figure in the last prediction

    @property
    def source_counts(self) -> dict[str, int]:
        return dict(Counter(self.sources.values()))

    @property
    def error_pct(self) -> float:
        return 100 * (self.predicted_ms - self.measured_ms) / self.measured_ms

    @property
    def recalibrated_error_pct(self) -> float | None:
        if self.recalibrated_ms is None:
            return None
        return 100 * (self.recalibrated_ms - self.measured_ms) / self.measured_ms


@dataclass(frozen=True)
class CheckResult:
    rows: list[CheckRow]
    reference_ms: float
    constant_ms: float
    fastest_reference_ms: float  # the original's fastest run of the check: the machine at its quietest
    fitted_plans: list[int] = field(default_factory=lambda: [0])  # the plans whose measurements fitted the table
    fit_on: int = 1  # the plans held to recalibrate on (one measured on a contended machine fits nothing)

    @property
    def recalibrated(self) -> bool:
        return bool(self.fitted_plans)

    def contention(self, row: CheckRow) -> float:
        """How much slower the machine ran during the row's measurement than at its quietest in the check."""
        return row.run_reference_ms / self.fastest_reference_ms

    @property
    def contended_plans(self) -> list[int]:
        """Plans whose every try ran on a contended machine (CONTENDED): their measured ratio is that of a
        busier machine, and their error includes it."""
        return [r.plan for r in self.rows if self.contention(r) > CONTENDED]

    def summary(self, recalibrated: bool = False) -> tuple[float, float]:
        """(median, p90) of the absolute % error, of the table alone or after recalibration (of the plans not fitted
        on)."""
        errs = sorted(abs(e) for r in self.rows
                      if (e := (r.recalibrated_error_pct if recalibrated else r.error_pct)) is not None)
        if not errs:
            return float("nan"), float("nan")
        return statistics.median(errs), errs[min(len(errs) - 1, int(round(0.9 * (len(errs) - 1))))]

    @property
    def slower_plans(self) -> list[int]:
        """Plans that measured slower than the original although every layer kept at most its channels: a cliff
        the runtime takes at those widths (layout, kernel choice), which no sum of layers prices."""
        return [r.plan for r in self.rows if r.measured_ms > self.reference_ms]

    def to_json(self) -> dict:
        (med, p90), (rmed, rp90) = self.summary(), self.summary(recalibrated=True)
        return {"reference_ms": self.reference_ms, "constant_ms": self.constant_ms, "slower_plans": self.slower_plans,
                "recalibrated": self.recalibrated, "fitted_plans": self.fitted_plans, "fit_on": self.fit_on,
                "fastest_reference_ms": self.fastest_reference_ms, "contended_plans": self.contended_plans,
                "median_abs_error_pct": med, "p90_abs_error_pct": p90,
                "recalibrated_median_abs_error_pct": rmed, "recalibrated_p90_abs_error_pct": rp90,
                "rows": [{**asdict(r), "error_pct": r.error_pct, "recalibrated_error_pct": r.recalibrated_error_pct,
                          "source_counts": r.source_counts, "contention": self.contention(r)} for r in self.rows]}


def _pruned(model: LoadedModel, keep) -> LoadedModel:
    x = model.example_input()
    module = apply_plan(model.module, make_plan(model.module, x, keep, round_to=1), x)
    return LoadedModel(model.name, model.kind, model.input_shape, module, arch=model.arch)


def search_space_configs(model: LoadedModel, round_to: int = 8, single_layer: bool = False) -> list[LayerConfig]:
    """Distinct layer configurations of the model pruned to a sweep of widths (on the rounding grid)."""
    x = model.example_input()
    table = prunable_layers(model.module, x)
    configs: dict[str, LayerConfig] = {}

    def add(module) -> None:
        configs.update({c.key: c for c in layer_configs(module, x).values()})

    add(model.module)
    for ratio in UNIFORM_SWEEP[1:]:
        keep = {layer.name: round_width(int(layer.out_channels * ratio), layer.out_channels, round_to, layer.channel_step)
                for layer in table if layer.prunable}
        add(_pruned(model, keep).module)
    if single_layer:
        for layer in (g for g in table if g.prunable):
            for w in range(round_to, layer.out_channels, round_to):
                add(_pruned(model, {layer.name: round_width(w, layer.out_channels, round_to, layer.channel_step)}).module)
    return list(configs.values())


def build_table(model: LoadedModel, table: LatencyTable, round_to: int = 8, single_layer: bool = False) -> BuildResult:
    configs = search_space_configs(model, round_to, single_layer)
    have = table.stored([c.key for c in configs])
    missing = [c for c in configs if c.key not in have]
    if missing:
        table.measure(missing)
    return BuildResult(len(configs), len(missing), len(configs) - len(missing))


def check_table(model: LoadedModel, table: LatencyTable, n_plans: int = 10, seed: int = 0, round_to: int = 8,
                min_ratio: float = 0.3, log: Callable[[str], None] = lambda _m: None,
                in_context: bool = True, fit_on: int = FIT_ON) -> CheckResult:
    """Random plans (each prunable group keeps a random fraction in [min_ratio, 1]), predicted vs measured; the
    first `fit_on` recalibrate the table, and the others' errors are checked after it.

    Whole models are timed at the table's batch; `in_context=False` prices every layer standalone."""
    rng = random.Random(seed)
    measured = RelativeOracle(model, table.target, Protocol.for_target(table.target,
                                                                       batch_size=table.protocol.batch_size))
    oracle = TableOracle(table, model, measured, in_context=in_context)
    layers = [g for g in prunable_layers(model.module, model.example_input()) if g.prunable]
    candidates = [_pruned(model, {g.name: round_width(max(1, int(g.out_channels * rng.uniform(min_ratio, 1.0))),
                                                      g.out_channels, round_to, g.channel_step) for g in layers})
                  for _ in range(n_plans)]
    configs = [layer_configs(c.module, c.example_input()) for c in candidates]
    alone = oracle.predict_configs(configs)  # before any pruned model is measured (missing entries in one go)
    fitting = range(min(fit_on, n_plans))
    readings = {}  # per plan: (ms, the original's time in its run)
    for i in range(len(fitting), n_plans):
        readings[i] = measured.latency_ms(candidates[i]), measured.run_reference_ms
        log(f"plan {i}: predicted {alone[i].total_ms:.3f} ms, measured {readings[i][0]:.3f} ms")
    # Recalibrated on the first plans as a search does (each measured whole, profiled, fitted), last: by then the
    # original's fastest run tells a contended reading apart. A plan read in a spell of contention is read again,
    # and the less contended reading kept, and a recalibration turned down is tried again, CONTENTION_TRIES
    # rounds at most: a busy machine's ratio is off by more than the error being checked (a RegNet-like's plans
    # read 8-12% slow).
    fitted: list[int] = []
    for _ in range(CONTENTION_TRIES):
        for i in fitting:
            if i not in fitted:
                before = oracle.recalibrations
                readings[i] = oracle.recalibrate(candidates[i]), measured.run_reference_ms
                fitted += [i] * (oracle.recalibrations > before)
        busy = [i for i in range(len(fitting), n_plans) if readings[i][1] > CONTENDED * measured.fastest_ms]
        for i in busy:
            again = measured.latency_ms(candidates[i]), measured.run_reference_ms
            readings[i] = min(readings[i], again, key=lambda r: r[1])
        if len(fitted) == len(fitting) and not busy:
            break
    refits = [None] * len(fitting) + oracle.predict_configs(configs[len(fitting):])
    rows = []
    for i, (candidate, table_only, refit) in enumerate(zip(candidates, alone, refits)):
        ms, run_ms = readings[i]
        rows.append(CheckRow(i, summarize(candidate).macs or 0, table_only.total_ms, ms, run_ms,
                             refit and refit.total_ms, (refit or table_only).sources))
    return CheckResult(rows, measured.reference_ms, oracle.constant_ms, measured.fastest_ms, sorted(fitted),
                       len(fitting))
