"""Templates, preprocessing of odd images, input building and collation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cogvlm import CogVLMProcessor, build_prompt, open_image, preprocess_image
from cogvlm.processor import IMAGE_MEAN, IMAGE_STD


def test_templates_exact_strings():
    assert build_prompt("Describe the image.", template="base") == "Describe the image."
    assert build_prompt("What is it?", template="chat") == "Question: What is it? Answer:"
    assert build_prompt("What is it?", template="vqa") == "Question: What is it? Short answer:"
    hist = [("Hi?", "Hello."), ("Color?", "Red.")]
    assert build_prompt("Why?", hist, "chat") == (
        "Question: Hi? Answer: Hello.\nQuestion: Color? Answer: Red.\nQuestion: Why? Answer:")
    assert build_prompt("Why?", hist[:1], "vqa") == (
        "Question: Hi? Short answer: Hello.\nQuestion: Why? Short answer:")
    assert build_prompt("Why?", hist, "base") == "Why?"
    with pytest.raises(ValueError, match="template"):
        build_prompt("x", template="nope")


def _expected(img_rgb: Image.Image, size: int) -> torch.Tensor:
    arr = np.asarray(img_rgb.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    t = torch.from_numpy(arr).permute(2, 0, 1)
    return (t - torch.tensor(IMAGE_MEAN)[:, None, None]) / torch.tensor(IMAGE_STD)[:, None, None]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "LA"])
def test_preprocess_modes_match_convert_rgb(mode):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (37, 61, 3), dtype=np.uint8), "RGB")  # non-square
    img = base.convert(mode)
    out = preprocess_image(img, 28)
    assert out.shape == (3, 28, 28) and out.dtype == torch.float32
    torch.testing.assert_close(out, _expected(img.convert("RGB"), 28))


def test_palette_with_transparency_and_16bit():
    p = Image.new("P", (20, 10))
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((3, 3), 1)
    p.info["transparency"] = 0
    out = preprocess_image(p, 14)
    torch.testing.assert_close(out, _expected(p.convert("RGB"), 14))
    arr16 = (np.arange(200, dtype=np.uint16).reshape(10, 20) * 300)
    i16 = Image.fromarray(arr16)
    buf = io.BytesIO()
    i16.save(buf, format="PNG")
    out16 = preprocess_image(open_image(buf.getvalue()), 14)
    assert torch.isfinite(out16).all() and out16.std() > 0.1


def test_open_image_guards_and_exif():
    big = Image.new("RGB", (300, 200))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    with pytest.raises(ValueError, match="pixels"):
        open_image(buf.getvalue(), max_pixels=300 * 199)
    # EXIF orientation 6 (rotate 90 CW) swaps width and height
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    big.save(buf, format="JPEG", exif=exif)
    assert open_image(buf.getvalue()).size == (200, 300)
    with pytest.raises(Exception):
        open_image(b"not an image")


def test_build_inputs_and_left_padded_collate(ckpt_v1, tokenizer_v1):
    proc = CogVLMProcessor.from_pretrained(ckpt_v1, tokenizer_v1)
    cfg = proc.config
    img = Image.new("RGB", (50, 40), (10, 200, 30))
    s_img = proc.build_inputs("Describe the image.", img)
    s_txt = proc.build_inputs("What is it?", template="vqa")
    text_ids = proc.tokenizer.encode("Question: Describe the image. Answer:", add_special_tokens=False)
    n = cfg.num_vision_tokens
    assert s_img.input_ids == [cfg.bos_token_id] + [cfg.pad_token_id] * n + text_ids
    assert s_img.token_type_ids == [0] + [1] * n + [0] * len(text_ids)
    assert s_img.image.shape == (3, cfg.image_size, cfg.image_size)
    assert s_txt.image is None and 1 not in s_txt.token_type_ids
    b = proc.collate([s_img, s_txt])
    L = len(s_img.input_ids)
    pad = L - len(s_txt.input_ids)
    assert b.input_ids.shape == (2, L)
    assert b.attention_mask[1].tolist() == [0] * pad + [1] * len(s_txt.input_ids)
    assert b.input_ids[1, :pad].eq(cfg.pad_token_id).all() and b.token_type_ids[1, :pad].eq(0).all()
    assert b.images[1] is None
    # decode drops eos and returns text the tokenizer round-trips
    ids = proc.tokenizer.encode("a red dog", add_special_tokens=False)
    assert proc.decode(ids + [cfg.eos_token_ids[0]]) == "a red dog"
