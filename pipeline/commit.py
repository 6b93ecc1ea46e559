"""The driver's commit policy: part records in, committed shards out.

    PartTracker   a shard is complete when its part records cover every one of its images
    ErrorGuard    holds the first commits until the first images are judged (one bad setting
                  must not commit millions of error rows)
    Committer     a Ray task merges a complete shard's parts into its data file, then the
                  ledger marker is written and the claim released; `result()` says what it did

A shard with a transient failure left (network, throttling, out of memory, after retries) is not
committed: the run ends non-zero naming it and a rerun redoes it. The same holds for a commit that
fails transiently past `retry.deadline_s` (the output store throttles or is unreachable): its shard
is left and the run goes on, unless STORE_DOWN_AFTER commits in a row failed so (the store is down:
the run stops taking work, exit 3). A commit that cannot work (a full disk, no permission) stops
the run (exit 1).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable

from .claims import Claiming
from .config import JobConfig
from .errors import DOWNLOAD_ERROR, OutputDown, RunStopped, describe, is_transient, redact, root_cause
from .faults import kill_after_commits, kill_driver
from .ledger import Ledger
from .progress import Progress
from .rows import TOTAL_UNKNOWN
from .sink import delete_parts

log = logging.getLogger("pipeline")

COMMIT_THREADS = 8  # shards merged and marked at once (each waits on a Ray task and two writes)
STORE_DOWN_AFTER = 3  # commits in a row failing transiently past retry.deadline_s: the store is down


@dataclasses.dataclass
class ShardParts:
    """What the driver knows of one shard in flight: its parts and the images they cover."""

    shard_id: str
    parts: list[str] = dataclasses.field(default_factory=list)
    images: set[int] = dataclasses.field(default_factory=set)
    total: int = TOTAL_UNKNOWN  # known once the reader's last block of the shard is through
    transient: str | None = None  # a transient failure's message: the shard is left for a rerun
    failures: dict[int, tuple[str, str]] = dataclasses.field(default_factory=dict)  # image -> (status, message)


class PartTracker:
    """Part records in, complete shards out: a shard is complete when its parts cover every one
    of its images. Records repeated by a re-run batch add no image twice."""

    def __init__(self) -> None:
        self.open: dict[str, ShardParts] = {}
        self.finished: set[str] = set()
        self.late: list[str] = []  # parts written for shards already complete (a re-run batch's)

    def add(self, rec: dict[str, Any]) -> ShardParts | None:
        sid = str(rec["shard_id"])
        if sid in self.finished:
            if rec["part"]:
                self.late.append(str(rec["part"]))
            return None
        sp = self.open.setdefault(sid, ShardParts(sid))
        if rec["part"]:
            sp.parts.append(str(rec["part"]))
        sp.images.update(json.loads(rec["images"]))
        if int(rec["shard_total"]) != TOTAL_UNKNOWN:
            sp.total = int(rec["shard_total"])
        if rec["transient"] and sp.transient is None:
            sp.transient = str(rec["transient"])
        for i, status, msg in json.loads(rec["failures"]):
            sp.failures.setdefault(int(i), (status, msg))
        if sp.total != TOTAL_UNKNOWN and len(sp.images) >= sp.total:
            self.finished.add(sid)
            return self.open.pop(sid)
        return None


class ErrorGuard:
    """Stops a run whose first images mostly fail the same way (wrong credentials, wrong column,
    unreachable store) before it commits them: shards are held until `images` images are in
    (or the stream ends with at least MIN_IMAGES), then judged once."""

    MIN_IMAGES = 10

    def __init__(self, images: int, share: float) -> None:
        self.limit, self.share = images, share
        self.decided = images <= 0
        self.seen = 0
        self.kinds: Counter = Counter()
        self.example: dict[tuple[str, str], str] = {}

    def add(self, images: int, failures: list[tuple[str, str]]) -> None:
        """`images` more images, of which `failures` (status, message) failed. img2dataset's
        failed downloads are not images: they count neither way."""
        self.seen += images
        for status, msg in failures:
            if status == DOWNLOAD_ERROR:
                self.seen -= 1
                continue
            kind = (status, msg.split(":", 1)[0][:80])
            self.kinds[kind] += 1
            self.example.setdefault(kind, msg)

    def ready(self, stream_ended: bool) -> bool:
        return not self.decided and (self.seen >= self.limit or (stream_ended and self.seen >= self.MIN_IMAGES))

    def verdict(self) -> str | None:
        """A one-line reason to stop, or None; decides once."""
        self.decided = True
        if not self.kinds:
            return None
        kind, n = self.kinds.most_common(1)[0]
        if n <= self.share * self.seen:
            return None
        return (f"stopped before committing anything: {n} of the first {self.seen} images failed with "
                f"{kind[0]} ({redact(self.example[kind])[:300]}). Fix the cause (credentials, column "
                f"names, input paths) and rerun, or raise errors.guard_share to accept such rows")


@dataclasses.dataclass
class Commits:
    """What a run committed and left: the Committer's result."""

    t0: float  # the run's start (time.perf_counter)
    counts: Counter = dataclasses.field(default_factory=Counter)  # rows by status
    images: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    committed: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # shard -> why it was left
    first_commit: tuple[float, int] | None = None  # (seconds after t0, images committed by then)
    failed_downloads_skipped: int = 0  # img2dataset's failed downloads left out (input.failed_downloads: skip)


class Committer:
    """Commits complete shards on COMMIT_THREADS threads: a Ray task merges a shard's parts into
    its data file (`sink.merge_parts`, which retries its reads and writes), then the ledger marker
    is written (`Ledger.mark`, which retries) and the claim released. Shards with transient
    failures are left uncommitted; commits wait until the error guard has judged the first images."""

    def __init__(self, cfg: JobConfig, ledger: Ledger, claiming: Claiming, run_id: str, t0: float,
                 progress: Progress | None = None, carry: Any = None) -> None:
        """`carry`: the carried columns' schema (`readers.carried_schema`), for the merge."""
        import ray

        from .sink import merge_parts

        self.tasks_pass = ledger.layout.tasks_pass  # the pass of added tasks this run commits, if any
        self.merge_options = {"carry": carry, "skip_failed_downloads": cfg.input.failed_downloads == "skip",
                              "tasks_pass": self.tasks_pass}
        self.cfg, self.ledger, self.claiming, self.run_id, self.progress = cfg, ledger, claiming, run_id, progress
        self.commits = Commits(t0)
        self.merge = ray.remote(num_cpus=0, max_retries=3)(merge_parts)
        self.guard = ErrorGuard(cfg.errors.guard_images, cfg.errors.guard_share)
        self.held: list[tuple[ShardParts, str]] = []
        self.kill_after = kill_after_commits()
        self.pool = ThreadPoolExecutor(COMMIT_THREADS, thread_name_prefix="commit")
        self.running: set[Future] = set()
        self.lock = threading.Lock()
        self.refused = 0  # commits failed transiently since the last one that worked
        self.down: str | None = None  # why the output store is taken as down (OutputDown, raised once)
        self.stopping = False

    def result(self) -> Commits:
        return self.commits

    def shard_done(self, sp: ShardParts, source: str) -> None:
        if sp.transient is not None:
            self.commits.failed[sp.shard_id] = sp.transient
            log.error("shard %s left uncommitted (a rerun redoes it): rows failed transiently: %s",
                      sp.shard_id, redact(sp.transient))
            self.claiming.release(sp.shard_id)
            return
        if self.guard.decided:
            self._submit(sp, source)
            return
        self.guard.add(len(sp.images), list(sp.failures.values()))
        self.held.append((sp, source))
        if self.guard.ready(stream_ended=False):
            self._judge()

    def check(self) -> None:
        """Raise the first failed commit's error (RunStopped), or OutputDown once the store is down."""
        for f in [f for f in self.running if f.done()]:
            self.running.discard(f)
            f.result()
        if self.down is not None and not self.stopping:
            raise OutputDown(self.down)

    def stream_ended(self) -> None:
        if self.guard.ready(stream_ended=True):
            self._judge()
        for sp, source in self.held:
            self._submit(sp, source)
        self.held = []
        self.drain()

    def drain(self) -> None:
        while self.running:
            wait(self.running, return_when=FIRST_COMPLETED)
            self.check()

    def stop(self) -> None:
        """The run stops taking work (StoppedShort): wait for the commits in flight."""
        self.stopping = True
        self.held = []
        self.drain()

    def leave(self, shard_ids: list[str], why: str) -> None:
        """The run stops short: these shards, unless committed, are left for a rerun (their
        claims released, their parts removed by the rerun that claims them)."""
        self.held = []
        done = set(self.commits.committed)
        for sid in shard_ids:
            if sid not in done and sid not in self.commits.failed:
                self.commits.failed[sid] = why
                self.claiming.release(sid)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _judge(self) -> None:
        reason = self.guard.verdict()
        if reason is not None:
            raise RunStopped(reason)
        for sp, source in self.held:
            self._submit(sp, source)
        self.held = []

    def _submit(self, sp: ShardParts, source: str) -> None:
        self.running.add(self.pool.submit(self._commit, sp, source))

    def _commit(self, sp: ShardParts, source: str) -> None:
        import ray

        c, sid, out = self.commits, sp.shard_id, self.cfg.output.path
        try:
            rec = ray.get(self.merge.remote(out, self.cfg.s3, self.cfg.retry, sid, source, sp.parts, self.run_id,
                                            **self.merge_options))
            self.ledger.mark(rec)
        except Exception as e:  # noqa: BLE001 - the store is down or full: stop with one line
            log.debug("commit of shard %s failed", sid, exc_info=True)  # the traceback: with --debug
            e = root_cause(e)  # a Ray task's error: the exception it raised
            if _quietly(lambda: self.ledger.is_done(sid)):  # another run (that took the claim over) committed it
                log.warning("shard %s was committed by another run meanwhile", sid)
                return
            if is_transient(e):  # the store throttles or is unreachable: the shard is left for a rerun
                self._refused(sid, e)
                return
            raise RunStopped(f"could not commit shard {sid} to {redact(out)}: {describe(e)}. "
                             f"{len(c.committed)} shards were committed by this run and are kept; "
                             f"rerun to finish") from None
        delete_parts(out, self.cfg.s3, sid, tasks_pass=self.tasks_pass)
        self.claiming.release(sid)
        with self.lock:
            self.refused = 0
            c.counts.update(rec["status"])
            c.images += rec["images"]
            c.prompt_tokens += rec["prompt_tokens"]
            c.output_tokens += rec["output_tokens"]
            c.failed_downloads_skipped += rec.get("failed_downloads_skipped", 0)
            c.committed.append(sid)
            if c.first_commit is None:
                c.first_commit = (time.perf_counter() - c.t0, c.images)
            log.info("shard %s committed: %d images, %d rows %s (%d committed)", sid, rec["images"],
                     rec["rows"], rec["status"], len(c.committed))
            if self.kill_after and len(c.committed) >= self.kill_after:
                kill_driver()
        if self.progress is not None:
            self.progress.add_shard(rec["images"], Counter(rec["status"]), sid, c.first_commit)
            self.progress.report()

    def _refused(self, sid: str, e: BaseException) -> None:
        """A commit failed transiently past the deadline: leave its shard (its parts stay for the
        rerun's claim to sweep); STORE_DOWN_AFTER such failures in a row: the store is down."""
        why = f"could not commit to {redact(self.cfg.output.path)} within retry.deadline_s={self.cfg.retry.deadline_s:g}: " \
              f"{describe(e)}"
        with self.lock:
            self.commits.failed[sid] = why
            self.refused += 1
            if self.refused >= STORE_DOWN_AFTER and self.down is None:
                self.down = f"the output store refused {self.refused} commits in a row ({describe(e)})"
        log.error("shard %s left uncommitted (a rerun redoes it): %s", sid, why)
        self.claiming.release(sid)


def _quietly(check: Callable[[], bool]) -> bool:
    """`check()`, or False if it raises (the store may be what failed)."""
    try:
        return check()
    except Exception:  # noqa: BLE001
        return False
