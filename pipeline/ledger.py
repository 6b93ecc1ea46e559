"""Shard-level ledger and per-shard Parquet commit: the resume state is one small file per shard.

Layout under the output prefix:

    data/<shard_id>.parquet      all rows of one input shard (written whole, then...)
    _ledger/<shard_id>.json      ...this marker: the shard is committed (counts, run id, file)
    _runs/<run_id>/summary.json  one per run, with the resolved config beside it
    _claims/<shard_id>.json      a live run's lease on a shard it is processing
    _tmp/                        local outputs: files being written, renamed into place when whole

Shard ids never start with '_' or '.', so no data file is hidden from dataset readers.

A rerun skips shards with a marker. A kill between the two writes leaves a data file without a
marker; the rerun rewrites the same file name, so nothing is duplicated.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import threading
from collections import Counter
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .storage import create_exclusive, fresh_exists, is_s3, join, put_conditional, to_uri, write_bytes_atomic

log = logging.getLogger("pipeline")

BOX = pa.struct([("phrase", pa.string()), ("x0", pa.float32()), ("y0", pa.float32()),
                 ("x1", pa.float32()), ("y1", pa.float32()), ("x0_px", pa.int32()),
                 ("y0_px", pa.int32()), ("x1_px", pa.int32()), ("y1_px", pa.int32())])

SCHEMA = pa.schema([
    ("key", pa.string()),
    ("source_uri", pa.string()),
    ("shard_id", pa.string()),
    ("image_index", pa.int32()),
    ("task", pa.string()),
    ("task_index", pa.int32()),
    ("prompt", pa.string()),
    ("response", pa.string()),
    ("boxes", pa.list_(BOX)),
    ("box_errors", pa.list_(pa.string())),
    ("status", pa.string()),
    ("error_message", pa.string()),
    ("prompt_tokens", pa.int32()),
    ("output_tokens", pa.int32()),
    ("finish_reason", pa.string()),
    ("generation_s", pa.float64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("generation_settings", pa.string()),
    ("model_source", pa.string()),
    ("model_fingerprint", pa.string()),
    ("project_version", pa.string()),
    ("run_id", pa.string()),
    ("timestamp", pa.timestamp("us", tz="UTC")),
])


def _none(v: Any) -> Any:
    """pandas gives NaN for missing numbers and strings: make them None."""
    if v is None:
        return None
    try:
        if v != v:  # NaN
            return None
    except (TypeError, ValueError):
        pass
    return v


def _boxes(boxes_json: Any) -> tuple[list[dict[str, Any]] | None, list[str] | None]:
    boxes_json = _none(boxes_json)
    if boxes_json is None:
        return None, None
    g = json.loads(boxes_json)
    out = []
    for b in g["boxes"]:
        px = b["box_pixels"] or [None] * 4
        out.append({"phrase": b["phrase"], "x0": b["box"][0], "y0": b["box"][1], "x1": b["box"][2],
                    "y1": b["box"][3], "x0_px": px[0], "y0_px": px[1], "x1_px": px[2], "y1_px": px[3]})
    return out, g["errors"]


def to_table(rows: list[dict[str, Any]], run: dict[str, Any]) -> pa.Table:
    """Rows from the Generate stage (plus run-level fields) as a table of SCHEMA, sorted."""
    rows = sorted(rows, key=lambda r: (int(r["image_index"]), int(r["task_index"])))
    cols: dict[str, list[Any]] = {f.name: [] for f in SCHEMA}
    for r in rows:
        boxes, errors = _boxes(r.get("boxes_json"))
        for f in SCHEMA:
            if f.name == "boxes":
                v = boxes
            elif f.name == "box_errors":
                v = errors
            elif f.name in run:
                v = run[f.name]
            else:
                v = _none(r.get(f.name))
                if v is not None and pa.types.is_integer(f.type):
                    v = int(v)
            cols[f.name].append(v)
    return pa.table(cols, schema=SCHEMA)


class Ledger:
    def __init__(self, fs: Any, root: str) -> None:
        self.fs, self.root = fs, root
        self.dir = join(root, "_ledger")

    def done(self) -> set[str]:
        self.fs.invalidate_cache(self.dir)
        if not self.fs.exists(self.dir):
            return set()
        names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.dir, detail=False, refresh=True)]
        return {n[: -len(".json")] for n in names if n.endswith(".json")}

    def is_done(self, shard_id: str) -> bool:
        """A fresh check of one shard's marker (never answered from a listing cache)."""
        return fresh_exists(self.fs, join(self.dir, f"{shard_id}.json"))

    def data_path(self, shard_id: str) -> str:
        return join(self.root, "data", f"{shard_id}.parquet")

    def commit(self, shard_id: str, source_uri: str, rows: list[dict[str, Any]],
               run: dict[str, Any]) -> dict[str, Any]:
        """Write the shard's Parquet file whole, then its marker. Returns the marker record."""
        table = to_table(rows, run)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        path = self.data_path(shard_id)
        write_bytes_atomic(self.fs, path, sink.getvalue().to_pybytes(), tmp_root=self.root)
        record = {
            "shard_id": shard_id, "source_uri": source_uri, "file": f"data/{shard_id}.parquet",
            "rows": table.num_rows, "images": len({r["image_index"] for r in rows}),
            "status": dict(Counter(r["status"] for r in rows)), "run_id": run["run_id"],
            "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        }
        write_bytes_atomic(self.fs, join(self.dir, f"{shard_id}.json"), json.dumps(record).encode(),
                           tmp_root=self.root)
        return record


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

    def __init__(self, fs: Any, root: str, run_id: str, ttl_s: float = 600.0) -> None:
        self.fs, self.root, self.run_id, self.ttl_s = fs, root, run_id, ttl_s
        self.dir = join(root, "_claims")
        self.held: set[str] = set()
        self._lock = threading.Lock()  # the heartbeat must not rewrite a claim being released
        self.s3 = is_s3(to_uri(fs, root))

    def _path(self, shard_id: str) -> str:
        return join(self.dir, f"{shard_id}.json")

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

        self.fs.makedirs(self.dir, exist_ok=True)
        with open(join(self.dir, ".lock"), "a+") as f:
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

    def acquire(self, shard_id: str) -> bool:
        path = self._path(shard_id)
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

    def refresh(self) -> None:
        for sid in list(self.held):
            with self._lock, self._exclusive():
                if sid not in self.held:
                    continue
                exists, etag, owner = self._read(self._path(sid))
                if exists and owner is not None and owner.get("run_id") == self.run_id \
                        and self._write(self._path(sid), etag):
                    continue
                # our claim expired and another run took it (or it is gone): stop refreshing it
                self.held.discard(sid)
                log.warning("the claim on shard %s was taken over by run %s; it may be processed twice "
                            "(rows are not duplicated)", sid, (owner or {}).get("run_id"))

    def release(self, shard_id: str) -> None:
        """Drop our claim. Never raises: a claim left behind (store unreachable) expires after
        the TTL, or at once for a rerun on this machine (its owner process is gone)."""
        with self._lock:
            self.held.discard(shard_id)
        try:
            exists, _, owner = self._read(self._path(shard_id))
            if not exists or (owner is not None and owner.get("run_id") != self.run_id):
                return  # gone, or taken over by another run: theirs now
            self.fs.rm(self._path(shard_id))
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001
            from .errors import describe

            log.warning("could not release the claim on shard %s: %s", shard_id, describe(e))


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
    """True only when the claim's driver ran on this machine and is gone (a killed run's claims
    then need not wait out their TTL); an owner elsewhere is alive until its claim expires."""
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
