"""Progress while a run goes: a log line every `progress_interval_s` and at each shard commit, and
the same numbers in `_runs/<run_id>/progress.json` for schedulers and dashboards.

Images count as their rows are written (one part record per written part reaches the driver:
`add_written`), not only when their shard commits. The clock is the run's: `elapsed_s` (also
`wall_s`) runs from the same start as the summary's `wall_s` (the job passes its `t0`).

The rates are defined once, by `run_rates` (RATES_NOTE), for progress.json, the log line, the
summary and the report (which shows what the run recorded, computing nothing): `images_per_s`
over the wall time (labelled wall) and `steady_images_per_s` after the first commit (steady).

The total is exact once every shard of the run has been seen (a shard's image count arrives with
its rows); before that it is extrapolated from the shards seen so far, and says so.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections import Counter
from typing import Any

from .errors import describe
from .layout import OutputLayout
from .storage import write_bytes_atomic

log = logging.getLogger(__name__)

WRITE_EVERY_S = 10.0  # progress.json at most this often while running (the log line at every report)

RATES_NOTE = ("wall_s: from the run's start (listing, Ray start-up, model load included; progress.json's "
              "wall_s uses the same start); images_per_s (wall), output_tokens_per_s: over wall_s; "
              "steady_images_per_s (steady): the images committed after the first commit over the time after it "
              "(first_commit_s), the pipeline's rate once running")


def run_rates(images: int, wall_s: float, first_commit: tuple[float, int] | None,
              committed: int | None = None) -> dict[str, Any]:
    """A run's rates, the one definition (RATES_NOTE) for summary.json, progress.json, the log line
    and the report: `images` done in `wall_s` from the run's start; `first_commit`: (seconds from
    the start, images committed by then) at the first commit, or None before it; `committed`: the
    images committed now (default `images`: the summary counts committed images only)."""
    committed = images if committed is None else committed
    steady = None
    if first_commit is not None and wall_s > first_commit[0] and committed > first_commit[1]:
        steady = round((committed - first_commit[1]) / (wall_s - first_commit[0]), 4)
    return {"wall_s": round(wall_s, 3), "images_per_s": round(images / wall_s, 4) if images and wall_s > 0 else None,
            "first_commit_s": round(first_commit[0], 3) if first_commit is not None else None,
            "steady_images_per_s": steady}


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
        self.first_commit: tuple[float, int] | None = None  # (seconds from t0, images committed by then)
        self.wall_s = 0.0  # seconds from t0 at the latest snapshot
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

    def add_shard(self, images: int, counts: Counter, shard_id: str | None = None,
                  first_commit: tuple[float, int] | None = None) -> None:
        """A shard committed with `images` images (those `add_written` counted are not counted again).
        `first_commit`: the run's first commit as the committer took it (the summary's), if known."""
        with self.lock:
            new = images - self.writing.pop(shard_id, 0)
            self.images += new
            self.committed_images += images
            self.shards_done += 1
            self.seen_images += images
            self.counts.update(counts)
            if self.first_commit is None:
                self.first_commit = first_commit or (self.clock() - self.t0, self.committed_images)

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
            self.wall_s = now - self.t0  # the latest reading (the summary takes the final one's)
            rates = run_rates(self.images, self.wall_s, self.first_commit, self.committed_images)
            rate = rates["steady_images_per_s"] or rates["images_per_s"]  # the ETA's
            left = None if total is None else max(0, total - self.images)
            errors = {k: v for k, v in sorted(self.counts.items()) if k != "ok"}
            return {"run_id": self.run_id, "state": state, "images_done": self.images, "images_total": total,
                    "images_total_exact": exact, "images_committed": self.committed_images,
                    "shards_done": self.shards_done, "shards_total": self.shards,
                    **rates, "eta_s": None if not rate or left is None else round(left / rate, 1),
                    "rows_by_status": dict(sorted(self.counts.items())), "errors_by_status": errors,
                    "elapsed_s": rates["wall_s"], "rates": RATES_NOTE, "waiting": self.waiting,
                    "updated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}

    def line(self, p: dict[str, Any]) -> str:
        total = "?" if p["images_total"] is None else f"{'' if p['images_total_exact'] else '~'}{p['images_total']}"
        rate = (f"{_rate(p['images_per_s'])} images/s wall"
                + (f", {_rate(p['steady_images_per_s'])} steady" if p.get("steady_images_per_s") else ""))
        eta = "-" if p["eta_s"] is None else str(dt.timedelta(seconds=int(p["eta_s"])))
        errors = ", ".join(f"{k} {v}" for k, v in p["errors_by_status"].items()) or "none"
        state = "" if p["state"] == "running" else f" ({p['state']})"
        waiting = f"; {p['waiting']}" if p.get("waiting") and p["state"] == "running" else ""
        return (f"progress{state}: {p['images_done']}/{total} images ({p['images_committed']} committed), "
                f"{p['shards_done']}/{p['shards_total']} shards, {rate}, ETA {eta}, "
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


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
