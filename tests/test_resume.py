"""Resumable NetAdapt: a search stopped after an iteration and continued with `--resume` reaches the plan and
history of a run that never stopped; a resume with other arguments, without a stopped run, or of a method that
does not save its progress is refused.

Budgets are MACs (counted), so two runs of the same seed take the same steps; a stop is a KeyboardInterrupt
raised just after an iteration's progress is saved (what Ctrl-C does between two iterations).
"""

import json
import shutil

import pytest
import torch
from test_cli import assert_clean_error
from typer.testing import CliRunner

from squeeze.cli.app import app
from squeeze.outputs import partial_dir
from squeeze.prune.resume import SearchProgress

# Three iterations on digits-cnn: 10% of the original MACs a step, to 0.7x.
ARGS = ["zoo:digits-cnn", "--macs", "0.7x", "--data", "digits", "--long-term-epochs", "1", "--short-term-iters", "5",
        "--option", "initial_reduction=0.1"]
RECIPE = """\
name: prune-digits
budget: {macs_ratio: 0.7}
data: digits
stages:
  - method: prune.netadapt
    options:
      initial_reduction: 0.1
      short_term: {iterations: 5}
      long_term: {epochs: 1}
"""


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def saves_until(monkeypatch, stop_after: int | None) -> list[int]:
    """Record the iterations whose progress is saved; stop the run (Ctrl-C) once `stop_after` are done."""
    saved, save = [], SearchProgress.save

    def save_then_stop(self, search_state, weights):
        save(self, search_state, weights)
        saved.append(search_state["iteration"])
        if search_state["iteration"] == stop_after:
            raise KeyboardInterrupt

    monkeypatch.setattr(SearchProgress, "save", save_then_stop)
    return saved


def record(out):
    rep = json.loads((out / "report.json").read_text())
    return rep, rep["stages"][0]["record"]


def timeless(history):
    """The search's steps without their wall-clock seconds (which no two runs share)."""
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "out"
    r = invoke("prune", *ARGS, "--out", out)
    assert r.exit_code == 0, r.stderr
    return record(out)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped after its first iteration: its output folder (never written) and its progress."""
    out = tmp_path_factory.mktemp("stopped") / "out"
    with pytest.MonkeyPatch.context() as mp:
        saves_until(mp, 1)
        r = invoke("prune", *ARGS, "--out", out)
    assert r.exit_code == 130 and "interrupted" in r.stderr
    return out


def test_a_resumed_prune_reaches_the_plan_and_history_of_an_uninterrupted_one(uninterrupted, tmp_path, monkeypatch):
    rep_whole, rec_whole = uninterrupted
    assert len(rec_whole["history"]) == 3
    out = tmp_path / "out"
    saved = saves_until(monkeypatch, 2)
    r = invoke("prune", *ARGS, "--out", out)
    assert r.exit_code == 130 and saved == [1, 2]
    assert not out.exists() and (partial_dir(out) / "stage-0" / "weights-2.pt").is_file()

    saved.clear()
    r = invoke("prune", *ARGS, "--out", out, "--resume")
    assert r.exit_code == 0, r.stderr
    assert saved == [3]  # only the iteration the stopped run had left
    rep, rec = record(out)
    assert rec["plan"] == rec_whole["plan"] and rec["widths"] == rec_whole["widths"]
    assert timeless(rec["history"]) == timeless(rec_whole["history"])
    # The same weights went into the long-term fine-tune: the shipped model scores the same.
    assert rep["final"]["macs"] == rep_whole["final"]["macs"] <= 0.7 * rep["original"]["macs"]
    assert rep["accuracy"]["final_top1"] == rep_whole["accuracy"]["final_top1"]
    assert not partial_dir(out).exists()  # a finished run leaves no progress behind


def test_the_progress_is_plain_json_and_weights_that_load_without_pickle(stopped, uninterrupted):
    stage = partial_dir(stopped) / "stage-0"
    assert sorted(p.name for p in stage.iterdir()) == ["state.json", "weights-1.pt"]
    state = json.loads((stage / "state.json").read_text())
    first = uninterrupted[1]["history"][0]
    search = state["search"]
    assert state["iteration"] == search["iteration"] == 1 and state["table"] is None
    assert state["budget"] == uninterrupted[1]["budget"]
    assert search["plan"]["keep"] == {first["layer"]: first["width_after"]}
    assert timeless(search["history"]) == timeless([first])
    tensors = torch.load(stage / "weights-1.pt", weights_only=True)
    assert tensors["weights"][f"{first['layer'].removesuffix('.0')}.0.weight"].shape[0] == first["width_after"]
    assert set(tensors["rng"]) == {"torch", "numpy", "python"}
    run = json.loads((partial_dir(stopped) / "run.json").read_text())
    assert run["fingerprint"]["budget"] == {"macs_ratio": 0.7} and run["fingerprint"]["target"] == "host-cpu"


def test_squeeze_run_resumes_a_recipe(uninterrupted, tmp_path, monkeypatch):
    recipe = tmp_path / "prune.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    saved = saves_until(monkeypatch, 1)
    assert invoke("run", recipe, "zoo:digits-cnn", "--out", out).exit_code == 130
    r = invoke("run", recipe, "zoo:digits-cnn", "--out", out, "--resume")
    assert r.exit_code == 0, r.stderr
    assert saved == [1, 2, 3]
    assert record(out)[1]["plan"] == uninterrupted[1]["plan"]


@pytest.mark.parametrize("flag, value, needle", [
    ("--macs", "0.6x", "budget.macs_ratio (0.7 then, 0.6 now)"),
    ("--option", "initial_reduction=0.2", "method options[0].initial_reduction (0.1 then, 0.2 now)"),
    ("--data", "fashion-mnist", 'data.spec ("digits" then, "fashion-mnist" now)'),
    ("--target", "host-tvm", 'target ("host-cpu" then, "host-tvm" now)'),
], ids=["budget", "option", "data", "target"])
def test_resume_with_other_arguments_names_what_differs(stopped, flag, value, needle):
    args = list(ARGS)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    progress = partial_dir(stopped) / "stage-0" / "state.json"
    before = progress.read_text()
    r = invoke("prune", *args, "--out", stopped, "--resume")
    assert_clean_error(r, "--resume continues a stopped run with the same arguments", needle,
                       "Pass the stopped run's arguments again")
    assert not stopped.exists() and progress.read_text() == before


def test_a_fresh_run_does_not_replace_a_stopped_runs_progress_unasked(stopped, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(partial_dir(stopped), partial_dir(out))
    r = invoke("prune", *ARGS, "--out", out)
    assert_clean_error(r, f"{partial_dir(out)} holds the progress of a stopped run", "Add --resume to continue it",
                       "--force to start over")
    assert not out.exists() and (partial_dir(out) / "stage-0" / "weights-1.pt").is_file()


def test_force_starts_over(stopped, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(partial_dir(stopped), partial_dir(out))
    saved = saves_until(monkeypatch, 1)
    assert invoke("prune", *ARGS, "--out", out, "--force").exit_code == 130
    assert saved == [1]  # from the first iteration again (a resume would have saved iteration 2 first)


def test_resume_without_a_stopped_run_says_there_is_nothing_to_resume(tmp_path):
    recipe = tmp_path / "prune.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    for command in (["prune", *ARGS], ["run", recipe, "zoo:digits-cnn"]):
        r = invoke(*command, "--out", out, "--resume")
        assert_clean_error(r, "--resume: nothing to resume, no stopped run left its progress in "
                              f"{partial_dir(out)}.", "Run the command without --resume.")
    assert not out.exists() and not partial_dir(out).exists()


def test_resume_of_a_recipe_without_a_resumable_stage_says_so(tmp_path):
    r = invoke("run", "bench-host", "zoo:digits-cnn", "--out", tmp_path / "out", "--resume")
    assert_clean_error(r, "--resume: export.onnx, measure.latency cannot continue a stopped run")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["amc", "uniform"])
def test_a_method_that_does_not_save_its_progress_refuses_resume(tmp_path, method):
    out = tmp_path / "out"
    r = invoke("prune", "zoo:digits-cnn", "--method", method, "--macs", "0.5x", "--out", out, "--resume")
    assert_clean_error(r, f"--resume: prune.{method} cannot continue a stopped run (the methods that save their "
                          "progress as they go: prune.netadapt).", "Run it again without --resume; it starts over.")
    assert not out.exists() and not partial_dir(out).exists()


def test_progress_puts_back_the_rng_states_the_table_fit_and_the_budget(tmp_path):
    import random
    from types import SimpleNamespace

    import numpy as np

    from squeeze.prune.budget import ResolvedBudget
    from squeeze.prune.resume import RunCheckpoint

    def draws():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]

    table = SimpleNamespace(constant_ms=0.25, reference_ms=2.5)
    run = RunCheckpoint(tmp_path / "out.partial", {"target": "host-cpu"}, resume=False, resumable_stages={0})
    progress = SearchProgress(run.stage(0), table)
    assert progress.budget(ResolvedBudget("latency_ms", 2.5, 1.25)) == ResolvedBudget("latency_ms", 2.5, 1.25)
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    progress.save({"iteration": 4, "plan": None}, {"w": torch.ones(2)})
    expected = draws()

    table.constant_ms, table.reference_ms = 0.0, 3.1  # a new run's table, measured anew
    resumed = SearchProgress(RunCheckpoint(run.folder, run.fingerprint, True, {0}).stage(0), table)
    # The stopped run's budget, not the one this run resolved from its own measurement.
    assert resumed.budget(ResolvedBudget("latency_ms", 3.1, 1.55)) == ResolvedBudget("latency_ms", 2.5, 1.25)
    state, weights = resumed.restore()
    assert state == {"iteration": 4, "plan": None} and torch.equal(weights["w"], torch.ones(2))
    assert (table.constant_ms, table.reference_ms) == (0.25, 2.5)
    assert draws() == expected


def test_damaged_progress_is_a_clear_error(stopped, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(partial_dir(stopped), partial_dir(out))
    (partial_dir(out) / "run.json").write_text("{not json")
    r = invoke("prune", *ARGS, "--out", out, "--resume")
    assert_clean_error(r, f"The progress kept in {partial_dir(out)} cannot be read (JSONDecodeError",
                       "Start over without --resume, with --force")
    assert not out.exists()


TWO_STAGES = RECIPE + """\
  - method: prune.uniform
    budget: {macs_ratio: %s}
    options:
      long_term: {epochs: 1}
"""


def test_a_later_stage_that_fails_keeps_the_search_before_it_for_a_resume(uninterrupted, tmp_path, monkeypatch):
    """The user fixes the failing stage's options; --resume reuses the finished NetAdapt instead of repeating it."""
    recipe, out = tmp_path / "two.yaml", tmp_path / "out"
    recipe.write_text(TWO_STAGES % 0.01)
    saved = saves_until(monkeypatch, None)
    r = invoke("run", recipe, "zoo:digits-cnn", "--out", out)
    assert_clean_error(r, "budget", f"The stages before it are kept in {partial_dir(out)}: the same command with "
                       "--resume (once fixed) reuses them and starts at stage 2 (prune.uniform).")
    assert saved == [1, 2, 3] and not out.exists()
    assert sorted(p.name for p in (partial_dir(out) / "stage-0").iterdir()) == ["finished.json", "finished.pt"]

    recipe.write_text(TWO_STAGES % 0.5)
    saved.clear()
    r = invoke("run", recipe, "zoo:digits-cnn", "--out", out, "--resume")
    assert r.exit_code == 0, r.stderr
    assert saved == []  # NetAdapt did not run again
    rep = json.loads((out / "report.json").read_text())
    assert rep["stages"][0]["record"]["plan"] == uninterrupted[1]["plan"]
    assert rep["stages"][1]["method"] == "prune.uniform" and rep["final"]["macs"] <= 0.5 * rep["original"]["macs"]
    assert not partial_dir(out).exists()

    # What the kept stage depends on may not change: the first stage's options are still compared.
    recipe.write_text((TWO_STAGES % 0.01).replace("initial_reduction: 0.1", "initial_reduction: 0.2"))
    assert invoke("run", recipe, "zoo:digits-cnn", "--out", tmp_path / "b").exit_code == 2
    recipe.write_text(TWO_STAGES % 0.5)
    r = invoke("run", recipe, "zoo:digits-cnn", "--out", tmp_path / "b", "--resume")
    assert_clean_error(r, "method options[0].initial_reduction (0.2 then, 0.1 now)")
