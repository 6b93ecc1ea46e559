"""`input.carry_columns`: source metadata carried into the output rows as extra columns.

Parquet input carries the named source columns; webdataset input carries `txt` (the sample's
.txt file, as text) and the named keys of its .json sidecar (img2dataset's `url`,
`original_width`, `sha256`, ...). Each becomes a column of data/<shard>.parquet, after the
standard ones, with one type for every shard of the run, fixed on the driver before any work:
a Parquet column keeps its type in the first readable file; a webdataset field takes the type of
its first non-null value in the first shard's first samples (or the next shards', up to 3) (string for `txt`, text, null and
nested values, which are written as JSON; int64, float64 or bool for JSON numbers and booleans).
A value that does not fit its column's type in a later shard is null there. A field a sample
lacks is null. Error rows (a broken shard's `__shard__` row) carry nothing.

The values travel with the reader's row in the `passthrough` column (a pickled dict, as the
processor API's user columns do) through Preprocess and Generate to the sink.
"""

from __future__ import annotations

import json
import pickle
from typing import Any, Iterator

from .config import InputConfig
from .rows import PASSTHROUGH, SCHEMA

TXT = "txt"


# --- the reader's side ------------------------------------------------------------------------

def add_sidecar(sample: dict[str, Any], kind: str, value: Any, cfg: InputConfig) -> None:
    """Keep what `cfg.carry_columns` asks of a webdataset sample's .txt text or .json object."""
    if not cfg.carry_columns:
        return
    carried = sample.setdefault("carry", {})
    if kind == TXT and TXT in cfg.carry_columns:
        carried[TXT] = value
    elif kind == "json" and isinstance(value, dict):
        carried.update({c: value[c] for c in cfg.carry_columns if c != TXT and c in value})


def parquet_columns(cfg: InputConfig, cols: list[str]) -> list[str]:
    """The carried columns a Parquet file has (the plan checked the first file has them all)."""
    return [c for c in cfg.carry_columns if c in cols]


def from_record(data: dict[str, list[Any]], j: int, cols: list[str]) -> dict[str, Any]:
    return {c: data[c][j] for c in cols}


def with_passthrough(rows: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every row with the `passthrough` column: its carried values pickled, or None (a block's rows
    must all have the same columns)."""
    for row in rows:
        carried = row.pop("carry", None)
        row[PASSTHROUGH] = pickle.dumps(carried) if carried else None
        yield row


def json_type(v: Any) -> Any:
    """The column type a carried JSON value fixes (string for text, null and nested values)."""
    import pyarrow as pa

    if isinstance(v, bool):
        return pa.bool_()
    if isinstance(v, int):
        return pa.int64()
    if isinstance(v, float):
        return pa.float64()
    return pa.string()


# --- the sink's side ----------------------------------------------------------------------------

def _fit(v: Any, t: Any) -> Any:
    """`v` as a value of arrow type `t` where the JSON kinds allow, else None."""
    import pyarrow as pa

    if v is None:
        return None
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        if isinstance(v, str):
            return v
        if isinstance(v, (bytes, bytearray)):
            return bytes(v).decode("utf-8", "replace")
        return json.dumps(v, default=str)
    if pa.types.is_boolean(t):
        return v if isinstance(v, bool) else None
    if pa.types.is_integer(t):
        if isinstance(v, bool):
            return None
        if isinstance(v, float) and v.is_integer():
            return int(v)
        return v if isinstance(v, int) else None
    if pa.types.is_floating(t):
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    return v


def add_columns(table: Any, rows: list[dict[str, Any]], schema: Any) -> Any:
    """`table` (rows.to_table of `rows`, which it sorted by image and task) with the carried
    columns of `schema` appended, from each row's `passthrough`."""
    import pyarrow as pa

    if schema is None or not len(schema):
        return table
    rows = sorted(rows, key=lambda r: (int(r["image_index"]), int(r["task_index"])))  # as to_table
    carried = [pickle.loads(r[PASSTHROUGH]) if isinstance(r.get(PASSTHROUGH), (bytes, bytearray)) else {}
               for r in rows]
    for f in schema:
        values = [c.get(f.name) for c in carried]
        try:
            col = pa.array(values, type=f.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
            fitted = []
            for v in values:
                try:
                    pa.array([_fit(v, f.type)], type=f.type)
                    fitted.append(_fit(v, f.type))
                except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
                    fitted.append(None)
            col = pa.array(fitted, type=f.type)
        table = table.append_column(f, col)
    return table


def output_schema(schema: Any) -> Any:
    """The data files' schema: rows.SCHEMA and then the carried columns."""
    if schema is None:
        return SCHEMA
    out = SCHEMA
    for f in schema:
        out = out.append(f)
    return out
