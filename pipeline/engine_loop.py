"""One engine, many callers: the replica's engine runs on its own thread, fed by asyncio callers.

Ray Data runs the Generate stage's async `__call__` for several batches at once on one event
loop; each awaits its images here while a single thread steps the engine, so prompts from every
batch in flight share the same decode steps and the device never waits for the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from cogvlm.engine import Completion, Engine, Request

log = logging.getLogger(__name__)


class EngineBroken(RuntimeError):
    """The engine failed and could not even drop its work (e.g. a sticky device error): this
    process cannot generate any more."""


@dataclass
class _Job:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    count: int
    results: dict[int, Completion] = field(default_factory=dict)


class EngineLoop:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.jobs: dict[int, _Job] = {}
        self._next = 0
        self.broken: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.thread.start()

    async def generate(self, requests: list[Request], pixels: torch.Tensor | None, origin: Any = None,
                       ) -> list[Completion]:
        """All prompts of one image (`pixels` (3, S, S) on the CPU) to completion, in order.
        Raises what the engine raised if it failed while these prompts were in it."""
        return await self.submit([(requests, pixels)], origin)[0]

    def submit(self, images: list[tuple[list[Request], torch.Tensor | None]], origin: Any = None,
               ) -> list[asyncio.Future]:
        """Queue several images at once (they enter the engine together): one future each, which
        resolves to the image's Completions in order. Call from a running event loop."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        if self.broken is not None:
            for f in futures:
                f.set_exception(EngineBroken(f"the engine failed earlier: {self.broken!r}"))
            return futures
        work = []
        for (requests, pixels), future in zip(images, futures):
            if requests:
                work.append((requests, pixels, future))
            else:
                future.set_result([])
        if work:
            self.inbox.put((work, origin, loop))
        return futures

    def stats(self) -> dict[str, Any]:
        e = self.engine
        out: dict[str, Any] = dict(e.stats)
        out["recompiles"] = e.recompiles()
        out["slots"] = e.slots
        out["planned_gb"] = round(e.plan.planned_bytes / 1e9, 3)
        return out

    # the engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # noqa: BLE001 - never leave callers waiting on a dead thread
            log.error("the engine thread stopped: %r", e)
            self.broken = e
            for job in self.jobs.values():
                _settle(job, None, EngineBroken(f"the engine failed: {e!r}"))
            self.jobs.clear()
            while True:  # whatever arrives from now on
                work, origin, loop = self.inbox.get()
                for _, _, future in work:
                    _settle(_Job(loop, future, 0), None, EngineBroken(f"the engine failed: {e!r}"))

    def _serve(self) -> None:
        self.engine.warm_up()  # compile here: CUDA graphs belong to the thread that replays them
        while True:
            block = not self.engine.has_work
            while True:
                try:
                    item = self.inbox.get(block=block)
                except queue.Empty:
                    break
                self._add(*item)
                block = False
            if not self.engine.has_work:
                continue
            try:
                done = self.engine.step()
            except Exception as e:  # noqa: BLE001 - every caller in flight learns it; they retry alone
                log.warning("engine step failed (%s); failing the %d images in flight", type(e).__name__,
                            len(self.jobs))
                lost = {tag for tag, _ in self.engine.abort()}  # if this raises too, the engine is broken
                for tag in lost | set(self.jobs):
                    job = self.jobs.pop(tag, None)
                    if job is not None:
                        _settle(job, None, e)
                continue
            for c in done:
                job = self.jobs.get(c.tag)
                if job is None:
                    continue
                job.results[c.index] = c
                if len(job.results) == job.count:
                    del self.jobs[c.tag]
                    _settle(job, [job.results[i] for i in range(job.count)], None)

    def _add(self, work: list[tuple[list[Request], torch.Tensor | None, asyncio.Future]], origin: Any,
             loop: asyncio.AbstractEventLoop) -> None:
        for requests, pixels, future in work:
            tag = self._next
            self._next += 1
            try:
                self.engine.add(requests, pixels, tag=tag, origin=origin)
            except Exception as e:  # noqa: BLE001 - a request the caller should have checked
                _settle(_Job(loop, future, 0), None, e)
                continue
            self.jobs[tag] = _Job(loop, future, len(requests))


def _settle(job: _Job, result: Any, error: BaseException | None) -> None:
    """Hand a result or an error to the caller's event loop (which may be gone: then nobody waits)."""

    def settle() -> None:
        if job.future.done():  # the caller gave up (cancelled)
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # its loop is closed
        pass
