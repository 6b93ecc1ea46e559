"""Image preprocessing, prompt templates, input building, left-padded collation and decoding."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .config import LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE, CogVLMConfig

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

History = Sequence[tuple[str, str]]


# --- images -----------------------------------------------------------------------------------

def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the release does it (`convert("RGB")`); 16-bit and float modes are scaled to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def resize_image(image: Image.Image, image_size: int) -> np.ndarray:
    """(S, S, 3) uint8: RGB, bicubic resize (PIL, antialiased). A quarter of the float bytes, so
    this is what travels between pipeline stages; `normalize` finishes the job on the device."""
    image = to_rgb(image).resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.array(image, dtype=np.uint8)  # a writable copy


def normalize(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(..., S, S, 3) uint8 -> (..., 3, S, S) float32: [0, 1], then CLIP mean/std."""
    x = torch.as_tensor(pixels).float() / 255.0
    x = x.movedim(-1, -3)  # channels first
    mean = torch.tensor(IMAGE_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def preprocess_image(image: Image.Image, image_size: int) -> torch.Tensor:
    """(3, S, S) float32: RGB, bicubic resize (PIL, antialiased), [0, 1], CLIP normalization."""
    return normalize(resize_image(image, image_size))


def open_image(data: bytes | str | os.PathLike | Image.Image, *, max_pixels: int | None = None) -> Image.Image:
    """Open bytes or a path fully (decode errors surface here), applying EXIF orientation.

    `max_pixels` guards against decompression bombs: larger declared sizes raise ValueError
    before any pixel is decoded.
    """
    if isinstance(data, Image.Image):
        return data
    image = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    w, h = image.size
    if max_pixels is not None and w * h > max_pixels:
        raise ValueError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
    image.load()
    return ImageOps.exif_transpose(image) or image


# --- templates --------------------------------------------------------------------------------

def build_prompt(query: str, history: History = (), template: str = "chat") -> str:
    """`base`: the query as given; `chat`/`vqa`: `Question: ... Answer:` / `... Short answer:`."""
    if template == "base":
        return query
    if template == "chat":
        answer = "Answer:"
    elif template == "vqa":
        answer = "Short answer:"
    else:
        raise ValueError(f"unknown template {template!r}; use base, chat or vqa")
    prompt = "".join(f"Question: {q} {answer} {a}\n" for q, a in history)
    return prompt + f"Question: {query} {answer}"


# --- inputs -----------------------------------------------------------------------------------

@dataclass
class Sample:
    input_ids: list[int]
    token_type_ids: list[int]
    image: torch.Tensor | None


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) long, left-padded
    token_type_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long
    images: list[torch.Tensor | None]

    def as_kwargs(self) -> dict[str, Any]:
        return dict(input_ids=self.input_ids, token_type_ids=self.token_type_ids,
                    attention_mask=self.attention_mask, images=self.images)


class CogVLMProcessor:
    """Turns (image, query) into model inputs and generated ids into text, for one checkpoint."""

    def __init__(self, tokenizer: Any, config: CogVLMConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config

    @classmethod
    def from_pretrained(cls, checkpoint: str | os.PathLike | CogVLMConfig,
                        tokenizer: str | os.PathLike | None = None) -> "CogVLMProcessor":
        """`checkpoint`: a checkpoint directory or a config. `tokenizer`: a path or hub id
        (v1 checkpoints do not ship one; default: the checkpoint directory)."""
        from transformers import AutoTokenizer

        from .weights import read_config

        if isinstance(checkpoint, CogVLMConfig):
            config, default_tok = checkpoint, None
        else:
            from pathlib import Path

            config, default_tok = read_config(Path(checkpoint)), str(checkpoint)
        source = tokenizer if tokenizer is not None else default_tok
        if source is None:
            raise ValueError("give a tokenizer path or hub id")
        tok = AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)  # never run checkpoint code
        return cls(tok, config)

    @property
    def template(self) -> str:
        return self.config.template_version

    def image_tensor(self, image: Image.Image | bytes | str) -> torch.Tensor:
        return preprocess_image(open_image(image), self.config.image_size)

    def build_inputs(self, query: str, image: Image.Image | torch.Tensor | bytes | None = None,
                     history: History = (), template: str | None = None) -> Sample:
        """`[bos] + [pad] * n_vision + text` with token types 0 / 1 / 0 (no placeholders without image)."""
        text = build_prompt(query, history, template or self.template)
        text_ids = self.tokenizer.encode(text, add_special_tokens=False)
        ids = [self.config.bos_token_id]
        types = [LANGUAGE_TOKEN_TYPE]
        pixels = None
        if image is not None:
            pixels = image if isinstance(image, torch.Tensor) else self.image_tensor(image)
            n = self.config.num_vision_tokens
            ids += [self.config.pad_token_id] * n
            types += [VISION_TOKEN_TYPE] * n
        ids += text_ids
        types += [LANGUAGE_TOKEN_TYPE] * len(text_ids)
        return Sample(ids, types, pixels)

    def collate(self, samples: Sequence[Sample]) -> Batch:
        return collate(samples, self.config.pad_token_id)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of generated ids: eos and ids outside the tokenizer dropped, special tokens skipped."""
        eos = set(self.config.eos_token_ids)
        size = len(self.tokenizer)
        ids = [int(t) for t in token_ids if t not in eos and 0 <= t < size]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def collate(samples: Sequence[Sample], pad_token_id: int) -> Batch:
    """Left-pad to the longest row (pad id, token type 0, attention mask 0)."""
    L = max(len(s.input_ids) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    token_type_ids = torch.zeros((B, L), dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[i, L - n:] = torch.tensor(s.input_ids)
        token_type_ids[i, L - n:] = torch.tensor(s.token_type_ids)
        attention_mask[i, L - n:] = 1
    return Batch(input_ids, token_type_ids, attention_mask, [s.image for s in samples])
