"""The driver's look at the input: its shards (the unit of work, retry and resume), their ids,
the image counts, and a check of the Parquet columns, without reading any image.

    list_input(cfg.input, s3) -> InputListing   shards in a stable order, the input's root, skipped files
    count_images(cfg, shards)                  images per shard from sidecars, tar headers, footers

The worker side (streaming a shard's bytes) is `pipeline.readers`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from . import img2dataset
from .config import InputConfig, JobConfig, S3Config
from .errors import METADATA_DEADLINE_S, InputError, describe, retry
from .storage import filesystem, list_files, to_uri

# files with these extensions are images: each gets a row (decode_error if no decoder here reads
# it: SVG, HEIC, JPEG XL, camera raw); any other file is not an image and is skipped and counted
IMAGE_EXTENSIONS = frozenset(
    "jpg jpeg jpe jfif png apng webp bmp dib gif tif tiff ico cur icns tga pcx ppm pgm pbm pnm pfm "
    "qoi psd jp2 j2k jpx jpf j2c jpc avif avifs sgi rgb rgba bw dds xbm xpm mpo blp ras im msp "
    "svg svgz heic heif jxl dng cr2 cr3 nef arw orf rw2 raf".split())

# webdataset shards: tars as webdataset's TarWriter/ShardWriter writes them (plain, gzip, bz2, xz)
# and its reader reads them (tarfile's "r|*"). A plain tar's shard id drops ".tar"; the others keep
# their whole name, so `a.tar` and `a.tar.gz` never share an id.
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# tars compressed in a way neither webdataset nor this reader reads: each is a shard whose one row
# is a read_error naming the kind, never silently passed over
OTHER_TAR_SUFFIXES = (".tar.zst", ".tar.zstd", ".tzst", ".tar.lz4", ".tar.lzma", ".tar.lz", ".tar.lzo",
                      ".tar.br", ".tar.sz", ".tar.z", ".tar.7z")
SKIP_NOT_SHARD = {"webdataset": "not a tar shard (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz)",
                  "parquet": "not a .parquet file", "folder": "not an image (by its extension)"}
SKIP_SIDECAR = "img2dataset metadata (a shard's .parquet or _stats.json, an image's .txt or .json)"

log = logging.getLogger("pipeline")

EXACT, ESTIMATED = "exact", "estimated"
COUNT_SHARDS = 200  # most shards opened to count images; the rest are extrapolated by size


@dataclass
class Shard:
    shard_id: str
    uri: str  # the tar / parquet file, or the folder for folder chunks
    files: list[str] = field(default_factory=list)  # folder input: this chunk's image files

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class InputListing:
    shards: list[Shard]
    root: str  # the input's location: the prefix, or the folder of a single input file
    skipped_files: int = 0  # files under the input that are neither shards nor images
    skipped_examples: list[str] = field(default_factory=list)
    # why -> {"files": count, "examples": the first few} (see skip_reason)
    skipped_reasons: dict[str, dict[str, Any]] = field(default_factory=dict)

    def log_skipped(self, fmt: str) -> None:
        """Log the files the job will not read, with the reasons (a line per reason)."""
        if not self.skipped_files:
            return
        log.info("%d files under the input are not %s and were skipped (e.g. %s)", self.skipped_files,
                 "images" if fmt == "folder" else "shards", ", ".join(self.skipped_examples))
        for why, skipped in self.skipped_reasons.items():
            log.info("  skipped %d files: %s (e.g. %s)", skipped["files"], why, ", ".join(skipped["examples"]))


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


def sample_key(member_name: str) -> tuple[str, str] | None:
    """A webdataset tar member's (sample key, kind), or None for a member that belongs to no sample
    (no extension, or a hidden file). As webdataset's `base_plus_ext`: the key is the path up to the
    first dot of the file name, and the field's kind is its last extension, so `dir/a.b.jpg` is a
    jpg of sample `dir/a`."""
    base = posixpath.basename(member_name)
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return posixpath.join(posixpath.dirname(member_name), stem), ext.rsplit(".", 1)[-1].lower()


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


def input_root(path: str, s3: S3Config) -> str:
    """The input's location as a URI, as `list_input` gives it: the prefix, or the folder of a
    single input file."""
    fs, root = filesystem(path, s3)
    return to_uri(fs, _location(root, fs.isfile(root)))


def _location(root: str, is_file: bool) -> str:
    return posixpath.dirname(root) if is_file else root


def list_input(cfg: InputConfig, s3: S3Config) -> InputListing:
    """List the input's shards in a stable order; raises InputError when there is nothing to read
    or two files would map to one shard id."""
    fs, root = filesystem(cfg.path, s3)

    def listing() -> tuple[bool, bool, list[str]]:
        exists = fs.exists(root)
        return exists, exists and fs.isfile(root), list_files(fs, root) if exists else []

    try:
        exists, is_file, files = retry(listing, f"listing {cfg.path}", METADATA_DEADLINE_S)
    except Exception as e:  # noqa: BLE001 - backend errors (auth, endpoint) become one clear message
        raise InputError(f"cannot list input {cfg.path}: {describe(e)}") from None
    if not exists:
        raise InputError(f"input {cfg.path} does not exist")
    base = _location(root, is_file)
    if cfg.format in ("webdataset", "parquet"):
        suffix = ".tar" if cfg.format == "webdataset" else ".parquet"
        shard_file = is_tar_shard if cfg.format == "webdataset" else (lambda f: f.endswith(suffix))
        chosen = [f for f in files if shard_file(f)]
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
    return InputListing(shards, to_uri(fs, base), len(skipped), skipped[:5],
                        skip_reasons(cfg, skipped, taken, base))


def check_parquet_columns(cfg: InputConfig, s3: S3Config, shards: list[Shard], tries: int = 3) -> None:
    """Check the configured columns against the schema of the first readable shard (its footer
    only), so that a wrong column name fails before any work. Unreadable files are left to the
    readers, which report them as error rows."""
    for shard in shards[:tries]:
        fs, path = filesystem(shard.uri, s3)
        try:
            names = retry(lambda: _parquet_columns(fs, path), f"reading the schema of {shard.uri}",
                          METADATA_DEADLINE_S)
        except Exception:  # noqa: BLE001 - not Parquet / unreachable: the reader reports it per shard
            continue
        problem = missing_columns(cfg, names)
        if problem:
            raise InputError(f"{shard.uri}: {problem}")
        return


def _parquet_columns(fs: Any, path: str) -> list[str]:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        return list(pq.ParquetFile(f).schema_arrow.names)


def missing_columns(cfg: InputConfig, cols: list[str]) -> str | None:
    """What the configured columns lack in a Parquet file with columns `cols`, or None."""
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


# --- counting images without decoding any ------------------------------------------------------

def _tar_images(fs: Any, path: str) -> int:
    """Samples with an image in a tar, from its headers (`sample_key`, as the readers group them);
    member data is seeked over, not read, where the file can seek."""
    keys: set[str] = set()
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
        for member in tar:
            sample = sample_key(member.name) if member.isfile() else None
            if sample is not None and sample[1] in IMAGE_EXTENSIONS:
                keys.add(sample[0])
    return len(keys)


def _sidecar_successes(fs: Any, path: str) -> int | None:
    try:
        n = json.loads(fs.cat_file(path)).get("successes")
    except (ValueError, AttributeError):
        return None
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None


def _parquet_num_rows(fs: Any, path: str) -> int:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def _count_one(cfg: JobConfig, shard: Shard, files: set[str]) -> tuple[int | None, str, str | None]:
    """(images, method, error) for one shard, opened."""
    fs, path = filesystem(shard.uri, cfg.s3)
    try:
        if cfg.input.format == "parquet":
            sidecar = path[: -len(".parquet")] + "_stats.json"  # img2dataset's: its failed downloads are
            if cfg.input.failed_downloads == "skip" and sidecar in files:  # rows, but not images to do
                n = retry(lambda: _sidecar_successes(fs, sidecar), f"reading {sidecar}", METADATA_DEADLINE_S)
                if n is not None:
                    return n, "img2dataset sidecar", None
            n = retry(lambda: _parquet_num_rows(fs, path), f"reading the footer of {shard.uri}",
                      METADATA_DEADLINE_S)
            return n, "parquet footer", None
        if unsupported_tar(shard.uri):
            return None, "unreadable", unsupported_tar(shard.uri)
        sidecar = path[: -len(tar_kind(path) or ".tar")] + "_stats.json"  # a.tar.gz -> a_stats.json
        if sidecar in files:
            n = retry(lambda: _sidecar_successes(fs, sidecar), f"reading {sidecar}", METADATA_DEADLINE_S)
            if n is not None:
                return n, "img2dataset sidecar", None
        n = retry(lambda: _tar_images(fs, path), f"reading the headers of {shard.uri}", METADATA_DEADLINE_S)
        return n, "tar headers", None
    except Exception as e:  # noqa: BLE001 - one unreadable shard is reported, not fatal to a plan
        return None, "unreadable", describe(e)


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), first and last included."""
    if k >= n:
        return list(range(n))
    if k <= 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def count_images(cfg: JobConfig, shards: list[Shard], count_shards: int = COUNT_SHARDS) -> dict[str, Any]:
    """Images per shard without decoding any: `per_shard` (shard id -> count), whether the total
    is exact, and how it was counted."""
    if cfg.input.format == "folder":
        per = {s.shard_id: len(s.files) for s in shards}
        return {"per_shard": per, "images": sum(per.values()), "basis": EXACT,
                "how": f"the listing of {len(shards)} chunks of up to {cfg.input.images_per_shard} images",
                "methods": {"listing": len(shards)}, "errors": []}
    fs, root = filesystem(cfg.input.path, cfg.s3)
    found = fs.find(root, detail=True) if not fs.isfile(root) else {root: fs.info(root)}
    sizes = {to_uri(fs, p): int(info.get("size") or 0) for p, info in found.items()}
    files = set(found)
    chosen = [shards[i] for i in _spread(len(shards), max(1, count_shards))]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda s: _count_one(cfg, s, files), chosen))
    per: dict[str, int] = {}
    methods: dict[str, int] = {}
    errors = []
    for s, (n, method, err) in zip(chosen, results):
        methods[method] = methods.get(method, 0) + 1
        if n is None:
            errors.append(f"{s.uri}: {err}")
        else:
            per[s.shard_id] = n
    counted_bytes = sum(sizes.get(s.uri, 0) for s in chosen if s.shard_id in per)
    rest = [s for s in shards if s.shard_id not in per]
    if rest and not counted_bytes:  # nothing could be counted: no number rather than zero
        return {"per_shard": {}, "images": None, "basis": "unknown", "methods": methods, "errors": errors[:5],
                "how": f"no shard could be counted ({len(errors)} failed)"}
    per_byte = sum(per.values()) / counted_bytes if counted_bytes else 0.0
    for s in rest:
        per[s.shard_id] = round(sizes.get(s.uri, 0) * per_byte)
    what = " and ".join(f"{n} by {m}" for m, n in sorted(methods.items()))
    if not rest:
        how = f"all {len(shards)} shards counted: {what}"
    else:
        how = (f"estimated from {len(chosen) - len(errors)} shards ({what}), the other {len(rest)} "
               f"extrapolated by file size at {per_byte * 1e6:.3g} images per MB")
    return {"per_shard": per, "images": sum(per.values()), "basis": EXACT if not rest else ESTIMATED,
            "how": how, "methods": methods, "errors": errors[:5]}


