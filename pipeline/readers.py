"""Input shards (the unit of work, retry and resume) and reading them as raw bytes, never decoded."""

from __future__ import annotations

import json
import posixpath
import tarfile
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import InputConfig, S3Config
from .storage import filesystem, list_files, to_uri

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

ROW_COLUMNS = ["shard_id", "source_uri", "shard_total", "image_index", "key", "image", "image_uri",
               "questions", "read_error"]


class InputError(ValueError):
    """The input cannot be read at all (missing prefix, no shards)."""


@dataclass
class Shard:
    shard_id: str
    uri: str  # the tar / parquet file, or the folder for folder chunks
    files: list[str] = field(default_factory=list)  # folder input: this chunk's image files

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _shard_id(root: str, path: str, suffix: str) -> str:
    rel = posixpath.relpath(path, root) if path != root else posixpath.basename(path)
    if rel.endswith(suffix):
        rel = rel[: -len(suffix)]
    return rel.replace("/", "__")


def plan_shards(cfg: InputConfig, s3: S3Config) -> list[Shard]:
    """List the input's shards in a stable order; raises InputError when there is nothing to read."""
    fs, root = filesystem(cfg.path, s3)
    try:
        exists = fs.exists(root)
        files = list_files(fs, root) if exists else []
    except Exception as e:  # noqa: BLE001 - backend errors (auth, endpoint) become one clear message
        raise InputError(f"cannot list input {cfg.path}: {type(e).__name__}: {e}") from e
    if not exists:
        raise InputError(f"input {cfg.path} does not exist")
    base = root if not fs.isfile(root) else posixpath.dirname(root)
    if cfg.format == "webdataset":
        shards = [Shard(_shard_id(base, f, ".tar"), to_uri(fs, f)) for f in files if f.endswith(".tar")]
    elif cfg.format == "parquet":
        shards = [Shard(_shard_id(base, f, ".parquet"), to_uri(fs, f)) for f in files
                  if f.endswith(".parquet")]
    else:
        images = [f for f in files if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS]
        n = max(1, cfg.images_per_shard)
        shards = [Shard(f"part-{i // n:05d}", to_uri(fs, base), [to_uri(fs, f) for f in images[i:i + n]])
                  for i in range(0, len(images), n)]
    if not shards:
        kind = {"webdataset": ".tar", "parquet": ".parquet", "folder": "image"}[cfg.format]
        raise InputError(f"no {kind} files under {cfg.path}")
    return shards


def _questions(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return json.dumps([value])
    return json.dumps([str(q) for q in value])


def _rows_from_tar(shard: Shard, cfg: InputConfig, s3: S3Config) -> list[dict[str, Any]]:
    fs, path = filesystem(shard.uri, s3)
    samples: dict[str, dict[str, Any]] = {}
    error = None
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
                        sample["read_error"] = f"image file is {member.size} bytes, over max_image_bytes"
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
                        sample["read_error"] = f"bad json sidecar: {e}"
    except Exception as e:  # noqa: BLE001 - a truncated/corrupt tar keeps what was read
        error = f"shard read failed after {len(samples)} samples: {type(e).__name__}: {e}"
    rows = []
    for key, s in samples.items():
        err = s.get("read_error")
        if "image" not in s and err is None:
            err = "sample has no image file"
        rows.append({"key": key, "image": s.get("image"), "image_uri": None,
                     "questions": s.get("questions"), "read_error": err})
    if error is not None:
        rows.append({"key": "__shard__", "image": None, "image_uri": None, "questions": None,
                     "read_error": error})
    return rows


def _rows_from_parquet(shard: Shard, cfg: InputConfig, s3: S3Config) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    fs, path = filesystem(shard.uri, s3)
    stem = posixpath.basename(path).rsplit(".", 1)[0]
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    cols = table.column_names
    for name, col in (("input.uri_column", cfg.uri_column), ("input.key_column", cfg.key_column),
                      ("input.questions_column", cfg.questions_column)):
        if col and col not in cols:
            raise InputError(f"{shard.uri} has no column {col!r} ({name}); columns: {cols}")
    if not cfg.uri_column and (not cfg.image_column or cfg.image_column not in cols):
        raise InputError(f"{shard.uri} has no image column {cfg.image_column!r}; columns: {cols}")
    data = table.to_pydict()
    rows = []
    for i in range(table.num_rows):
        key = str(data[cfg.key_column][i]) if cfg.key_column else f"{stem}-{i:06d}"
        uri = data[cfg.uri_column][i] if cfg.uri_column else None
        image = None if cfg.uri_column else data[cfg.image_column][i]
        err = None
        if cfg.uri_column and not uri:
            err = "empty image URI"
        elif not cfg.uri_column and image is None:
            err = "no image bytes in row"
        q = _questions(data[cfg.questions_column][i]) if cfg.questions_column else None
        rows.append({"key": key, "image": image, "image_uri": uri, "questions": q, "read_error": err})
    return rows


def _rows_from_folder(shard: Shard, cfg: InputConfig) -> list[dict[str, Any]]:
    root = shard.uri.rstrip("/")
    rows = []
    for uri in shard.files:
        rel = uri[len(root) + 1:] if uri.startswith(root + "/") else posixpath.basename(uri)
        rows.append({"key": rel.rsplit(".", 1)[0], "image": None, "image_uri": uri, "questions": None,
                     "read_error": None})
    return rows


def read_shard(shard: Shard, cfg: InputConfig, s3: S3Config) -> list[dict[str, Any]]:
    """The shard's samples as rows (ROW_COLUMNS); every row carries the shard's total sample count."""
    if cfg.format == "webdataset":
        rows = _rows_from_tar(shard, cfg, s3)
    elif cfg.format == "parquet":
        rows = _rows_from_parquet(shard, cfg, s3)
    else:
        rows = _rows_from_folder(shard, cfg)
    total = len(rows)
    for i, r in enumerate(rows):
        r.update(shard_id=shard.shard_id, source_uri=shard.uri, shard_total=total, image_index=i)
    return rows
