"""MDP, multi-dimensional pruning (Guo, Ouyang, Xu, CVPR 2020): channels and resolution (and, in a 3D CNN,
time) pruned together, chosen by a search whose loss carries the latency the target has.

Searching stage: each selected conv becomes a multi-branch layer (squeeze.prune.multidim.MultiBranchConv),
one branch per candidate scale (average pool -> the layer's conv, weights shared -> resize back), mixed by
softmax-normalised branch parameters, with a learnable gate per output channel after its BatchNorm. The
loss is CE (or KD from the original) + alpha * branch entropy (pushes each layer to one branch) + eta *
mean |gate| + lambda * max(0, expected cost - the budget's ratio), where the expected cost of a layer is the
branch-probability-weighted price of its configurations (ProxylessNAS-style): the sum of the target's
lookup-table entries (pool, conv at the reduced size, resize) for a latency budget, the conv's MACs for a
MACs budget, as a share of the selected layers' price at full resolution. The hinge presses resolution down
to the budget, not below it: what is left is the channels' to close. Weight steps (train split) and
architecture steps (val split) alternate, DARTS-style.

Pruning stage: each layer keeps its most probable branch; gates are folded into the BatchNorm (or conv)
they scale and the branches collapse to the plain conv. Then the channels with the smallest gates
(averaged over a group's coupled members) are removed, globally, fewest first, by bisection on how many,
until the budget is met as the harness's resource prices it (table or measurement; MACs counted), with the
table re-fitted to a measurement of the choice (table+recalibrate) and the bisection repeated when it reads
over. Fine-tuning stage: the harness's long-term fine-tune, distilled from the original by default.

The result is a "multidim" plan (per conv its scale, plus a channel plan) that replays on the original
architecture; the export runs pool -> conv -> resize where a scale below 1 won.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import Field, field_validator

from squeeze.measure.protocol import LATENCY_TOLERANCE
from squeeze.methods.base import register_pass
from squeeze.methods.prune import PruneOptions, PruneSearch
from squeeze.train.config import FineTuneConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

    from squeeze.data import DataBundle
    from squeeze.model.loading import LoadedModel
    from squeeze.prune.budget import Resource, ResolvedBudget
    from squeeze.prune.multidim import Factors, MultiBranchConv, MultiDimPlan
    from squeeze.prune.search import SearchResult

__all__ = ["MDPOptions", "MDPPass", "BranchPrices", "Gates", "branch_prices", "expected_cost", "mdp",
           "search_stage", "prune_stage"]

NEEDS_DATA = ("MDP needs data (--data): its search trains the branch and gate parameters.",
              "Pass --data digits, a folder of class sub-folders, or package.module:function.")
# Bisections of the channel count, each after re-fitting the table to a measurement of the last choice.
CONFIRM_TRIES = 3


class MDPOptions(PruneOptions):
    spatial_scales: list[float] = Field([1.0, 0.5, 0.25], description="candidate scales of H and W (each 1/k)")
    temporal_scales: list[float] = Field([1.0], description="candidate scales of T for Conv3d layers (each 1/k), "
                                                            "e.g. [1, 0.5]")
    min_side: int = Field(4, ge=1, description="smallest input side (pixels) a conv may be scaled to; in time, "
                                               "at least 2 frames (fashion-cnn's 4x4 stage at 1/4 ran at one pixel "
                                               "and cost 4 pt at 0.5x latency)")
    upsample: Literal["nearest", "bilinear"] = Field("nearest", description="how a reduced output is resized back")
    layers: list[str] | None = Field(None, description="the convs to search (default: every Conv2d/Conv3d)")
    search: FineTuneConfig = Field(FineTuneConfig(optimizer="sgd", lr=0.01, iterations=300),
                                   description="weight steps of the searching stage (one architecture step each)")
    arch_lr: float = Field(0.05, gt=0, description="Adam learning rate of the branch parameters and gates")
    kd: bool = Field(True, description="the search's task loss distils from the original (else plain CE)")
    alpha: float = Field(0.01, ge=0, description="weight of the branch-sparsity term (entropy of each layer's "
                                                  "branch probabilities)")
    eta: float = Field(0.01, ge=0, description="weight of the L1 term on the channel gates (mean |gate|)")
    lambda_latency: float = Field(1.0, ge=0, description="weight of the expected cost above the budget's share "
                                                          "(a share of the selected layers' cost at full resolution)")
    distill: bool = Field(True, description="long-term fine-tune distils from the unpruned model")

    @field_validator("spatial_scales", "temporal_scales")
    @classmethod
    def _reciprocals(cls, scales: list[float]) -> list[float]:
        for s in scales:
            if not 0 < s <= 1 or abs(round(1 / s) * s - 1) > 1e-6:
                raise ValueError(f"a scale must be 1/k for an integer k >= 1, got {s}")
        return scales


@register_pass
class MDPPass(PruneSearch):
    name = "prune.mdp"
    summary = "MDP: channels + spatial/temporal resolution per conv, searched with a lookup-table latency term."
    Options = MDPOptions
    smoke_options = {"search": {"iterations": 2, "batch_size": 16}, "long_term": {"iterations": 2}}

    def run(self, state, ctx):
        from squeeze.errors import DataError
        from squeeze.prune.budget import BudgetError, budget_resource

        # Refused before the harness measures anything.
        if ctx.data is None:
            raise DataError(*NEEDS_DATA)
        if ctx.budget is not None and budget_resource(ctx.budget) == "size_bytes":
            raise BudgetError("MDP trades resolution, which does not change a model's size.",
                              "Pass --macs 0.5x or --latency 0.5x (or use prune.netadapt for a size budget).")
        return super().run(state, ctx)

    def search(self, original, budget, resource, data, recalibrate, log) -> SearchResult:
        return mdp(original, budget, resource, self.options, data, recalibrate, log)


# The search. torch and the engine load when it runs, not when `squeeze list` imports this module.


class BranchPrices:
    """Per searched layer, the price of each candidate branch (ms from the table, or MACs), and the price of
    the selected layers at full resolution that expected costs are a share of."""

    def __init__(self, prices: dict[str, list[float]]) -> None:
        self.prices = prices
        self.full = sum(p[0] for p in prices.values()) or 1.0  # branch 0 is full resolution

    def tensor(self, name: str):
        import torch

        return torch.tensor(self.prices[name], dtype=torch.float64)  # MACs run to 1e9 and more


def _conv_macs(conv, in_shape: tuple[int, ...], factors: Factors) -> float:
    from squeeze.prune.multidim import full_size

    size = [n // f for n, f in zip(in_shape[2:], factors)]
    out = math.prod(full_size(conv, tuple(size)))
    return float(conv.out_channels * out * (conv.in_channels // conv.groups) * math.prod(conv.kernel_size))


def branch_prices(module: nn.Module, shapes: dict[str, tuple[int, ...]], candidates: dict[str, list[Factors]],
                  resource: str, table=None, mode: str = "nearest") -> BranchPrices:
    """Prices of every candidate branch of every searched conv: from `table` (anything with `entries(configs)`
    -> {key: entry with median_ms}) for a latency budget, counted MACs otherwise."""
    from squeeze.prune.multidim import branch_configs

    if resource != "latency_ms":
        return BranchPrices({n: [_conv_macs(module.get_submodule(n), shapes[n], f) for f in fs]
                             for n, fs in candidates.items()})
    configs = {(n, f): branch_configs(module.get_submodule(n), shapes[n], f, mode)
               for n, fs in candidates.items() for f in fs}
    entries = table.entries([c for cs in configs.values() for c in cs])
    return BranchPrices({n: [sum(entries[c.key].median_ms for c in configs[n, f]) for f in fs]
                         for n, fs in candidates.items()})


def expected_cost(layers: dict[str, MultiBranchConv], prices: BranchPrices):
    """sum over layers of sum_i p_i * price_i, as a share of the layers' full-resolution price (a tensor with
    gradients to the branch parameters)."""
    total = sum((layer.probs() * prices.tensor(name)).sum() for name, layer in layers.items())
    return total / prices.full


def _entropy(layers: dict[str, MultiBranchConv]):
    return sum(-(p * p.clamp_min(1e-12).log()).sum() for p in (layer.probs() for layer in layers.values()))


class Gates:
    """The search's channel gates: attached as hooks, then folded into the weights they scale."""

    def __init__(self, module: nn.Module, names: list[str], x: torch.Tensor) -> None:
        from squeeze.prune.multidim import attach_gates

        self.module = module
        self.params, self.targets, self._hooks = attach_gates(module, names, x)

    def l1(self):
        n = sum(g.numel() for g in self.params.values())
        return sum(g.abs().sum() for g in self.params.values()) / n

    def fold(self) -> None:
        """Remove the hooks, multiplying each gate into its BatchNorm's affine (or its conv's output channels):
        the module computes what it computed with the hooks."""
        import torch
        from torch import nn

        for h in self._hooks:
            h.remove()
        with torch.no_grad():
            for name, gate in self.params.items():
                m = self.targets[name]
                if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                    m.weight.mul_(gate)
                    m.bias.mul_(gate)
                else:
                    conv = getattr(m, "conv", m)
                    conv.weight.mul_(gate.view(-1, *([1] * (conv.weight.dim() - 1))))
                    if conv.bias is not None:
                        conv.bias.mul_(gate)


def _factors(scales: list[float]) -> tuple[int, ...]:
    return tuple(sorted({round(1 / s) for s in scales}))


def _batches(dataset, batch_size: int, seed: int):
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) > batch_size,
                        generator=torch.Generator().manual_seed(seed))
    while True:
        yield from loader


def search_stage(original: LoadedModel, data: DataBundle, opts: MDPOptions, prices_for: Callable,
                 cost_target: float = 0.0, log: Callable[[str], None] = lambda _m: None) -> tuple[nn.Module, dict[str, Factors], Gates,
                                                                        dict[str, Any]]:
    """Train the multi-branch network. Returns the supernet collapsed to the original architecture (searched
    weights, gates folded), each layer's most probable factors, the gates, and a record. `cost_target`: the
    expected cost (a share of full resolution) below which the cost term stops pressing."""
    import torch

    from squeeze import progress
    from squeeze.prune.multidim import candidate_factors, collapse, conv_input_shapes, supernet
    from squeeze.train import distillation_loss

    x = original.example_input()
    shapes = conv_input_shapes(original.module, x)
    names = opts.layers or list(shapes)
    unknown = [n for n in names if n not in shapes]
    if unknown:
        from squeeze.prune.plan import PlanError

        raise PlanError(f"MDP's layers {', '.join(map(repr, unknown))} are not Conv2d/Conv3d layers the model runs.",
                        f"Convs: {', '.join(shapes)}.")
    spatial, temporal = _factors(opts.spatial_scales), _factors(opts.temporal_scales)
    candidates = {n: candidate_factors(original.module.get_submodule(n), shapes[n], spatial, temporal, opts.min_side)
                  for n in names}
    prices: BranchPrices = prices_for(original.module, shapes, candidates)
    net, layers = supernet(original.module, x, candidates, opts.upsample)
    gates = Gates(net, names, x)
    arch = [layer.alpha for layer in layers.values()] + list(gates.params.values())
    arch_ids = {id(p) for p in arch}
    cfg = opts.search
    w_opt = torch.optim.SGD([p for p in net.parameters() if id(p) not in arch_ids and p.requires_grad], lr=cfg.lr,
                            momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    a_opt = torch.optim.Adam(arch, lr=opts.arch_lr)
    teacher = original.module.eval() if opts.kd else None
    train, val = _batches(data.train, cfg.batch_size, cfg.seed), _batches(data.val, cfg.batch_size, cfg.seed + 1)
    steps = cfg.iterations or cfg.epochs * math.ceil(len(data.train) / cfg.batch_size)

    def task_loss(xb, yb):
        logits = net(xb)
        with torch.no_grad():
            t = None if teacher is None else teacher(xb)
        return distillation_loss(logits, t, yb, alpha=cfg.distill_alpha if t is not None else 0.0,
                                 temperature=cfg.distill_temperature)

    curve = []
    with torch.random.fork_rng(devices=[]), progress.task("MDP search", total=steps, unit="steps") as bar:
        torch.manual_seed(cfg.seed)
        net.train()
        for step in range(steps):
            w_opt.zero_grad(set_to_none=True)
            task_loss(*next(train)).backward()
            w_opt.step()
            a_opt.zero_grad(set_to_none=True)
            task = task_loss(*next(val))
            cost = expected_cost(layers, prices)
            over = (cost - cost_target).clamp_min(0)
            loss = task + opts.alpha * _entropy(layers) + opts.eta * gates.l1() + opts.lambda_latency * over
            loss.backward()
            a_opt.step()
            curve.append((task.item(), cost.item()))
            bar.advance(1, loss=loss.item(), cost=cost.item())
    net.eval()
    chosen = {n: layer.candidates[int(layer.alpha.argmax())] for n, layer in layers.items()}
    gates.fold()
    collapse(net, layers)
    probs = {n: [round(p, 4) for p in layer.probs().tolist()] for n, layer in layers.items()}
    log("MDP search: " + ", ".join(f"{n} 1/{max(chosen[n])}" for n in names))
    record = {"candidates": {n: [[1 / f for f in fs] for fs in c] for n, c in candidates.items()},
              "branch_probs": probs, "branch_prices": prices.prices,
              "search_curve": {"task_loss": [round(a, 5) for a, _ in curve],
                               "expected_cost": [round(b, 5) for _, b in curve]}}
    return net, chosen, gates, record


class _Pruner:
    """Candidates of the pruning stage: the k smallest-gate channels removed, the chosen scales applied."""

    def __init__(self, original: LoadedModel, searched: nn.Module, factors: dict[str, Factors], gates: Gates,
                 opts: MDPOptions) -> None:
        import torch

        from squeeze.prune.graph import prunable_layers

        self.original, self.searched, self.factors, self.opts = original, searched, factors, opts
        self.x = original.example_input()
        self.groups = [g for g in prunable_layers(searched, self.x) if g.prunable]
        scores: dict[str, torch.Tensor] = {}
        for g in self.groups:  # a group's channel score: the mean |gate| of its gated members
            members = [gates.params[n].detach().abs() for n in (g.name, *g.coupled) if n in gates.params]
            if members:
                scores[g.name] = torch.stack(members).mean(0)
        self.scores = scores
        # every gated channel, least important first: (score, group, channel)
        self.order = sorted((float(s), name, i) for name, ss in scores.items() for i, s in enumerate(ss))
        self.built: dict[int, LoadedModel] = {}

    @property
    def most(self) -> int:
        return len(self.order)

    def widths(self, k: int) -> dict[str, list[int]]:
        """Kept channels per group with the k least important channels removed (rounded up to the grid: the
        highest-scoring channels refill a group)."""
        from squeeze.prune.plan import round_width
        from squeeze.prune.engine import select_channels

        removed: dict[str, int] = {}
        for _, name, _ in self.order[:k]:
            removed[name] = removed.get(name, 0) + 1
        kept = {}
        for g in self.groups:
            if g.name not in self.scores or not removed.get(g.name):
                continue
            width = round_width(g.out_channels - removed[g.name], g.out_channels, self.opts.round_to, g.channel_step)
            if width < g.out_channels:
                kept[g.name] = select_channels(self.scores[g.name], width, g.channel_step)
        return kept

    def plan(self, k: int) -> MultiDimPlan:
        from squeeze.prune.multidim import MultiDimPlan
        from squeeze.prune.plan import ChannelPlan

        kept = self.widths(k)
        channels = ChannelPlan({n: len(i) for n, i in kept.items()}, kept, round_to=self.opts.round_to,
                               importance="mdp_gate") if kept else None
        return MultiDimPlan(dict(self.factors), channels, self.opts.upsample)

    def build(self, k: int) -> LoadedModel:
        from squeeze.model.loading import LoadedModel
        from squeeze.prune.multidim import apply_multidim

        if k not in self.built:
            plan = self.plan(k)
            o = self.original
            self.built[k] = LoadedModel(o.name, o.kind, o.input_shape, apply_multidim(self.searched, plan, self.x),
                                        arch=o.arch, plans=[*o.plans, plan.to_json()], metadata=dict(o.metadata))
        return self.built[k]


def prune_stage(pruner: _Pruner, budget: ResolvedBudget, price: Callable[[LoadedModel], float],
                lo: int = 0) -> tuple[int, float]:
    """The fewest removed channels (from `lo` up) whose model prices under the budget, by bisection (the price
    falls as channels go); raises BudgetError when even the most removed does not."""
    from squeeze.prune.budget import BudgetError

    if price(pruner.build(lo)) <= budget.target:
        return lo, price(pruner.build(lo))
    hi = pruner.most
    top = price(pruner.build(hi))
    if top > budget.target:
        raise BudgetError(f"MDP cannot meet {budget.resource} <= {budget.target:.4g} with the scales it chose: "
                          f"every gated group at its minimum width prices {top:.4g} ({top / budget.original:.3g}x).",
                          "Raise lambda_latency (lower resolutions), allow smaller scales, use a smaller --round-to, "
                          "or ask for less.")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if price(pruner.build(mid)) <= budget.target:
            hi = mid
        else:
            lo = mid
    return hi, price(pruner.build(hi))


def mdp(original: LoadedModel, budget: ResolvedBudget, resource: Resource, opts: MDPOptions,
        data: DataBundle | None, recalibrate: Callable[[LoadedModel], float] | None = None,
        log: Callable[[str], None] = lambda _msg: None) -> SearchResult:
    """Search scales and gates, then prune channels until `budget` is met on `resource`."""
    from squeeze.errors import DataError
    from squeeze.prune.budget import BudgetError
    from squeeze.prune.search import SearchResult

    if data is None:
        raise DataError(*NEEDS_DATA)
    if budget.resource not in ("macs", "latency_ms"):
        raise BudgetError("MDP trades resolution, which does not change a model's size.",
                          "Pass --macs 0.5x or --latency 0.5x.")
    t_start = time.perf_counter()
    table = None
    if budget.resource == "latency_ms":
        from squeeze.measure.lut import LatencyTable

        # The expected latency is always a table sum; whole candidates are priced as the harness decided.
        oracle = resource.oracle
        table = getattr(oracle, "table", None) or LatencyTable(oracle.target, batch_size=oracle.protocol.batch_size)

    def prices_for(module, shapes, candidates):
        return branch_prices(module, shapes, candidates, budget.resource, table, opts.upsample)

    searched, factors, gates, record = search_stage(original, data, opts, prices_for, budget.ratio, log)
    searched_s = time.perf_counter() - t_start
    pruner = _Pruner(original, searched, factors, gates, opts)
    k, predicted = prune_stage(pruner, budget, resource.of)
    if budget.resource == "latency_ms":
        confirm = recalibrate or resource.confirm
        for _ in range(CONFIRM_TRIES):
            measured = confirm(pruner.build(k))
            log(f"MDP: {k} channels removed, predicted {predicted:.4g} ms, measured {measured:.4g} ms")
            if measured <= LATENCY_TOLERANCE * budget.target or k == pruner.most:
                break
            if recalibrate is not None:
                pruner.built = {}  # priced anew with the re-fitted table
            k, predicted = prune_stage(pruner, budget, resource.of, lo=min(k + 1, pruner.most))
    model = pruner.build(k)
    result = SearchResult(model, budget)
    plan = pruner.plan(k)
    widths = {g.name: (len(plan.channels.kept_indices[g.name]) if plan.channels and g.name in plan.channels.keep
                       else g.out_channels) for g in pruner.groups}
    result.extra = {
        **record,
        "scales": {n: [1 / f for f in fs] for n, fs in factors.items()},
        "channels_removed": k,
        "final_predicted": predicted,
        "search_stage_seconds": round(searched_s, 2),
    }
    result.widths_after = widths
    result.search_seconds = time.perf_counter() - t_start
    log(f"MDP: widths {widths}, predicted {budget.resource} {predicted:.4g} (budget {budget.target:.4g})")
    return result
