"""How an image travels from `Preprocess` (CPU actors) to `Generate` (GPU actors) through the
object store: the smaller of the image file's own bytes and its resized uint8 pixels.

Measured in `bench/transport.py` (photo-like JPEGs at quality 90, 56 KB at 640x480 and 131 KB at
1024x768): object-store bytes per image fall from 720 KB to the file's size for v1's S = 490
(5.5-13x) and from 5.4 MB for v2's S = 1344 (41-96x). The CPU work moves: Preprocess drops from
5-25 ms to 1-3 ms per image, Generate's side rises from 1.5 ms (v1) / 12 ms (v2) to 7-12 ms / 32-36 ms
(decode, resize, normalize), run on `Generate`'s decode threads while its engine works on other
batches. How the column is stored changes no bytes: Ray Data turns a pandas batch's bytes column into
an Arrow binary column (nothing pickled), within 0.01% of a uint8 tensor column.

`Preprocess` still decodes every image in full (`pack`), so corrupt, oversized and bomb images get
their status there; it skips only the resize when it forwards the file. `unpack` gives the pixels
bit for bit as `Preprocess` would have made them (the same `open_image` and `resize_image`).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from cogvlm.processor import open_image, resize_image, to_rgb

from .errors import describe

SOURCE = "source"  # `pixels` holds the image file's bytes, decoded and resized by `unpack`
RAW = "raw"  # `pixels` holds uint8 (S, S, 3) pixels, C order

COLUMNS = ("pixels", "pixels_format")


class UndecodableImage(ValueError):
    """Forwarded file bytes that did not decode in `Generate` (they did in `Preprocess`)."""


def raw_bytes(image_size: int) -> int:
    """Bytes of one image's uint8 (S, S, 3) pixels."""
    return image_size * image_size * 3


def pack(data: bytes, image_size: int, *, max_pixels: int | None = None) -> tuple[dict[str, Any], int, int]:
    """An image file, decoded in full -> its transport columns (`COLUMNS`) and its (width, height)
    after EXIF rotation. The file's bytes travel when smaller than the resized pixels, else the
    pixels. Decode errors (and `max_pixels` refusals, as ValueError) are raised here."""
    image = open_image(data, max_pixels=max_pixels)
    w, h = image.size
    if len(data) < raw_bytes(image_size):
        to_rgb(image)  # all of `resize_image` but the resize itself: its failures surface here too
        return {"pixels": bytes(data), "pixels_format": SOURCE}, w, h
    return {"pixels": resize_image(image, image_size).tobytes(), "pixels_format": RAW}, w, h


def unpack(row: Mapping[str, Any], image_size: int) -> np.ndarray:
    """(S, S, 3) uint8, writable: the pixels of a row `pack` made (without `pixels_format`: raw).
    Forwarded bytes that fail to decode raise `UndecodableImage` (MemoryError passes as it is)."""
    fmt = row.get("pixels_format") or RAW
    if fmt == SOURCE:
        try:
            return resize_image(open_image(bytes(row["pixels"])), image_size)
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure is this image's
            raise UndecodableImage(f"the image decoded in Preprocess but not in Generate: {describe(e)}") from e
    if fmt != RAW:
        raise ValueError(f"unknown pixels_format {fmt!r}")
    S = image_size
    return np.frombuffer(row["pixels"], dtype=np.uint8).reshape(S, S, 3).copy()
