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

from .config import InputConfig, S3Config

PASSTHROUGH = "passthrough"
TXT = "txt"
PEEK_SAMPLES = 50  # webdataset: the first shard's samples that type the carried fields


def carry_problem(inp: InputConfig) -> str | None:
    """A one-line config error for `input.carry_columns`, or None."""
    cols = inp.carry_columns
    if not cols:
        return None
    from .ledger import SCHEMA  # pyarrow: only when there is something to check

    if inp.format == "folder":
        return "input.carry_columns needs input.format parquet or webdataset (folder input has no source columns)"
    clash = [c for c in cols if c in SCHEMA.names]
    if clash:
        return (f"input.carry_columns: {', '.join(map(repr, clash))} would replace the output column(s) of "
                f"that name; carry other columns (e.g. original_width, not width)")
    if len(set(cols)) != len(cols):
        return "input.carry_columns names a column twice"
    return None


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


# --- the driver's side: one type per column, for every shard --------------------------------------

def carry_schema(cfg: InputConfig, s3: S3Config, shards: list[Any]) -> Any:
    """The carried columns' `pa.Schema` (None without carry_columns), from the first shard(s)."""
    import pyarrow as pa

    if not cfg.carry_columns:
        return None
    if cfg.format == "parquet":
        import pyarrow.parquet as pq

        from .storage import filesystem

        for shard in shards[:3]:
            fs, path = filesystem(shard.uri, s3)
            try:
                with fs.open(path, "rb") as f:
                    schema = pq.ParquetFile(f).schema_arrow
            except Exception:  # noqa: BLE001 - unreadable: the reader reports it as an error row
                continue
            return pa.schema([schema.field(c) if c in schema.names else pa.field(c, pa.string())
                              for c in cfg.carry_columns])
        return pa.schema([pa.field(c, pa.string()) for c in cfg.carry_columns])
    first: dict[str, Any] = {}
    for shard in shards[:3]:  # the first shard, or the next ones if it leaves fields untyped
        for k, v in _peek_tar(cfg, s3, shard).items():
            first.setdefault(k, v)
        if len(first) == len(cfg.carry_columns):
            break
    return pa.schema([pa.field(c, _json_type(first.get(c))) for c in cfg.carry_columns])


def _peek_tar(cfg: InputConfig, s3: S3Config, shard: Any) -> dict[str, Any]:
    """Each carried field's first non-null value among the shard's first PEEK_SAMPLES samples."""
    from .readers import _tar_samples, unsupported_tar

    found: dict[str, Any] = {}
    if unsupported_tar(shard.uri):
        return found
    try:
        for n, row in enumerate(_tar_samples(shard, cfg, s3, 0, 1 << 20)):
            for k, v in (row.get("carry") or {}).items():
                if v is not None:
                    found.setdefault(k, v)
            if n + 1 >= PEEK_SAMPLES or len(found) == len(cfg.carry_columns):
                break
    except Exception:  # noqa: BLE001 - an unreadable first shard: its fields are typed string
        pass
    return found


def _json_type(v: Any) -> Any:
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
    """`table` (ledger.to_table of `rows`, which it sorted by image and task) with the carried
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
    """The data files' schema: ledger.SCHEMA and then the carried columns."""
    from .ledger import SCHEMA

    if schema is None:
        return SCHEMA
    out = SCHEMA
    for f in schema:
        out = out.append(f)
    return out
