"""Resumable searches: a run's progress, saved after every search iteration, and the checks that `--resume`
continues the same run.

A run keeps its progress in `<out>.partial/` (squeeze.outputs.partial_dir), outside the output folder's
all-or-nothing staging: Ctrl-C or a crash leaves it, a run that writes its outputs removes it.

    run.json                 {"version": 1, "fingerprint": {what the run depends on, as the user gave it}}
    stage-<i>/state.json     stage i's search after its last finished iteration (plain JSON: plan, history...)
    stage-<i>/weights-<n>.pt that iteration's fine-tuned state_dict and the RNG states (loads weights_only)
    stage-<i>/finished.json  once stage i has finished: its report entry and the plan of the model it passed on
    stage-<i>/finished.pt    that model's state_dict (after its long-term fine-tune)

state.json names its weights file and is replaced after that file is written, so a stop at any moment leaves
a matching pair; finished.json is written after finished.pt.

A resumed run must match the stopped one in the model, data, budget and target, and in every stage up to the
last one that saved something; later stages may differ. So when a later stage fails (int8 measured not faster,
say), the user fixes its options and `--resume` reuses the finished search instead of repeating it.
"""

from __future__ import annotations

import io
import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from squeeze.errors import SqueezeError
from squeeze.methods import list_passes
from squeeze.outputs import partial_dir
from squeeze.preprocessing import Preprocessing
from squeeze.prune.budget import ResolvedBudget
from squeeze.util.cache import atomic_write_bytes, sha256_file

if TYPE_CHECKING:
    from squeeze.measure.lut import TableOracle
    from squeeze.methods.base import ModelState, Pass
    from squeeze.model.loading import LoadedModel
    from squeeze.recipe import Recipe

__all__ = ["RunCheckpoint", "StageCheckpoint", "SearchProgress", "keep_finished", "open_run", "reuse_finished",
           "run_fingerprint"]

log = logging.getLogger("squeeze.prune")

VERSION = 1
RUN_FILE, STATE_FILE = "run.json", "state.json"
FINISHED_FILE, FINISHED_WEIGHTS = "finished.json", "finished.pt"
STAGE_KEYS = ("methods", "method options", "stage budgets")  # the fingerprint's per-stage lists


def run_fingerprint(recipe: Recipe, model_spec: str, weights: str | None, input_shape: tuple[int, ...] | None,
                    target: str, data_spec: str | None, preprocessing: Preprocessing | None) -> dict[str, Any]:
    """What a run's result depends on, as JSON: model (a file by its content), data, methods and their options,
    budget, target. A resumed run must match the stopped one in every value."""
    section = recipe.data
    return {
        "model": {"spec": model_spec, "sha256": _file_digest(model_spec), "weights": weights,
                  "weights sha256": _file_digest(weights), "input shape": list(input_shape) if input_shape else None},
        "data": {"spec": data_spec or (section.spec if section else None),
                 **(preprocessing or Preprocessing()).over(section.preprocessing() if section else None).to_json()},
        "methods": [stage.method for stage in recipe.stages],
        "method options": [stage.typed_options().model_dump(mode="json") for stage in recipe.stages],
        "budget": recipe.budget.model_dump(mode="json", exclude_none=True) if recipe.budget else None,
        "target": target,
        # Only where a stage has one, so that progress saved before stages could have budgets still resumes.
        **({"stage budgets": [s.budget.model_dump(mode="json", exclude_none=True) if s.budget else None
                              for s in recipe.stages]} if any(s.own_budget for s in recipe.stages) else {}),
    }


def _file_digest(spec: str | None) -> str | None:
    return sha256_file(Path(spec)) if spec and Path(spec).is_file() else None


@dataclass
class RunCheckpoint:
    """A run's progress folder; `stage(i)` is where resumable stage i saves, None for the others."""

    folder: Path
    fingerprint: dict[str, Any]
    resume: bool
    resumable_stages: set[int] = field(default_factory=set)

    def stage(self, index: int) -> StageCheckpoint | None:
        return StageCheckpoint(self, self.folder / f"stage-{index}") if index in self.resumable_stages else None

    def kept(self) -> list[int]:
        """The stages a stopped run saved something of (progress or a finished result), ascending."""
        saved = {p.parent.name for name in (FINISHED_FILE, STATE_FILE) for p in self.folder.glob(f"stage-*/{name}")}
        return sorted(int(name.removeprefix("stage-")) for name in saved if name.removeprefix("stage-").isdigit())

    def discard(self) -> None:
        """The run wrote its outputs: its progress is of no more use."""
        if self.resumable_stages:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _write_run_file(self, replace: bool = False) -> None:
        path = self.folder / RUN_FILE
        if replace or not path.exists():
            run = {"version": VERSION, "fingerprint": self.fingerprint}
            atomic_write_bytes(path, json.dumps(run, indent=2).encode())
            log.info(f"progress is saved after every iteration in {self.folder}: if the run stops, the same command "
                     "with --resume continues it")


def open_run(out_dir: Path, fingerprint: dict[str, Any], passes: list[type[Pass]], resume: bool,
             force: bool) -> RunCheckpoint:
    """The progress folder of a run writing to `out_dir`, checked before any work: `resume` needs a resumable
    method, a stopped run's progress and the same fingerprint; a fresh run does not replace a stopped run's
    progress unless `force`."""
    folder = partial_dir(out_dir)
    stages = {i for i, p in enumerate(passes) if p.resumable}
    if resume and not stages:
        names = ", ".join(p.name for p in passes)
        resumable = ", ".join(p.name for p in list_passes() if p.resumable)
        raise SqueezeError(f"--resume: {names} cannot continue a stopped run (the methods that save their progress "
                           f"as they go: {resumable}).", "Run it again without --resume; it starts over.")
    run = RunCheckpoint(folder, json.loads(json.dumps(fingerprint)), resume, stages)
    if resume:
        later = _check_same_run(folder, run.fingerprint, (run.kept() or [-1])[-1] + 1)
        if later:
            log.info("stages after the ones the stopped run kept differ from its (they run as given now): "
                     + "; ".join(later))
            run._write_run_file(replace=True)
    elif stages and folder.exists():
        if not force:
            raise SqueezeError(f"{folder} holds the progress of a stopped run writing to {out_dir}.",
                               "Add --resume to continue it, or --force to start over (its progress is replaced).")
        shutil.rmtree(folder)
    return run


def _check_same_run(folder: Path, fingerprint: dict[str, Any], kept: int) -> list[str]:
    """Refuse a resume whose arguments differ from the stopped run's in anything its first `kept` stages
    depend on; return the differences in the later stages."""
    path = folder / RUN_FILE
    if not path.exists():
        raise SqueezeError(f"--resume: nothing to resume, no stopped run left its progress in {folder}.",
                           "Run the command without --resume.")
    try:
        saved = json.loads(path.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _damaged(folder, exc) from None
    differences = _differences(_first_stages(saved, kept), _first_stages(fingerprint, kept), "")
    if differences:
        raise SqueezeError("--resume continues a stopped run with the same arguments, and these differ from the "
                           f"stopped run's: {'; '.join(differences)}.",
                           "Pass the stopped run's arguments again, or start over without --resume (with --force, "
                           "which replaces its progress).")
    return _differences(saved, fingerprint, "")


def _first_stages(fingerprint: dict[str, Any], n: int) -> dict[str, Any]:
    """The fingerprint of the run's first n stages: everything but the later stages' methods, options, budgets."""
    count = len(fingerprint.get("methods") or [])
    lists = {key: (fingerprint.get(key) or [None] * count)[:n] for key in STAGE_KEYS}
    return {**{k: v for k, v in fingerprint.items() if k not in STAGE_KEYS}, **lists}


def _differences(saved: Any, now: Any, path: str) -> list[str]:
    """Dotted paths where two fingerprints differ, with both values."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [d for key in sorted(set(saved) | set(now))
                for d in _differences(saved.get(key), now.get(key), f"{path}.{key}" if path else key)]
    # The list of methods reads best whole; options and the like by their index
    if isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now) and path != "methods":
        return [d for i, (a, b) in enumerate(zip(saved, now)) for d in _differences(a, b, f"{path}[{i}]")]
    return [] if saved == now else [f"{path} ({json.dumps(saved)} then, {json.dumps(now)} now)"]


def _damaged(folder: Path, exc: Exception) -> SqueezeError:
    return SqueezeError(f"The progress kept in {folder} cannot be read ({type(exc).__name__}: {exc}).",
                        "Start over without --resume, with --force (which replaces it).")


@dataclass
class StageCheckpoint:
    """Where one resumable stage saves its search's state."""

    run: RunCheckpoint
    folder: Path

    def load(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The JSON state and the tensors a stopped run saved for this stage; None: the stage starts afresh."""
        state_path = self.folder / STATE_FILE
        if not self.run.resume or not state_path.exists():
            return None
        try:
            state = json.loads(state_path.read_text())
            tensors = torch.load(self.folder / state["weights"], weights_only=True)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise _damaged(self.run.folder, exc) from None
        return state, tensors

    def finished(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """What a stopped run kept of this stage once it had finished it: the report entry (with the plan of the
        model it passed on) and that model's state_dict. None: the stage runs."""
        path = self.folder / FINISHED_FILE
        if not self.run.resume or not path.exists():
            return None
        try:
            return json.loads(path.read_text()), torch.load(self.folder / FINISHED_WEIGHTS, weights_only=True)
        except (OSError, ValueError, TypeError, RuntimeError) as exc:
            raise _damaged(self.run.folder, exc) from None

    def save_finished(self, entry: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
        """The stage has finished: keep its result (a later stage may still stop the run), drop its search's
        progress."""
        self.run._write_run_file()
        buffer = io.BytesIO()
        torch.save(weights, buffer)
        atomic_write_bytes(self.folder / FINISHED_WEIGHTS, buffer.getvalue())
        atomic_write_bytes(self.folder / FINISHED_FILE, json.dumps(entry).encode())
        for old in [self.folder / STATE_FILE, *self.folder.glob("weights-*.pt")]:
            old.unlink(missing_ok=True)

    def save(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        self.run._write_run_file()
        name = f"weights-{state['iteration']}.pt"
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        atomic_write_bytes(self.folder / name, buffer.getvalue())
        atomic_write_bytes(self.folder / STATE_FILE, json.dumps({**state, "weights": name}).encode())
        for old in self.folder.glob("weights-*.pt"):
            if old.name != name:
                old.unlink(missing_ok=True)


def reuse_finished(checkpoint: StageCheckpoint | None, state: ModelState) -> dict[str, Any] | None:
    """The report entry a stopped run kept for this stage, with `state` set to the model the stage passed on;
    None: the stage runs."""
    done = checkpoint.finished() if checkpoint else None
    if done is None:
        return None
    from squeeze.prune.plan import plan_from_json
    from squeeze.prune.search import replayed_model

    saved, weights = done
    state.model, state.artifact = replayed_model(state.model, plan_from_json(saved["plan"]), weights), None
    entry = saved["entry"]
    log.info(f"{entry['method']}: the stopped run's result is reused ({entry['seconds']:.0f} s then)")
    return entry


def keep_finished(checkpoint: StageCheckpoint | None, received: LoadedModel, state: ModelState,
                  entry: dict[str, Any]) -> None:
    """Keep a finished stage's result for a resume, where it is a pruned torch model (a plan on `received`)."""
    if checkpoint is not None and state.artifact is None and len(state.model.plans) == len(received.plans) + 1:
        checkpoint.save_finished({"entry": entry, "plan": state.model.plans[-1]}, state.model.module.state_dict())


class SearchProgress:
    """A search's view of its stage checkpoint. To what the search saves after an iteration it adds the RNG
    states (torch, numpy, python), the lookup table's fitted state and the resolved budget, and on resume it
    puts them back, so that the run goes on as if it had not stopped."""

    def __init__(self, checkpoint: StageCheckpoint, table: TableOracle | None = None) -> None:
        self.checkpoint, self.table = checkpoint, table
        self.saved = checkpoint.load()
        self.resolved: ResolvedBudget | None = None

    def budget(self, resolved: ResolvedBudget) -> ResolvedBudget:
        """The stopped run's budget when resuming: a latency budget is resolved from a measurement, which a
        second run would take anew."""
        self.resolved = ResolvedBudget(**self.saved[0]["budget"]) if self.saved else resolved
        return self.resolved

    def restore(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The search's saved state and state_dict (None: start afresh), with the RNG and the table as they
        were when it was saved."""
        if self.saved is None:
            return None
        state, tensors = self.saved
        _set_rng_state(tensors["rng"])
        if self.table is not None and state["table"] is not None:
            self.table.constant_ms = state["table"]["constant_ms"]
            self.table.reference_ms = state["table"]["reference_ms"]
        return state["search"], tensors["weights"]

    def save(self, search_state: dict[str, Any], weights: dict[str, Any]) -> None:
        """After an iteration: `search_state` (JSON; its `iteration` is the next one to run) and the current
        model's state_dict."""
        table = None if self.table is None else {"constant_ms": self.table.constant_ms,
                                                  "reference_ms": self.table.reference_ms}
        state = {"iteration": search_state["iteration"], "budget": asdict(self.resolved), "table": table,
                 "search": search_state}
        self.checkpoint.save(state, {"weights": weights, "rng": _rng_state()})


def _rng_state() -> dict[str, Any]:
    """The global RNG states as tensors and plain values (numpy's array would need an unsafe load)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
