"""How far bf16 / fp16 logits are from fp32 for the same random weights (CPU or GPU).

    python bench/precision.py --config small --batch-size 4
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cogvlm.config import preset  # noqa: E402
from cogvlm.processor import Sample, collate  # noqa: E402

from engine import build_random  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="small", choices=["tiny", "small", "v1", "v2"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    cfg = preset(a.config)
    dev = torch.device(a.device)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(a.batch_size):
        text = 10 + 3 * i
        with_image = i % 4 != 3  # one text-only row in four
        n = cfg.num_vision_tokens if with_image else 0
        ids = [cfg.bos_token_id] + [cfg.pad_token_id] * n + torch.randint(3, cfg.vocab_size, (text,), generator=g).tolist()
        img = torch.randn(3, cfg.image_size, cfg.image_size, generator=g) if with_image else None
        rows.append(Sample(ids, [0] + [1] * n + [0] * text, img))
    batch = collate(rows, cfg.pad_token_id)
    kw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.as_kwargs().items()}
    real = batch.attention_mask.bool().to(dev)
    model = build_random(cfg, torch.float32, dev)
    with torch.no_grad():
        ref = model(**kw)[real]
        top_ref = ref.argmax(-1)
        print(f"config {a.config}, batch {a.batch_size}, device {dev}; fp32 logits: max |x| "
              f"{ref.abs().max():.3f}, std {ref.std():.3f}")
        print("| dtype | max abs diff | mean abs diff | argmax agreement |")
        print("|---|---|---|---|")
        for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            low = copy.deepcopy(model).to(dt)
            got = low(**kw)[real]
            d = (got - ref).abs()
            agree = (got.argmax(-1) == top_ref).float().mean()
            print(f"| {name} | {d.max():.4f} | {d.mean():.4f} | {agree:.1%} |")
            del low


if __name__ == "__main__":
    main()
