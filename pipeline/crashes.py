"""Isolating inputs that kill their worker process (a decoder segfault, the kernel's OOM killer).

Ray Data restarts a dead actor and retries its task with the same batch, without limit. Alone,
a poison image would loop forever. A small per-run Ray actor remembers which images were being
processed when a worker died:

- a batch none of whose images was in flight before runs normally;
- a batch retried after a death runs one image at a time, each marked before it starts;
- an image that was being processed *alone* when `max_crashes` workers died becomes an error row
  without being touched again, and the rest of the batch goes on.

Every death either happens in a batch's first attempt (then it is isolated) or is charged to
exactly one image, so a batch of n images ends after at most 1 + n * max_crashes attempts.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from typing import Any, Callable

FAULT_ENV = "COGVLM_FAULT_KILL_WORKER_ON"  # testing hook: "stage:key,..." SIGKILLs that worker


class CrashLedger:
    """The per-run memory of images in flight (run as a Ray actor; plain object in tests)."""

    def __init__(self) -> None:
        self.in_flight: Counter = Counter()  # batch attempts started and not finished, per image
        self.alone: Counter = Counter()  # solo attempts started and not finished, per image
        self.deaths = 0

    def begin(self, ids: list[str]) -> bool:
        """Start a batch attempt; True if any of its images was in flight when a worker died."""
        retried = any(self.in_flight[i] for i in ids)
        for i in ids:
            self.in_flight[i] += 1
        self.deaths += int(retried)
        return retried

    def begin_alone(self, image_id: str) -> int:
        """Start processing one image alone; returns how many workers died on it alone before."""
        self.alone[image_id] += 1
        return self.alone[image_id] - 1

    def end(self, ids: list[str]) -> None:
        for i in ids:
            self.in_flight.pop(i, None)
            self.alone.pop(i, None)

    def stats(self) -> dict[str, int]:
        return {"retried_batches": self.deaths}


def image_id(stage: str, row: dict[str, Any]) -> str:
    return f"{stage}/{row['shard_id']}/{int(row['image_index'])}"


def maybe_inject_fault(stage: str, key: str) -> None:
    """Testing hook: die like a crashing decoder when FAULT_ENV names this stage and key."""
    spec = os.environ.get(FAULT_ENV)
    if spec and f"{stage}:{key}" in spec.split(","):
        os.kill(os.getpid(), signal.SIGKILL)


def process_isolating(ledger: Any, stage: str, rows: list[dict[str, Any]],
                      process: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
                      died: Callable[[dict[str, Any], int], list[dict[str, Any]]],
                      max_crashes: int) -> list[dict[str, Any]]:
    """`process(rows)`, or, when these rows were in flight as a worker died, each row alone;
    `died(row, n)` gives the error rows of an image that killed `n` workers while alone.

    `ledger` is a CrashLedger actor handle, or None (no isolation: direct calls in tests)."""
    if ledger is None or not rows:
        return process(rows)
    import ray

    ids = [image_id(stage, r) for r in rows]
    if not ray.get(ledger.begin.remote(ids)):
        out = process(rows)
        ray.get(ledger.end.remote(ids))
        return out
    out = []
    for r, i in zip(rows, ids):
        deaths = ray.get(ledger.begin_alone.remote(i))
        out += died(r, deaths) if deaths >= max_crashes else process([r])
        ray.get(ledger.end.remote([i]))
    return out
