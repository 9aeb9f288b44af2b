"""Cheap evaluation of search candidates (EcoNAS) and the check that it keeps their ranking.

A search compares candidates; what matters is their order, not their accuracy. EcoNAS (Zhou et al., CVPR
2020) found that reduced settings (fewer samples, fewer epochs, smaller inputs) keep the order well in some
combinations and badly in others, measured by Spearman's rank correlation with the full evaluation. So a proxy
here is an option of the search (`proxy:`), and `squeeze proxy check` measures its rho on the user's model and
data before anyone relies on it; a search records the proxy it used and the last rho measured for it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from squeeze.util.cache import atomic_write_bytes, cache_dir
from squeeze.util.workers import Workers
from squeeze.errors import SqueezeError
from squeeze.train.config import FineTuneConfig, ProxyConfig

__all__ = ["CandidateEvaluator", "RankAgreement", "ProxyCheck", "ProxyRow", "Scored", "rank_agreement",
           "rank_scores", "pick_agreement", "fine_tuned", "task_threads", "proxy_grid", "proxy_check", "record_rho",
           "last_rho", "rho_key", "scaled_steps", "MIN_RHO", "MIN_PICK"]

# EcoNAS keeps a proxy whose Spearman rho with the full setting is at least this (here: all of its interval).
MIN_RHO = 0.8
# NetAdapt keeps only the best proposal of each iteration: a proxy must make the full setting's pick this often.
MIN_PICK = 0.9


def scaled_steps(config: FineTuneConfig, fraction: float, steps_per_epoch: int) -> FineTuneConfig:
    """`config` with its budget cut to `fraction` of its optimizer steps (at least one)."""
    if fraction == 1:
        return config
    total = config.iterations if config.iterations is not None else config.epochs * steps_per_epoch
    return config.model_copy(update={"iterations": max(1, round(fraction * total)), "epochs": None,
                                     "warmup_iterations": min(config.warmup_iterations,
                                                              max(0, round(fraction * total) - 1))})


class _Resized(Dataset):
    """A dataset whose images are scaled by `scale` per side (bilinear, antialiased)."""

    def __init__(self, base: Dataset, scale: float) -> None:
        self.base, self.scale = base, scale

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return F.interpolate(x[None], scale_factor=self.scale, mode="bilinear", antialias=True)[0], y


class CandidateEvaluator:
    """Scores candidates the same way for a whole search: short fine-tune, then top-1 on a fixed held-out
    subset, both cut by the proxy. `finish` completes a promoted candidate to the full setting."""

    def __init__(self, train: Dataset, held_out: Dataset, short_term: FineTuneConfig | None,
                 proxy: ProxyConfig = ProxyConfig(), seed: int = 0) -> None:
        self.proxy, self.short_term = proxy, short_term
        order = np.random.default_rng(seed).permutation(len(held_out))
        self.full_eval = held_out
        self.eval = Subset(held_out, sorted(order[:max(1, math.ceil(proxy.eval_fraction * len(held_out)))].tolist()))
        self.train = train
        if proxy.resolution < 1:
            self.train, self.eval = _Resized(train, proxy.resolution), _Resized(self.eval, proxy.resolution)
        steps_per_epoch = max(1, len(train) // (short_term.batch_size if short_term else 1))
        self.cheap_steps = short_term and scaled_steps(short_term, proxy.iterations_fraction, steps_per_epoch)
        self.rest_steps = short_term and scaled_steps(short_term, 1 - proxy.iterations_fraction, steps_per_epoch)

    def check_model(self, module: torch.nn.Module, input_shape: Sequence[int]) -> None:
        """A resolution proxy needs a model that takes smaller inputs (global pooling before the classifier)."""
        why = resolution_error(module, input_shape, self.proxy.resolution)
        if why:
            raise SqueezeError(f"The proxy's resolution x{self.proxy.resolution:g} does not fit this model: {why}.",
                               "Use resolution 1 for a model without global pooling before its classifier.")

    def accuracy(self, module: torch.nn.Module) -> float:
        """Top-1 on the proxy's held-out subset, without fine-tuning."""
        from squeeze.train import evaluate

        return evaluate(module, self.eval).top1

    def score(self, module: torch.nn.Module) -> float:
        """Fine-tune `module` in place by the proxy's steps (if the search fine-tunes), then its top-1 on the
        proxy's held-out subset."""
        from squeeze.train import fine_tune

        if self.cheap_steps is not None:
            fine_tune(module, self.train, self.cheap_steps, progress=False)
        return self.accuracy(module)

    def finish(self, module: torch.nn.Module) -> float:
        """A promoted candidate: the fine-tune steps the proxy skipped, then top-1 on every held-out sample at
        full resolution."""
        from squeeze.train import evaluate, fine_tune

        if self.short_term is not None and self.proxy.iterations_fraction < 1:
            fine_tune(module, self.full_train, self.rest_steps, progress=False)
        return evaluate(module, self.full_eval).top1

    @property
    def full_train(self) -> Dataset:
        return self.train.base if isinstance(self.train, _Resized) else self.train


def task_threads(workers: Workers, requested: int | None) -> int:
    """Torch threads of each candidate's fine-tune: as requested; else this process's when serial, one on Ray
    (a task holds one CPU). Results depend on the count (summation order), not on where the task runs."""
    return requested or (1 if workers.on_ray else torch.get_num_threads())


def fine_tuned(evaluator: CandidateEvaluator, module: torch.nn.Module, promoted: bool,
               threads: int) -> tuple[dict[str, torch.Tensor], float]:
    """`evaluator.score(module)` (`finish` if `promoted`) as one task, here or on a Ray worker: its weights after
    the fine-tune and its accuracy. `threads` torch threads wherever it runs, so that the result does not depend
    on where (fine_tune seeds itself from its config)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        accuracy = evaluator.finish(module) if promoted else evaluator.score(module)
    finally:
        torch.set_num_threads(before)
    return module.state_dict(), accuracy


def resolution_error(module: torch.nn.Module, input_shape: Sequence[int], scale: float) -> str | None:
    """Why `module` cannot run inputs scaled by `scale` per side; None when it can."""
    if scale == 1:
        return None
    side = [max(1, round(scale * s)) for s in input_shape[2:]]
    try:
        with torch.no_grad():
            copy.deepcopy(module).eval()(torch.zeros(1, *input_shape[1:2], *side))
    except RuntimeError as exc:
        return f"it fails on {'x'.join(map(str, side))} inputs ({str(exc).splitlines()[0]})"
    return None


@dataclass
class Scored:
    """Candidates' scores under a proxy, and the full-setting top-1 of those it promoted (EcoNAS's hierarchical
    schedule: the proxy's best k finish the full evaluation)."""

    proxy: list[float]
    finished: dict[int, float]

    @property
    def ranked(self) -> list[float]:
        """The order the search acts on: promoted candidates by their full score, above every other one."""
        return [1 + self.finished[i] if i in self.finished else s for i, s in enumerate(self.proxy)]


def rank_scores(evaluator: CandidateEvaluator, modules: list[torch.nn.Module], workers: Workers | None = None,
                threads: int | None = None) -> Scored:
    """Each candidate's score under the evaluator's proxy; with `promote`, the proxy's best k finish the full
    evaluation. The candidates are fine-tuned (in place) as tasks of `workers` (default: serially here),
    `threads` torch threads each (`task_threads`)."""
    workers = workers or Workers()
    shared = workers.share(evaluator)
    threads = task_threads(workers, threads)

    def scored(chosen: list[torch.nn.Module], promoted: bool) -> list[float]:
        results = workers.map(fine_tuned, shared, [(m, promoted, threads) for m in chosen], cpus=threads)
        for module, (weights, _) in zip(chosen, results):
            module.load_state_dict(weights)
        return [accuracy for _, accuracy in results]

    scores = scored(modules, False)
    k = evaluator.proxy.promote
    if not k or evaluator.proxy.is_full:
        return Scored(scores, {})
    top = sorted(range(len(scores)), key=lambda i: -scores[i])[:k]
    return Scored(scores, dict(zip(top, scored([modules[i] for i in top], True))))


@dataclass
class RankAgreement:
    """How well a proxy's order of candidates matches the full evaluation's."""

    n: int
    spearman: float
    spearman_low: float
    spearman_high: float
    kendall: float
    top_k: int
    top_k_overlap: float  # share of the full setting's best k that the proxy's best k also holds
    pick_size: int = 0  # candidates one decision compares (NetAdapt: an iteration's proposals); 0: not simulated
    pick_kept: float | None = None  # share of such decisions where the proxy picks the full setting's best
    pick_loss: float | None = None  # mean full-setting top-1 (fraction) such a decision gives up

    def to_json(self) -> dict:
        return asdict(self)


def rank_agreement(proxy: Sequence[float], full: Sequence[float], top_k: int = 3, seed: int = 0) -> RankAgreement:
    """Spearman's rho with a 95% paired-bootstrap interval, Kendall's tau and top-k overlap. A proxy that
    scores every candidate alike cannot rank them: its rho is 0."""
    from scipy import stats

    p, f = np.asarray(proxy, float), np.asarray(full, float)
    if len(p) < 3:
        raise SqueezeError(f"A rank check needs at least 3 candidates (got {len(p)}).", "Pass --candidates 8 or more.")

    def rho(a, b):
        with warnings.catch_warnings():  # a constant resample has no rho: it counts as 0 below
            warnings.simplefilter("ignore", stats.ConstantInputWarning)
            value = stats.spearmanr(a, b).statistic
        return 0.0 if np.isnan(value) else float(value)

    ci = stats.bootstrap((p, f), rho, paired=True, vectorized=False, n_resamples=999, method="percentile",
                         random_state=seed).confidence_interval
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        tau = stats.kendalltau(p, f).statistic
    k = min(top_k, len(p))
    best = lambda s: set(np.argsort(-s, kind="stable")[:k])  # noqa: E731
    return RankAgreement(len(p), rho(p, f), float(np.nan_to_num(ci.low)), float(np.nan_to_num(ci.high, nan=1.0)),
                         0.0 if np.isnan(tau) else float(tau), k, len(best(p) & best(f)) / k)


def pick_agreement(scored: Scored, full: Sequence[float], size: int, promote: int = 0, draws: int = 2000,
                   seed: int = 0) -> tuple[float, float]:
    """How often the proxy makes the full setting's choice where a search keeps one candidate of `size` (NetAdapt,
    the best of each iteration's proposals): over random draws of `size` of the checked candidates, the share in
    which the proxy's pick is the draw's best by the full setting, and the mean full-setting top-1 its pick gives
    up. With `promote`, the pick is the best full score among the proxy's top k of the draw (exact for a proxy
    that cuts only the evaluation; one that cuts steps finishes them later, close to the full run). Rank
    correlation over all candidates does not say this: an iteration's proposals are often near ties."""
    p, f = np.asarray(scored.proxy, float), np.asarray(full, float)
    rng = np.random.default_rng(seed)
    size = min(size, len(p))
    given_up = np.empty(draws)
    for d in range(draws):
        draw = rng.choice(len(p), size, replace=False)
        top = draw[np.argsort(-p[draw], kind="stable")][:max(1, promote)]
        given_up[d] = f[draw].max() - f[top].max()
    return float(np.mean(given_up <= 0)), float(given_up.mean())


def proxy_grid(fine_tunes: bool, resolution_ok: bool) -> list[ProxyConfig]:
    """The proxies `squeeze proxy check` tries: EcoNAS's axes, each cut to a half and a quarter, the
    more-samples-fewer-steps combinations it found to rank best, and hierarchical ones (the top 3 of each
    decision promoted; after an evaluation-only cut, promoted candidates score exactly as in full)."""
    grid = [ProxyConfig(eval_fraction=e) for e in (0.5, 0.25)]
    if fine_tunes:
        grid += [ProxyConfig(eval_fraction=e, iterations_fraction=i) for e, i in ((1, 0.5), (1, 0.25), (0.5, 0.25))]
        grid += [ProxyConfig(eval_fraction=0.5, iterations_fraction=0.25, promote=3),
                 ProxyConfig(eval_fraction=0.25, iterations_fraction=0.5, promote=3),
                 ProxyConfig(eval_fraction=0.25, promote=3)]
    if resolution_ok:
        grid.append(ProxyConfig(eval_fraction=0.5, resolution=0.5))
    return grid


def timed(fn: Callable[[], list[float]]) -> tuple[list[float], float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def fresh(modules: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """Copies to fine-tune, so that every setting starts from the same weights."""
    return [copy.deepcopy(m) for m in modules]


# The last rho measured per (model, data, method, proxy), so that a search can say how far its proxy is trusted.
def _store():
    return cache_dir("proxy") / "rho.json"


def rho_key(model_name: str, data_spec: str, method: str) -> str:
    return f"{model_name}|{data_spec}|{method}"


def record_rho(key: str, proxy: ProxyConfig, agreement: RankAgreement) -> None:
    path = _store()
    known = json.loads(path.read_text()) if path.is_file() else {}
    known[f"{key}|{proxy.model_dump_json()}"] = agreement.spearman
    atomic_write_bytes(path, json.dumps(known, indent=1).encode())


def last_rho(key: str, proxy: ProxyConfig) -> float | None:
    path = _store()
    try:
        return json.loads(path.read_text()).get(f"{key}|{proxy.model_dump_json()}")
    except (OSError, ValueError):  # no check run yet, or a store another version wrote: nothing known
        return None


@dataclass
class ProxyRow:
    proxy: ProxyConfig
    seconds: float
    cost_ratio: float  # this proxy's evaluation time / the full evaluation's, same candidates
    agreement: RankAgreement
    base_ratio: float = 1.0  # the depth: candidates cut from the model at this share of every layer's channels

    @property
    def keeps(self) -> bool:
        """The ranking is kept: the lower end of rho's 95% interval >= 0.8 (a point estimate of a dozen
        candidates can read 0.9 for a proxy whose interval reaches down to 0.5), and where a search keeps one
        candidate per decision, that one too in MIN_PICK of the decisions. A proxy that promotes its top k to
        the full setting for such a search needs the pick only: the search acts on the promoted candidates'
        full scores, and the order of the rest (what rho mostly measures) decides nothing."""
        a = self.agreement
        if a.pick_kept is not None and self.proxy.promote:
            return a.pick_kept >= MIN_PICK
        return a.spearman_low >= MIN_RHO and (a.pick_kept is None or a.pick_kept >= MIN_PICK)

    def to_json(self) -> dict:
        return {"proxy": self.proxy.model_dump(), "label": self.proxy.label(), "base_ratio": self.base_ratio,
                "seconds": round(self.seconds, 2), "cost_ratio": round(self.cost_ratio, 4), **self.agreement.to_json()}


@dataclass
class ProxyCheck:
    method: str
    candidates: int  # at each depth
    depths: list[float]  # the base ratios checked (1: cuts of the original)
    full_seconds: list[float]  # the full evaluation's time at each depth
    rows: list[ProxyRow]

    @property
    def recommended(self) -> list[ProxyRow] | None:
        """The rows of the cheapest proxy (mean cost over the depths) that keeps the ranking at every depth
        checked (a search passes through all of them), if any."""
        by_proxy: dict[ProxyConfig, list[ProxyRow]] = defaultdict(list)
        for row in self.rows:
            by_proxy[row.proxy].append(row)
        kept = [rows for rows in by_proxy.values() if all(r.keeps for r in rows)]
        return min(kept, key=lambda rows: float(np.mean([r.cost_ratio for r in rows]))) if kept else None

    def to_json(self) -> dict:
        best = self.recommended
        summary = best and {"proxy": best[0].proxy.model_dump(), "label": best[0].proxy.label(),
                            "cost_ratio": round(float(np.mean([r.cost_ratio for r in best])), 4),
                            "spearman_low": min(r.agreement.spearman_low for r in best),
                            "pick_size": best[0].agreement.pick_size,
                            "pick_kept": None if best[0].agreement.pick_kept is None else
                            min(r.agreement.pick_kept for r in best)}
        return {"method": self.method, "candidates": self.candidates, "depths": self.depths,
                "full_seconds": [round(s, 2) for s in self.full_seconds],
                "min_rho": MIN_RHO, "min_pick": MIN_PICK, "rows": [r.to_json() for r in self.rows],
                "recommended": summary}


def _candidates(original, method: str, n: int, round_to: int, seed: int, min_ratio: float = 0.2,
                base_ratio: float = 1.0) -> tuple[list, int]:
    """`n` candidates of the kind `method` compares: NetAdapt, one layer cut to a width on its grid (of the
    model with every layer at `base_ratio` of its channels: a later iteration's starting point); AMC, a whole
    policy of per-layer preserve ratios in [min_ratio, 1]. With them, how many candidates one of the method's
    decisions compares: NetAdapt's iteration, one proposal per layer; AMC keeps the best of all (0: no draws)."""
    from squeeze.prune.graph import prunable_layers
    from squeeze.prune.plan import round_width
    from squeeze.prune.search import pruned_candidate, shrinkable, width_grid

    rng = np.random.default_rng(seed)
    if base_ratio < 1:
        if method != "netadapt":
            raise SqueezeError("--from-ratio applies to NetAdapt's candidates (one layer cut from the model the "
                               "search has reached); AMC's policies always start from the original.",
                               "Drop --from-ratio for --method amc.")
        original = pruned_candidate(original, None, base_ratio, "l1", round_to)[0]
    layers = shrinkable(prunable_layers(original.module, original.example_input()), round_to)
    if not layers:
        raise SqueezeError("The model has no prunable layer to build candidates from.",
                           "Check `squeeze info MODEL`: its layers table says why each layer stays.")
    out = []
    for _ in range(n):
        if method == "netadapt":
            layer = layers[rng.integers(len(layers))]
            keep = {layer.name: int(rng.choice(width_grid(layer, round_to)))}
        else:
            keep = {g.name: round_width(max(1, round(rng.uniform(min_ratio, 1) * g.out_channels)), g.out_channels,
                                        round_to, g.channel_step) for g in layers}
        out.append(pruned_candidate(original, None, keep, "l1", round_to)[0].module)
    return out, len(layers) if method == "netadapt" else 0


def proxy_check(original, data, method: str, candidates: int, short_term: FineTuneConfig | None,
                round_to: int = 8, proxies: list[ProxyConfig] | None = None, seed: int = 0,
                on_row: Callable[[ProxyRow], None] = lambda _row: None, base_ratios: Sequence[float] = (1.0,),
                workers: Workers | None = None) -> ProxyCheck:
    """Score `candidates` candidates of `method` under the full setting and under each proxy, with the same
    starting weights; `short_term` is the method's per-candidate fine-tune (None: scored without one).
    At each of `base_ratios` < 1, NetAdapt's candidates are cut from the model at that share of every layer's
    channels, where a late iteration compares them (a proxy that ranks first cuts well may rank late ones
    badly). On `workers`, each setting's candidates are fine-tuned at once."""
    from squeeze import progress

    grid = proxies or proxy_grid(short_term is not None,
                                 resolution_error(original.module, original.input_shape, 0.5) is None)
    rows, full_times = [], []
    with progress.task(f"proxy check ({method})", total=(1 + len(grid)) * len(base_ratios), unit="settings") as step:
        for base_ratio in base_ratios:
            modules, pick_size = _candidates(original, method, candidates, round_to, seed, base_ratio=base_ratio)
            full_ev = CandidateEvaluator(data.train, data.val, short_term, ProxyConfig(), seed)
            full, full_seconds = timed(lambda: rank_scores(full_ev, fresh(modules), workers))
            full_times.append(full_seconds)
            step.advance(1)
            for proxy in grid:
                ev = CandidateEvaluator(data.train, data.val, short_term, proxy, seed)
                scores, seconds = timed(lambda: rank_scores(ev, fresh(modules), workers))
                agreement = rank_agreement(scores.ranked, full.ranked, seed=seed)
                if pick_size:
                    kept, loss = pick_agreement(scores, full.ranked, pick_size, proxy.promote, seed=seed)
                    agreement = dataclasses.replace(agreement, pick_size=pick_size, pick_kept=kept, pick_loss=loss)
                rows.append(ProxyRow(proxy, seconds, seconds / full_seconds, agreement, base_ratio))
                on_row(rows[-1])
                step.advance(1, rho=f"{rows[-1].agreement.spearman:.2f}")
    return ProxyCheck(method, candidates, list(base_ratios), full_times, rows)
