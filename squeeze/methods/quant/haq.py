"""`quant.haq`: HAQ (Wang et al., CVPR 2019; code mit-han-lab/haq), per-layer precision chosen by a DDPG agent
with hardware feedback: the costs are measured on the target, the policy's reward comes from a short
fake-quant fine-tune (the environment and the fake-quant model: squeeze.quant.haq), the chosen policy is
fine-tuned longer, exported as one ONNX model and measured interleaved with fp32 and uniform int8.

What a layer may choose depends on the budget:
- latency: only precisions the target's runtime executes, each measured per layer (squeeze.quant.costs):
  fp32, fp16 where it runs, int8 (QDQ), int4w (4-bit weight-only MatMulNBits, Linear). A precision that
  is not faster than a wider one for that layer is dropped (it would cost accuracy for nothing), so
  lowering bits always lowers the cost and the wall is monotone. The policy's latency is predicted from
  the table as a ratio to the measured fp32 model, with a constant for what the layers miss (pooling,
  adds, per-call overhead) fitted to the measured uniform-int8 model; the final policy is measured.
- size: also 2..7-bit weights for convolutions (no kernel anywhere: exported as int8 QDQ whose weights
  lie on the b-bit grid, i.e. *simulated*, and their latency is modelled). Size is counted exactly:
  weight params x bits / 8 (+ biases in 32 bits, other parameters in fp32).
First and last layers never go below 8 bits (HAQ pins them at 8 for accuracy).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from squeeze.errors import DataError
from squeeze.measure.protocol import LATENCY_TOLERANCE
from squeeze.methods.base import ModelState, Pass, PassContext, register_pass
from squeeze.quant.parity import ParityFloor
from squeeze.train.config import FineTuneConfig

if TYPE_CHECKING:
    from torch import nn

    from squeeze.data import DataBundle
    from squeeze.export.artifact import OnnxArtifact
    from squeeze.measure.protocol import Protocol
    from squeeze.model.loading import LoadedModel
    from squeeze.prune.budget import BudgetError, ResolvedBudget
    from squeeze.quant.costs import CostRow, CostTable, Precision
    from squeeze.quant.haq import HAQLayer
    from squeeze.recipe import Budget
    from squeeze.target import Target
    from squeeze.util.workers import Workers

__all__ = ["HAQOptions", "HAQPass", "HAQResult", "HAQSetup", "prepare", "search", "finish", "haq_search"]

log = logging.getLogger("squeeze.quant.haq")


class HAQOptions(ParityFloor):
    episodes: int = Field(100, ge=1, description="search episodes (HAQ: 600), each one policy fine-tuned briefly")
    warmup: int = Field(20, ge=0, description="first episodes with random actions that only fill the replay buffer")
    min_bits: int = Field(2, ge=2, le=32, description="lowest weight bits a layer may take (2..7 only under a size "
                          "budget: no kernel runs them)")
    max_bits: int = Field(32, ge=2, le=32, description="highest weight bits (32: a layer may stay fp32)")
    keep_first_last: bool = Field(True, description="first and last layers keep at least 8 bits (HAQ)")
    short_term: FineTuneConfig = Field(FineTuneConfig(optimizer="sgd", lr=0.001, iterations=20),
                                       description="fake-quant fine-tune of every episode's policy before its reward")
    long_term: FineTuneConfig = Field(FineTuneConfig(optimizer="sgd", lr=0.001, epochs=3),
                                      description="fake-quant fine-tune of the chosen policy before export")
    samples: int = Field(256, ge=1, description="calibration samples from the data's train split")
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    seed: int = 0
    workers: int | None = Field(None, ge=1, description="score the warm-up episodes' random policies at once, as Ray "
                                "tasks on a local Ray of this many CPUs (pip install 'squeeze[ray]'); the later "
                                "episodes each act on the last reward, so they run in turn")
    ray_address: str | None = Field(None, pattern=r"^[^:\s]+:\d+$", description="HOST:PORT of a running Ray "
                                    "cluster to score the warm-up policies on, instead of workers")

    @model_validator(mode="after")
    def _bits_ordered(self):
        if self.min_bits > self.max_bits:
            raise ValueError(f"min_bits {self.min_bits} is above max_bits {self.max_bits}")
        return self


@register_pass
class HAQPass(Pass):
    name = "quant.haq"
    summary = "HAQ: per-layer precision (fp32/int8/4-bit; 2-7 bit under a size budget), DDPG on measured costs."
    Options = HAQOptions
    needs_budget = True
    runtimes = ("onnxruntime",)
    # 8 bits at the least: lower widths are simulated, and two short fine-tunes cannot recover them.
    smoke_options = {"episodes": 2, "warmup": 1, "min_bits": 8, "samples": 32, "short_term": {"iterations": 2},
                     "long_term": {"iterations": 2}}
    smoke_budget = {"size_bytes": 200_000}  # about 0.37x of digits-cnn's fp32 weights: int8 fits

    def run(self, state: ModelState, ctx: PassContext) -> tuple[ModelState, dict[str, Any]]:
        model, artifact, result = haq_search(state.model, ctx.data, ctx.target, ctx.protocol, ctx.budget, self.options)
        state.model, state.artifact = model, artifact
        return state, result.to_json()


# ---------------------------------------------------------------------------------------------------
# The search. torch, the cost table and the agent load when it runs, not when `squeeze list` imports this module.


@dataclass
class HAQResult:
    layers: dict[str, str]  # the chosen precision per layer
    search_budget: dict[str, Any]  # resource, original, target, met
    rows: list[dict[str, Any]]  # per layer: precision, bits, cost, measured or modelled, how it was exported
    accuracy: dict[str, Any]
    latency: dict[str, Any]  # fp32, uniform int8 and the HAQ model, measured interleaved in one run
    size_bytes: dict[str, float]  # ONNX file sizes: fp32 and final
    counted_size_bytes: dict[str, float]  # weights at their bits (what a size budget limits): fp32 and final
    episodes: list[dict[str, Any]]
    cost_table: list[dict[str, Any]]
    unsupported_precisions: dict[str, str]
    search_seconds: float
    simulated_layers: list[str] = field(default_factory=list)
    output_parity: dict[str, Any] | None = None  # the exported model against fp32, checked against the floor

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class HAQSetup:
    """Everything a search (or a hand-made policy) is evaluated against: the model and data, the layers with
    their choices and costs, the resolved budget in cost units, and the fp32 / uniform-int8 references."""

    original: LoadedModel
    data: DataBundle
    target: Target
    protocol: Protocol
    opts: HAQOptions
    resource: str = "latency_ms"  # or "size_bytes"
    layers: list[HAQLayer] = field(default_factory=list)
    rows: list[CostRow] = field(default_factory=list)
    unsupported: dict[str, str] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    calibration: Any = None
    fp32_size_bytes: float = 0.0
    fp32_artifact: Any = None
    int8_artifact: Any = None
    resolved: ResolvedBudget | None = None
    target_cost: float = 0.0  # the budget in layer-cost units (table ms or bytes)
    constant_ms: float = 0.0  # latency: what the table's layers miss, fitted to the uniform-int8 measurement
    base_accuracy: float = 0.0  # fp32 top-1 (%) on the validation split
    _accuracy: dict[tuple[str, ...], float] = field(default_factory=dict)

    def policy(self, names: tuple[str, ...]) -> dict[str, Precision]:
        return self.scorer().policy(names)

    def fine_tuned(self, names: tuple[str, ...], config) -> nn.Module:
        return self.scorer().fine_tuned(names, config)

    def scorer(self) -> PolicyScorer:
        return PolicyScorer(self.original.module, tuple(layer.name for layer in self.layers), self.ranges,
                            self.data.train, self.data.val, self.opts.short_term)

    def evaluate(self, names: tuple[str, ...]) -> float:
        """Accuracy (%) on the validation split after the short fine-tune; memoized (fine-tunes are seeded)."""
        if names not in self._accuracy:
            self._accuracy[names] = self.scorer()(names)
        return self._accuracy[names]


@dataclass
class PolicyScorer:
    """A policy's reward accuracy: its fake-quant model after the short fine-tune, top-1 (%) on the validation
    split. It holds only what that needs, so that Ray ships it to the workers once."""

    module: nn.Module
    layers: tuple[str, ...]
    ranges: dict[str, tuple[float, float]]
    train: Any
    val: Any
    short_term: FineTuneConfig

    def policy(self, names: tuple[str, ...]) -> dict[str, Precision]:
        from squeeze.quant.costs import precision

        return {layer: precision(n) for layer, n in zip(self.layers, names)}

    def fine_tuned(self, names: tuple[str, ...], config: FineTuneConfig) -> nn.Module:
        from squeeze.quant.haq import fake_quant_model
        from squeeze.train import fine_tune

        model = fake_quant_model(self.module, self.policy(names), self.ranges)
        fine_tune(model, self.train, config, progress=False)
        return model

    def __call__(self, names: tuple[str, ...]) -> float:
        from squeeze.train import evaluate

        return 100 * evaluate(self.fine_tuned(names, self.short_term), self.val).top1


def _scored(scorer: PolicyScorer, names: tuple[str, ...]) -> float:
    """One warm-up policy's accuracy as a Ray task, on one torch thread (a task holds one CPU): the same as a
    serial run on one thread."""
    import torch

    torch.set_num_threads(1)
    return scorer(names)


def _pareto(choices: list[Precision], costs: list[float], measured: list[bool]):
    """Keep a choice only if it is cheaper than every choice with more bits (else it loses accuracy for no
    gain). Input and output ascend in weight bits."""
    keep = []
    best = math.inf
    for c, cost, m in sorted(zip(choices, costs, measured), key=lambda t: -t[0].weight_bits):
        if cost < best:
            keep.append((c, cost, m))
            best = cost
    keep.reverse()
    return [k[0] for k in keep], [k[1] for k in keep], [k[2] for k in keep]


def _layers(search: HAQSetup, table: CostTable, resource: str) -> tuple[list[HAQLayer], list[CostRow]]:
    from squeeze.measure.lut import layer_configs
    from squeeze.prune.budget import BudgetError
    from squeeze.quant.costs import precision
    from squeeze.quant.haq import HAQLayer

    module, x = search.original.module, search.original.example_input()
    configs = {n: c for n, c in layer_configs(module, x).items() if c.op in ("conv2d", "linear")}
    rows = table.rows(configs, modelled=resource == "size_bytes")
    opts = search.opts
    layers = []
    for i, (name, cfg) in enumerate(configs.items()):
        mine = [r for r in rows if r.layer == name and opts.min_bits <= r.weight_bits <= opts.max_bits
                and r.precision != "fp16"]  # fp16 rows are measured but not mixed into one graph yet
        mine.sort(key=lambda r: (r.weight_bits, r.act_bits))
        choices = [precision(r.precision) for r in mine]
        costs = [r.latency_ms if resource == "latency_ms" else r.size_bytes for r in mine]
        measured = [r.measured for r in mine]
        if resource == "latency_ms":
            choices, costs, measured = _pareto(choices, costs, measured)
        if not choices:
            raise BudgetError(f"Layer {name} has no precision within --min-bits {opts.min_bits} .. "
                              f"--max-bits {opts.max_bits} on {search.target.name}.",
                              "Widen the bit range (the target runs fp32, int8 and 4-bit weight-only Linear).")
        floor = 0
        if opts.keep_first_last and i in (0, len(configs) - 1):
            eight = [j for j, c in enumerate(choices) if c.weight_bits >= 8]
            floor = eight[0] if eight else len(choices) - 1
        layers.append(HAQLayer(name, cfg, choices, costs, measured, floor))
    return layers, rows


def _table_sums(rows: list[CostRow], precision: str) -> float:
    """Table latency of the whole model in one precision (fp32 or int8 everywhere)."""
    by_layer = {r.layer: r.latency_ms for r in rows if r.precision == precision}
    fp32 = {r.layer: r.latency_ms for r in rows if r.precision == "fp32"}
    return sum(by_layer.get(layer, ms) for layer, ms in fp32.items())


def _latency_target(rows: list[CostRow], fp32_ms: float, int8_ms: float, target_ms: float) -> tuple[float, float]:
    """The budget in table units, and C: predicted(policy) = fp32_ms (T(policy) + C) / (T(fp32) + C), with C
    fitted so that the uniform-int8 model predicts its measured latency (as TableOracle.recalibrate)."""
    from squeeze.measure.lut import fit_table_constant

    t_fp32 = _table_sums(rows, "fp32")
    c = fit_table_constant(_table_sums(rows, "int8"), t_fp32, int8_ms / fp32_ms)
    return target_ms / fp32_ms * (t_fp32 + c) - c, c


def _predicted_ms(table_cost: float, rows: list[CostRow], fp32_ms: float, constant: float) -> float:
    return fp32_ms * (table_cost + constant) / (_table_sums(rows, "fp32") + constant)


def _check_inputs(original: LoadedModel, data: DataBundle | None, budget: Budget | None) -> str:
    from squeeze.prune.budget import BudgetError

    if original.module is None:
        raise DataError("HAQ needs the torch model (it fine-tunes each candidate); an ONNX file cannot be searched.",
                        "Pass the model as a checkpoint, zoo:NAME or package.module:factory.")
    if data is None:
        raise DataError("HAQ needs data (--data): every candidate precision policy is fine-tuned and evaluated.",
                        "Pass --data digits, a folder of class sub-folders, or package.module:function.")
    if budget is None or budget.macs_ratio is not None and all(
            v is None for v in (budget.latency_ms, budget.latency_ratio, budget.size_bytes)):
        raise BudgetError("HAQ needs a latency or model-size budget.",
                          "Pass --latency 0.6x, --latency-ms N or --size-bytes N (or `budget:` in the recipe).")
    return "latency_ms" if budget.latency_ms is not None or budget.latency_ratio is not None else "size_bytes"


def _size_bytes(search: HAQSetup, policy: dict[str, Precision]) -> float:
    """Model size with each searched layer's weights at its bits (biases 32-bit, other parameters fp32)."""
    from squeeze.quant.costs import layer_size_bytes

    return search.fp32_size_bytes + sum(
        layer_size_bytes(layer.config, policy[layer.name].weight_bits) - layer_size_bytes(layer.config, 32)
        for layer in search.layers)


def prepare(original: LoadedModel, data: DataBundle | None, target: Target, protocol: Protocol,
            budget: Budget | None, opts: HAQOptions) -> HAQSetup:
    """Layers and their costs on the target, references measured, budget resolved and checked."""
    import torch

    from squeeze.export.onnx import export_onnx
    from squeeze.measure.oracle import FixedOracle, MeasuredOracle
    from squeeze.prune.budget import Resource, resolve_budget
    from squeeze.quant.costs import CostTable, layer_size_bytes
    from squeeze.quant.fakequant import int8_reduce_range
    from squeeze.quant.haq import cost_of, input_ranges, names_of
    from squeeze.quant.calibrate import calibration_data
    from squeeze.quant.ptq import QuantConfig, quantize_onnx
    from squeeze.model.summary import summarize
    from squeeze.train import evaluate

    setup = HAQSetup(original, data, target, protocol, opts, resource=_check_inputs(original, data, budget))
    setup.fp32_size_bytes = float(summarize(original).size_bytes)
    setup.calibration = calibration_data(data, opts.samples, seed=opts.seed)
    table = CostTable(target, batch_size=protocol.batch_size)
    setup.unsupported = table.unsupported
    setup.layers, setup.rows = _layers(setup, table, setup.resource)
    setup.ranges = input_ranges(original.module, [layer.name for layer in setup.layers],
                                torch.from_numpy(setup.calibration.inputs))
    setup.fp32_artifact = export_onnx(original)
    setup.int8_artifact = quantize_onnx(setup.fp32_artifact, setup.calibration,
                                        QuantConfig(calibration=opts.calibration,
                                                    reduce_range=int8_reduce_range()))
    fp32_m, int8_m = MeasuredOracle(target, protocol, use_cache=False).measurements(
        [setup.fp32_artifact, setup.int8_artifact])
    fp32_ms, int8_ms = fp32_m.stats.median_ms, int8_m.stats.median_ms
    if setup.resource == "latency_ms":
        setup.resolved = resolve_budget(budget, original, Resource("latency_ms", FixedOracle(fp32_ms), FixedOracle(fp32_ms)))
        setup.target_cost, setup.constant_ms = _latency_target(setup.rows, fp32_ms, int8_ms, setup.resolved.target)
    else:
        setup.resolved = resolve_budget(budget, original, Resource("size_bytes"))
        fp32_layers = sum(layer_size_bytes(layer.config, 32) for layer in setup.layers)
        setup.target_cost = setup.resolved.target - (setup.resolved.original - fp32_layers)  # the rest stays fp32
    lowest = [layer.floor for layer in setup.layers]
    if cost_of(setup.layers, lowest) > setup.target_cost:
        raise _impossible(setup, names_of(setup.layers, lowest), cost_of(setup.layers, lowest), fp32_ms, int8_ms)
    setup.base_accuracy = 100 * evaluate(original.module, data.val).top1
    log.info(f"haq: {setup.resolved.resource} {setup.resolved.original:.4g} -> budget {setup.resolved.target:.4g}; "
             f"measured fp32 {fp32_ms:.4g} ms, uniform int8 {int8_ms:.4g} ms; {len(setup.layers)} layers")
    return setup


def _score_warmup(setup: HAQSetup, agent, episodes: int, workers: Workers) -> None:
    """Score the policies of the first `episodes` (random) episodes at once on `workers`, into the search's memo.
    Their actions come from the agent's own generator alone: a copy of it, stepped through the budget wall here,
    draws the policies the episodes will then take."""
    import torch

    from squeeze.quant.haq import HAQEnv

    policies: list[tuple[str, ...]] = []
    env = HAQEnv(setup.layers, setup.target_cost, lambda names: policies.append(names) or 0.0, setup.base_accuracy)
    generator = torch.Generator()
    generator.set_state(agent.generator.get_state())
    for _ in range(episodes):
        env.reset()
        done = False
        while not done:
            _, _, done, _ = env.step(torch.rand(agent.action_dim, generator=generator))
    todo = [p for p in dict.fromkeys(policies) if p not in setup._accuracy]
    started = time.perf_counter()
    with workers:
        setup._accuracy.update(zip(todo, workers.map(_scored, workers.share(setup.scorer()), [(p,) for p in todo])))
    log.info(f"haq: {len(todo)} warm-up policies scored on {workers.slots} Ray workers in "
             f"{time.perf_counter() - started:.1f} s")


def search(setup: HAQSetup, workers: Workers | None = None) -> tuple[tuple[str, ...], list, float]:
    """The DDPG episodes; returns the best policy (highest reward, then lowest cost), the episode records
    and the search wall time in seconds. With Ray `workers`, the warm-up episodes' policies are scored at once
    beforehand (the result is that of a serial run on one torch thread)."""
    from squeeze.agents import DDPG, DDPGConfig, run_episodes
    from squeeze.quant.haq import HAQEnv
    from squeeze.util.workers import Workers

    workers = workers or Workers()

    started = time.perf_counter()
    opts = setup.opts
    env = HAQEnv(setup.layers, setup.target_cost, setup.evaluate, setup.base_accuracy)
    agent = DDPG(env.states.shape[1], 1, len(setup.layers), DDPGConfig(warmup_episodes=opts.warmup, seed=opts.seed))
    if workers.on_ray:
        _score_warmup(setup, agent, min(opts.warmup, opts.episodes), workers)
    best: dict[str, Any] = {"key": (-math.inf, 0.0)}

    def on_episode(rec) -> None:
        key = (rec.reward, -rec.info["cost"])  # equal rewards: the cheaper policy
        if key > best["key"]:
            best.update(key=key, policy=tuple(rec.info["policy"]))
            log.info(f"haq episode {rec.episode + 1}: new best, reward {rec.reward:+.4f}, val "
                     f"{rec.info['accuracy']:.2f}%, cost {rec.info['cost']:.4g}: {' '.join(rec.info['policy'])}")
        elif (rec.episode + 1) % 10 == 0:
            log.info(f"haq episode {rec.episode + 1}/{opts.episodes}: {len(setup._accuracy)} policies evaluated")

    records = run_episodes(env, agent, opts.episodes, on_episode)
    return best["policy"], records, time.perf_counter() - started


def finish(setup: HAQSetup, names: tuple[str, ...], records: list | None = None, search_seconds: float = 0.0
           ) -> tuple[LoadedModel, OnnxArtifact, HAQResult]:
    """Fine-tune `names` (one precision per layer) longer, export it as one ONNX model, and measure it
    interleaved with fp32 and uniform int8. Returns the fine-tuned float model, the artifact, the record."""
    from squeeze.measure.oracle import MeasuredOracle
    from squeeze.quant.haq import export_policy, strip_fake_quant
    from squeeze.train import evaluate

    data, opts, resolved = setup.data, setup.opts, setup.resolved
    chosen = setup.policy(names)
    simulated = [n for n, p in chosen.items() if not p.kernel]
    tuned = setup.fine_tuned(names, opts.long_term)
    torch_top1 = None if simulated else evaluate(tuned, data.held_out()[1]).top1
    final_model = _with_module(setup.original, strip_fake_quant(tuned, set(simulated)))
    artifact = export_policy(final_model, chosen, setup.calibration, opts.calibration)
    final_m, fp32_m, int8_m = MeasuredOracle(setup.target, setup.protocol, use_cache=False).measurements(
        [artifact, setup.fp32_artifact, setup.int8_artifact])
    haq_ms, fp32_ms, int8_ms = (m.stats.median_ms for m in (final_m, fp32_m, int8_m))
    budget_json: dict[str, Any] = asdict(resolved)
    counted = {"fp32": setup.fp32_size_bytes, "final": _size_bytes(setup, chosen)}
    if setup.resource == "latency_ms":
        # Within 2% of the budget: readings of the same model vary about that much (as the pruning searches).
        budget_json["met"] = haq_ms / fp32_ms <= LATENCY_TOLERANCE * resolved.ratio
    else:
        budget_json["met"] = counted["final"] <= resolved.target
    policy_cost = sum(layer.costs[layer.choices.index(chosen[layer.name])] for layer in setup.layers)
    result = HAQResult(
        layers={n: p.name for n, p in chosen.items()},
        search_budget=budget_json,
        rows=[_row(layer, chosen[layer.name]) for layer in setup.layers],
        accuracy=_accuracies(setup, artifact, names, torch_top1),
        latency={
            "fp32_ms": fp32_ms, "uniform_int8_ms": int8_ms, "haq_ms": haq_ms, "haq_vs_fp32": haq_ms / fp32_ms,
            "uniform_int8_vs_fp32": int8_ms / fp32_ms, "table_constant_ms": setup.constant_ms,
            "predicted_haq_ms": _predicted_ms(policy_cost, setup.rows, fp32_ms, setup.constant_ms)
            if setup.resource == "latency_ms" else None,
            "measurements": {"haq": final_m.to_json(), "fp32": fp32_m.to_json(), "uniform_int8": int8_m.to_json()},
        },
        size_bytes={"fp32": float(setup.fp32_artifact.path.stat().st_size),
                    "final": float(artifact.path.stat().st_size)},
        counted_size_bytes=counted, episodes=[r.to_json() for r in records or []],
        cost_table=[r.to_json() for r in setup.rows], unsupported_precisions=setup.unsupported,
        search_seconds=search_seconds, simulated_layers=simulated)
    return final_model, artifact, result


def haq_search(original: LoadedModel, data: DataBundle | None, target: Target, protocol: Protocol,
               budget: Budget | None, opts: HAQOptions) -> tuple[LoadedModel, OnnxArtifact, HAQResult]:
    """Prepare, search, then fine-tune, export and measure the best policy (see `finish`). Should the
    measurement miss a latency budget, the table is re-fitted to it and the wall lowers the policy further
    (at most `_RETRIES` times); a budget still missed is reported as such."""
    from squeeze.util.workers import Workers

    started = time.perf_counter()
    workers = Workers(opts.workers, opts.ray_address)  # before any work: without Ray, this fails at once
    setup = prepare(original, data, target, protocol, budget, opts)
    names, records, _ = search(setup, workers)
    for attempt in range(_RETRIES + 1):
        model, artifact, result = finish(setup, names, records, time.perf_counter() - started)
        if result.search_budget["met"] or setup.resource != "latency_ms" or attempt == _RETRIES:
            break
        lower = _refit_and_lower(setup, names, result.latency["haq_vs_fp32"])
        if lower == names:
            break
        log.info(f"haq: measured {result.latency['haq_vs_fp32']:.3f}x misses the budget "
                 f"({setup.resolved.ratio:.3f}x); table re-fitted, policy lowered to {' '.join(lower)}")
        names = lower
    from squeeze.quant.parity import OrtParity
    from squeeze.quant.run import final_parity

    parity = OrtParity(setup.fp32_artifact, data, opts.parity_samples)
    result.output_parity = final_parity(
        "The HAQ model", parity, artifact, opts,
        fix="Relax the budget (more bits), search longer (--episodes), or lower the floor (--min-agreement, "
            "--max-accuracy-drop) if that loss is acceptable.")
    return model, artifact, result


_RETRIES = 2


def _refit_and_lower(setup: HAQSetup, names: tuple[str, ...], measured_ratio: float) -> tuple[str, ...]:
    """Fit the table constant so that `names` predicts its measured ratio to fp32, re-derive the budget in
    table units, and run the wall on `names` again."""
    from squeeze.measure.lut import fit_table_constant
    from squeeze.quant.costs import precision
    from squeeze.quant.haq import budget_wall, cost_of, names_of

    policy = [layer.choices.index(precision(n)) for layer, n in zip(setup.layers, names)]
    t_policy, t_fp32 = cost_of(setup.layers, policy), _table_sums(setup.rows, "fp32")
    setup.constant_ms = fit_table_constant(t_policy, t_fp32, measured_ratio, setup.constant_ms)
    setup.target_cost = setup.resolved.ratio * (t_fp32 + setup.constant_ms) - setup.constant_ms
    floors = [layer.floor for layer in setup.layers]
    return names_of(setup.layers, budget_wall(policy, [layer.costs for layer in setup.layers], floors,
                                              setup.target_cost))


def _accuracies(setup: HAQSetup, haq: OnnxArtifact, names: tuple[str, ...], torch_top1: float | None
                ) -> dict[str, Any]:
    """Top-1 of the exported files through ONNX Runtime on the test split (val when there is none)."""
    from squeeze.train import evaluate_onnx

    split_name, split = setup.data.held_out()
    return {
        "split": split_name,
        "fp32_top1": evaluate_onnx(setup.fp32_artifact, split).top1,
        "uniform_int8_ptq_top1": evaluate_onnx(setup.int8_artifact, split).top1,
        "haq_top1": evaluate_onnx(haq, split).top1,
        "haq_torch_fake_quant_top1": torch_top1,  # the same model in torch (None with simulated layers)
        "val_fp32_pct": setup.base_accuracy,
        "val_after_short_fine_tune_pct": setup.evaluate(names),
    }


def _row(layer: HAQLayer, p: Precision) -> dict[str, Any]:
    j = layer.choices.index(p)
    return {"layer": layer.name, "precision": p.name, "weight_bits": p.weight_bits, "act_bits": p.act_bits,
            "cost": layer.costs[j], "measured": layer.measured[j], "exported_as": _exported_as(p),
            "choices": [c.name for c in layer.choices]}


def _exported_as(p: Precision) -> str:
    if p.name == "int4w":
        return "MatMulNBits, 4-bit weights"
    if p.name == "int8":
        return "QDQ int8"
    if not p.kernel:
        return f"simulated: {p.weight_bits}-bit weight grid stored in int8 QDQ, runs as int8"
    return "float"


def _with_module(original: LoadedModel, module: nn.Module) -> LoadedModel:
    from squeeze.model.loading import LoadedModel

    return LoadedModel(original.name, original.kind, original.input_shape, module.eval(), arch=original.arch,
                       plans=list(original.plans), metadata=dict(original.metadata))


def _impossible(setup: HAQSetup, names: tuple[str, ...], min_cost: float, fp32_ms: float, int8_ms: float
                ) -> BudgetError:
    from squeeze.prune.budget import BudgetError
    from squeeze.quant.costs import layer_size_bytes

    resolved = setup.resolved
    cheapest = ", ".join(f"{layer.name}={n}" for layer, n in zip(setup.layers, names))
    if setup.resource == "latency_ms":
        ratio = _predicted_ms(min_cost, setup.rows, fp32_ms, setup.constant_ms) / fp32_ms
        return BudgetError(
            f"No precision policy meets the latency budget of {resolved.target:.4g} ms ({resolved.ratio:.2f}x the "
            f"measured fp32 {fp32_ms:.4g} ms) on {setup.target.name}: the fastest one ({cheapest}) is predicted at "
            f"{ratio:.2f}x, and uniform int8 measured {int8_ms:.4g} ms ({int8_ms / fp32_ms:.2f}x).",
            f"Ask for {math.ceil(100 * ratio) / 100}x or more, or use a model-size budget (--size-bytes), which also "
            "allows 2..7-bit weights.")
    rest = resolved.original - sum(layer_size_bytes(layer.config, 32) for layer in setup.layers)
    return BudgetError(
        f"No precision policy meets the size budget of {resolved.target:.0f} bytes: the smallest one ({cheapest}) "
        f"counts {min_cost + rest:.0f} bytes (fp32: {resolved.original:.0f}).",
        "Ask for more bytes, lower min_bits (2 at the least), or let the first and last layers go below 8 bits "
        "(keep_first_last: false).")
