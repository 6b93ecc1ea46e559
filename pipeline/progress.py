"""Progress while a run goes: a log line every `progress_interval_s` and at each shard commit, and
the same numbers in `_runs/<run_id>/progress.json` for schedulers and dashboards.

Images count as their rows are written (one part record per written part reaches the driver:
`add_written`), not only when their shard commits. The clock is the run's: `elapsed_s` (also
`wall_s`) runs from the same start as the summary's `wall_s` (the job passes its `t0`).

The total is exact once every shard of the run has been seen (a shard's image count arrives with
its rows); before that it is extrapolated from the shards seen so far, and says so.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections import Counter, deque
from typing import Any

from .errors import describe
from .layout import OutputLayout
from .storage import write_bytes_atomic

log = logging.getLogger(__name__)

WRITE_EVERY_S = 10.0  # progress.json at most this often while running (the log line at every report)
RATE_WINDOW_S = 300.0  # images/s over the last five minutes (the run's average until 2 commits fall in it)


def duration(s: float) -> str:
    """A length of time for people: `45 s`, `12.5 min`, `3.2 h`."""
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


class Progress:
    def __init__(self, out_fs: Any, out_root: str, run_id: str, shards: int, known_images: int | None = None,
                 clock: Any = time.perf_counter, t0: float | None = None) -> None:
        self.fs, self.root, self.run_id = out_fs, out_root, run_id
        self.shards = shards  # shards this run works on
        self.known_images = known_images  # images in them, when counted before the start
        self.clock = clock
        self.t0 = clock() if t0 is None else t0  # the run's start on `clock` (the summary's wall_s too)
        self.images = 0  # images with rows written (committed shards' and the open shards' parts)
        self.committed_images = 0
        self.writing: dict[str, int] = {}  # open shard -> its images with rows written so far
        self.shards_done = 0
        self.seen_images = 0  # images in the shards done (their totals)
        self.counts: Counter = Counter()
        self.recent: deque[tuple[float, int]] = deque()  # (time, images) of each commit in the window
        self.lock = threading.Lock()
        self.write_lock = threading.Lock()
        self.written = float("-inf")  # when progress.json was last written
        self.waiting: str | None = None  # what the run waits for, when it waits (e.g. nodes)

    def add_written(self, shard_id: str, images: int) -> None:
        """A part of `shard_id` was written: `images` of its images (distinct, so far) have rows."""
        with self.lock:
            new = images - self.writing.get(shard_id, 0)
            if new > 0:
                self.writing[shard_id] = images
                self.images += new
                self.recent.append((self.clock(), new))

    def add_shard(self, images: int, counts: Counter, shard_id: str | None = None) -> None:
        """A shard committed with `images` images (those `add_written` counted are not counted again)."""
        with self.lock:
            new = images - self.writing.pop(shard_id, 0)
            self.images += new
            self.committed_images += images
            self.shards_done += 1
            self.seen_images += images
            self.counts.update(counts)
            if new > 0:
                self.recent.append((self.clock(), new))

    def add_shards(self, n: int) -> None:
        """More shards to do (batch mode: taken over from runs that died)."""
        with self.lock:
            self.shards += n

    def snapshot(self, state: str = "running") -> dict[str, Any]:
        with self.lock:
            now = self.clock()
            if self.known_images is not None:
                total, exact = self.known_images, True
            elif self.shards_done >= self.shards:
                total, exact = self.seen_images, True
            elif self.shards_done:
                total, exact = round(self.seen_images / self.shards_done * self.shards), False
            else:
                total, exact = None, False
            while self.recent and self.recent[0][0] < now - RATE_WINDOW_S:
                self.recent.popleft()
            window = min(RATE_WINDOW_S, now - self.t0)
            if len(self.recent) >= 2 and window > 0:  # the last minutes
                rate: float | None = sum(n for _, n in self.recent) / window
                basis = f"last {duration(window)}"
            else:  # too few parts lately (slow shards, a stall): the run's average
                rate = self.images / (now - self.t0) if self.images and now > self.t0 else None
                basis = "wall"
            left = None if total is None else max(0, total - self.images)
            errors = {k: v for k, v in sorted(self.counts.items()) if k != "ok"}
            return {"run_id": self.run_id, "state": state, "images_done": self.images, "images_total": total,
                    "images_total_exact": exact, "images_committed": self.committed_images,
                    "shards_done": self.shards_done, "shards_total": self.shards,
                    "images_per_s": None if rate is None else round(rate, 3), "images_per_s_over": basis,
                    "eta_s": None if not rate or left is None else round(left / rate, 1),
                    "rows_by_status": dict(sorted(self.counts.items())), "errors_by_status": errors,
                    "elapsed_s": round(now - self.t0, 1), "wall_s": round(now - self.t0, 1), "waiting": self.waiting,
                    "updated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}

    def line(self, p: dict[str, Any]) -> str:
        total = "?" if p["images_total"] is None else f"{'' if p['images_total_exact'] else '~'}{p['images_total']}"
        rate = "-" if p["images_per_s"] is None else f"{p['images_per_s']:.2f}"
        eta = "-" if p["eta_s"] is None else str(dt.timedelta(seconds=int(p["eta_s"])))
        errors = ", ".join(f"{k} {v}" for k, v in p["errors_by_status"].items()) or "none"
        state = "" if p["state"] == "running" else f" ({p['state']})"
        waiting = f"; {p['waiting']}" if p.get("waiting") and p["state"] == "running" else ""
        return (f"progress{state}: {p['images_done']}/{total} images ({p['images_committed']} committed), "
                f"{p['shards_done']}/{p['shards_total']} shards, {rate} images/s, ETA {eta}, "
                f"wall {duration(p['wall_s'])}, errors: {errors}{waiting}")

    def report(self, state: str = "running") -> dict[str, Any]:
        """Log the line and write progress.json (a failed write is logged, never raised)."""
        with self.write_lock:  # reports in order: the last one written is the last one made
            p = self.snapshot(state)
            log.info("%s", self.line(p))
            now = self.clock()
            if state != "running" or now - self.written >= WRITE_EVERY_S:  # not one PUT per shard commit
                self.written = now
                self._write(p)
        return p

    def _write(self, p: dict[str, Any]) -> None:
        try:
            write_bytes_atomic(self.fs, OutputLayout(self.root).progress(self.run_id),
                               json.dumps(p, indent=2).encode(), tmp_root=self.root)
        except Exception as e:  # noqa: BLE001 - progress is advisory; the next report retries
            log.warning("could not write progress.json: %s", describe(e))
