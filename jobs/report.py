"""One self-contained HTML page about a job's output: runs, status counts, throughput, a gallery.

    python -m jobs.report OUT [--sample N] [--seed S] [--out FILE] [--endpoint-url URL]

OUT is the job's output prefix, local or s3:// (credentials from the environment, as for the
job). The page needs no network to view: thumbnails are embedded JPEGs, charts are inline SVG.
Thumbnails are read back from the input named in each run's saved config.yaml; an image that
cannot be read is shown as a placeholder with the reason, and never stops the report.

Exit codes: 0 written; 2 OUT is not a job output, or bad arguments.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import functools
import random
import sys
from collections import defaultdict
from typing import Any

import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from pipeline import errors as st
from pipeline.config import S3Config
from pipeline.errors import describe, redact
from pipeline.progress import duration
from pipeline.rows import none_if_missing
from pipeline.storage import is_s3

from .report_data import (Commit, NotAnOutput, Output, RunRecord, display_size, epoch, input_of, load_output,
                          read_images, thumbnail)

ERROR_EXAMPLES = 3
TASK_ORDER = {"caption": 0, "vqa": 1, "grounding": 2}


# --- the page: plain data for the templates under jobs/templates/ ---------------------------------
#
# Everything below builds data (strings and numbers); the templates write the HTML, and their
# environment escapes every value, so model text, keys, paths and messages are always text.

@functools.lru_cache(maxsize=None)
def templates() -> Environment:
    """The templates shipped with the package (jobs/templates/), autoescaping every value."""
    env = Environment(loader=PackageLoader("jobs", "templates"), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True, finalize=lambda v: "" if v is None else v)
    env.globals["OK"] = st.OK
    return env


def _macros() -> Any:
    return templates().get_template("macros.html.j2").module


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _counts(counts: Any) -> str:
    if not isinstance(counts, dict) or not counts:
        return "–"
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (kv[0] != st.OK, kv[0])))


RUN_COLUMNS = (("run", None), ("mode", None), ("state", None),
               ("images committed", "images in the shards this run committed (its summary; while it runs, its "
                                    "progress.json): a shard that two runs processed counts in both"),
               ("in the data now", "distinct images in the committed data whose rows this run wrote: these add "
                                   "up to the page's count of distinct images"),
               ("rows", None), ("status counts", None),
               ("wall", "from the run's start: listing, Ray start-up and model load included"),
               ("images/s wall", "images over the wall time, as the run recorded it (summary.json; while it "
                                 "runs, progress.json)"),
               ("images/s steady", "images after the first commit over the time after it, as the run "
                                   "recorded it: the pipeline's rate once running, start-up excluded"),
               ("shards processed", None), ("shards failed", None), ("progress", None),
               ("tasks", "the tasks the run made rows for: the output's first tasks, or a pass of tasks added "
                         "to it later (--add-tasks), whose runs count the same images again"))


STALE_S = 600.0  # a live run rewrites progress.json every progress_interval_s (60 s by default)


def run_state(run: RunRecord, now: float) -> tuple[str, str | None]:
    """The run's state as the README names progress.json's: running, done, incomplete or failed;
    `stopped` for a run without a summary whose progress has not moved for STALE_S (killed, or its
    driver lost: a rerun redoes its uncommitted shards). With a note where the records say less."""
    if run.summary is not None:  # the run ended and wrote its record
        return ("incomplete" if run.summary.get("shards_failed") else "done"), None
    p = run.progress or {}
    state = p.get("state")
    if state == "failed":
        return "failed", None
    if state in ("done", "incomplete"):  # ended, and its summary.json is not there (yet)
        return state, "no summary.json"
    if state == "running":
        updated = epoch(p["updated_at"]) if p.get("updated_at") else None
        if updated is not None and now - updated > STALE_S:
            return "stopped", f"no summary, no progress for {duration(now - updated)}"
        return "running", None
    return "unknown", "no summary.json or progress.json could be read"


def runs_view(runs: list[RunRecord], now: float, rows: pd.DataFrame) -> dict[str, Any]:
    """The runs table: one row per run, each cell's text by field name; and the images counted
    both ways: committed by each run (a shard processed twice counts twice), and in the data now."""
    in_data = rows.drop_duplicates(["source_uri", "key", "run_id"]).groupby("run_id").size() if len(rows) else {}
    out, committed = [], 0
    for r in runs:
        s, p = r.summary or {}, r.progress or {}
        state, note = run_state(r, now)
        progress = "–"
        if p:
            progress = f"{_num(p.get('images_done'))} / {_num(p.get('images_total'))}"
            if p.get("eta_s") is not None and state == "running":
                progress += f", ETA {duration(float(p['eta_s']))}"
        failed = s.get("shards_failed")
        wall = (s or p).get("wall_s")
        images = s.get("images", p.get("images_done"))
        committed += images if isinstance(images, int) else 0
        cells = {
            "run_id": r.run_id, "mode": s.get("mode") or (r.config or {}).get("mode"), "state": state,
            "images": _num(images), "images_in_data": str(int(in_data.get(r.run_id, 0))), "rows": _num(s.get("rows")),
            "status_counts": _counts(s.get("status_counts") or p.get("status_counts") or p.get("rows_by_status")),
            "wall_s": duration(float(wall)) if isinstance(wall, (int, float)) else "–",
            "images_per_s": _num((s or p).get("images_per_s"), 3),
            "steady_images_per_s": _num((s or p).get("steady_images_per_s"), 3),
            "shards_processed": (f"{_num(s.get('shards_processed', p.get('shards_done')))} of "
                                 f"{_num(s.get('shards_total', p.get('shards_total')))}" if s or p else "–"),
            "shards_failed": str(len(failed)) if isinstance(failed, list) else "–",
            "progress": progress,
            "tasks": ", ".join(s.get("tasks") or []) or "–",
        }
        out.append({"run_id": r.run_id, "state": state, "state_note": note, "cells": list(cells.items()),
                    "failed": [str(f) for f in failed] if isinstance(failed, list) else []})
    distinct = rows.groupby(["source_uri", "key"]).ngroups if len(rows) else 0
    # runs count an image once per pass of tasks they made its rows for (README: Adding a task)
    passes = rows.tasks_pass.nunique() if len(rows) else 1
    per_pass = rows.groupby(["tasks_pass", "source_uri", "key"]).ngroups if len(rows) else 0
    attributed = sum(int(in_data.get(r.run_id, 0)) for r in runs)
    return {"head": [{"text": h, "title": t} for h, t in RUN_COLUMNS], "runs": out, "images": distinct,
            "passes": passes, "per_pass": per_pass, "committed": committed, "attributed": attributed,
            "unattributed": per_pass - attributed}


def _task_key(task: str) -> tuple[int, str]:
    return TASK_ORDER.get(task, 9), task


def status_view(rows: pd.DataFrame) -> dict[str, Any] | None:
    """Row counts by task and status (None without rows), with example messages per error status."""
    if rows.empty:
        return None
    counts = rows.groupby(["task", "status"]).size()
    tasks = sorted({t for t, _ in counts.index}, key=_task_key)
    statuses = sorted({s for _, s in counts.index}, key=lambda s: (s != st.OK, s))
    return {
        "statuses": statuses,
        "tasks": [{"task": t, "cells": [{"status": s, "n": int(counts.get((t, s), 0))} for s in statuses],
                   "total": int(counts.xs(t, level="task").sum())} for t in tasks],
        "totals": [{"status": s, "n": int(counts.xs(s, level="status").sum())} for s in statuses],
        "grand": len(rows),
        "errors": error_examples(rows),
    }


def error_examples(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """Per error status: its counts and up to ERROR_EXAMPLES distinct messages (with a key each)."""
    out = []
    bad = rows[rows.status != st.OK]
    for status, group in sorted(bad.groupby("status"), key=lambda kv: kv[0]):
        examples: list[dict[str, Any]] = []
        seen: set[str] = set()
        for r in group.sort_values(["source_uri", "key", "task_index"]).itertuples():
            msg = str(r.error_message) if isinstance(r.error_message, str) else "(no message)"
            if msg in seen:
                continue
            seen.add(msg)
            examples.append({"key": r.key, "task": r.task, "message": msg})
            if len(seen) == ERROR_EXAMPLES:
                break
        out.append({"status": status, "rows": len(group), "images": group.key.nunique(), "examples": examples})
    return out


def throughput_chart(run: RunRecord, commits: list[Commit], width: int = 560,
                     height: int = 220) -> dict[str, Any] | None:
    """The chart's geometry (numbers only): images committed over time, one point per committed
    shard, from the ledger markers; None if the run committed none."""
    points = sorted((c.at, c.images) for c in commits if c.run_id == run.run_id and c.at is not None)
    if not points:
        return None
    t0 = run.start if run.start is not None else points[0][0]
    series, total = [(0.0, 0)], 0
    for at, n in points:
        total += n
        series.append((max(0.0, at - t0), total))
    x_max = max(t for t, _ in series) or 1.0
    y_max = max(total, 1)
    left, right, top, bottom = 56, 16, 12, 40
    pw, ph = width - left - right, height - top - bottom

    def xy(t: float, n: float) -> tuple[float, float]:
        return left + t / x_max * pw, top + ph - n / y_max * ph

    ticks = []
    for i in range(5):  # ticks: 0, 1/4, ... of each axis
        x, y = left + pw * i / 4, top + ph - ph * i / 4
        ticks.append({"x": f"{x:.1f}", "y": f"{y:.1f}", "y_text": f"{y + 4:.1f}",
                      "x_label": f"{x_max * i / 4:.0f}", "y_label": f"{y_max * i / 4:.0f}"})
    steps = [series[0]]  # a staircase: the count rises only when a shard commits
    for (_, before), (t, n) in zip(series, series[1:]):
        steps += [(t, before), (t, n)]
    commits_xy = []
    for t, n in series[1:]:
        x, y = xy(t, n)
        commits_xy.append({"x": f"{x:.1f}", "y": f"{y:.1f}", "images": n, "t": f"{t:.1f}"})
    return {"width": width, "height": height, "left": left, "top": top, "pw": pw, "ph": ph,
            "right": left + pw, "bottom": top + ph, "x_tick_y": top + ph + 14, "y_tick_x": left - 6,
            "x_axis": {"x": left + pw / 2, "y": height - 6}, "y_axis": {"x": 14, "y": top + ph / 2},
            "ticks": ticks, "points": commits_xy,
            "series": " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(t, n) for t, n in steps))}


def throughput_svg(run: RunRecord, commits: list[Commit], width: int = 560, height: int = 220) -> Markup:
    """The run's chart as inline SVG (or a line saying it committed nothing)."""
    return _macros().throughput_chart(run.run_id, throughput_chart(run, commits, width, height))


def box_geometry(boxes: Any, source_size: tuple[int, int], thumb_size: tuple[int, int]) -> dict[str, Any] | None:
    """One rect per box over the thumbnail (the row's pixel coordinates, scaled from the image's
    size to the thumbnail's; normalized coordinates when a box has no pixels); None without boxes."""
    boxes = [] if boxes is None else list(boxes)
    if not boxes:
        return None
    (sw, sh), (tw, th) = source_size, thumb_size
    out = []
    for i, b in enumerate(boxes):
        if b.get("x0_px") is not None and sw and sh:
            x0, y0, x1, y1 = (b["x0_px"] * tw / sw, b["y0_px"] * th / sh, b["x1_px"] * tw / sw, b["y1_px"] * th / sh)
        else:
            x0, y0, x1, y1 = b["x0"] * tw, b["y0"] * th, b["x1"] * tw, b["y1"] * th
        out.append({"phrase": b.get("phrase"), "label": b.get("phrase") or "(no phrase)", "hue": (i * 67) % 360,
                    "x": f"{x0:.1f}", "y": f"{y0:.1f}", "w": f"{max(x1 - x0, 1):.1f}", "h": f"{max(y1 - y0, 1):.1f}",
                    "label_x": f"{x0 + 2:.1f}", "label_y": f"{y0 - 3 if y0 > 14 else y0 + 13:.1f}"})
    return {"width": tw, "height": th, "boxes": out}


def box_overlay(boxes: Any, source_size: tuple[int, int], thumb_size: tuple[int, int]) -> Markup:
    """The boxes as an SVG over the thumbnail (empty without boxes)."""
    geometry = box_geometry(boxes, source_size, thumb_size)
    return _macros().box_overlay(geometry) if geometry else Markup("")


def gallery_view(task: str, rows: list[dict[str, Any]], image: bytes | str | None,
                 max_pixels: int | None = None) -> dict[str, Any]:
    """One image of one task: the thumbnail (with its boxes for grounding) or the reason there is
    none, then each of the image's prompts of this task with its answer."""
    first = rows[0]
    status = first["status"] if all(r["status"] == first["status"] for r in rows) else "mixed"
    thumb, reason = None, image if isinstance(image, str) else None
    if isinstance(image, (bytes, bytearray)):
        try:
            thumb = thumbnail(bytes(image), max_pixels)
        except Exception as e:  # noqa: BLE001 - this image's problem only
            reason = f"cannot decode: {describe(e)}"
    shown = None
    if thumb is not None:
        tw, th = display_size(thumb.size)
        size = (int(first["width"]), int(first["height"])) if _is_set(first.get("width")) \
            and _is_set(first.get("height")) else thumb.source_size
        overlays = [g for g in (box_geometry(r.get("boxes"), size, (tw, th)) for r in rows) if g]
        shown = {"width": tw, "height": th, "pixelated": tw > thumb.size[0], "overlays": overlays,
                 "src": "data:image/jpeg;base64," + base64.b64encode(thumb.jpeg).decode()}
    qa = []
    for r in rows:
        box_list = [] if r.get("boxes") is None else list(r["boxes"])
        qa.append({"task_index": r["task_index"], "ok": r["status"] == st.OK,
                   "show_prompt": task != "caption" or r["status"] != st.OK, "prompt": r["prompt"],
                   "response": r["response"], "error_message": r["error_message"],
                   "boxes": [{"phrase": b.get("phrase"),
                              "coords": f'[{b["x0"]:.3f}, {b["y0"]:.3f}, {b["x1"]:.3f}, {b["y1"]:.3f}]'}
                             for b in box_list],
                   "box_errors": [] if r.get("box_errors") is None else list(r["box_errors"])})
    return {"task": task, "key": first["key"], "status": status, "thumb": shown, "reason": reason,
            "source_name": redact(str(first["source_uri"])).rsplit("/", 1)[-1], "size_text": _size_text(first),
            "qa": qa}


def gallery_item(task: str, rows: list[dict[str, Any]], image: bytes | str | None,
                 max_pixels: int | None = None) -> Markup:
    """One image of one task, rendered (see gallery_view)."""
    return _macros().gallery_item(gallery_view(task, rows, image, max_pixels))


def _is_set(v: Any) -> bool:
    return none_if_missing(v) is not None


def _size_text(row: dict[str, Any]) -> str:
    if _is_set(row.get("width")) and _is_set(row.get("height")):
        return f' · {int(row["width"])}×{int(row["height"])}'
    return ""


def sample_images(rows: pd.DataFrame, n: int, seed: int) -> dict[str, list[list[dict[str, Any]]]]:
    """task -> up to `n` images (each: its rows of that task), drawn uniformly with `seed`."""
    out: dict[str, list[list[dict[str, Any]]]] = {}
    for task in sorted(set(rows.task), key=_task_key):
        by_image: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for r in rows[rows.task == task].to_dict("records"):
            by_image[(r["source_uri"], r["key"])].append(r)
        chosen = random.Random(f"{seed}:{task}").sample(sorted(by_image), min(n, len(by_image)))
        out[task] = [sorted(by_image[k], key=lambda r: r["task_index"]) for k in sorted(chosen)]
    return out


def gallery_sections(out: Output, n: int, seed: int, s3: S3Config) -> list[dict[str, Any]]:
    """Per task, its sampled images (gallery_view each), with their images read back from the input."""
    sampled = sample_images(out.rows, n, seed)
    if not sampled:
        return []
    configs = {r.run_id: r.config for r in out.runs if r.config}
    latest = next((r.config for r in reversed(out.runs) if r.config), None)
    wanted: dict[tuple[str | None, str], set[str]] = defaultdict(set)  # (run, source) -> keys
    for images in sampled.values():
        for rows in images:
            wanted[(rows[0]["run_id"], rows[0]["source_uri"])].add(rows[0]["key"])
    found: dict[tuple[str, str], bytes | str] = {}
    limits: dict[str, int] = {}
    for (run_id, source), keys in sorted(wanted.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        config = configs.get(run_id) or latest
        if config is None:
            found.update({(source, k): f"no config.yaml for run {run_id}: the input is unknown" for k in keys})
            continue
        icfg, in_s3 = input_of(config, s3)
        limits[source] = icfg.max_image_pixels
        for key, image in read_images(source, keys, icfg, in_s3).items():
            found[(source, key)] = image
    return [{"task": task, "total": out.rows[out.rows.task == task].key.nunique(),
             "images": [gallery_view(task, rows, found.get((rows[0]["source_uri"], rows[0]["key"])),
                                    limits.get(rows[0]["source_uri"])) for rows in images]}
            for task, images in sampled.items()]


def page(title: str, body: str | Markup) -> str:
    """A whole page around `body`: rendered markup (Markup, as gallery_item returns) is kept,
    a plain string is escaped, as text."""
    return templates().get_template("page.html.j2").render(title=title, body=body)


def build_report(uri: str, s3: S3Config, sample: int = 8, seed: int = 0) -> str:
    out = load_output(uri, s3)
    rows = out.rows
    images = rows.groupby(["source_uri", "key"]).ngroups if not rows.empty else 0  # = runs_view's "images"
    now = dt.datetime.now(dt.timezone.utc)
    return templates().get_template("report.html.j2").render(
        title=f"Job report: {redact(uri)}", uri=redact(uri), generated=now.strftime("%Y-%m-%d %H:%M UTC"),
        totals={"rows": len(rows), "images": images, "shards": len({c.shard_id for c in out.commits})},
        uncommitted=out.uncommitted_files, runs=runs_view(out.runs, now.timestamp(), rows), status=status_view(rows),
        charts=[{"run_id": run.run_id, "chart": throughput_chart(run, out.commits)} for run in out.runs],
        sample=sample, seed=seed, gallery=gallery_sections(out, sample, seed, s3))


def default_out(uri: str) -> str:
    return uri.rstrip("/") + "_report.html"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", metavar="OUT", help="the job's output prefix, local or s3://")
    p.add_argument("--sample", type=int, default=8, help="images per task in the gallery (default 8)")
    p.add_argument("--seed", type=int, default=0, help="the gallery sample's seed (default 0)")
    p.add_argument("--out", default=None, help="the HTML file to write (default OUT_report.html; "
                                               "required for an s3:// OUT)")
    p.add_argument("--endpoint-url", default=None, help="an S3-compatible store's endpoint (also for the input)")
    a = p.parse_args(argv)
    if a.sample < 0:
        p.error("--sample must be >= 0")
    if a.out is None and is_s3(a.output):
        p.error("--out FILE is required for an s3:// OUT (the report is written locally)")
    if a.out is not None and "://" in a.out:
        p.error("--out must be a local file path")
    target = a.out or default_out(a.output)
    try:
        text = build_report(a.output, S3Config(endpoint_url=a.endpoint_url), a.sample, a.seed)
    except NotAnOutput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(target, "w", encoding="utf-8") as f:
        f.write(text)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
