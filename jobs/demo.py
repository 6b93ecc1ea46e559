"""Demo: build a tiny RANDOM-weight CogVLM checkpoint and caption the bundled images with it.

    python -m jobs.demo

The weights are random, so the captions are gibberish: the demo shows the plumbing (checkpoint
in the release format, tokenizer, preprocessing, batched generation), not model quality.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from cogvlm import CogVLMProcessor, generate, load_model
from cogvlm.tiny import write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "assets" / "images"
BUILD = ROOT / "build" / "demo"


def ensure_checkpoint() -> tuple[Path, Path]:
    ckpt, tok = BUILD / "tiny-v1", BUILD / "tiny-v1-tokenizer"
    if not (ckpt / "config.json").exists():
        write_checkpoint(ckpt, version=1, preset_name="tiny", shards=2, tokenizer_dir=tok)
    return ckpt, tok


def main() -> None:
    ckpt, tok = ensure_checkpoint()
    model = load_model(ckpt, dtype=torch.float32)
    proc = CogVLMProcessor.from_pretrained(ckpt, tok)
    paths = sorted(p for p in IMAGES.iterdir() if p.suffix in (".jpg", ".png", ".webp"))
    batch = proc.collate([proc.build_inputs("Describe this image.", p.read_bytes()) for p in paths])
    t0 = time.perf_counter()
    out = generate(model, **batch.as_kwargs(), max_new_tokens=12)
    dt = time.perf_counter() - t0
    print("NOTE: random weights -- the text below is meaningless; it shows the engine end to end.")
    for p, toks, why in zip(paths, out.tokens, out.finish_reasons):
        print(f"{p.name:12s} [{why}, {len(toks)} tokens] {proc.decode(toks)!r}")
    print(f"{len(paths)} images in {dt:.2f} s")


if __name__ == "__main__":
    main()
