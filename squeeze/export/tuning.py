"""MetaSchedule tuning with databases in the squeeze cache, keyed by workload + target.

A task is one fused layer as TIR (its shapes, not its weights). Each resolved TVM target has one MetaSchedule
JSON database (`cache_dir("tvm-tuning")/<target digest>/`), shared by every model and pruning candidate
compiled for it: layer shapes recur, so a task is tuned once to the target's `tuning_trials` and reused.
`trials.json` beside the database records how far each workload was tuned (by structural hash). Candidates
are timed where the model will run: here (local runner) or on the board over RPC (direct or tracker).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field

from squeeze.util.cache import atomic_write_bytes, cache_dir
from squeeze import progress
from squeeze.errors import SqueezeError
from squeeze.export.tvm import import_tvm, target_json
from squeeze.target import Target, parse_host_port

__all__ = ["TuningError", "TuningReport", "TuningDatabase", "extract_tasks", "ensure_tuned", "known_tuning"]

_log = logging.getLogger("squeeze.tuning")

# Per candidate, generous: a builder process's first build includes importing TVM (20 s and more on 2 loaded
# cores; MetaSchedule's default of 30 s made every candidate fail there).
BUILD_TIMEOUT_S = 180.0
RUN_TIMEOUT_S = 120.0


class TuningError(SqueezeError):
    pass


@dataclass
class TuningReport:
    tasks: int  # tuning tasks (fused layers) of the model
    tuned: list[str]  # task names tuned by this call
    reused: int  # tasks already tuned far enough in the database
    trials_per_task: int
    seconds: float
    workloads: list[str]  # the model's tasks, by workload key
    database: "TuningDatabase" = field(repr=False)
    state: str = field(init=False)  # how far each workload is tuned: part of the compiled library's cache key

    def __post_init__(self) -> None:
        done = self.database.trials()
        pairs = [(k, done.get(k, {}).get("trials", 0)) for k in sorted(self.workloads)]
        self.state = hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {"method": "metaschedule", "tasks": self.tasks, "tuned_now": self.tuned, "reused": self.reused,
                "trials_per_task": self.trials_per_task, "seconds": round(self.seconds, 1),
                "database": str(self.database.path), "state": self.state}


class TuningDatabase:
    """The MetaSchedule database of one TVM target in the cache, with the trials each workload got."""

    def __init__(self, tvm_target) -> None:
        tvm = import_tvm()
        from tvm.s_tir import meta_schedule as ms

        digest = hashlib.sha256(f"{target_json(tvm_target)}|{tvm.__version__}".encode()).hexdigest()[:16]
        self.path = cache_dir("tvm-tuning") / digest
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path / "target.json", target_json(tvm_target).encode())  # what the digest is of
        self.db = ms.database.JSONDatabase(work_dir=str(self.path), module_equality="structural")
        self._trials_path = self.path / "trials.json"

    def __enter__(self):
        return self.db.__enter__()

    def __exit__(self, *exc) -> None:
        self.db.__exit__(*exc)

    @staticmethod
    def workload_key(mod) -> str:
        import tvm_ffi

        return str(tvm_ffi.structural_hash(mod))

    def trials(self) -> dict[str, dict]:
        return json.loads(self._trials_path.read_text()) if self._trials_path.exists() else {}

    def trials_done(self, mod) -> int:
        return self.trials().get(self.workload_key(mod), {}).get("trials", 0)

    def record(self, mod, task_name: str, trials: int, seconds_per_trial: float) -> None:
        done = self.trials()
        done[self.workload_key(mod)] = {"task": task_name, "trials": trials,
                                        "seconds_per_trial": round(seconds_per_trial, 3)}
        atomic_write_bytes(self._trials_path, json.dumps(done, indent=1, sort_keys=True).encode())

    def seconds_per_trial(self) -> float | None:
        """The median time one trial took in the tunings recorded here (this target, this machine's cache)."""
        times = sorted(r["seconds_per_trial"] for r in self.trials().values() if "seconds_per_trial" in r)
        return times[len(times) // 2] if times else None

    def reload(self) -> None:
        """Re-read the records (another process may have tuned while this one waited for the lock)."""
        from tvm.s_tir import meta_schedule as ms

        self.db = ms.database.JSONDatabase(work_dir=str(self.path), module_equality="structural")

    @contextlib.contextmanager
    def lock(self):
        """One tuner per database at a time (processes of a search, or two commands)."""
        with open(self.path / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def extract_tasks(lowered, tvm_target) -> list:
    """The model's tuning tasks (fused TIR functions not already scheduled), from `lower_for_tuning`'s output."""
    import_tvm()
    from tvm.s_tir.meta_schedule.relax_integration import extract_tasks as ms_extract

    return [t for t in ms_extract(lowered, tvm_target) if not t.mod.attrs.get("tirx.is_scheduled", False)]


def _logger(db: TuningDatabase) -> logging.Logger:
    """MetaSchedule's log goes to a file in the database folder, not to the console."""
    log = logging.getLogger("tvm.s_tir.meta_schedule")
    log.setLevel(logging.INFO)
    log.propagate = False
    path = str(db.path / "tuning.log")
    if not any(getattr(h, "baseFilename", None) == path for h in log.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s"))
        log.addHandler(handler)
    return log


def _export_cross(cross_compiler: str, mod) -> str:
    """Builder export for a board: a shared library made by the cross compiler (no compiler on the board)."""
    from tvm.support.cc import cross_compiler as make

    path = os.path.join(tempfile.mkdtemp(), "candidate.so")
    mod.export_library(path, fcompile=make(cross_compiler))
    return path


def _direct_session(host: str, port: int, session_timeout_s: float, _rpc_config):
    """A board without a tracker: MetaSchedule's RPC runner normally asks a tracker for its session."""
    from tvm import rpc

    return rpc.connect(host, port, session_timeout=session_timeout_s)


def _build_candidate(cross_compiler: str | None, mod, tvm_target) -> str:
    """MetaSchedule's default build, less its import of TVM's tensor intrinsics (42 s per process on 2 loaded
    cores): they are needed to schedule (tensorize), and a candidate arrives here already scheduled."""
    from tvm.driver import build
    from tvm.s_tir.meta_schedule.builder.local_builder import default_export
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    built = build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=tvm_target)
    return _export_cross(cross_compiler, built) if cross_compiler else default_export(built)


def _persistent_builder(cross_compiler: str | None):
    """A builder whose processes live for the whole tuning run: MetaSchedule's LocalBuilder starts fresh ones
    for every batch of candidates, each importing TVM again."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class _Builder(PyBuilder):
        def __init__(self) -> None:
            super().__init__()
            # maximum_process_uses: MetaSchedule restarts builders because long-lived ones leak memory.
            self.pool = PopenPoolExecutor(max_workers=os.cpu_count() or 1, timeout=BUILD_TIMEOUT_S,
                                          maximum_process_uses=64)

        def build(self, build_inputs):
            jobs = [(cross_compiler, b.mod, b.target) for b in build_inputs]
            results = []
            for r in self.pool.map_with_error_catching(lambda job: _build_candidate(*job), jobs):
                if r.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(r.value, None))
                elif r.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"build timed out after {BUILD_TIMEOUT_S:g} s"))
                else:
                    results.append(BuilderResult(None, f"build failed: {r.value}"))
            return results

    return _Builder()


def _builder_and_runner(target: Target):
    from tvm.s_tir import meta_schedule as ms

    builder = _persistent_builder(target.tvm.cross_compiler)
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50,
                                          enable_cpu_cache_flush=target.device != "cuda")
    if target.tvm.runner != "rpc":
        return builder, ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S, evaluator_config=evaluator)
    from squeeze.measure.tvm import connect  # fails early, with the board errors, before any candidate is built

    rpc = target.tvm.rpc
    connect(target, rpc)
    if rpc.tracker:
        host, port = parse_host_port(rpc.tracker, "tracker")
        config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=rpc.key,
                                     session_timeout_sec=int(RUN_TIMEOUT_S))
        return builder, ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator)
    # RPCConfig insists on tracker fields even when the session comes from elsewhere.
    config = ms.runner.RPCConfig(tracker_host="direct", tracker_port=1, tracker_key="direct",
                                 session_timeout_sec=int(RUN_TIMEOUT_S))
    return builder, ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator,
                                        f_create_session=functools.partial(_direct_session, rpc.host, rpc.port,
                                                                           RUN_TIMEOUT_S))


def _progress_callback(advance):
    """A MetaSchedule measure callback that reports each batch of timed candidates."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            advance(len(measure_candidates))

    return _Progress()


def _tune_one(task, db: TuningDatabase, trials: int, builder, runner, log, advance) -> bool:
    """Tune one task by `trials` more trials; True when the database now holds a valid schedule for it."""
    from tvm.s_tir import meta_schedule as ms

    # The search evolves a population of schedules ranked by the cost model, of which `trials` are measured.
    # MetaSchedule's 512 suits hundreds of trials; for a few dozen a smaller one finds as good a schedule
    # and costs a fraction of the time (a 512 search took ~55 s per round for one small conv here).
    strategy = ms.search_strategy.EvolutionarySearch(population_size=min(512, max(128, 16 * trials)))
    ctx = ms.TuneContext(mod=task.dispatched[0], target=task.target, space_generator="post-order-apply",
                         search_strategy=strategy, task_name=task.task_name, logger=log, rand_state=0,
                         num_threads="physical").clone()
    ms.tune_tasks(tasks=[ctx], task_weights=[1.0], work_dir=str(db.path), max_trials_global=trials,
                  max_trials_per_task=trials, num_trials_per_iter=min(64, trials), builder=builder, runner=runner,
                  database=db.db,
                  measure_callbacks=[*ms.MeasureCallback.create("default"), _progress_callback(advance)],
                  task_scheduler=ms.TaskScheduler.create("round-robin"))
    workload = db.db.commit_workload(task.dispatched[0])
    return bool(db.db.get_top_k(workload, 1))


def _tuning_estimate(layers: int, trials: int, total: int, seconds_per_trial: float | None, target: Target) -> str:
    """What the user is told before tuning starts: how much, and how long by this machine's earlier tunings."""
    what = f"tuning {layers} layers x {trials} trials on {target.name} ({total} trials to run)"
    if seconds_per_trial is None:
        return (f"{what}; no tuning has been timed on this machine yet, so no estimate: the bar's time left appears "
                "after the first trials. Tuned layers are kept, so this is paid once per layer shape.")
    minutes = total * seconds_per_trial / 60
    return (f"{what}, {'under a minute' if minutes < 1 else f'~{minutes:.0f} min'} on this machine "
            f"(by its earlier tunings, {seconds_per_trial:.1f} s per trial)")


def _tune_pending(pending: list, db: TuningDatabase, target: Target, of_tasks: int) -> tuple[list[str], list[str]]:
    """Tune each pending task by the trials it lacks, reported as one progress task in trials (the label names
    the layer being tuned); returns (tuned, failed) names."""
    trials = target.tvm.tuning_trials
    missing = [trials - db.trials_done(t.dispatched[0]) for t in pending]
    builder, runner = _builder_and_runner(target)
    log = _logger(db)
    tuned, failed = [], []
    _log.info(_tuning_estimate(len(pending), trials, sum(missing), db.seconds_per_trial(), target))
    with progress.task(f"tuning {len(pending)} of {of_tasks} layers of {target.name}", total=sum(missing),
                       unit="trials") as step:
        for i, (task, extra) in enumerate(zip(pending, missing), 1):
            step.describe(f"tuning layer {i}/{len(pending)} ({task.task_name})")
            t0 = time.perf_counter()
            if _tune_one(task, db, extra, builder, runner, log, step.advance):
                db.record(task.dispatched[0], task.task_name, trials, (time.perf_counter() - t0) / extra)
                tuned.append(task.task_name)
            else:
                failed.append(task.task_name)
    return tuned, failed


def ensure_tuned(lowered, tvm_target, target: Target) -> TuningReport:
    """Tune the tasks of `lowered` that the database lacks, or has with fewer trials (by the difference);
    reuse the rest."""
    trials = target.tvm.tuning_trials
    db = TuningDatabase(tvm_target)
    tasks = extract_tasks(lowered, tvm_target)
    t0 = time.perf_counter()
    tuned, failed = [], []
    if any(db.trials_done(t.dispatched[0]) < trials for t in tasks):
        with db.lock():
            db.reload()
            pending = [t for t in tasks if db.trials_done(t.dispatched[0]) < trials]
            if pending:
                tuned, failed = _tune_pending(pending, db, target, len(tasks))
    if failed:
        raise TuningError(
            f"MetaSchedule found no valid schedule for {len(failed)} layer(s) of the model on `{target.name}` "
            f"({', '.join(failed)}) in {trials} trials; every candidate failed to build or run.",
            f"See {db.path / 'tuning.log'}. Re-run (layers tuned so far are kept), raise `tvm.tuning_trials`, or "
            "set `tvm.tuning: none` to measure untuned code (labelled untuned).",
        )
    workloads = [db.workload_key(t.dispatched[0]) for t in tasks]
    return TuningReport(len(tasks), tuned, len(tasks) - len(tuned), trials, time.perf_counter() - t0, workloads, db)


def known_tuning(workloads: list[str], tvm_target, target: Target) -> TuningReport | None:
    """A model whose workloads are known (from an earlier build) and all tuned far enough: no lowering needed."""
    db = TuningDatabase(tvm_target)
    done = db.trials()
    if any(done.get(k, {}).get("trials", 0) < target.tvm.tuning_trials for k in workloads):
        return None
    return TuningReport(len(workloads), [], len(workloads), target.tvm.tuning_trials, 0.0, workloads, db)

