"""Filesystems for local paths and `s3://` URIs (fsspec), configured without credentials in code."""

from __future__ import annotations

import os
import posixpath
from typing import Any

import fsspec

from .config import S3Config


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_options(s3: S3Config) -> dict[str, Any]:
    """s3fs options from the config. Credentials: the environment / profile / instance role."""
    opts: dict[str, Any] = {}
    client: dict[str, Any] = {}
    endpoint = s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        client["endpoint_url"] = endpoint
    if s3.region:
        client["region_name"] = s3.region
    if client:
        opts["client_kwargs"] = client
    if s3.profile:
        opts["profile"] = s3.profile
    if s3.anonymous:
        opts["anon"] = True
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


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Whole-or-nothing write: an S3 PUT is atomic; locally write a temp file and rename."""
    if to_uri(fs, path).startswith("s3://"):
        fs.pipe_file(path, data)
        return
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def list_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """All files under `root` (or `root` itself if it is a file), sorted; S3 folder markers skipped."""
    if fs.isfile(root):
        return [root]
    found = fs.find(root, detail=True)
    return sorted(p for p, info in found.items() if info.get("type") == "file" and not p.endswith("/"))


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create `path` only if it does not exist (S3 conditional PUT / O_EXCL). True if we created it."""
    if to_uri(fs, path).startswith("s3://"):
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except (FileExistsError, OSError) as e:
            if isinstance(e, FileExistsError) or "PreconditionFailed" in str(e) or "412" in str(e) \
                    or getattr(e, "errno", None) == 22:
                return False
            raise
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True
