"""Shard-level ledger and the output's Parquet schema: the resume state is one small file per shard.

Layout under the output prefix:

    data/<shard_id>.parquet      all rows of one input shard (written whole, then...)
    _ledger/<shard_id>.json      ...this marker: the shard is committed (counts, run id, file)
    _parts/<shard_id>/*.parquet  rows the replicas wrote, merged into data/ at commit (pipeline.sink)
    _runs/<run_id>/summary.json  one per run, with the resolved config beside it
    _claims/<shard_id>.json      a live run's lease on a shard it is processing
    _tmp/                        local outputs: files being written, renamed into place when whole

Shard ids never start with '_' or '.', so no data file is hidden from dataset readers.

A rerun skips shards with a marker. A kill between the data file and its marker leaves a data
file without a marker; the rerun rewrites the same file name, so nothing is duplicated.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pyarrow as pa

from .storage import fresh_exists, join, write_bytes_atomic

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

    def mark(self, record: dict[str, Any]) -> None:
        """Write the shard's marker (after its data file is whole): the shard is committed."""
        write_bytes_atomic(self.fs, join(self.dir, f"{record['shard_id']}.json"), json.dumps(record).encode(),
                           tmp_root=self.root)


from .claims import Claims  # noqa: E402,F401 - re-exported (claims live in pipeline.claims)
