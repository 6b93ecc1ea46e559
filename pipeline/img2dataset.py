"""img2dataset's Parquet output as it is: its image column, its key, and its failed downloads.

img2dataset (output_format parquet) writes one row per URL of its list: `key`, `url`, `status`
(`success`, `failed_to_download`, `failed_to_resize`, ...), `error_message` (e.g. "HTTP Error 404:
File not found"), the image bytes in a column named after its encode format (`jpg`, `png` or
`webp`), `width`, `height`, `original_width`, `original_height`, `sha256`, and the caption and
other columns it was asked to keep. A failed download has no image bytes: it is not an image to
annotate, and dead URLs are the normal case of a link list.

- `input.image_column: auto` (the default) is `image` where the file has that column, else the
  encode-format column of a file with img2dataset's columns; then `key` is the row key unless
  `input.key_column` is set.
- Rows whose `status` is not `success` become DOWNLOAD_ERROR rows with img2dataset's own
  `error_message`: written as such with `input.failed_downloads: rows`, or left out of the shard's
  data file and counted in the summary (`failed_downloads_skipped`) with `skip` (the default).
  Either way they never count toward the error guard.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import InputConfig
from .errors import DOWNLOAD_ERROR

AUTO = "auto"
COLUMNS = ("key", "url", "status", "error_message")  # what makes a Parquet file img2dataset's
IMAGE_COLUMNS = ("jpg", "png", "webp", "jpeg", "avif")  # its encode formats, the image column's name
SUCCESS = "success"


def is_img2dataset(cols: list[str]) -> bool:
    return all(c in cols for c in COLUMNS)


def resolve(cfg: InputConfig, cols: list[str]) -> InputConfig:
    """`cfg` with the image (and key) column a file with columns `cols` is read by: `auto` becomes
    `image` if the file has it, else img2dataset's encode-format column (and `key` the key column
    when none is set), else `image` (so that the error names today's default)."""
    if cfg.uri_column or cfg.image_column != AUTO:
        return cfg
    if "image" in cols or not is_img2dataset(cols):
        return dataclasses.replace(cfg, image_column="image")
    found = next((c for c in IMAGE_COLUMNS if c in cols), "image")
    return dataclasses.replace(cfg, image_column=found, key_column=cfg.key_column or "key")


def status_columns(cols: list[str]) -> list[str]:
    """The columns `download_row` needs from a file with columns `cols` (none for ordinary Parquet)."""
    return ["status", "error_message"] if is_img2dataset(cols) else []


def download_row(row: dict[str, Any], data: dict[str, list[Any]], j: int) -> dict[str, Any]:
    """The reader's row for record `j`, made a DOWNLOAD_ERROR row when img2dataset's status says
    the URL was not downloaded (its error_message, not "no image bytes in row")."""
    if "status" not in data:
        return row
    status = data["status"][j]
    if status == SUCCESS:
        return row
    why = data["error_message"][j] or f"img2dataset status {status!r}"
    row.update(image=None, image_uri=None, read_error=f"{status}: {why}", read_status=DOWNLOAD_ERROR)
    return row
