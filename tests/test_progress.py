"""Progress numbers: totals extrapolated until every shard is seen, the run's rates (wall, steady), ETA."""

from __future__ import annotations

import json
from collections import Counter

import fsspec

from pipeline.progress import RATES_NOTE, Progress, run_rates

LATER = 600.0


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_progress_extrapolates_rates_and_writes_progress_json(tmp_path):
    clock = Clock()
    p = Progress(fsspec.filesystem("file"), str(tmp_path), "run-1", shards=4, clock=clock)
    first = p.snapshot()
    assert first["images_total"] is None and first["images_per_s"] is None and first["eta_s"] is None
    clock.t += 10
    p.add_shard(10, Counter(ok=18, decode_error=2))
    snap = p.report()
    assert snap["images_total"] == 40 and not snap["images_total_exact"]  # 10 per shard x 4 shards
    assert snap["images_per_s"] == 1.0 and snap["eta_s"] == 30.0  # one commit: no steady rate yet, the wall's
    assert snap["steady_images_per_s"] is None and snap["first_commit_s"] == 10.0 and snap["rates"] == RATES_NOTE
    assert snap["errors_by_status"] == {"decode_error": 2}
    line = p.line(snap)
    assert "10/~40 images" in line and "1/4 shards" in line and "decode_error 2" in line and "ETA 0:00:30" in line
    assert "1.00 images/s wall," in line and "steady" not in line
    assert json.loads((tmp_path / "_runs" / "run-1" / "progress.json").read_text()) == snap
    # two rates, each labelled, defined once (`run_rates`, as the summary's): over the wall time,
    # and after the first commit (the start-up excluded); the ETA follows the steady one
    clock.t += LATER
    p.add_shard(10, Counter(ok=20))
    clock.t += 10
    p.add_shard(20, Counter(ok=40))
    p.report()
    p.add_shard(5, Counter(ok=10))
    p.report()  # a commit right after the last write: logged, not written again
    assert json.loads((tmp_path / "_runs" / "run-1" / "progress.json").read_text())["images_done"] == 40
    snap = p.report("done")
    assert json.loads((tmp_path / "_runs" / "run-1" / "progress.json").read_text()) == snap
    assert snap["images_total"] == 45 and snap["images_total_exact"] and snap["state"] == "done"
    wall = LATER + 20
    assert snap["wall_s"] == snap["elapsed_s"] == wall and snap["eta_s"] == 0.0
    assert snap["images_per_s"] == round(45 / wall, 4) and snap["steady_images_per_s"] == round(35 / (wall - 10), 4)
    assert {k: snap[k] for k in ("wall_s", "images_per_s", "first_commit_s", "steady_images_per_s")} == \
        run_rates(45, wall, (10.0, 10))
    assert "0.07 images/s wall, 0.06 steady" in p.line(snap)
    clock.t += LATER  # nothing committed for a while: both rates fall
    snap = p.snapshot()
    assert snap["images_per_s"] == round(45 / (clock.t - 1000.0), 4)
    assert snap["steady_images_per_s"] == round(35 / (clock.t - 1010.0), 4)


def test_progress_counts_images_as_parts_are_written_on_the_run_clock(tmp_path):
    """Images count when a part with their rows is written, not only at their shard's commit, and
    the clock starts where the run's (and the summary's wall_s) does."""
    clock = Clock()
    p = Progress(fsspec.filesystem("file"), str(tmp_path), "run-2", shards=2, clock=clock, t0=clock.t - 5)
    assert p.snapshot()["wall_s"] == 5.0 == p.snapshot()["elapsed_s"]
    clock.t += 5
    p.add_written("a", 3)
    p.add_written("a", 3)  # a re-run batch's record: nothing new
    snap = p.report()
    assert snap["images_done"] == 3 and snap["images_committed"] == 0 and snap["shards_done"] == 0
    assert snap["images_per_s"] == 0.3  # 3 images over the run's 10 s
    assert "3/? images (0 committed)" in p.line(snap) and "wall 10 s" in p.line(snap)
    p.add_written("a", 4)
    p.add_shard(4, Counter(ok=4), "a")
    snap = p.snapshot()
    assert snap["images_done"] == 4 and snap["images_committed"] == 4 and snap["shards_done"] == 1
    p.add_shard(2, Counter(ok=2), "b")  # a shard whose parts were not seen: counted at its commit
    assert p.snapshot()["images_done"] == 6
