"""Real test inputs: images (good and bad), WebDataset tar shards, Parquet files."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def good_image(seed: int, size: tuple[int, int] = (48, 36), fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return _save(Image.fromarray(arr, "RGB"), fmt)


def huge_png_header(w: int = 100000, h: int = 100000) -> bytes:
    """A PNG that declares w x h pixels (a decompression bomb's header) with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


def bad_images() -> dict[str, tuple[str, bytes, str]]:
    """name -> (extension, bytes, expected status)."""
    jpeg = good_image(99, (64, 64))
    cmyk = _save(Image.new("CMYK", (30, 20), (10, 200, 30, 0)), "JPEG")
    png16 = _save(Image.fromarray((np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)), "PNG")
    pal = Image.new("P", (20, 20))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((5, 5), 1)
    pal_png = _save(pal, "PNG", transparency=0)
    frames = [Image.new("RGB", (24, 24), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return {
        "truncated": ("jpg", jpeg[: len(jpeg) // 2], "decode_error"),
        "empty": ("jpg", b"", "decode_error"),
        "notimage": ("jpg", b"this is not an image at all", "decode_error"),
        "bomb": ("png", huge_png_header(), "image_too_large"),
        "cmyk": ("jpg", cmyk, "ok"),
        "png16": ("png", png16, "ok"),
        "palette": ("png", pal_png, "ok"),
        "animated": ("gif", buf.getvalue(), "ok"),
    }


def write_tar(path: Path, samples: list[tuple[str, str, bytes, dict | None]]) -> None:
    """samples: (key, image extension, image bytes, json sidecar or None); img2dataset layout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, ext, data, meta in samples:
            members = [(f"{key}.{ext}", data), (f"{key}.txt", f"caption of {key}".encode())]
            if meta is not None:
                members.append((f"{key}.json", json.dumps(meta).encode()))
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def webdataset_shards(root: Path, n_shards: int, per_shard: int, bad: bool = False,
                      questions: bool = False) -> dict[str, str]:
    """Write `n_shards` tars (+ img2dataset sidecars); returns key -> expected status."""
    expected = {}
    bads = list(bad_images().items()) if bad else []
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            meta = {"questions": [f"Is sample {i} red?"] * (i % 3)} if questions else {"url": key}
            samples.append((key, "jpg", good_image(s * 100 + i), meta))
            expected[key] = "ok"
        if s == 0:
            for j, (name, (ext, data, status)) in enumerate(bads):
                key = f"{s:05d}9{j:03d}"
                samples.append((key, ext, data, None))
                expected[key] = status
        write_tar(root / f"{s:05d}.tar", samples)
        (root / f"{s:05d}.parquet").write_bytes(b"PAR1 not really: an img2dataset sidecar")
        (root / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard}))
    return expected
