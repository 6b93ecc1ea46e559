"""Filesystems for local paths and `s3://` URIs (fsspec), configured without credentials in code."""

from __future__ import annotations

import os
import posixpath
import stat
import threading
import uuid
from typing import Any

import fsspec

from .config import S3Config
from .errors import error_code, retry
from .layout import TMP


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_options(s3: S3Config) -> dict[str, Any]:
    """s3fs options from the config. Credentials: the environment / profile / instance role; with
    no `s3.endpoint_url`, botocore itself reads AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL."""
    opts: dict[str, Any] = {}
    client: dict[str, Any] = {}
    if s3.endpoint_url:
        client["endpoint_url"] = s3.endpoint_url
    if s3.region:
        client["region_name"] = s3.region
    if client:
        opts["client_kwargs"] = client
    if s3.profile:
        opts["profile"] = s3.profile
    if s3.anonymous:
        opts["anon"] = True
    # botocore retries each request (connection errors, throttling, 5xx) with backoff; timeouts
    # make a hung connection an error instead of a stall
    # (max_pool_connections: the default 10 capped Preprocess's 16 concurrent image fetches)
    opts["config_kwargs"] = {"retries": {"max_attempts": s3.max_attempts, "mode": "standard"},
                             "connect_timeout": s3.connect_timeout_s, "read_timeout": s3.read_timeout_s,
                             "max_pool_connections": 32}
    return opts


def filesystem(uri: str, s3: S3Config) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path without scheme) for a local path or s3:// URI."""
    if is_s3(uri):
        return fsspec.filesystem("s3", **s3_options(s3)), uri[len("s3://"):].rstrip("/")
    return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(uri)).rstrip("/")


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return f"s3://{path}" if protocol in ("s3", "s3a") else path


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes,
                       tmp_root: str | None = None) -> None:
    """Whole-or-nothing write: an S3 PUT is atomic; locally write a temp file and rename it.

    The temp file goes to `tmp_root/_tmp/` (same filesystem, so the rename is atomic), not beside
    `path`: a failed write (disk full) must not leave a partial file where dataset readers look.
    """
    if is_s3(to_uri(fs, path)):
        fs.pipe_file(path, data)
        return
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp_dir = posixpath.join(tmp_root or posixpath.dirname(path), TMP)
    os.makedirs(tmp_dir, exist_ok=True)
    tmp = posixpath.join(tmp_dir, f"{posixpath.basename(path)}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def fresh_exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """`exists` asked of the store itself, not of s3fs's listing cache (another run may have
    written `path` since this process listed its folder)."""
    fs.invalidate_cache(path)
    fs.invalidate_cache(posixpath.dirname(path))
    return bool(fs.exists(path))


def read_capped(fs: fsspec.AbstractFileSystem, path: str, max_bytes: int) -> bytes:
    """Read a whole regular file, refusing devices, FIFOs and sockets and anything over
    `max_bytes` (counted while reading: a device reports size 0 and never ends)."""
    if is_s3(to_uri(fs, path)):
        with fs.open(path, "rb", block_size=min(max_bytes + 1, 8 * 1024 * 1024)) as f:
            data = f.read(max_bytes + 1)
    else:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError("not a regular file")
            os.set_blocking(fd, True)
            chunks, n = [], 0
            while n <= max_bytes:
                chunk = os.read(fd, min(1 << 20, max_bytes + 1 - n))
                if not chunk:
                    break
                chunks.append(chunk)
                n += len(chunk)
            data = b"".join(chunks)
        finally:
            os.close(fd)
    if len(data) > max_bytes:
        raise FileTooLarge(f"image file is over max_image_bytes ({max_bytes} bytes)")
    return data


class FileTooLarge(ValueError):
    """A file over the configured byte limit."""


def list_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """All files under `root` (or `root` itself if it is a file), sorted; S3 folder markers skipped."""
    if fs.isfile(root):
        return [root]
    if is_s3(to_uri(fs, root)):
        # names only: no per-key detail dicts for listings of 100k+ keys; folder markers end in "/"
        return sorted(p for p in fs.find(root, detail=False) if not p.endswith("/"))
    # locally the walk stats every entry anyway: keep regular files only (no links, FIFOs, sockets)
    return sorted(p for p, info in fs.find(root, detail=True).items() if info.get("type") == "file")


def put_conditional(fs: fsspec.AbstractFileSystem, path: str, data: bytes, **condition: Any) -> bool:
    """An S3 PUT under a condition (`mode="create"` for If-None-Match: *, or `IfMatch=etag`).
    False when the service says the condition failed (412 PreconditionFailed, 409
    ConditionalRequestConflict: a concurrent conditional write won); other errors are raised."""
    try:
        fs.pipe_file(path, data, **condition)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if error_code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
            return False
        raise


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create `path` only if it does not exist (S3 conditional PUT / an exclusive hard link). True if we created it.

    On S3 only the service's answer counts as "exists": 412 PreconditionFailed, or 409
    ConditionalRequestConflict (a concurrent conditional write won); any other error is raised.
    """
    if is_s3(to_uri(fs, path)):
        return put_conditional(fs, path, data, mode="create")
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    # write whole, then link: nobody ever sees the file empty or half-written
    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.new"
    with open(tmp, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


class UriRefused(ValueError):
    """A data-borne URI outside the allowed locations (or of an unsupported scheme)."""


class UriPolicy:
    """Which image URIs a dataset may point at: the input's own location and the configured
    `allowed_uri_prefixes`, nothing else (not /etc, /proc, $HOME, or other buckets).

    Relative URIs are resolved against the folder of the shard file that holds them. Local paths
    are compared after resolving symlinks and '..'; S3 keys may not hold '.' or '..' segments.
    """

    def __init__(self, input_root: str, allowed: list[str] | tuple[str, ...] = ()) -> None:
        """`input_root`: the input's location (a folder or prefix, never a file's path)."""
        self.local: list[str] = []
        self.s3: list[str] = []
        for p in [input_root, *allowed]:
            scheme, path = self._split(p)
            if scheme == "s3":
                self.s3.append(path.rstrip("/"))
            else:
                self.local.append(os.path.realpath(os.path.expanduser(path)))

    @staticmethod
    def _split(uri: str) -> tuple[str, str]:
        if "://" not in uri:
            return "file", uri
        scheme, path = uri.split("://", 1)
        scheme = scheme.lower()
        if scheme in ("s3", "s3a"):
            return "s3", path
        if scheme == "file":
            return "file", path
        raise UriRefused(f"unsupported URI scheme {scheme}:// (local paths and s3:// are read)")

    def resolve(self, uri: str, base: str) -> tuple[str, str]:
        """('file' | 's3', path without scheme) for `uri`, or UriRefused."""
        scheme, path = self._split(uri)
        refused = UriRefused(f"URI refused: {uri} is outside the input location and "
                             f"input.allowed_uri_prefixes")
        if scheme == "s3":
            if any(seg in (".", "..") for seg in path.split("/")):
                raise refused
            if not any(path == p or path.startswith(p + "/") for p in self.s3):
                raise refused
            return "s3", path
        if not path.startswith("/") and "://" not in uri:  # relative: beside the shard file
            b_scheme, b_path = self._split(base)
            if b_scheme == "s3":
                joined = posixpath.normpath(posixpath.join(b_path, path))
                return self.resolve(f"s3://{joined}", base)
            path = os.path.join(b_path, path)
        real = os.path.realpath(path)
        if not any(real == p or real.startswith(p.rstrip(os.sep) + os.sep) for p in self.local):
            raise refused
        return "file", real


class ConfinedFetcher:
    """The bytes behind data-borne URIs (a Parquet `uri_column`): confined by a `UriPolicy`, regular
    files only, size-capped while reading, transient failures retried for `deadline_s`. Safe to
    call from many threads (each scheme's filesystem is made once)."""

    def __init__(self, input_root: str, allowed: list[str] | tuple[str, ...], s3: S3Config, max_bytes: int,
                 deadline_s: float, backoff_s: float = 0.5) -> None:
        self.policy = UriPolicy(input_root, allowed)
        self.s3, self.max_bytes = s3, max_bytes
        self.deadline_s, self.backoff_s = deadline_s, backoff_s
        self._fs: dict[str, fsspec.AbstractFileSystem] = {}
        self._lock = threading.Lock()

    def fetch(self, uri: str, source_uri: str) -> bytes:
        """`uri`'s bytes; relative URIs are resolved beside `source_uri` (the shard file holding
        them). Raises UriRefused, FileTooLarge, FileNotFoundError, ... or TransientError."""
        scheme, path = self.policy.resolve(uri, base=posixpath.dirname(source_uri))
        with self._lock:
            if scheme not in self._fs:
                self._fs[scheme] = filesystem("s3://" if scheme == "s3" else "/", self.s3)[0]
            fs = self._fs[scheme]
        return retry(lambda: read_capped(fs, path, self.max_bytes), f"fetching {uri}", self.deadline_s,
                     self.backoff_s)
