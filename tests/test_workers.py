"""NetAdapt's proposals fine-tuned and evaluated as Ray tasks (squeeze.util.workers): the same plan, widths and
proposal accuracies as a serial run; Ray is shut down after the search, Ctrl-C included, and leaves no process
behind; a missing Ray, an unreachable cluster and conflicting options are one-paragraph errors.

Budgets are MACs (counted), so no latency reading enters and two runs of the same seed take the same steps.
"""

import json
import sys
import time

import psutil
import pytest
from test_cli import assert_clean_error
from test_resume import saves_until
from typer.testing import CliRunner

from squeeze.cli.app import app
from squeeze.data import load_data
from squeeze.errors import SqueezeError
from squeeze.methods.prune.netadapt import NetAdaptOptions, netadapt
from squeeze.model.loading import load_model
from squeeze.prune.budget import Resource, resolve_budget
from squeeze.recipe import Budget
from squeeze.util.workers import RAY_INSTALL, Workers

NEEDS_RAY = f"Ray is not installed: {RAY_INSTALL}"
# Three iterations on digits-cnn: 10% of the original MACs a step, to 0.7x.
ARGS = ["zoo:digits-cnn", "--macs", "0.7x", "--data", "digits", "--long-term-epochs", "1", "--short-term-iters", "5",
        "--option", "initial_reduction=0.1"]
RAY_PROCESSES = ("raylet", "gcs_server", "ray::", "default_worker", "plasma", "log_monitor", "dashboard", "runtime_env")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def ray_processes() -> list[str]:
    """Ray processes started from this one, once those a shutdown ends have had a moment to go."""
    for _ in range(50):
        left = []
        for p in psutil.Process().children(recursive=True):
            try:
                text = " ".join(p.cmdline()) or p.name()
            except psutil.Error:  # gone meanwhile
                continue
            if any(name in text for name in RAY_PROCESSES):
                left.append(text)
        if not left:
            return []
        time.sleep(0.2)
    return left


def timeless(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.fixture(scope="module")
def digits():
    model = load_model("zoo:digits-cnn")
    return model, load_data("digits", input_shape=model.input_shape)


def search(digits, **options):
    model, data = digits
    resource = Resource("macs")
    budget = resolve_budget(Budget(macs_ratio=0.7), model, resource)
    opts = NetAdaptOptions(initial_reduction=0.1, short_term={"optimizer": "sgd", "lr": 0.001, "iterations": 5},
                           **options)
    return netadapt(model, budget, resource, opts, data)


def test_proposals_on_two_ray_workers_give_the_serial_result(digits):
    pytest.importorskip("ray", reason=NEEDS_RAY)
    import ray

    serial = search(digits, proposal_threads=1)  # a Ray task's count: the result depends on it, not on where
    parallel = search(digits, workers=2)
    assert not ray.is_initialized() and ray_processes() == []
    assert len(serial.history) == 3
    assert timeless([h.__dict__ for h in parallel.history]) == timeless([h.__dict__ for h in serial.history])
    accuracies = [[p["accuracy"] for p in h.proposals] for h in parallel.history]
    assert all(0 < a <= 1 for row in accuracies for a in row) and len(set(map(len, accuracies))) == 1
    assert parallel.model.plans == serial.model.plans
    # The winner goes on from its fine-tuned weights, which came back from a worker.
    for a, b in zip(parallel.model.module.state_dict().values(), serial.model.module.state_dict().values()):
        assert a.equal(b)
    assert serial.extra["evaluation"] == {"runner": "serial", "workers": 1, "proposal_threads": 1}
    assert parallel.extra["evaluation"] == {"runner": "ray", "workers": 2, "address": "local", "proposal_threads": 1}


@pytest.mark.slow
def test_cli_workers_reports_ray_and_a_ctrl_c_shuts_it_down(tmp_path, monkeypatch):
    pytest.importorskip("ray", reason=NEEDS_RAY)
    import ray

    saves_until(monkeypatch, 1)  # Ctrl-C once the first iteration is saved, with the workers running
    r = invoke("prune", *ARGS, "--workers", "2", "--out", tmp_path / "out")
    assert r.exit_code == 130 and "interrupted" in r.stderr
    assert not ray.is_initialized() and ray_processes() == []

    monkeypatch.undo()
    r = invoke("prune", *ARGS, "--workers", "2", "--out", tmp_path / "out", "--resume")
    assert r.exit_code == 0, r.stderr
    record = json.loads((tmp_path / "out" / "report.json").read_text())["stages"][0]["record"]
    assert record["evaluation"] == {"runner": "ray", "workers": 2, "address": "local", "proposal_threads": 1}
    assert len(record["history"]) == 3 and not ray.is_initialized() and ray_processes() == []


HAQ_ARGS = ["zoo:digits-cnn", "--method", "haq", "--size-bytes", "60000", "--data", "digits", "--samples", "32"]


@pytest.mark.parametrize("command", [["prune", *ARGS], ["quantize", *HAQ_ARGS]], ids=["netadapt", "haq"])
def test_workers_without_ray_name_the_extra(tmp_path, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    r = invoke(*command, "--workers", "2", "--out", tmp_path / "out")
    assert_clean_error(r, "not installed", "pip install 'squeeze[ray]'")
    assert "\n\n" not in r.stderr.strip() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["prune", "quantize", "proxy check"])
def test_the_help_of_workers_names_the_extra(command):
    r = invoke(*command.split(), "--help")  # help is Rich markup, where an unescaped [ray] would vanish
    assert r.exit_code == 0 and "'squeeze[ray]'" in " ".join(r.stdout.replace("│", " ").split())


def test_an_unreachable_ray_address_is_a_clear_error(tmp_path):
    pytest.importorskip("ray", reason=NEEDS_RAY)
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = invoke("prune", *ARGS, "--ray-address", f"127.0.0.1:{port}", "--out", tmp_path / "out")
    assert_clean_error(r, f"No Ray cluster answers at 127.0.0.1:{port}", "ray start --head")


def test_a_malformed_ray_address_names_the_flag(tmp_path):
    r = invoke("prune", *ARGS, "--ray-address", "localhost", "--out", tmp_path / "out")
    assert_clean_error(r, "--ray-address `localhost`")


def test_workers_and_a_ray_address_together_are_refused():
    with pytest.raises(SqueezeError, match="give one"):
        Workers(workers=2, address="127.0.0.1:6379")


def test_serial_workers_run_here_in_order():
    with Workers() as w:
        assert not w.on_ray and w.share("data") == "data"
        done = []
        assert w.map(lambda shared, a, b: (shared, a + b), "d", [(1, 2), (3, 4)],
                     on_done=lambda: done.append(1)) == [("d", 3), ("d", 7)]
        assert len(done) == 2 and w.describe() == {"runner": "serial", "workers": 1}


def test_a_task_error_comes_back_as_the_error_itself():
    pytest.importorskip("ray", reason=NEEDS_RAY)
    from squeeze.util.refs import import_ref

    with Workers(workers=1) as w, pytest.raises(SqueezeError, match="no_such_module"):
        w.map(import_ref, "no_such_module:f", [(SqueezeError, "a model")])
    assert ray_processes() == []


@pytest.mark.slow
def test_proxy_ranking_with_promotion_on_ray_equals_serial(digits):
    pytest.importorskip("ray", reason=NEEDS_RAY)
    from squeeze.prune.proxy import CandidateEvaluator, _candidates, fresh, rank_scores
    from squeeze.train.config import FineTuneConfig, ProxyConfig

    model, data = digits
    modules, _ = _candidates(model, "netadapt", 4, 8, seed=0)
    evaluator = CandidateEvaluator(data.train, data.val, FineTuneConfig(optimizer="sgd", lr=0.001, iterations=4),
                                   ProxyConfig(eval_fraction=0.5, iterations_fraction=0.5, promote=2))
    serial = rank_scores(evaluator, fresh(modules))
    with Workers(workers=2) as w:
        assert rank_scores(evaluator, fresh(modules), w) == serial
    assert sum(s > 1 for s in serial.ranked) == 2 == len(serial.finished)  # the promoted two rank above the rest
    assert ray_processes() == []


def test_a_recipe_stage_takes_the_workers(tmp_path):
    from squeeze.errors import RecipeError
    from squeeze.recipe import load_recipe

    good = tmp_path / "good.yaml"
    good.write_text("name: x\nstages:\n  - method: prune.netadapt\n    budget: {macs_ratio: 0.7}\n"
                    "    options: {workers: 2, proposal_threads: 1}\n")
    assert load_recipe(str(good)).stages[0].options == {"workers": 2, "proposal_threads": 1}
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages:\n  - method: prune.netadapt\n    budget: {macs_ratio: 0.7}\n"
                   "    options:\n      ray_address: localhost\n")
    with pytest.raises(RecipeError, match=r"bad.yaml:6: `stages.0.options.ray_address`"):
        load_recipe(str(bad))


@pytest.mark.slow
def test_haq_warmup_policies_scored_on_two_ray_workers_give_the_serial_search(digits, monkeypatch):
    """HAQ's random warm-up episodes are scored at once on Ray; the search then takes the serial run's every step
    (a size budget: no measurement in the search, so two runs can only differ by how they score)."""
    import torch

    from squeeze.measure.protocol import Protocol
    from squeeze.methods.quant.haq import HAQOptions, PolicyScorer, prepare, search
    from squeeze.target import load_target

    model, data = digits
    host = load_target("host-cpu")
    opts = HAQOptions(episodes=6, warmup=4, min_bits=2, samples=32, max_accuracy_drop=3,
                      short_term={"optimizer": "sgd", "lr": 0.001, "iterations": 3})
    setup = prepare(model, data, host, Protocol.for_target(host, repeat=3, warmup=1, min_repeat_ms=2, threads=1),
                    Budget(size_bytes=60_000), opts)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each Ray task uses
    try:
        serial_best, serial, _ = search(setup)
    finally:
        torch.set_num_threads(threads)
    scored = dict(setup._accuracy)
    setup._accuracy.clear()
    here, score = [], PolicyScorer.__call__
    monkeypatch.setattr(PolicyScorer, "__call__", lambda self, names: here.append(names) or score(self, names))
    best, episodes, _ = search(setup, Workers(workers=2))
    warmup = {tuple(e.info["policy"]) for e in serial[:4]}
    assert here == list(dict.fromkeys(tuple(e.info["policy"]) for e in serial[4:] if tuple(e.info["policy"]) not in warmup))
    assert best == serial_best and setup._accuracy == scored
    assert [(e.info["policy"], e.reward, e.actions) for e in episodes] == [
        (e.info["policy"], e.reward, e.actions) for e in serial]
    assert len({tuple(e.info["policy"]) for e in serial[:4]}) > 1  # the warm-up tried several policies
    assert ray_processes() == []
