"""Preprocess -> Generate transport: the image file's bytes when smaller than its pixels, bit-identical
pixels on the Generate side either way, and a forwarded file that fails there is a decode_error."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cogvlm.processor import normalize, open_image, resize_image
from pipeline import load_config
from pipeline.transport import RAW, SOURCE, UndecodableImage, pack, raw_bytes, unpack

from .data import bad_images, good_image, huge_png_header
from .test_pipeline import job


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo(w: int, h: int, seed: int) -> np.ndarray:
    """(h, w, 3) uint8: smooth gradients plus grain, like a small photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([128 + 90 * np.sin(x / w * rng.uniform(2, 6) + y / h * rng.uniform(1, 4) + c) for c in range(3)], -1)
    return np.clip(arr + rng.normal(0, 6, arr.shape), 0, 255).astype(np.uint8)


def _rotated_jpeg() -> bytes:
    """A 60x40 JPEG whose EXIF says: rotate 90 degrees (orientation 6), so it is 40x60 upright."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(Image.fromarray(_photo(60, 40, 3)), "JPEG", quality=90, exif=exif.tobytes())


def _images() -> dict[str, bytes]:
    rgba = Image.fromarray(_photo(50, 30, 1)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((50, 30)))
    pal = Image.fromarray(_photo(32, 32, 5)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return {
        "jpeg": _save(Image.fromarray(_photo(64, 48, 0)), "JPEG", quality=90),
        "png_alpha": _save(rgba, "PNG"),
        "exif_rotated": _rotated_jpeg(),
        "gray": _save(Image.fromarray(_photo(40, 40, 2)[..., 0], "L"), "JPEG", quality=90),
        "cmyk": _save(Image.fromarray(_photo(30, 20, 4)).convert("CMYK"), "JPEG", quality=90),
        "palette_transparent": _save(pal, "PNG", transparency=0),
        "png16": bad_images()["png16"][1],
    }


@pytest.mark.parametrize("name", sorted(_images()))
def test_generate_side_pixels_are_those_preprocess_made_for_both_transports(name):
    """Today's path (Preprocess: open_image + resize_image, uint8 (S, S, 3)) is what Generate gets,
    bit for bit, whether the file travels (large S) or the pixels do (small S)."""
    data = _images()[name]
    for S, fmt in ((64, SOURCE), (4, RAW)):
        assert (len(data) < raw_bytes(S)) == (fmt == SOURCE), (name, len(data))  # the case meant
        expected = resize_image(open_image(data, max_pixels=10**6), S)
        columns, w, h = pack(data, S, max_pixels=10**6)
        assert columns["pixels_format"] == fmt
        got = unpack(columns, S)
        assert got.dtype == np.uint8 and got.shape == (S, S, 3) and got.flags.writeable
        assert np.array_equal(got, expected), (name, fmt)
        assert (w, h) == open_image(data).size


def test_the_file_travels_when_smaller_than_the_pixels_else_the_pixels():
    jpeg = _images()["jpeg"]
    columns, w, h = pack(jpeg, 56)
    assert columns == {"pixels": jpeg, "pixels_format": SOURCE} and (w, h) == (64, 48)
    noise = _save(Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8)), "PNG")
    assert len(noise) > raw_bytes(56)  # a lossless file larger than the resized pixels
    columns, w, h = pack(noise, 56)
    assert columns["pixels_format"] == RAW and len(columns["pixels"]) == raw_bytes(56) and (w, h) == (80, 80)
    assert np.array_equal(unpack(columns, 56), resize_image(open_image(noise), 56))
    # EXIF rotation is applied before the size is taken, as before
    assert pack(_images()["exif_rotated"], 56)[1:] == (40, 60)
    # rows without the format column (built before it existed) hold raw pixels
    px = np.arange(2 * 2 * 3, dtype=np.uint8)
    assert np.array_equal(unpack({"pixels": px.tobytes()}, 2), px.reshape(2, 2, 3))


def test_bad_files_still_fail_in_pack_and_a_bad_forwarded_file_fails_in_unpack():
    bad = bad_images()
    for name in ("truncated", "notimage"):
        with pytest.raises(Exception):
            pack(bad[name][1], 56)
    with pytest.raises(ValueError, match="pixels"):
        pack(huge_png_header(5000, 5000), 56, max_pixels=10**6)  # refused before decoding
    with pytest.raises(UndecodableImage, match="decoded in Preprocess but not in Generate"):
        unpack({"pixels": bad["truncated"][1], "pixels_format": SOURCE}, 56)
    with pytest.raises(ValueError, match="pixels_format"):
        unpack({"pixels": b"x", "pixels_format": "webp"}, 56)


def _rows(images: dict[str, bytes]) -> pd.DataFrame:
    return pd.DataFrame([{"shard_id": "s", "source_uri": "u", "shard_total": len(images), "image_index": i,
                          "key": k, "image": data, "image_uri": None, "questions": None, "read_error": None}
                         for i, (k, data) in enumerate(images.items())])


def test_preprocess_statuses_unchanged_and_generate_decodes_forwarded_files(ckpt_v1, tokenizer_v1, tmp_path):
    """Through the real stages (tiny v1, S = 56): bad images get their Preprocess status as before;
    good ones travel as file or pixels, Generate sees the same pixels either way; a forwarded file
    that does not decode in Generate gives decode_error rows, one per prompt, and nothing is lost."""
    from cogvlm.weights import read_config
    from pipeline.stages import Generate, Preprocess

    tasks = {"caption": {"max_new_tokens": 3}, "vqa": {"questions": ["What is it?"], "max_new_tokens": 2}}
    cfg = load_config(data=job(ckpt_v1, tokenizer_v1, tmp_path, tmp_path / "o", tasks=tasks,
                               input={"max_image_pixels": 10**6}))
    mcfg = read_config(ckpt_v1)
    S = mcfg.image_size
    noise_png = _save(Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 80, 3), dtype=np.uint8)), "PNG")
    good = {"jpeg": _images()["jpeg"], "rotated": _rotated_jpeg(), "noise_png": noise_png,
            "broken_later": good_image(7, (40, 30))}
    bad = {name: data for name, (_, data, status) in bad_images().items() if status != "ok"}
    pre = Preprocess.__call__(Preprocess(cfg, mcfg), _rows({**good, **bad}))
    by_key = pre.set_index("key")
    assert by_key.status.to_dict() == {**{k: "ok" for k in good},
                                       **{k: bad_images()[k][2] for k in bad}}
    assert by_key.pixels_format[list(good)].tolist() == [SOURCE, SOURCE, RAW, SOURCE]
    assert by_key.pixels["jpeg"] == good["jpeg"] and len(by_key.pixels["noise_png"]) == raw_bytes(S)
    assert (by_key.width["rotated"], by_key.height["rotated"]) == (40, 60)
    assert by_key.pixels[list(bad)].isna().all() and by_key.pixels_format[list(bad)].isna().all()

    gen = Generate(cfg, mcfg)
    for k in ("jpeg", "rotated", "noise_png"):  # Generate's float pixels: today's, exactly
        want = normalize(resize_image(open_image(good[k]), S))
        assert torch.equal(gen._pixels(by_key.loc[k].to_dict()), want), k

    i = pre.index[pre.key == "broken_later"][0]
    pre.loc[i, "pixels"] = pre.loc[i, "pixels"][: len(pre.loc[i, "pixels"]) // 2]  # decoded before, not now
    out = gen.run(pre)
    assert len(out) == 2 * len(pre) and not out.duplicated(["key", "task_index"]).any()
    status = out.groupby("key").status.agg(set).to_dict()
    assert status == {**{k: {"ok"} for k in ("jpeg", "rotated", "noise_png")}, "broken_later": {"decode_error"},
                      **{k: {bad_images()[k][2]} for k in bad}}
    msgs = out[out.key == "broken_later"].error_message
    assert msgs.str.contains("decoded in Preprocess but not in Generate").all()
