"""Every row contract between the stages, and the output's Parquet schema.

    read task   -> ROW_COLUMNS           a sample's raw bytes (or URI) and where it came from
    Preprocess  -> PREPROCESSED_COLUMNS  pixels (pipeline.transport) and token ids per prompt
    Generate    -> OUTPUT_COLUMNS        one row per (image, prompt), with a status
    PartSink    -> RECORD_COLUMNS        what the driver receives per written part
    merge       -> SCHEMA                data/<shard_id>.parquet (`to_table`)
    processor   -> RESULT_COLUMNS        what `build_processor` adds to a user's rows

`shard_total` is TOTAL_UNKNOWN on every block of a shard but its last (the size is known only at
the end of the stream); a shard that breaks mid-way ends with one row keyed SHARD_KEY.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

ROW_COLUMNS = ["shard_id", "source_uri", "shard_total", "image_index", "key", "image", "image_uri",
               "questions", "read_error", "read_status"]
PREPROCESSED_COLUMNS = ["shard_id", "source_uri", "shard_total", "image_index", "key", "status",
                        "error_message", "width", "height", "pixels", "pixels_format", "prompts", "prompt_ids",
                        "passthrough"]
OUTPUT_COLUMNS = ["key", "source_uri", "shard_id", "shard_total", "image_index", "image_tasks", "task",
                  "task_index", "prompt", "response", "boxes_json", "status", "error_message",
                  "prompt_tokens", "output_tokens", "finish_reason", "generation_s", "width", "height",
                  "generation_settings", "model_source", "model_fingerprint", "passthrough"]
# what the driver receives per written part (a few hundred bytes, whatever the part's size)
RECORD_COLUMNS = ["shard_id", "part", "images", "shard_total", "rows", "transient", "failures"]

PASSTHROUGH = "passthrough"  # a processor's user columns, pickled per row, carried through the stages
SHARD_KEY = "__shard__"  # the key of the row that reports a shard which broke mid-way
TOTAL_UNKNOWN = -1  # shard_total of a row whose shard's size is not known yet (not its last block)

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

# what a processor adds to each row (the CLI's Parquet schema less the shard and run fields)
RESULT_COLUMNS = [f.name for f in SCHEMA if f.name not in ("shard_id", "image_index", "run_id", "timestamp")]


def none_if_missing(v: Any) -> Any:
    """pandas gives NaN for missing numbers and strings: make them None."""
    if v is None:
        return None
    try:
        if v != v:  # NaN
            return None
    except (TypeError, ValueError):
        pass
    return v


def questions_json(value: Any) -> str | None:
    """A row's own VQA question(s) (a string or a list) as the JSON list the stages carry."""
    if value is None:
        return None
    if isinstance(value, str):
        return json.dumps([value])
    return json.dumps([str(q) for q in value])


def boxes_from_json(boxes_json: Any) -> tuple[list[dict[str, Any]] | None, list[str] | None]:
    """Generate's `boxes_json` -> (a list of BOX dicts, the parse errors), or (None, None)."""
    boxes_json = none_if_missing(boxes_json)
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
        boxes, errors = boxes_from_json(r.get("boxes_json"))
        for f in SCHEMA:
            if f.name == "boxes":
                v = boxes
            elif f.name == "box_errors":
                v = errors
            elif f.name in run:
                v = run[f.name]
            else:
                v = none_if_missing(r.get(f.name))
                if v is not None and pa.types.is_integer(f.type):
                    v = int(v)
            cols[f.name].append(v)
    return pa.table(cols, schema=SCHEMA)
