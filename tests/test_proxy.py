"""Cheap candidate evaluation (EcoNAS proxies): the rank statistics, the proxy's cuts, the check, and NetAdapt
scoring its proposals through a proxy."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.methods.prune.netadapt import NetAdaptOptions, netadapt
from squeeze.prune.budget import Resource, resolve_budget
from squeeze.prune.proxy import (CandidateEvaluator, ProxyCheck, ProxyRow, Scored, last_rho, pick_agreement,
                                 proxy_check, rank_agreement, record_rho, resolution_error, scaled_steps)
from squeeze.recipe import Budget
from squeeze.train.config import FineTuneConfig, ProxyConfig


def test_rank_statistics_on_known_rankings():
    same = rank_agreement([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [10, 20, 30, 40, 50, 60])
    assert same.spearman == pytest.approx(1) and same.kendall == pytest.approx(1) and same.top_k_overlap == 1
    assert same.spearman_low <= 1 <= same.spearman_high + 1e-9
    flipped = rank_agreement([6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6])
    assert flipped.spearman == pytest.approx(-1) and flipped.top_k_overlap == 0
    # One swap among 5: rho = 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 120 = 0.9; tau = (9 - 1) / 10.
    swapped = rank_agreement([1, 2, 3, 5, 4], [1, 2, 3, 4, 5])
    assert swapped.spearman == pytest.approx(0.9) and swapped.kendall == pytest.approx(0.8)
    assert swapped.spearman_low < 0.9 <= swapped.spearman_high
    # A proxy that scores every candidate alike cannot rank: rho 0, never "kept".
    assert rank_agreement([0.5] * 5, [1, 2, 3, 4, 5]).spearman == 0
    with pytest.raises(SqueezeError, match="at least 3 candidates"):
        rank_agreement([1, 2], [1, 2])


def test_pick_agreement_counts_the_decisions_a_near_tie_swaps_and_promotion_restores():
    full = [0.90, 0.91, 0.50, 0.40]
    swapped = Scored([0.91, 0.90, 0.50, 0.40], {})  # the near tie at the top the other way round
    assert pick_agreement(Scored(full, {}), full, size=4) == (1.0, 0.0)
    kept, loss = pick_agreement(swapped, full, size=4)
    assert kept == 0 and loss == pytest.approx(0.01)
    # Of the 6 pairs one holds both tied candidates: the proxy picks wrong in 1/6 of 2-proposal iterations.
    kept, loss = pick_agreement(swapped, full, size=2)
    assert kept == pytest.approx(5 / 6, abs=0.03) and loss == pytest.approx(0.01 / 6, abs=0.001)
    # Promoting the proxy's top 2 to the full evaluation makes the full setting's pick every time.
    assert pick_agreement(swapped, full, size=4, promote=2) == (1.0, 0.0)


def test_a_proxy_that_swaps_an_iteration_s_pick_is_not_recommended_however_high_its_rho():
    def row(proxy: ProxyConfig, cost: float, pick_kept: float | None, depth: float = 1.0) -> ProxyRow:
        agreement = rank_agreement([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8])  # rho 1 [1, 1]
        if pick_kept is not None:
            agreement = dataclasses.replace(agreement, pick_size=5, pick_kept=pick_kept, pick_loss=1 - pick_kept)
        return ProxyRow(proxy, cost, cost, agreement, depth)

    cheap, hierarchical = ProxyConfig(eval_fraction=0.25), ProxyConfig(eval_fraction=0.25, promote=3)
    check = ProxyCheck("netadapt", 8, [1.0], [10.0], [row(cheap, 0.6, 0.7), row(hierarchical, 0.7, 0.95)])
    assert [r.proxy for r in check.recommended] == [hierarchical]
    assert check.to_json()["min_pick"] == 0.9
    assert ProxyCheck("amc", 8, [1.0], [10.0], [row(cheap, 0.6, None)]).recommended[0].proxy == cheap  # no pick
    # A proxy must keep the pick at every depth a search passes: kept on the original's cuts is not enough.
    steps = ProxyConfig(iterations_fraction=0.5)
    deep = ProxyCheck("netadapt", 8, [1.0, 0.4], [10.0, 5.0],
                      [row(steps, 0.5, 0.95), row(hierarchical, 0.8, 1.0), row(steps, 0.5, 0.7, 0.4),
                       row(hierarchical, 0.9, 1.0, 0.4)])
    summary = deep.to_json()["recommended"]
    assert summary["label"] == hierarchical.label() and summary["cost_ratio"] == pytest.approx(0.85)
    # A promoting proxy is judged on the pick alone: the search acts on its top 3's full scores, so the order of
    # the rest (rho 0.3 here) decides nothing. Without promotion the same rho rules it out.
    def ranked(proxy, cost, rho_low, pick_kept):
        r = row(proxy, cost, pick_kept)
        return dataclasses.replace(r, agreement=dataclasses.replace(r.agreement, spearman_low=rho_low))

    shallow = ProxyConfig(eval_fraction=0.25, iterations_fraction=0.5, promote=3)
    loose = ProxyCheck("netadapt", 8, [1.0], [10.0], [ranked(shallow, 0.6, 0.3, 0.99), ranked(cheap, 0.5, 0.3, 0.99),
                                                       ranked(hierarchical, 0.9, 0.9, 1.0)])
    assert [r.proxy for r in loose.recommended] == [shallow]
    assert not ranked(shallow, 0.6, 0.9, 0.8).keeps
    from rich.console import Console

    from squeeze.report.render import proxy_view

    console = Console(width=200, record=True)
    console.print(proxy_view({"model": "m", "data": "d", **deep.to_json()}))
    text = console.export_text()
    assert "cut from" in text and "best of 5 kept (pt lost)" in text
    assert f"recommended: {hierarchical.label()} (the best of 5 kept in 100% at every depth; below its top 3 the " \
           "order decides nothing: rho's interval from 1.00, 0.85x the cost)" in text.replace("\n", " ")


def test_a_proxy_cuts_steps_and_samples_and_the_full_setting_cuts_nothing():
    cfg = FineTuneConfig(iterations=100, warmup_iterations=10)
    assert scaled_steps(cfg, 0.25, 50).iterations == 25
    assert scaled_steps(FineTuneConfig(epochs=2), 0.5, 30).iterations == 30
    assert scaled_steps(cfg, 1, 50) is cfg
    assert scaled_steps(cfg, 0.001, 50).iterations == 1
    data = [(torch.zeros(1, 16, 16), i % 10) for i in range(101)]
    full = CandidateEvaluator(data, data, cfg)
    cheap = CandidateEvaluator(data, data, cfg, ProxyConfig(eval_fraction=0.25, iterations_fraction=0.5))
    assert len(full.eval) == 101 and len(cheap.eval) == math.ceil(0.25 * 101)
    assert cheap.eval.indices == CandidateEvaluator(data, data, cfg, ProxyConfig(eval_fraction=0.25)).eval.indices
    assert cheap.cheap_steps.iterations == 50 and full.cheap_steps is cfg
    assert ProxyConfig().label() == "full"
    assert ProxyConfig(eval_fraction=0.5, iterations_fraction=0.25, promote=3).label() == \
        "eval 50%, steps 25%, top 3 promoted"


def test_a_resolution_proxy_needs_global_pooling():
    pooled = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    flat = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 16 * 16, 2))
    assert resolution_error(pooled, (1, 1, 16, 16), 0.5) is None
    assert "8x8 inputs" in resolution_error(flat, (1, 1, 16, 16), 0.5)
    ev = CandidateEvaluator([], [(torch.zeros(1, 16, 16), 0)], None, ProxyConfig(resolution=0.5))
    with pytest.raises(SqueezeError, match="resolution x0.5 does not fit this model"):
        ev.check_model(flat, (1, 1, 16, 16))


@pytest.mark.slow
def test_proxy_check_measures_rank_and_cost(digits_model, digits_data, tmp_path, monkeypatch):
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path))
    proxies = [ProxyConfig(eval_fraction=0.25, iterations_fraction=0.25), ProxyConfig(eval_fraction=0.5)]
    check = proxy_check(digits_model, digits_data, "netadapt", candidates=6,
                        short_term=FineTuneConfig(optimizer="sgd", lr=0.001, iterations=20), proxies=proxies)
    assert [r.proxy for r in check.rows] == proxies and check.full_seconds[0] > 0 and check.depths == [1.0]
    for row in check.rows:
        assert -1 <= row.agreement.spearman <= 1 and row.agreement.n == 6 and row.cost_ratio > 0
        assert row.agreement.pick_size >= 2 and 0 <= row.agreement.pick_kept <= 1 and row.agreement.pick_loss >= 0
    # A quarter of the steps and of the samples costs less than the full evaluation of the same candidates.
    assert check.rows[0].cost_ratio < 1
    best = check.recommended
    assert best is None or all(r.agreement.spearman_low >= 0.8 for r in best)
    record_rho("k", proxies[0], check.rows[0].agreement)
    assert last_rho("k", proxies[0]) == check.rows[0].agreement.spearman and last_rho("k", proxies[1]) is None


def test_amc_candidates_are_whole_policies_scored_without_fine_tune(digits_model, digits_data):
    check = proxy_check(digits_model, digits_data, "amc", candidates=5, short_term=None,
                        proxies=[ProxyConfig(eval_fraction=0.5)])
    assert check.rows[0].agreement.n == 5


def test_netadapt_scores_proposals_through_its_proxy(digits_model, digits_data, monkeypatch):
    import squeeze.prune.proxy as proxy_module

    scored, finished = [], []
    real_score, real_finish = proxy_module.CandidateEvaluator.score, proxy_module.CandidateEvaluator.finish
    monkeypatch.setattr(proxy_module.CandidateEvaluator, "score",
                        lambda self, m: scored.append(len(self.eval)) or real_score(self, m))
    monkeypatch.setattr(proxy_module.CandidateEvaluator, "finish",
                        lambda self, m: finished.append(len(self.full_eval)) or real_finish(self, m))
    resource = Resource("macs")
    budget = resolve_budget(Budget(macs_ratio=0.8), digits_model, resource)
    proxy = ProxyConfig(eval_fraction=0.5, iterations_fraction=0.5, promote=1)
    opts = NetAdaptOptions(initial_reduction=0.1, proxy=proxy,
                           short_term=FineTuneConfig(optimizer="sgd", lr=0.001, iterations=4))
    result = netadapt(digits_model, budget, resource, opts, digits_data)
    n_val = len(digits_data.val)
    # Every proposal on half the validation set; each iteration's best one finished on all of it.
    assert set(scored) == {math.ceil(n_val / 2)} and len(scored) == sum(len(h.proposals) for h in result.history)
    assert finished == [n_val] * len(result.history)


def test_squeeze_proxy_check_prints_the_rank_table_and_refuses_other_methods(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path))
    r = cli("proxy", "check", "zoo:digits-cnn", "--method", "amc", "--data", "digits", "--candidates", "4",
            "--json", tmp_path / "p.json")
    assert r.exit_code == 0, r.stderr
    assert "Spearman rho" in r.stdout and "eval 50%" in r.stdout
    import json

    result = json.loads((tmp_path / "p.json").read_text())
    assert result["candidates"] == 4 and {row["label"] for row in result["rows"]} >= {"eval 50%", "eval 25%"}
    r = cli("proxy", "check", "zoo:digits-cnn", "--method", "uniform", "--data", "digits")
    assert r.exit_code == 2 and "Pass --method netadapt or --method amc." in r.stderr


def test_netadapt_candidates_can_be_cut_from_a_late_iterations_model(digits_model, digits_data, cli, tmp_path):
    from squeeze.prune.graph import prunable_layers
    from squeeze.prune.proxy import _candidates

    widths = lambda m: {g.name: g.out_channels for g in prunable_layers(m, digits_model.example_input())}  # noqa: E731
    full = widths(digits_model.module)
    for module in _candidates(digits_model, "netadapt", 4, 8, seed=0, base_ratio=0.5)[0]:
        cut = widths(module)
        # every prunable layer at half its channels or fewer (the classifier's outputs stay)
        assert cut["fc"] == full["fc"] and all(cut[n] <= full[n] // 2 for n in full if n != "fc")
    r = cli("proxy", "check", "zoo:digits-cnn", "--method", "amc", "--data", "digits", "--from-ratio", "0.5")
    assert r.exit_code == 2 and "AMC's policies always start from the original" in r.stderr
