"""What the report reads: a job output's runs, commits and committed rows (through the output
layout and the ledger), and images read back from the input as the job read them."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import posixpath
import sys
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import yaml

from pipeline.config import InputConfig, RetryConfig, S3Config
from pipeline.errors import describe, redact
from pipeline.layout import OutputLayout
from pipeline.ledger import Ledger
from pipeline.listing import Shard, input_root, is_image_name
from pipeline.readers import read_shard
from pipeline.rows import SHARD_KEY
from pipeline.storage import ConfinedFetcher, filesystem, join, read_capped

THUMB_SIDE = 256
COLUMNS = ["key", "source_uri", "shard_id", "image_index", "task", "task_index", "prompt", "response",
           "boxes", "box_errors", "status", "error_message", "width", "height", "run_id", "tasks_pass"]
READ_POLICY = RetryConfig(deadline_s=30.0, backoff_s=0.5)


class NotAnOutput(ValueError):
    """OUT holds neither runs nor data."""


# --- reading the output ---------------------------------------------------------------------------

@dataclasses.dataclass
class RunRecord:
    run_id: str
    summary: dict[str, Any] | None  # None while the run is going (or if it died before its record)
    config: dict[str, Any] | None  # the resolved config the run saved
    progress: dict[str, Any] | None  # progress.json, when the pipeline writes one
    start: float | None  # epoch seconds, when it can be told


@dataclasses.dataclass
class Commit:
    shard_id: str
    run_id: str | None
    images: int
    at: float | None  # epoch seconds
    tasks_pass: str = ""  # the pass of added tasks it committed ("" : the output's first tasks)


@dataclasses.dataclass
class Output:
    uri: str
    runs: list[RunRecord]
    commits: list[Commit]
    rows: pd.DataFrame  # the committed shards' rows (COLUMNS; `tasks_pass`: the pass of tasks of their file)
    uncommitted_files: list[str]  # data files without a ledger marker (a crash between the writes)


def _read(fs: Any, path: str) -> bytes | None:
    """The file's bytes; None if it is missing or cannot be read (the page says what it lacks)."""
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - one unreadable record never stops the report
        print(f"jobs.report: cannot read {redact(path)}: {describe(e)}", file=sys.stderr)
        return None


def _json(fs: Any, path: str) -> dict[str, Any] | None:
    data = _read(fs, path)
    try:
        value = json.loads(data) if data is not None else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _mtime(fs: Any, path: str) -> float | None:
    try:
        info = fs.info(path)
    except (FileNotFoundError, OSError):
        return None
    t = info.get("mtime", info.get("LastModified"))
    if isinstance(t, dt.datetime):
        return t.timestamp()
    return float(t) if isinstance(t, (int, float)) else None


def epoch(iso: Any) -> float | None:
    try:
        return dt.datetime.fromisoformat(str(iso)).timestamp()
    except ValueError:
        return None


def _names(fs: Any, folder: str) -> list[str]:
    if not fs.exists(folder):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False))


def _runs(fs: Any, layout: OutputLayout, commits: list[Commit]) -> list[RunRecord]:
    out = []
    for run_id in _names(fs, layout.runs_dir):
        if run_id.startswith(".") or not fs.isdir(layout.run_dir(run_id)):  # the job's write probes
            continue
        summary = _json(fs, layout.summary(run_id))
        progress = _json(fs, layout.progress(run_id))
        raw = _read(fs, layout.config(run_id))
        try:
            config = yaml.safe_load(raw) if raw is not None else None
        except yaml.YAMLError:
            config = None
        out.append(RunRecord(run_id, summary, config if isinstance(config, dict) else None, progress,
                             _run_start(fs, layout.summary(run_id), summary,
                                        [c for c in commits if c.run_id == run_id])))
    return sorted(out, key=lambda r: (r.start or 0.0, r.run_id))


def _run_start(fs: Any, summary_path: str, summary: dict[str, Any] | None, commits: list[Commit]) -> float | None:
    """The first commit less the summary's time to it; else the summary's write time less the run's
    wall time; else the first commit."""
    first = min((c.at for c in commits if c.at is not None), default=None)
    if summary and first is not None and isinstance(summary.get("first_commit_s"), (int, float)):
        return first - summary["first_commit_s"]
    written = _mtime(fs, summary_path)
    if summary and written is not None and isinstance(summary.get("wall_s"), (int, float)):
        return written - summary["wall_s"]
    return first


def _passes(fs: Any, layout: OutputLayout) -> list[str]:
    """The output's passes of tasks: "" (its first tasks) and those added (its _output.json)."""
    manifest = _json(fs, layout.output_manifest) or {}
    return ["", *(str(p.get("name")) for p in manifest.get("passes", []) if isinstance(p, dict))]


def _commits(fs: Any, layout: OutputLayout) -> list[Commit]:
    out = []
    for tasks_pass in _passes(fs, layout):
        ledger = Ledger(fs, layout.root, READ_POLICY, tasks_pass)
        for sid in sorted(ledger.done()):
            try:
                marker = ledger.read(sid) or {}
            except Exception as e:  # noqa: BLE001 - one unreadable record never stops the report
                print(f"jobs.report: cannot read the marker of {sid}: {describe(e)}", file=sys.stderr)
                marker = {}
            at = (epoch(marker["committed_at"]) if marker.get("committed_at")
                  else _mtime(fs, ledger.layout.marker(sid)))
            out.append(Commit(sid, marker.get("run_id"), int(marker.get("images") or 0), at, tasks_pass))
    return out


def _rows(fs: Any, layout: OutputLayout, committed: set[tuple[str, str]]) -> tuple[pd.DataFrame, list[str]]:
    frames, uncommitted = [], []
    for name in _names(fs, layout.data_dir):
        if not name.endswith(".parquet"):
            continue
        sid, tasks_pass = OutputLayout.data_name_shard(name)
        if (sid, tasks_pass) not in committed:
            uncommitted.append(name)
            continue
        with fs.open(layout.for_pass(tasks_pass).data_file(sid), "rb") as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in COLUMNS if c in pf.schema_arrow.names]
            frames.append(pf.read(columns=cols).to_pandas().assign(tasks_pass=tasks_pass))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS}), uncommitted
    return pd.concat(frames, ignore_index=True).reindex(columns=COLUMNS), uncommitted


def load_output(uri: str, s3: S3Config) -> Output:
    fs, root = filesystem(uri, s3)
    layout = OutputLayout(root)
    commits = _commits(fs, layout)
    rows, uncommitted = _rows(fs, layout, {(c.shard_id, c.tasks_pass) for c in commits})
    runs = _runs(fs, layout, commits)
    if not runs and not commits and not uncommitted:
        raise NotAnOutput(f"{redact(uri)} holds no job output (no _runs/, _ledger/ or data/)")
    return Output(uri, runs, commits, rows, uncommitted)


# --- reading images back from the input -----------------------------------------------------------

def _fields(cls: type, data: Any) -> dict[str, Any]:
    """The keys of a saved config section that `cls` knows (a newer or older config still reads)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in (data or {}).items() if k in names}


def input_of(config: dict[str, Any], s3: S3Config) -> tuple[InputConfig, S3Config]:
    """The run's input settings, and its S3 settings with the command line's endpoint on top."""
    icfg = InputConfig(**_fields(InputConfig, config.get("input")))
    saved = S3Config(**_fields(S3Config, config.get("s3")))
    return icfg, dataclasses.replace(saved, endpoint_url=s3.endpoint_url or saved.endpoint_url)


def _fetcher(icfg: InputConfig, s3: S3Config) -> ConfinedFetcher:
    """The Preprocess stage's fetch: confined to the input and the allowed prefixes, size-capped."""
    return ConfinedFetcher(input_root(icfg.path, s3), icfg.allowed_uri_prefixes, s3, icfg.max_image_bytes,
                           READ_POLICY.deadline_s, READ_POLICY.backoff_s)


def _folder_file(root_uri: str, key: str, s3: S3Config) -> str:
    """Folder input: the image file whose path under the input is `key` plus an extension."""
    fs, root = filesystem(root_uri, s3)
    folder, stem = posixpath.split(join(root, key))
    for path in fs.ls(folder, detail=False):
        name = path.rsplit("/", 1)[-1]
        if is_image_name(name) and name.rsplit(".", 1)[0] == stem:
            return path
    raise FileNotFoundError(f"no image file {key}.* under {root_uri}")


def read_images(source_uri: str, keys: set[str], icfg: InputConfig, s3: S3Config) -> dict[str, bytes | str]:
    """key -> image bytes, or the reason they could not be read. Never raises."""
    out: dict[str, bytes | str] = {}
    try:
        if icfg.format == "folder":
            for key in keys:
                try:
                    fs, _ = filesystem(source_uri, s3)
                    out[key] = read_capped(fs, _folder_file(source_uri, key, s3), icfg.max_image_bytes)
                except Exception as e:  # noqa: BLE001 - one image's problem
                    out[key] = describe(e)
            return out
        rows = {r["key"]: r for r in read_shard(Shard("report", source_uri), icfg, s3, READ_POLICY)}
    except Exception as e:  # noqa: BLE001 - the shard is gone or unreadable: every image says why
        return {k: f"cannot read {redact(source_uri)}: {describe(e)}" for k in keys}
    broken = rows.get(SHARD_KEY, {}).get("read_error")
    fetcher = None
    for key in keys:
        r = rows.get(key)
        if r is None:
            out[key] = broken or f"no sample {key} in {redact(source_uri)}"
        elif r.get("read_error"):
            out[key] = str(r["read_error"])
        elif r.get("image") is not None:
            out[key] = bytes(r["image"])
        else:
            try:
                fetcher = fetcher or _fetcher(icfg, s3)
                out[key] = fetcher.fetch(str(r["image_uri"]), source_uri)
            except Exception as e:  # noqa: BLE001
                out[key] = describe(e)
    return out


@dataclasses.dataclass
class Thumb:
    jpeg: bytes
    size: tuple[int, int]  # the thumbnail's (width, height)
    source_size: tuple[int, int]  # the decoded image's (width, height), EXIF-rotated as the job saw it


def display_size(size: tuple[int, int], side: int = THUMB_SIDE) -> tuple[int, int]:
    """The size a thumbnail is shown at: fitted to `side` (small images are scaled up too)."""
    w, h = size
    scale = side / max(w, h, 1)
    return max(1, round(w * scale)), max(1, round(h * scale))


def thumbnail(data: bytes, max_pixels: int | None = None, side: int = THUMB_SIDE) -> Thumb:
    """A JPEG no larger than `side` on either side; raises what decoding raises."""
    from cogvlm.processor import open_image, to_rgb  # the job's own decoding: same orientation and modes

    if not data:
        raise ValueError("empty image file (0 bytes)")
    image = open_image(data, max_pixels=max_pixels)
    source = image.size
    image = to_rgb(image)
    image.thumbnail((side, side))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return Thumb(buf.getvalue(), image.size, source)


