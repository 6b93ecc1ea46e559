"""Input shards (the unit of work, retry and resume) and reading them as raw bytes, never decoded."""

from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile
from dataclasses import asdict, dataclass, field
from typing import Any

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
        chosen = [f for f in files if f.endswith(suffix)]
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
    return InputPlan(shards, to_uri(fs, base), len(skipped), skipped[:5])


def plan_shards(cfg: InputConfig, s3: S3Config) -> list[Shard]:
    return plan_input(cfg, s3).shards


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


def _read_tar(shard: Shard, cfg: InputConfig, s3: S3Config) -> tuple[dict[str, dict[str, Any]], str | None]:
    """One pass over a tar: (samples by key, error that broke the stream or None). Transient
    failures are raised (the caller starts over); a corrupt tar keeps what was read."""
    fs, path = filesystem(shard.uri, s3)
    samples: dict[str, dict[str, Any]] = {}
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = posixpath.basename(member.name)
                if "." not in base or base.startswith("."):
                    continue
                key = posixpath.join(posixpath.dirname(member.name), base.split(".", 1)[0])
                ext = base.split(".", 1)[1].lower()
                sample = samples.setdefault(key, {})
                if ext in IMAGE_EXTENSIONS and "image" not in sample:
                    if member.size > cfg.max_image_bytes:
                        sample["error"] = (f"image file is {member.size} bytes, over max_image_bytes "
                                           f"({cfg.max_image_bytes})", IMAGE_TOO_LARGE)
                        sample["image"] = None
                    else:
                        data = tar.extractfile(member)
                        sample["image"] = data.read() if data is not None else None
                elif ext == "json" and cfg.questions_column:
                    data = tar.extractfile(member)
                    try:
                        meta = json.loads(data.read()) if data is not None else {}
                        sample["questions"] = _questions(meta.get(cfg.questions_column))
                    except (ValueError, AttributeError) as e:
                        sample["error"] = (f"bad json sidecar: {describe(e)}", READ_ERROR)
    except Exception as e:  # noqa: BLE001 - a truncated/corrupt tar keeps what was read
        if is_transient(e) or not _is_corrupt_tar(e):
            raise
        return samples, f"shard read failed after {len(samples)} samples: {describe(e)}"
    return samples, None


def _is_corrupt_tar(e: BaseException) -> bool:
    """The bytes themselves are bad (truncated, not a tar, bad compression): a permanent answer.
    Anything else (an unknown error) must not be committed as the shard's final state."""
    import gzip  # bz2's errors are OSError("Invalid data stream")
    import lzma
    import zlib

    return isinstance(e, (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)) or (
        type(e) is OSError and "Invalid data stream" in str(e))


def _read_or_error_row(shard: Shard, read: Any, policy: RetryConfig, corrupt: tuple[type, ...] = (),
                       what: str = "shard read failed") -> tuple[Any, list[dict[str, Any]] | None]:
    """(`read()`, None), retrying transient failures; or (None, the shard's one error row): a final
    read_error when the bytes are bad (`corrupt`) or the file is gone or forbidden, a TRANSIENT row
    (never committed) when the failure may pass or is unknown."""
    try:
        return retry(read, f"reading {shard.uri}", policy.deadline_s, policy.backoff_s), None
    except TransientError as e:
        return None, [_row(SHARD_KEY, error=str(e), status=TRANSIENT)]
    except Exception as e:  # noqa: BLE001
        if isinstance(e, (*corrupt, FileNotFoundError, PermissionError, IsADirectoryError)):
            return None, [_row(SHARD_KEY, error=f"{what}: {describe(e)}")]
        return None, [_row(SHARD_KEY, error=f"unexpected error reading {shard.uri}: {describe(e)}", status=TRANSIENT)]


def _rows_from_tar(shard: Shard, cfg: InputConfig, s3: S3Config, policy: RetryConfig) -> list[dict[str, Any]]:
    result, failed = _read_or_error_row(shard, lambda: _read_tar(shard, cfg, s3), policy)
    if failed:
        return failed
    samples, error = result
    rows = []
    for key, s in samples.items():
        err, status = s.get("error", (None, None))
        if "image" not in s and err is None:
            err = "sample has no image file"
        rows.append(_row(key, s.get("image"), questions=s.get("questions"), error=err, status=status))
    if error is not None:
        rows.append(_row(SHARD_KEY, error=error))
    return rows


def _read_parquet(shard: Shard, s3: S3Config) -> Any:
    import pyarrow.parquet as pq

    fs, path = filesystem(shard.uri, s3)
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def _rows_from_parquet(shard: Shard, cfg: InputConfig, s3: S3Config, policy: RetryConfig) -> list[dict[str, Any]]:
    import pyarrow as pa

    # not Parquet, truncated: one error row, the job goes on
    table, failed = _read_or_error_row(shard, lambda: _read_parquet(shard, s3), policy, (pa.ArrowInvalid,),
                                       "not a readable Parquet file")
    if failed:
        return failed
    cols = table.column_names
    problem = _missing_columns(cfg, cols)
    if problem is not None:
        return [_row(SHARD_KEY, error=problem)]
    stem = posixpath.basename(shard.uri).rsplit(".", 1)[0]
    data = table.to_pydict()
    rows = []
    for i in range(table.num_rows):
        key = str(data[cfg.key_column][i]) if cfg.key_column else f"{stem}-{i:06d}"
        uri = data[cfg.uri_column][i] if cfg.uri_column else None
        image = None if cfg.uri_column else data[cfg.image_column][i]
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
        q = _questions(data[cfg.questions_column][i]) if cfg.questions_column else None
        rows.append(_row(key, image, uri, q, err))
    return rows


def _rows_from_folder(shard: Shard) -> list[dict[str, Any]]:
    root = shard.uri.rstrip("/")
    rows = []
    for uri in shard.files:
        rel = uri[len(root) + 1:] if uri.startswith(root + "/") else posixpath.basename(uri)
        rows.append(_row(rel.rsplit(".", 1)[0], uri=uri))
    return rows


def read_shard(shard: Shard, cfg: InputConfig, s3: S3Config, policy: RetryConfig | None = None) -> list[dict[str, Any]]:
    """The shard's samples as rows (ROW_COLUMNS); every row carries the shard's total sample count.

    Transient failures are retried for `policy.deadline_s`; if they persist the shard yields one
    TRANSIENT row, which the driver never commits.
    """
    policy = policy or RetryConfig()
    if cfg.format == "webdataset":
        rows = _rows_from_tar(shard, cfg, s3, policy)
    elif cfg.format == "parquet":
        rows = _rows_from_parquet(shard, cfg, s3, policy)
    else:
        rows = _rows_from_folder(shard)
    total = len(rows)
    for i, r in enumerate(rows):
        r.update(shard_id=shard.shard_id, source_uri=shard.uri, shard_total=total, image_index=i)
    return rows
