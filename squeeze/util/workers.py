"""Independent tasks, run one after the other in this process or as Ray tasks.

`Workers()` runs them here, serially. `Workers(workers=N)` starts a local Ray for the run (N CPUs, one task on
each) and `Workers(address="HOST:PORT")` connects to a running cluster (`ray start --head --port=PORT`); either
way Ray is shut down (or disconnected from) when the `with` block ends, Ctrl-C included. What every task of a
batch reads (data sets) is shared once with `share` and passed to each task as its first argument.

Ray is an extra (`pip install 'squeeze[ray]'`), imported only when asked for. Imports no torch.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any

from squeeze.errors import SqueezeError, first_line

__all__ = ["Workers", "RAY_INSTALL"]

RAY_INSTALL = "pip install 'squeeze[ray]'"
# Room for one search's shared data sets; larger objects spill to disk. Small hosts have little memory to spare.
OBJECT_STORE_BYTES = 200 * 1024**2
CONNECT_TIMEOUT_S = 5.0


class Workers:
    """Where a batch of tasks runs: serially here (the default) or on Ray."""

    def __init__(self, workers: int | None = None, address: str | None = None) -> None:
        if workers is not None and address is not None:
            raise SqueezeError("--workers starts a local Ray and --ray-address connects to a running one: give one.",
                               "Drop --workers to use the cluster's CPUs.")
        self.workers, self.address = workers, address
        self.slots = 1  # tasks that run at once
        self._ray: Any = None
        self._remotes: dict[tuple[Callable, int], Any] = {}
        if self.on_ray:  # before any work: a run that cannot have its workers fails at once
            _import_ray()
            if address is not None:
                _check_reachable(address)

    @property
    def on_ray(self) -> bool:
        return self.workers is not None or self.address is not None

    def __enter__(self) -> Workers:
        if not self.on_ray:
            return self
        ray = _import_ray()
        try:
            if self.address is not None:
                ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING)
            else:
                # ERROR: a Ray of our own has nothing to warn the user of (its token set-up is Ray's business).
                ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False,
                         object_store_memory=OBJECT_STORE_BYTES, logging_level=logging.ERROR)
        except Exception as exc:  # Ray raises several kinds (ConnectionError, RuntimeError, ValueError)
            where = f"the Ray cluster at {self.address}" if self.address else f"a local Ray with {self.workers} CPUs"
            fix = ("Check the address (`ray status --address HOST:PORT`) or run without --workers/--ray-address."
                   if not _refused_token(exc) else
                   "The cluster checks a token (Ray's default): connect with RAY_AUTH_MODE=token set and its token "
                   "in ~/.ray/auth_token or $RAY_AUTH_TOKEN.")
            raise SqueezeError(f"Could not start or reach {where} ({first_line(exc)}).", fix) from None
        self._ray = ray
        self.slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._ray is not None:
            self._ray.shutdown()  # a local Ray's processes end with it; a cluster's keep running
            self._ray = None

    def share(self, value: Any) -> Any:
        """`value` as every task of this run receives it: put in Ray's object store once, or itself."""
        return self._ray.put(value) if self._ray is not None else value

    def map(self, fn: Callable[..., Any], shared: Any, tasks: Sequence[tuple], cpus: int = 1,
            on_done: Callable[[], None] = lambda: None) -> list[Any]:
        """`[fn(shared, *task) for task in tasks]`, in order; on Ray, the tasks run at once (`cpus` CPUs each)
        and this waits for all of them, calling `on_done` as each ends. `fn` must be a module-level function
        (workers import it)."""
        if self._ray is None:
            results = []
            for task in tasks:
                results.append(fn(shared, *task))
                on_done()
            return results
        ray = self._ray
        remote = self._remotes.get((fn, cpus))
        if remote is None:
            remote = self._remotes[(fn, cpus)] = ray.remote(num_cpus=cpus)(fn)
        refs = [remote.remote(shared, *task) for task in tasks]
        try:
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)  # a failed task raises here, as soon as it fails
                on_done()
            return ray.get(refs)
        except ray.exceptions.RayTaskError as exc:  # the task's own error, as if it had run here
            raise (exc.cause if isinstance(exc.cause, Exception) else exc) from None
        except ray.exceptions.RayError as exc:
            raise SqueezeError(f"A Ray task was lost ({first_line(exc)}).",
                               "Check the cluster's nodes (`ray status`), or run without --workers/--ray-address.",
                               detail=str(exc)) from None
        except BaseException:  # Ctrl-C: a cluster's workers stop too
            for ref in refs:
                ray.cancel(ref, force=True)
            raise

    def describe(self) -> dict[str, Any]:
        """For the report: where the tasks ran."""
        if not self.on_ray:
            return {"runner": "serial", "workers": 1}
        return {"runner": "ray", "workers": self.slots, "address": self.address or "local"}


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SqueezeError("--workers and --ray-address run tasks on Ray, which is not installed.",
                           f"Install it with `{RAY_INSTALL}`, or run without them (serially).") from None
    return ray


def _refused_token(exc: BaseException | None) -> bool:
    """Whether a failed `ray.init` (or the error under it) was the cluster refusing a missing or wrong token."""
    while exc is not None:
        if "InvalidAuthToken" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _check_reachable(address: str) -> None:
    """Fail at once, not after Ray's own long connection retries, when nothing listens at HOST:PORT."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SqueezeError(f"--ray-address `{address}` is not HOST:PORT.", "Write e.g. --ray-address 127.0.0.1:6379.")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise SqueezeError(f"No Ray cluster answers at {address} ({exc.strerror or exc}).",
                           f"Start one there (`ray start --head --port={port}`) or check the address.") from None
