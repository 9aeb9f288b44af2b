"""Lookup-table batches spread over the boards a target reaches (several boards behind one TVM tracker key).

Each batch is a run of its own (one worker, one board session, the anchor layer timed with it), so entries from
different boards stay comparable through the anchor, as entries from different moments do. The tracker hands
each concurrent request a free board; a batch whose board drops, or that waits out a busy fleet, is queued
again for the boards left. Whole-model comparisons never come here: their interleaved rounds run in one session,
on one board.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

from squeeze.errors import first_line

__all__ = ["run_batches"]

log = logging.getLogger("squeeze.measure")

B = TypeVar("B")
R = TypeVar("R")


def _requeued(exc: BaseException) -> bool:
    """A board went away or stayed busy: another board (or a later try) may run the batch."""
    from squeeze.measure.tvm import BoardError, DeviceDropped

    return isinstance(exc, DeviceDropped) or (isinstance(exc, BoardError) and exc.retryable)


def run_batches(batches: Sequence[B], run: Callable[[B], R], slots: int, done: Callable[[B], None],
                attempts: int = 3) -> list[R]:
    """`run(batch)` for every batch, `slots` at a time; results in the batches' order, `done(batch)` as each
    ends. With one slot the batches run in turn and any error stops the build, as a single board's would."""
    if slots <= 1:
        results = []
        for batch in batches:
            results.append(run(batch))
            done(batch)
        return results
    results: dict[int, R] = {}
    tries = dict.fromkeys(range(len(batches)), 0)
    with ThreadPoolExecutor(max_workers=slots, thread_name_prefix="squeeze-board") as pool:
        pending: dict[Future, int] = {pool.submit(run, batches[i]): i for i in tries}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                i = pending.pop(future)
                exc = future.exception()
                if exc is None:
                    results[i] = future.result()
                    done(batches[i])
                    continue
                tries[i] += 1
                if not _requeued(exc) or tries[i] >= attempts:
                    for other in pending:
                        other.cancel()
                    if _requeued(exc):
                        raise type(exc)(f"{exc.what} The same batch of layers failed {tries[i]} times, on "
                                        "whichever boards were left.", exc.fix) from None
                    raise exc
                log.warning(f"a board failed a batch of {len(batches[i])} layers ({first_line(exc)}); "
                            "it is queued again for the other boards")
                pending[pool.submit(run, batches[i])] = i
    return [results[i] for i in range(len(batches))]
