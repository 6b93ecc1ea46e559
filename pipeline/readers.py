"""Input shards (the unit of work, retry and resume) and reading them as raw bytes, never decoded."""

from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

from . import carry, img2dataset
from .config import InputConfig, RetryConfig, S3Config
from .errors import IMAGE_TOO_LARGE, READ_ERROR, TRANSIENT, TransientError, describe, is_transient, retry
from .storage import filesystem, list_files, to_uri

# files with these extensions are images: each gets a row (decode_error if no decoder here reads
# it: SVG, HEIC, JPEG XL, camera raw); any other file is not an image and is skipped and counted
IMAGE_EXTENSIONS = frozenset(
    "jpg jpeg jpe jfif png apng webp bmp dib gif tif tiff ico cur icns tga pcx ppm pgm pbm pnm pfm "
    "qoi psd jp2 j2k jpx jpf j2c jpc avif avifs sgi rgb rgba bw dds xbm xpm mpo blp ras im msp "
    "svg svgz heic heif jxl dng cr2 cr3 nef arw orf rw2 raf".split())

ROW_COLUMNS = ["shard_id", "source_uri", "shard_total", "image_index", "key", "image", "image_uri",
               "questions", "read_error", "read_status"]
SHARD_KEY = "__shard__"  # the key of the row that reports a shard which broke mid-way

# webdataset shards: tars as webdataset's TarWriter/ShardWriter writes them (plain, gzip, bz2, xz)
# and its reader reads them (tarfile's "r|*"). A plain tar's shard id drops ".tar"; the others keep
# their whole name, so `a.tar` and `a.tar.gz` never share an id.
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# tars compressed in a way neither webdataset nor this reader reads: each is a shard whose one row
# is a read_error naming the kind, never silently passed over
OTHER_TAR_SUFFIXES = (".tar.zst", ".tar.zstd", ".tzst", ".tar.lz4", ".tar.lzma", ".tar.lz", ".tar.lzo",
                      ".tar.br", ".tar.sz", ".tar.z", ".tar.7z")


class InputError(ValueError):
    """The input cannot be read at all (missing prefix, no shards, wrong columns)."""


@dataclass
class Shard:
    shard_id: str
    uri: str  # the tar / parquet file, or the folder for folder chunks
    files: list[str] = field(default_factory=list)  # folder input: this chunk's image files

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class InputPlan:
    shards: list[Shard]
    root: str  # the input's location: the prefix, or the folder of a single input file
    skipped_files: int = 0  # files under the input that are neither shards nor images
    skipped_examples: list[str] = field(default_factory=list)
    # why -> {"files": count, "examples": the first few} (see skip_reason)
    skipped_reasons: dict[str, dict[str, Any]] = field(default_factory=dict)


_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-_")


def shard_id(relpath: str) -> str:
    """A file-name-safe, injective id for a shard's path relative to the input root.

    '/' becomes '~'; '~', '%' and every other byte outside [A-Za-z0-9._-] are %-escaped (so
    `a/b` and `a__b` stay apart); a leading '_' or '.' is escaped too, since dataset readers
    (pandas, pyarrow, DuckDB's hive discovery) skip files whose names start with them. Ids over
    180 bytes keep a readable head and a hash of the whole path.
    """
    out = []
    for i, part in enumerate(relpath.split("/")):
        esc = "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in part)
        out.append(esc)
    sid = "~".join(out)
    if not sid:
        sid = "%"  # the empty stem (a file named '.tar'); no escaped id is a lone '%'
    elif sid[0] in "_.":
        sid = f"%{ord(sid[0]):02X}{sid[1:]}"
    if len(sid.encode()) > 180:
        sid = f"{sid[:150]}~{hashlib.sha256(relpath.encode()).hexdigest()[:24]}"
    return sid


def _relative(root: str, path: str, suffix: str) -> str:
    rel = posixpath.relpath(path, root) if path != root else posixpath.basename(path)
    return rel[: -len(suffix)] if rel.endswith(suffix) else rel


def is_image_name(name: str) -> bool:
    base = posixpath.basename(name)
    return "." in base and base.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def plan_input(cfg: InputConfig, s3: S3Config) -> InputPlan:
    """List the input's shards in a stable order; raises InputError when there is nothing to read
    or two files would map to one shard id."""
    fs, root = filesystem(cfg.path, s3)

    def listing() -> tuple[bool, bool, list[str]]:
        exists = fs.exists(root)
        return exists, exists and fs.isfile(root), list_files(fs, root) if exists else []

    try:
        exists, is_file, files = retry(listing, f"listing {cfg.path}", 30.0)
    except Exception as e:  # noqa: BLE001 - backend errors (auth, endpoint) become one clear message
        raise InputError(f"cannot list input {cfg.path}: {describe(e)}") from None
    if not exists:
        raise InputError(f"input {cfg.path} does not exist")
    base = root if not is_file else posixpath.dirname(root)
    if cfg.format in ("webdataset", "parquet"):
        suffix = ".tar" if cfg.format == "webdataset" else ".parquet"
        chosen = [f for f in files if (is_tar_shard(f) if cfg.format == "webdataset" else f.endswith(suffix))]
        shards = [Shard(shard_id(_relative(base, f, suffix)), to_uri(fs, f)) for f in chosen]
    else:
        chosen = [f for f in files if is_image_name(f)]
        n = max(1, cfg.images_per_shard)
        shards = [Shard(f"part-{i // n:05d}", to_uri(fs, base), [to_uri(fs, f) for f in chosen[i:i + n]])
                  for i in range(0, len(chosen), n)]
    if not shards:
        kind = {"webdataset": ".tar", "parquet": ".parquet", "folder": "image"}[cfg.format]
        raise InputError(f"no {kind} files under {cfg.path}")
    seen: dict[str, str] = {}
    for s in shards:
        if s.shard_id in seen:  # cannot happen with shard_id()'s escaping unless the hash collides
            raise InputError(f"{seen[s.shard_id]} and {s.uri} map to the same shard id {s.shard_id}")
        seen[s.shard_id] = s.uri
    taken = set(chosen)
    skipped = [posixpath.relpath(f, base) for f in files if f not in taken]
    return InputPlan(shards, to_uri(fs, base), len(skipped), skipped[:5], skip_reasons(cfg, skipped, taken, base))


def plan_shards(cfg: InputConfig, s3: S3Config) -> list[Shard]:
    return plan_input(cfg, s3).shards


def tar_kind(name: str) -> str | None:
    """The webdataset shard suffix of a file name (TAR_SUFFIXES or OTHER_TAR_SUFFIXES, matched
    without regard to case), or None: not a tar shard."""
    low = posixpath.basename(name).lower()
    return next((s for s in TAR_SUFFIXES + OTHER_TAR_SUFFIXES if low.endswith(s)), None)


def is_tar_shard(name: str) -> bool:
    """A plain `.tar` (as before) or any compressed tar kind: each is a shard, read or reported."""
    return name.endswith(".tar") or tar_kind(name) is not None


def unsupported_tar(uri: str) -> str | None:
    """Why a webdataset shard cannot be read at all (its compression), or None."""
    kind = tar_kind(uri)
    if kind in OTHER_TAR_SUFFIXES:
        return (f"unsupported shard kind {kind}: webdataset shards are read as .tar, .tar.gz/.tgz, "
                f".tar.bz2/.tbz2 or .tar.xz/.txz; recompress it as one of those")
    return None


SKIP_NOT_SHARD = {"webdataset": "not a tar shard (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz)",
                  "parquet": "not a .parquet file", "folder": "not an image (by its extension)"}
SKIP_SIDECAR = "img2dataset metadata (a shard's .parquet or _stats.json, an image's .txt or .json)"


def skip_reason(fmt: str, rel: str, taken: set[str], base: str) -> str:
    """Why the job does not read the file `rel` (relative to the input's location): img2dataset's
    own metadata (a shard's `_stats.json` or `.parquet` listing beside a webdataset or files
    shard, an image's `.txt`/`.json` in files output), or not being the input's kind."""
    stem, ext = posixpath.splitext(rel)
    if stem.endswith("_stats") and ext == ".json":
        return SKIP_SIDECAR
    if fmt == "webdataset" and ext == ".parquet" and any(
            posixpath.join(base, stem + s) in taken for s in TAR_SUFFIXES):
        return SKIP_SIDECAR
    if fmt == "folder" and ext in (".txt", ".json", ".parquet"):
        return SKIP_SIDECAR if ext == ".parquet" or any(
            posixpath.join(base, f"{stem}.{e}") in taken for e in ("jpg", "png", "webp", "jpeg")
        ) else SKIP_NOT_SHARD[fmt]
    return SKIP_NOT_SHARD[fmt]


def skip_reasons(cfg: InputConfig, skipped: list[str], taken: set[str], base: str) -> dict[str, dict[str, Any]]:
    """Skipped files by reason (`skip_reason`): how many, and the first 3 names."""
    out: dict[str, dict[str, Any]] = {}
    for rel in skipped:
        entry = out.setdefault(skip_reason(cfg.format, rel, taken, base), {"files": 0, "examples": []})
        entry["files"] += 1
        if len(entry["examples"]) < 3:
            entry["examples"].append(rel)
    return out


def check_parquet_columns(cfg: InputConfig, s3: S3Config, shards: list[Shard], tries: int = 3) -> None:
    """Check the configured columns against the schema of the first readable shard (its footer
    only), so that a wrong column name fails before any work. Unreadable files are left to the
    readers, which report them as error rows."""
    for shard in shards[:tries]:
        fs, path = filesystem(shard.uri, s3)
        try:
            names = retry(lambda: _parquet_columns(fs, path), f"reading the schema of {shard.uri}", 30.0)
        except Exception:  # noqa: BLE001 - not Parquet / unreachable: the reader reports it per shard
            continue
        problem = _missing_columns(cfg, names)
        if problem:
            raise InputError(f"{shard.uri}: {problem}")
        return


def _parquet_columns(fs: Any, path: str) -> list[str]:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        return list(pq.ParquetFile(f).schema_arrow.names)


def _missing_columns(cfg: InputConfig, cols: list[str]) -> str | None:
    cfg = img2dataset.resolve(cfg, cols)
    for col in cfg.carry_columns if cfg.format == "parquet" else ():
        if col not in cols:
            return f"no column {col!r} (input.carry_columns); columns: {cols}"
    for name, col in (("input.uri_column", cfg.uri_column), ("input.key_column", cfg.key_column),
                      ("input.questions_column", cfg.questions_column)):
        if col and col not in cols:
            return f"no column {col!r} ({name}); columns: {cols}"
    if not cfg.uri_column and (not cfg.image_column or cfg.image_column not in cols):
        return f"no image column {cfg.image_column!r} (input.image_column); columns: {cols}"
    return None


def _questions(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return json.dumps([value])
    return json.dumps([str(q) for q in value])


def _row(key: str, image: Any = None, uri: str | None = None, questions: str | None = None,
         error: str | None = None, status: str | None = None) -> dict[str, Any]:
    return {"key": key, "image": image, "image_uri": uri, "questions": questions, "read_error": error,
            "read_status": (status or READ_ERROR) if error is not None else None}


# --- reading a shard as a stream of bounded blocks ---------------------------------------------

TOTAL_UNKNOWN = -1  # shard_total of a row whose shard's size is not known yet (not its last block)
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
                if not member.isfile():
                    continue
                base = posixpath.basename(member.name)
                if "." not in base or base.startswith("."):
                    continue
                name = posixpath.join(posixpath.dirname(member.name), base.split(".", 1)[0])
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
                    _add_member(tar, member, base.split(".", 1)[1].lower(), sample, cfg)
    except Exception as e:
        if sample is not None and _is_corrupt_tar(e) and not is_transient(e):
            yield _sample_row(key, sample)  # the bytes end here for good: keep what this sample had
        raise
    if sample is not None:
        yield _sample_row(key, sample)


def _add_member(tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str, sample: dict[str, Any],
                cfg: InputConfig) -> None:
    kind = ext.rsplit(".", 1)[-1]  # webdataset decodes a field by its last extension: "b.c.jpg" is a jpg
    if kind in IMAGE_EXTENSIONS and "image" not in sample:
        if member.size > cfg.max_image_bytes:
            sample["error"] = (f"image file is {member.size} bytes, over max_image_bytes "
                               f"({cfg.max_image_bytes})", IMAGE_TOO_LARGE)
            sample["image"] = None
        else:
            data = tar.extractfile(member)
            sample["image"] = data.read() if data is not None else None
    elif kind == "json" and (cfg.questions_column or cfg.carry_columns):
        data = tar.extractfile(member)
        try:
            meta = json.loads(data.read()) if data is not None else {}
            carry.add_sidecar(sample, "json", meta, cfg)
            if cfg.questions_column:
                sample["questions"] = _questions(meta.get(cfg.questions_column))
        except (ValueError, AttributeError) as e:
            sample["error"] = (f"bad json sidecar: {describe(e)}", READ_ERROR)
    elif kind == carry.TXT and carry.TXT in cfg.carry_columns:
        data = tar.extractfile(member)
        carry.add_sidecar(sample, carry.TXT, data.read().decode("utf-8", "replace") if data is not None else None, cfg)


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
        problem = _missing_columns(cfg, names)
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
    q = _questions(data[cfg.questions_column][j]) if cfg.questions_column else None
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
