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

A whole node lost (spot preemption, a killed raylet) is not the image's doing: an attempt that
ran on a node that is dead by the time of the retry is forgotten, as if it never started, so a lost
node costs only its in-flight work and never charges an image (`worker_died`).

A replica that works on several batches at once (the Generate stage) processes an image "alone"
only while no other batch runs in that process (`Gate`), so a death is charged to the right image.
The same actor also gathers each replica's engine statistics for the run summary.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, OrderedDict
from typing import Any, AsyncIterator, Callable

def node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001
        return None


def dead_nodes() -> set[str]:
    """The ids of the cluster's nodes that Ray knows to be dead."""
    import ray

    return {n["NodeID"] for n in ray.nodes() if not n.get("Alive", True)}


class CrashLedger:
    """The per-run memory of images in flight (run as a Ray actor; plain object in tests).

    `dead`: the ids of dead nodes (default: asked of Ray when a retry comes, see `dead_nodes`)."""

    RECENT = 200_000  # attempt counts kept for this many recent images (a retry comes soon)

    def __init__(self, dead: Callable[[], set[str]] | None = None) -> None:
        self.in_flight: Counter = Counter()  # batch attempts started and not finished, per image
        self.alone: dict[str, list[str | None]] = {}  # solo attempts started and not finished: their nodes
        self.attempts: OrderedDict[str, list[str | None]] = OrderedDict()  # batch attempts ever (their
        # nodes), recent images
        self.deaths = 0
        self.lost_to_nodes = 0  # attempts forgotten because their node died
        self.engines: dict[str, dict[str, Any]] = {}  # per replica: its latest engine statistics
        self.dead = dead or dead_nodes

    def _forget_lost(self, ids: list[str]) -> None:
        """Drop the attempts of these images that ran on nodes now dead (not the images' doing)."""
        if not any(self.attempts.get(i) or self.alone.get(i) for i in ids):
            return
        try:
            dead = self.dead()
        except Exception:  # noqa: BLE001 - unknown: every attempt counts, as before
            return
        if not dead:
            return
        for i in ids:
            for book in (self.attempts, self.alone):
                nodes = book.get(i)
                if nodes and any(n in dead for n in nodes):
                    kept = [n for n in nodes if n not in dead]
                    self.lost_to_nodes += len(nodes) - len(kept)
                    book[i] = kept
                    if i in self.in_flight and book is self.attempts:
                        self.in_flight[i] = min(self.in_flight[i], len(kept))

    def begin(self, ids: list[str], node: str | None = None) -> tuple[bool, int]:
        """Start a batch attempt on `node`: (whether these images were seen before, i.e. a worker
        died during or after an earlier attempt on a node still alive; the most attempts any of
        them has had on such nodes)."""
        self._forget_lost(ids)
        retried = any(self.in_flight[i] or self.attempts.get(i) for i in ids)
        for i in ids:
            self.in_flight[i] += 1
            self.attempts[i] = self.attempts.pop(i, []) + [node]
        while len(self.attempts) > self.RECENT:
            self.attempts.popitem(last=False)
        self.deaths += int(retried)
        return retried, max(len(self.attempts[i]) for i in ids)

    def begin_alone(self, image_id: str, node: str | None = None) -> int:
        """Start processing one image alone on `node`; returns how many workers died on it alone
        before (on nodes still alive)."""
        self._forget_lost([image_id])
        self.alone.setdefault(image_id, []).append(node)
        return len(self.alone[image_id]) - 1

    def end(self, ids: list[str]) -> None:
        for i in ids:
            self.in_flight.pop(i, None)
            self.alone.pop(i, None)

    def record_engine(self, worker: str, stats: dict[str, Any]) -> None:
        """The latest cumulative engine statistics of one replica."""
        self.engines[worker] = stats

    def stats(self) -> dict[str, Any]:
        total: Counter = Counter()
        for st in self.engines.values():
            total.update({k: v for k, v in st.items() if isinstance(v, (int, float))})
        return {"retried_batches": self.deaths, "lost_to_nodes": self.lost_to_nodes, "engine": dict(total),
                "replicas": len(self.engines)}


def image_id(stage: str, row: dict[str, Any]) -> str:
    return f"{stage}/{row['shard_id']}/{int(row['image_index'])}"


class Gate:
    """Many batches at once (`shared`), or one image alone (`exclusive`, which waits for the
    running batches to finish and goes before batches that arrive meanwhile)."""

    def __init__(self) -> None:
        self._cond: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    def _condition(self) -> asyncio.Condition:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # asyncio primitives belong to one loop (plain calls make new ones)
            self._cond, self._loop = asyncio.Condition(), loop
        return self._cond

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        cond = self._condition()
        async with cond:
            await cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            async with cond:
                self._shared -= 1
                cond.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        cond = self._condition()
        async with cond:
            self._waiting += 1
            try:
                await cond.wait_for(lambda: not self._exclusive and not self._shared)
            finally:  # cancelled while waiting: no longer in the way of shared holders
                self._waiting -= 1
                cond.notify_all()
            self._exclusive = True
        try:
            yield
        finally:
            async with cond:
                self._exclusive = False
                cond.notify_all()


Rows = list[dict[str, Any]]


async def isolating(ledger: Any, stage: str, rows: Rows, process: Callable[[Rows], AsyncIterator[Rows]],
                    died: Callable[[dict[str, Any], int], Rows], max_crashes: int,
                    gate: Gate | None = None) -> AsyncIterator[Rows]:
    """Output rows of `process(rows)` as they come, or, when these rows were in flight as a
    worker died, of each row alone; `died(row, n)` gives the error rows of an image that killed
    `n` workers while alone. `ledger` is a CrashLedger actor handle, or None (no isolation:
    direct calls in tests); `gate` keeps "alone" alone in a process running several batches."""
    gate = gate or Gate()
    if ledger is None or not rows:
        async with gate.shared():
            async for out in process(rows):
                yield out
        return
    ids = [image_id(stage, r) for r in rows]
    node = node_id()
    retried, attempts = await ledger.begin.remote(ids, node)
    if not retried:
        async with gate.shared():
            async for out in process(rows):
                yield out
        await ledger.end.remote(ids)
        return
    cap = 2 + len(ids) * max_crashes
    for r, i in zip(rows, ids):
        async with gate.exclusive():
            deaths = await ledger.begin_alone.remote(i, node)
            if deaths >= max_crashes or attempts > cap:
                out = died(r, max(deaths, attempts - 1))
            else:
                out = [row async for chunk in process([r]) for row in chunk]
            await ledger.end.remote([i])
        yield out


def process_isolating(ledger: Any, stage: str, rows: Rows, process: Callable[[Rows], Rows],
                      died: Callable[[dict[str, Any], int], Rows], max_crashes: int) -> Rows:
    """`isolating` for a stage that processes one batch at a time, synchronously."""

    async def one(rs: Rows) -> AsyncIterator[Rows]:
        yield process(rs)

    async def collect() -> Rows:
        return [row async for chunk in isolating(ledger, stage, rows, one, died, max_crashes) for row in chunk]

    return asyncio.run(collect())

