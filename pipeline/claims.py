"""Leases on shards, so that concurrent runs on one output split the pending work instead of
doubling it: `Claims` (the objects under `<out>/_claims/`) and `ClaimKeeper` (one run's holder).

A run claims a shard just before it reads it (`ClaimKeeper.claim`, called from the read task),
so a run holds only the shards it has in progress: claiming costs nothing up front, the
heartbeat rewrites only those claims, and a run that starts later finds the rest unclaimed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

from . import errors
from .actors import on_driver_node
from .config import JobConfig, RetryConfig, S3Config
from .errors import describe, redact
from .layout import OutputLayout
from .ledger import Ledger
from .listing import Shard
from .storage import create_exclusive, filesystem, is_s3, put_conditional, to_uri, write_bytes_atomic

log = logging.getLogger("pipeline")

MINE, BUSY, DONE = "mine", "busy", "done"  # ClaimKeeper.claim's answers
REFRESH_THREADS = 16  # claims rewritten at once by a heartbeat round
_STRIPES = 256  # per-shard locks, striped so that their number stays fixed


class ClaimError(RuntimeError):
    """A shard could not be claimed: the output store kept failing (one line)."""


class Claims:
    """Leases on shards so that concurrent runs split the pending work instead of doubling it.

    A claim is created exclusively (S3 conditional PUT / an exclusive hard link). Its owner
    rewrites it every `ttl_s / 3` (`refresh`) and deletes it after the commit; a claim not
    refreshed for `ttl_s` (its run died), or whose process on this machine is gone, may be taken
    over. Taking over and refreshing are read-check-write steps made atomic: on S3 the write is
    conditional on the ETag that was read (`If-Match`), locally both hold a file lock. So of two
    runs racing for one expired claim exactly one gets it, and an owner that was too slow to
    refresh learns that its claim was taken instead of overwriting it. Even if two runs did process
    one shard, its output file name is deterministic, so rows are never duplicated.
    """

    def __init__(self, fs: Any, root: str, run_id: str, ttl_s: float = 600.0,
                 threads: int = REFRESH_THREADS, tasks_pass: str = "") -> None:
        self.fs, self.root, self.run_id, self.ttl_s = fs, root, run_id, ttl_s
        self.threads = max(1, threads)
        self.layout = OutputLayout(root, tasks_pass)
        self.held: set[str] = set()
        self._lock = threading.Lock()  # guards `held`
        # the heartbeat must not rewrite a claim being released: one lock per shard (striped)
        self._shard_locks = [threading.Lock() for _ in range(_STRIPES)]
        self.s3 = is_s3(to_uri(fs, root))

    def _path(self, shard_id: str) -> str:
        return self.layout.claim(shard_id)

    def _shard_lock(self, shard_id: str) -> threading.Lock:
        return self._shard_locks[hash(shard_id) % _STRIPES]

    def _record(self) -> bytes:
        now = dt.datetime.now(dt.timezone.utc).timestamp()
        return json.dumps({"run_id": self.run_id, "expires_at": now + self.ttl_s, "owner": _process_id()}).encode()

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Locally: one read-check-write at a time across processes (S3 uses If-Match instead)."""
        if self.s3:
            yield
            return
        import fcntl

        self.fs.makedirs(self.layout.claims_dir, exist_ok=True)
        with open(self.layout.claims_lock, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read(self, path: str) -> tuple[bool, str | None, dict[str, Any] | None]:
        """(exists, ETag on S3, owner record or None if unreadable)."""
        etag = None
        try:
            if self.s3:
                self.fs.invalidate_cache(path)
                etag = self.fs.info(path).get("ETag")  # first: a newer body then fails If-Match
                data = self.fs.cat_file(path, max_concurrency=1)  # 1: a GET, without s3fs's HEAD for the size
            else:
                data = self.fs.cat_file(path)
        except FileNotFoundError:
            return False, None, None
        try:
            owner = json.loads(data)
        except ValueError:
            owner = None
        return True, etag, owner if isinstance(owner, dict) else None

    def _write(self, path: str, etag: str | None) -> bool:
        """Overwrite the claim we read (S3: only if it is still the version we read)."""
        if not self.s3:
            write_bytes_atomic(self.fs, path, self._record(), tmp_root=self.root)
            return True
        try:
            return put_conditional(self.fs, path, self._record(), IfMatch=etag)
        except FileNotFoundError:  # released meanwhile: not ours to recreate here
            return False

    def _free(self, owner: dict[str, Any] | None) -> bool:
        now = dt.datetime.now(dt.timezone.utc).timestamp()
        return owner is None or owner.get("run_id") == self.run_id or owner.get("expires_at", 0) <= now \
            or _is_dead(owner.get("owner"))

    def holding(self) -> list[str]:
        """The shards this run holds claims on now, sorted (a copy)."""
        with self._lock:
            return sorted(self.held)

    def acquire(self, shard_id: str) -> bool:
        """Claim the shard: True if it is this run's now (created, taken over, or already ours)."""
        path = self._path(shard_id)
        with self._shard_lock(shard_id):  # a refresh of the same claim (already ours) waits
            got = create_exclusive(self.fs, path, self._record())
            if not got:
                with self._exclusive():
                    exists, etag, owner = self._read(path)
                    if not exists:  # released meanwhile: compete for it afresh
                        got = create_exclusive(self.fs, path, self._record())
                    elif self._free(owner):  # take over an expired claim, or one whose run died
                        got = self._write(path, etag)
            if got:
                with self._lock:
                    self.held.add(shard_id)
        return got

    def refresh(self) -> int:
        """Rewrite the claims this run holds (only those), `threads` at a time. A claim that
        another run took over is dropped from `held` with a warning; one that could not be read
        or written (store trouble) stays held and is tried again next time. Returns the number of
        claim writes made (PUTs on S3)."""
        held = self.holding()
        if not held:
            return 0
        with ThreadPoolExecutor(min(self.threads, len(held)), thread_name_prefix="claims-refresh") as pool:
            results = list(pool.map(self._refresh_one, held))
        failed = [e for _, e in results if e is not None]
        if failed:
            log.warning("could not refresh %d of %d claims (tried again next round): %s", len(failed),
                        len(held), describe(failed[0]))
        return sum(n for n, _ in results)

    def _refresh_one(self, shard_id: str) -> tuple[int, Exception | None]:
        """(writes made, the error if the store failed) for one held claim."""
        path = self._path(shard_id)
        writes, owner = 0, None
        with self._shard_lock(shard_id), self._exclusive():
            with self._lock:
                if shard_id not in self.held:  # released meanwhile
                    return 0, None
            try:
                exists, etag, owner = self._read(path)
                if exists and owner is not None and owner.get("run_id") == self.run_id:
                    writes = 1
                    if self._write(path, etag):
                        return writes, None
                    # the version changed under us: still ours (a retried PUT of our own), or taken?
                    exists, _, owner = self._read(path)
                    if exists and owner is not None and owner.get("run_id") == self.run_id:
                        return writes, None
            except Exception as e:  # noqa: BLE001 - reported by refresh, once per round
                return writes, e
            # our claim expired and another run took it (or it is gone): stop refreshing it
            with self._lock:
                self.held.discard(shard_id)
        log.warning("the claim on shard %s was taken over by run %s; it may be processed twice "
                    "(rows are not duplicated)", shard_id, (owner or {}).get("run_id"))
        return writes, None

    def release(self, shard_id: str) -> None:
        """Drop our claim. Never raises: a claim left behind (store unreachable) expires after
        the TTL, or at once for a rerun on this machine (its owner process is gone)."""
        with self._shard_lock(shard_id), self._lock:  # waits for a refresh of it in progress
            self.held.discard(shard_id)
        try:
            exists, _, owner = self._read(self._path(shard_id))
            if not exists or (owner is not None and owner.get("run_id") != self.run_id):
                return  # gone, or taken over by another run: theirs now
            self.fs.rm(self._path(shard_id))
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001
            log.warning("could not release the claim on shard %s: %s", shard_id, describe(e))


class ClaimKeeper:
    """One run's claims, asked for shard by shard just before each is read, with their heartbeat.

    Made to run as a Ray actor that the read tasks call (its arguments are picklable configs):

        keeper = ray.remote(num_cpus=0, max_concurrency=32)(ClaimKeeper).remote(
            cfg.output.path, cfg.s3, run_id, cfg.claim_ttl_s, cfg.retry)

    and as a plain object. The heartbeat thread starts here and rewrites every `max(1, ttl_s / 3)`
    seconds the claims held, i.e. the shards in progress; `close()` stops it and releases them.
    Methods may be called from many threads at once (the actor's `max_concurrency`).
    """

    def __init__(self, output_path: str, s3: S3Config, run_id: str, ttl_s: float, retry: RetryConfig,
                 tasks_pass: str = "") -> None:
        fs, root = filesystem(output_path, s3)
        self.output_path = output_path
        self.claims = Claims(fs, root, run_id, ttl_s, tasks_pass=tasks_pass)
        self.ledger = Ledger(fs, root, tasks_pass=tasks_pass)
        self.interval_s = max(1.0, ttl_s / 3)
        self._retry = retry
        self._lock = threading.Lock()  # guards _outcome and _stats
        self._outcome: dict[str, str] = {}  # shard -> its latest answer
        self._stats: dict[str, Any] = {"last_round_writes": 0, "last_round_s": 0.0, "rounds": 0}
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="claims-heartbeat", daemon=True)
        self._beat.start()

    def claim(self, shard_id: str) -> str:
        """MINE: claimed, and (checked afresh) not committed; DONE: committed meanwhile (not
        held); BUSY: another live run holds it. Store failures are retried for `retry.deadline_s`,
        then ClaimError, as after `close()`."""
        if self._stop.is_set():  # nothing would refresh the claim
            raise ClaimError(f"cannot claim shard {shard_id}: the run's claims are closed")

        def attempt() -> str:
            if not self.claims.acquire(shard_id):
                return BUSY
            if self.ledger.is_done(shard_id):  # committed by another run since we listed
                self.claims.release(shard_id)
                return DONE
            return MINE

        try:
            outcome = errors.retry(attempt, f"claiming shard {shard_id}", self._retry.deadline_s,
                                   self._retry.backoff_s)
        except Exception as e:  # noqa: BLE001 - one line for the read task's error
            self.claims.release(shard_id)  # if acquired before the failure
            raise ClaimError(f"could not claim shard {shard_id} under {redact(self.output_path)}: "
                             f"{describe(e)}") from None
        with self._lock:
            self._outcome[shard_id] = outcome
        return outcome

    def release(self, shard_id: str) -> None:
        """Drop the claim (after the commit, or when the shard is left for a rerun); never raises."""
        self.claims.release(shard_id)

    def held(self) -> list[str]:
        return self.claims.holding()

    def outcomes(self) -> dict[str, list[str]]:
        """Every shard asked for so far under its latest answer: {"mine": [...], "busy": [...], "done": [...]}."""
        out: dict[str, list[str]] = {MINE: [], BUSY: [], DONE: []}
        with self._lock:
            for sid, outcome in self._outcome.items():
                out[outcome].append(sid)
        return out

    def wait_busy(self, shard_ids: list[str], poll_s: float = 10.0, max_wait_s: float | None = None) -> list[str]:
        """Batch mode: claim again, every `poll_s`, shards that other runs held, until some are
        this run's (released uncommitted, or their run died and the claim expired), none is held
        elsewhere any more, or `max_wait_s` passed. Returns the shards now MINE; [] otherwise
        (`outcomes()` then tells the shards still BUSY)."""
        left = list(shard_ids)
        start = time.monotonic()
        while left:
            answers = {sid: self.claim(sid) for sid in left}
            mine = [sid for sid in left if answers[sid] == MINE]
            if mine:
                return mine
            left = [sid for sid in left if answers[sid] == BUSY]
            if not left or (max_wait_s is not None and time.monotonic() - start >= max_wait_s):
                break
            if self._stop.wait(poll_s):  # closed
                break
        return []

    def beat(self) -> int:
        """One heartbeat round now (the thread calls this): returns the claim writes made."""
        t0 = time.perf_counter()
        writes = self.claims.refresh()
        with self._lock:
            self._stats.update(last_round_writes=writes, last_round_s=round(time.perf_counter() - t0, 4),
                               rounds=self._stats["rounds"] + 1)
        return writes

    def stats(self) -> dict[str, Any]:
        """{"held": n, "last_round_writes": n, "last_round_s": s, "rounds": n}."""
        held = len(self.held())
        with self._lock:
            return {"held": held, **self._stats}

    def close(self) -> None:
        """Stop the heartbeat and release every claim still held. Safe to call twice."""
        self._stop.set()
        if self._beat.is_alive() and threading.current_thread() is not self._beat:
            self._beat.join(timeout=60)
        held = self.held()
        if held:
            with ThreadPoolExecutor(min(REFRESH_THREADS, len(held)), thread_name_prefix="claims-release") as pool:
                list(pool.map(self.claims.release, held))

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except Exception as e:  # noqa: BLE001 - try again next beat; the TTL covers several
                log.warning("claims heartbeat failed: %s", describe(e))


class Claiming:
    """The driver's side of a run's claims: its `ClaimKeeper` actor (on the driver's node: a claim
    names its process, and a rerun on this machine takes over at once the claims of a process that
    is gone; the keeper dies with the driver), and the rounds of work it leaves this run."""

    WAIT_ROUND_S = 60.0  # a log line per round of waiting for shards other runs hold

    def __init__(self, cfg: JobConfig, run_id: str, tasks_pass: str = "") -> None:
        self.batch = cfg.mode == "batch"
        self.poll_s = max(1.0, min(10.0, cfg.claim_ttl_s / 3))
        self.keeper = on_driver_node(ClaimKeeper, cfg.output.path, cfg.s3, run_id, cfg.claim_ttl_s, cfg.retry,
                                     tasks_pass, max_concurrency=32)
        self.elsewhere: list[Shard] = []  # shards other runs held at the last round's end

    def rounds(self, pending: list[Shard]) -> Iterator[list[Shard]]:
        """The shards to run, round by round: first `pending` (each read task claims its shard);
        then, in batch mode, the shards other runs held that became this run's (their run died or
        let them go), until every pending shard is committed or this run's. Enrich mode leaves
        held shards to their runs."""
        import ray

        todo = pending
        while todo:
            yield todo
            held = set(ray.get(self.keeper.outcomes.remote())[BUSY])
            self.elsewhere = [s for s in pending if s.shard_id in held]
            if self.elsewhere:
                log.info("%d shards are being processed by other runs", len(self.elsewhere))
            if not self.batch:
                return
            todo = self._wait(self.elsewhere)

    def _wait(self, busy: list[Shard]) -> list[Shard]:
        """Wait (one keeper call per round) until some of `busy` are this run's; [] when none is
        held elsewhere any more (committed by the runs that held them)."""
        import ray

        by_id = {s.shard_id: s for s in busy}
        left = list(by_id)
        while left:
            mine = ray.get(self.keeper.wait_busy.remote(left, self.poll_s, self.WAIT_ROUND_S))
            if mine:  # the next round's reads claim them again: already ours, so MINE
                return [by_id[sid] for sid in mine]
            held = set(ray.get(self.keeper.outcomes.remote())[BUSY])
            left = [sid for sid in left if sid in held]
            if left:
                log.info("waiting for %d shards that other runs are processing (%s%s)", len(left),
                         ", ".join(left[:5]), ", ..." if len(left) > 5 else "")
        return []

    def mine(self) -> set[str]:
        """The shards this run's reads claimed (their latest answer)."""
        import ray

        return set(ray.get(self.keeper.outcomes.remote())[MINE])

    def held_elsewhere(self) -> set[str]:
        """The shards other runs held at their claim (their latest answer)."""
        import ray

        return set(ray.get(self.keeper.outcomes.remote())[BUSY])

    def release(self, shard_id: str) -> None:
        self.keeper.release.remote(shard_id)

    def close(self) -> None:
        """Release the claims still held and stop the keeper; claims left behind (store down)
        expire, or are taken over at once by a rerun on this machine."""
        import ray

        try:
            ray.get(self.keeper.close.remote(), timeout=60)
            ray.kill(self.keeper)
        except Exception as e:  # noqa: BLE001
            log.warning("could not release this run's claims: %s", describe(e))


def _start_time(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _process_id() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()),
            "pid_ns": _pid_namespace()}


def _is_dead(owner: Any) -> bool:
    """True only when the claim's owner process ran on this machine and is gone (a killed run's
    claims then need not wait out their TTL); an owner elsewhere is alive until its claim expires."""
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname() or not owner.get("pid"):
        return False
    if owner.get("pid_ns") != _pid_namespace():  # another container on this host: cannot tell
        return False
    start = _start_time(int(owner["pid"]))
    if start is None:
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False
    return owner.get("start") is not None and start != owner["start"]
