"""Isolating inputs that kill their worker process (a decoder segfault, the kernel's OOM killer).

Ray Data restarts a dead actor and retries its task with the same batch, without limit. Alone,
a poison image would loop forever. A small per-run Ray actor remembers which images were being
processed when a worker died:

- a batch none of whose images was in flight before runs normally;
- a batch retried after a death runs one image at a time, each marked before it starts;
- an image that was being processed *alone* when `max_crashes` workers died becomes an error row
  without being touched again, and the rest of the batch goes on.

Every death either happens in a batch's first attempt (then it is isolated) or is charged to
exactly one image, so a batch of n images ends after at most 1 + n * max_crashes attempts. A death
that no image can be charged with (after all images were processed, e.g. while the results are
returned) is bounded too: past 2 + n * max_crashes attempts the batch's images become error rows.
"""

from __future__ import annotations

import os
import signal
from collections import Counter, OrderedDict
from typing import Any, Callable

FAULT_ENV = "COGVLM_FAULT_KILL_WORKER_ON"  # testing hook: "stage:key,..." SIGKILLs that worker


class CrashLedger:
    """The per-run memory of images in flight (run as a Ray actor; plain object in tests)."""

    RECENT = 200_000  # attempt counts kept for this many recent images (a retry comes soon)

    def __init__(self) -> None:
        self.in_flight: Counter = Counter()  # batch attempts started and not finished, per image
        self.alone: Counter = Counter()  # solo attempts started and not finished, per image
        self.attempts: OrderedDict[str, int] = OrderedDict()  # batch attempts ever, recent images
        self.deaths = 0

    def begin(self, ids: list[str]) -> tuple[bool, int]:
        """Start a batch attempt: (whether these images were seen before, i.e. a worker died
        during or after an earlier attempt; the most attempts any of them has had)."""
        retried = any(self.in_flight[i] or self.attempts.get(i, 0) for i in ids)
        for i in ids:
            self.in_flight[i] += 1
            self.attempts[i] = self.attempts.pop(i, 0) + 1
        while len(self.attempts) > self.RECENT:
            self.attempts.popitem(last=False)
        self.deaths += int(retried)
        return retried, max(self.attempts[i] for i in ids)

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
    retried, attempts = ray.get(ledger.begin.remote(ids))
    if not retried:
        out = process(rows)
        ray.get(ledger.end.remote(ids))
        return out
    cap = 2 + len(ids) * max_crashes
    out = []
    for r, i in zip(rows, ids):
        deaths = ray.get(ledger.begin_alone.remote(i))
        if deaths >= max_crashes or attempts > cap:
            out += died(r, max(deaths, attempts - 1))
        else:
            out += process([r])
        ray.get(ledger.end.remote([i]))
    return out
