"""The measurement protocol: every latency figure says how it was taken."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field

from squeeze.target import Target

__all__ = ["CONTENDED", "CONTENTION_TRIES", "LATENCY_TOLERANCE", "QUIET_FIT", "Protocol"]

# A latency budget is met by a reading within this of it: readings of one model vary about 2% between runs
# on a quiet machine. Every search and the final verdict allow the same.
LATENCY_TOLERANCE = 1.02

# A ratio is not the same on a contended machine: when a co-tenant (another VM on the host, invisible to the load
# average) slows the 2 cores, a small model slows more than a large one (per-kernel thread hand-offs wait on a
# stolen core). Seen here: one ShuffleNet plan read 0.73-0.75x of the original in runs where the original took
# 3.9-4.2 ms, and 0.78-0.81x in runs where it took 6-7 ms, each interval +-2%. A run whose probe (a ratio's
# reference, a table batch's anchor layer) took over CONTENDED x its fastest run so far was contended: it is
# taken again, at most CONTENTION_TRIES runs, and the least contended is kept; in a spell (every try
# contended), one run each until one is quiet (oracle.Quietest).
CONTENDED = 1.2
CONTENTION_TRIES = 3
# A lookup table's recalibration (TableOracle.recalibrate) is fitted only on a reading whose run found the original
# within this of its fastest: its ratio enters the price of every later candidate. On a 2-core EPYC, RegNet-like
# plans read at 1.12-1.14x put the plans priced after them 3-13% slow, where the table alone was within 2%.
QUIET_FIT = 1.1


class Protocol(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    warmup: int = Field(10, ge=0, description="untimed runs before timing")
    repeat: int = Field(30, ge=3, description="timed samples per model")
    min_repeat_ms: float = Field(20.0, ge=0, description="a sample loops the model until at least this long")
    threads: int = Field(1, ge=1, description="intra-op threads, fixed so runs compare")
    batch_size: int = Field(1, ge=1)
    seed: int = Field(0, description="seeds the random input tensor")

    @classmethod
    def for_target(cls, target: Target, **overrides) -> "Protocol":
        base = target.protocol.model_dump()
        base["threads"] = target.threads or os.cpu_count() or 1
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)
