"""Reading a shard (worker side): its samples as raw bytes, never decoded, in bounded blocks.

The driver's look at the input (listing, shard ids, counts) is `pipeline.listing`.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from typing import Any, Callable, Iterator

from . import carry, img2dataset
from .config import InputConfig, RetryConfig, S3Config
from .errors import IMAGE_TOO_LARGE, READ_ERROR, TRANSIENT, TransientError, describe, is_transient, retry
from .listing import IMAGE_EXTENSIONS, Shard, missing_columns, sample_key, unsupported_tar
from .rows import SHARD_KEY, TOTAL_UNKNOWN, questions_json
from .storage import filesystem


def _row(key: str, image: Any = None, uri: str | None = None, questions: str | None = None,
         error: str | None = None, status: str | None = None) -> dict[str, Any]:
    return {"key": key, "image": image, "image_uri": uri, "questions": questions, "read_error": error,
            "read_status": (status or READ_ERROR) if error is not None else None}


# --- reading a shard as a stream of bounded blocks ---------------------------------------------

MB = 1024 * 1024
ROW_OVERHEAD = 256  # bytes a row counts for beside its image bytes and text (dict, key, ints)

Row = dict[str, Any]


def read_block_bytes(cfg: InputConfig) -> int:
    """The read block budget in bytes (`input.read_block_mb`)."""
    return max(1, int(cfg.read_block_mb * MB))


def row_bytes(row: Row) -> int:
    """What a row counts for in a block's budget: its image bytes, its text, a fixed overhead."""
    text = sum(len(row[k]) for k in ("key", "image_uri", "questions", "read_error") if row.get(k))
    return len(row["image"] or b"") + text + ROW_OVERHEAD


def iter_shard(shard: Shard, cfg: InputConfig, s3: S3Config, policy: RetryConfig | None = None,
               block_bytes: int | None = None) -> Iterator[list[Row]]:
    """The shard's rows (ROW_COLUMNS) in blocks whose rows count for at most `block_bytes` in all
    (`row_bytes`; default `input.read_block_mb`); a row larger than that goes alone in its block.

    `image_index` counts 0.. over the whole shard, in file order. The shard's size is known only
    at the end of its stream, so every row of every block but the last carries
    `shard_total = TOTAL_UNKNOWN` (-1) and every row of the last block the true total: the number
    of rows the shard yielded in all, error rows included. At least one row is held back until the
    stream ends, so the last block is never empty; a shard without rows yields no block.

    A corrupt tar or Parquet file keeps the rows read so far and ends with one SHARD_KEY
    read_error row. Rows once produced are never taken back: a transient failure (network,
    throttling) is retried for `policy.deadline_s` (counted from the row that failed) by reopening
    the file and passing over the rows already produced; if it persists the shard ends with one
    SHARD_KEY TRANSIENT row, which is never committed. A file that is missing or forbidden is one
    SHARD_KEY read_error row.
    """
    policy = policy or RetryConfig()
    budget = max(1, int(block_bytes)) if block_bytes is not None else read_block_bytes(cfg)
    if cfg.format == "webdataset" and unsupported_tar(shard.uri):
        rows = iter([_row(SHARD_KEY, error=unsupported_tar(shard.uri))])
    elif cfg.format == "webdataset":
        rows = _resumable(shard, lambda skip: _tar_samples(shard, cfg, s3, skip, budget), policy, _tar_broken)
    elif cfg.format == "parquet":
        rows = _resumable(shard, lambda skip: _parquet_rows(shard, cfg, s3, skip, budget), policy,
                          _parquet_broken)
    else:
        rows = _folder_rows(shard)
    if cfg.carry_columns:
        rows = carry.with_passthrough(rows)
    return _blocks(shard, rows, budget)


def read_shard(shard: Shard, cfg: InputConfig, s3: S3Config, policy: RetryConfig | None = None) -> list[Row]:
    """The whole shard as one list (`iter_shard` flattened); every row carries the true total."""
    rows = [row for block in iter_shard(shard, cfg, s3, policy) for row in block]
    for r in rows:
        r["shard_total"] = len(rows)
    return rows


def shard_blocks_fn(cfg: InputConfig, s3: S3Config, policy: RetryConfig) -> Callable[[Shard], Iterator[Row]]:
    """A generator function for Ray Data's `flat_map`: a shard's rows, streamed block by block.

    Ray adds the rows to a block builder and cuts a block once it holds more than the plan's
    `DataContext.target_max_block_size`, so set that to `read_block_bytes(cfg)` on the dataset
    (`ds.context.target_max_block_size`): a read task then holds about three blocks (the one this
    reader fills, Ray's buffer, and Ray's copy of it into Arrow), not the shard.
    """
    def rows(shard: Shard) -> Iterator[Row]:
        for block in iter_shard(shard, cfg, s3, policy):
            for i, row in enumerate(block):
                block[i] = None  # once yielded, the row lives in Ray's block builder only
                yield row

    return rows


def _blocks(shard: Shard, rows: Iterator[Row], budget: int) -> Iterator[list[Row]]:
    """Rows into blocks of at most `budget` bytes; a block is yielded only once the next row has
    been read, so the last one is known and gets the total."""
    block: list[Row] = []
    size = n = 0
    for row in rows:
        b = row_bytes(row)
        if block and size + b > budget:
            yield block
            block, size = [], 0
        row.update(shard_id=shard.shard_id, source_uri=shard.uri, shard_total=TOTAL_UNKNOWN, image_index=n)
        block.append(row)
        size += b
        n += 1
    for row in block:
        row["shard_total"] = n
    if block:
        yield block


def _resumable(shard: Shard, attempt: Callable[[int], Iterator[Row]], policy: RetryConfig,
               broken: Callable[[BaseException, int], str | None]) -> Iterator[Row]:
    """The rows of `attempt(skip)`, a pass over the file that passes over its first `skip` rows.
    A transient failure is retried (`errors.retry`, its deadline counted from the row that
    failed) by a new pass from where the stream broke; if it persists, a SHARD_KEY TRANSIENT row
    ends the shard. `broken(e, rows)` names a permanent failure (a final SHARD_KEY read_error row),
    or None for an unknown one (a SHARD_KEY TRANSIENT row)."""
    done = 0
    stream: Iterator[Row] | None = None

    def next_row() -> Row | None:
        nonlocal stream
        if stream is None:
            stream = attempt(done)
        try:
            return next(stream, None)
        except Exception:
            stream = None  # a failed generator is finished: the retry starts a new pass
            raise

    while True:
        try:
            row = retry(next_row, f"reading {shard.uri}", policy.deadline_s, policy.backoff_s)
        except TransientError as e:
            yield _row(SHARD_KEY, error=str(e), status=TRANSIENT)
            return
        except Exception as e:  # noqa: BLE001 - permanent or unknown: the shard ends with an error row
            message = broken(e, done)
            yield (_row(SHARD_KEY, error=message) if message is not None else
                   _row(SHARD_KEY, error=f"unexpected error reading {shard.uri}: {describe(e)}", status=TRANSIENT))
            return
        if row is None:
            return
        done += 1
        yield row


_GONE = (FileNotFoundError, PermissionError, IsADirectoryError)


def _open(fs: Any, path: str, budget: int) -> Any:
    """The file; on S3 read ahead in requests of a quarter block, clamped to 1-16 MB."""
    return fs.open(path, "rb", block_size=int(min(16 * MB, max(MB, budget // 4))))


# --- webdataset tars -----------------------------------------------------------------------------

def _tar_samples(shard: Shard, cfg: InputConfig, s3: S3Config, skip: int, budget: int) -> Iterator[Row]:
    """One pass over a tar, one row per sample (webdataset: a sample's files are consecutive, and a
    sample ends where the key changes); the first `skip` samples are passed over unread.

    A key that comes back after other samples (its files are not consecutive) cannot join its
    sample's row, which is already out: its files form a read_error row of their own, with the
    same key and the next image_index, and are not read.
    """
    fs, path = filesystem(shard.uri, s3)
    seen: set[str] = set()
    key, sample, index = None, None, -1
    try:
        with _open(fs, path, budget) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in iter(tar.next, None):
                tar.members.clear()  # else stream mode keeps every header (~0.5 KB each) to the end
                sample_of = sample_key(member.name) if member.isfile() else None
                if sample_of is None:
                    continue
                name, ext = sample_of
                if name != key:
                    if sample is not None:
                        yield _sample_row(key, sample)
                    key, index = name, index + 1
                    sample = {} if index >= skip else None  # None: emitted by an earlier attempt
                    if name in seen and sample is not None:
                        sample["error"] = (f"files of sample {name!r} are not consecutive in the tar "
                                           "(webdataset layout): this part is not read", READ_ERROR)
                        sample["stray"] = True
                    seen.add(name)
                if sample is not None and "stray" not in sample:
                    _add_member(tar, member, ext, sample, cfg)
    except Exception as e:
        if sample is not None and _is_corrupt_tar(e) and not is_transient(e):
            yield _sample_row(key, sample)  # the bytes end here for good: keep what this sample had
        raise
    if sample is not None:
        yield _sample_row(key, sample)


def _add_member(tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str, sample: dict[str, Any],
                cfg: InputConfig) -> None:
    if ext in IMAGE_EXTENSIONS and "image" not in sample:
        if member.size > cfg.max_image_bytes:
            sample["error"] = (f"image file is {member.size} bytes, over max_image_bytes "
                               f"({cfg.max_image_bytes})", IMAGE_TOO_LARGE)
            sample["image"] = None
        else:
            data = tar.extractfile(member)
            sample["image"] = data.read() if data is not None else None
    elif ext == "json" and (cfg.questions_column or cfg.carry_columns):
        data = tar.extractfile(member)
        try:
            meta = json.loads(data.read()) if data is not None else {}
            carry.add_sidecar(sample, "json", meta, cfg)
            if cfg.questions_column:
                sample["questions"] = questions_json(meta.get(cfg.questions_column))
        except (ValueError, AttributeError) as e:
            sample["error"] = (f"bad json sidecar: {describe(e)}", READ_ERROR)
    elif ext == carry.TXT and carry.TXT in cfg.carry_columns:
        data = tar.extractfile(member)
        text = data.read().decode("utf-8", "replace") if data is not None else None
        carry.add_sidecar(sample, carry.TXT, text, cfg)


def _sample_row(key: str, s: dict[str, Any]) -> Row:
    err, status = s.get("error", (None, None))
    if "image" not in s and err is None:
        err = "sample has no image file"
    row = _row(key, s.get("image"), questions=s.get("questions"), error=err, status=status)
    if s.get("carry"):
        row["carry"] = s["carry"]
    return row


def _tar_broken(e: BaseException, done: int) -> str | None:
    if done == 0 and isinstance(e, tarfile.ReadError):  # e.g. a file named .tar that is not one
        return f"not a tar archive (or not compressed as its name says): {describe(e)}"
    if _is_corrupt_tar(e):  # a truncated/corrupt tar keeps what was read
        return f"shard read failed after {done} samples: {describe(e)}"
    if isinstance(e, _GONE):
        return f"shard read failed: {describe(e)}"
    return None


def _is_corrupt_tar(e: BaseException) -> bool:
    """The bytes themselves are bad (truncated, not a tar, bad compression): a permanent answer.
    Anything else (an unknown error) must not be committed as the shard's final state."""
    import gzip  # bz2's errors are OSError("Invalid data stream")
    import lzma
    import zlib

    return isinstance(e, (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)) or (
        type(e) is OSError and "Invalid data stream" in str(e))


# --- Parquet -------------------------------------------------------------------------------------

def _parquet_rows(shard: Shard, cfg: InputConfig, s3: S3Config, skip: int, budget: int) -> Iterator[Row]:
    """One pass over a Parquet file by record batches of the needed columns (row groups before
    `skip` are not read); a wrong column is one SHARD_KEY read_error row."""
    import pyarrow.parquet as pq

    fs, path = filesystem(shard.uri, s3)
    with _open(fs, path, budget) as f:
        pf = pq.ParquetFile(f, buffer_size=min(budget, 4 * MB), pre_buffer=False)
        names = list(pf.schema_arrow.names)
        problem = missing_columns(cfg, names)
        if problem is not None:
            yield _row(SHARD_KEY, error=problem)
            return
        cfg = img2dataset.resolve(cfg, names)  # input.image_column auto: this file's image column
        extra = img2dataset.status_columns(names) + carry.parquet_columns(cfg, names)
        meta = pf.metadata
        groups, first = list(range(meta.num_row_groups)), 0
        while groups and first + meta.row_group(groups[0]).num_rows <= skip:
            first += meta.row_group(groups.pop(0)).num_rows
        avg = sum(meta.row_group(g).total_byte_size for g in groups) / max(1, sum(
            meta.row_group(g).num_rows for g in groups))
        columns = [c for c in (cfg.key_column, cfg.uri_column or cfg.image_column, cfg.questions_column) if c]
        stem = posixpath.basename(shard.uri).rsplit(".", 1)[0]
        i = first
        for batch in pf.iter_batches(batch_size=max(1, int(budget // (4 * max(avg, 1.0)))), row_groups=groups,
                                     columns=list(dict.fromkeys(columns + extra))):
            data = batch.to_pydict()
            for j in range(batch.num_rows):
                if i >= skip:
                    yield _parquet_extras(cfg, data, j, _parquet_row(cfg, data, j, f"{stem}-{i:06d}"))
                i += 1


def _parquet_extras(cfg: InputConfig, data: dict[str, list[Any]], j: int, row: Row) -> Row:
    """The row with img2dataset's download status (`img2dataset.download_row`) and the carried
    columns (`input.carry_columns`) of record `j`."""
    row = img2dataset.download_row(row, data, j)
    if cfg.carry_columns:
        row["carry"] = carry.from_record(data, j, [c for c in cfg.carry_columns if c in data])
    return row


def _parquet_row(cfg: InputConfig, data: dict[str, list[Any]], j: int, default_key: str) -> Row:
    key = str(data[cfg.key_column][j]) if cfg.key_column else default_key
    uri = data[cfg.uri_column][j] if cfg.uri_column else None
    image = None if cfg.uri_column else data[cfg.image_column][j]
    err = None
    if cfg.uri_column and not uri:
        err = "empty image URI"
    elif cfg.uri_column and not isinstance(uri, str):
        err = f"image URI is not a string ({type(uri).__name__})"
        uri = None
    elif not cfg.uri_column and image is None:
        err = "no image bytes in row"
    elif not cfg.uri_column and not isinstance(image, (bytes, bytearray)):
        err = f"image column holds {type(image).__name__}, not bytes"
        image = None
    q = questions_json(data[cfg.questions_column][j]) if cfg.questions_column else None
    return _row(key, image, uri, q, err)


def _parquet_broken(e: BaseException, done: int) -> str | None:
    import pyarrow as pa

    if isinstance(e, (pa.ArrowInvalid, *_GONE)):  # not Parquet, truncated: the job goes on
        return f"not a readable Parquet file{f' after {done} rows' if done else ''}: {describe(e)}"
    return None


# --- folders -------------------------------------------------------------------------------------

def _folder_rows(shard: Shard) -> Iterator[Row]:
    root = shard.uri.rstrip("/")
    for uri in shard.files:
        rel = uri[len(root) + 1:] if uri.startswith(root + "/") else posixpath.basename(uri)
        yield _row(rel.rsplit(".", 1)[0], uri=uri)


PEEK_SAMPLES = 50  # webdataset: the first shard's samples that type the carried fields


# --- the carried columns' types, read on the driver (pipeline.carry) ---------------------------------

def carried_schema(cfg: InputConfig, s3: S3Config, shards: list[Shard]) -> Any:
    """The carried columns' `pa.Schema` (`input.carry_columns`, pipeline.carry; None without
    them), read on the driver from the first shard(s), so that every shard's file has one type
    per column."""
    import pyarrow as pa

    if not cfg.carry_columns:
        return None
    if cfg.format == "parquet":
        import pyarrow.parquet as pq

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
    return pa.schema([pa.field(c, carry.json_type(first.get(c))) for c in cfg.carry_columns])


def _peek_tar(cfg: InputConfig, s3: S3Config, shard: Any) -> dict[str, Any]:
    """Each carried field's first non-null value among the shard's first PEEK_SAMPLES samples."""
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
