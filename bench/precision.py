"""How far bf16 / fp16 / int8 / int4 logits are from fp32, and what each costs in weight memory.

    python bench/precision.py --config small --batch-size 4

A random checkpoint of `--config`'s shape is written in the release format (bf16, as the release
ships) and loaded through `load_model` once per variant: fp32 is the reference; every other
variant's logits are compared with it at every unpadded position of a batch mixing image and
text-only rows. Then the weight memory of the full v1 and v2 shapes per variant, computed from
the shapes (nothing loaded), for a CUDA device.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cogvlm import load_model  # noqa: E402
from cogvlm.config import preset  # noqa: E402
from cogvlm.decoder import CogVLMForCausalLM  # noqa: E402
from cogvlm.processor import Sample, collate  # noqa: E402
from cogvlm.quantization import module_bytes, weight_bytes  # noqa: E402
from cogvlm.tiny import write_checkpoint  # noqa: E402

# (name, dtype, quantization, quantize_vision)
VARIANTS = [("bf16", torch.bfloat16, None, True), ("fp16", torch.float16, None, True),
            ("bf16+int8", torch.bfloat16, "int8", True), ("bf16+int8 (decoder only)", torch.bfloat16, "int8", False),
            ("bf16+int4", torch.bfloat16, "int4", True), ("bf16+int4 (decoder only)", torch.bfloat16, "int4", False),
            ("fp32+int8", torch.float32, "int8", True), ("fp32+int4", torch.float32, "int4", True)]


def drift_batch(cfg, batch_size: int, seed: int = 0):
    """A batch mixing image rows and (one in four) text-only rows; and its unpadded positions."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(batch_size):
        text = 10 + 3 * i
        with_image = i % 4 != 3
        n = cfg.num_vision_tokens if with_image else 0
        ids = [cfg.bos_token_id] + [cfg.pad_token_id] * n + torch.randint(3, cfg.vocab_size, (text,), generator=g).tolist()
        img = torch.randn(3, cfg.image_size, cfg.image_size, generator=g) if with_image else None
        rows.append(Sample(ids, [0] + [1] * n + [0] * text, img))
    batch = collate(rows, cfg.pad_token_id)
    return batch, batch.attention_mask.bool()


@torch.no_grad()
def logits(model, batch, real: torch.Tensor) -> torch.Tensor:
    kw = {k: (v.to(model.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.as_kwargs().items()}
    return model(**kw)[real.to(model.device)].float().cpu()


def drift(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float, float]:
    """(max abs diff, mean abs diff, top-1 agreement)."""
    d = (got - ref).abs()
    return d.max().item(), d.mean().item(), (got.argmax(-1) == ref.argmax(-1)).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small", choices=["tiny", "small"])
    p.add_argument("--version", type=int, default=1, choices=[1, 2])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_checkpoint(os.path.join(tmp, "ckpt"), version=a.version, preset_name=a.config)
        batch, real = drift_batch(cfg, a.batch_size)
        fp32 = load_model(os.path.join(tmp, "ckpt"), dtype=torch.float32, device=a.device)
        ref = logits(fp32, batch, real)
        print(f"config {a.config} v{a.version}, batch {a.batch_size}, device {a.device}, {real.sum().item()} positions; "
              f"fp32 logits: max |x| {ref.abs().max():.3f}, std {ref.std():.3f}; fp32 weights "
              f"{module_bytes(fp32) / 1e6:.1f} MB")
        print("| weights | max abs diff | mean abs diff | top-1 agreement | weight MB | layers kept (shape) |")
        print("|---|---|---|---|---|---|")
        for name, dtype, q, vision in VARIANTS:
            if q == "int4" and dtype is not torch.bfloat16 and a.device != "cpu":
                continue  # torchao's CUDA int4 kernel takes bf16 only
            model = load_model(os.path.join(tmp, "ckpt"), dtype=dtype, device=a.device, quantization=q,
                               quantize_vision=vision)
            mx, mean, agree = drift(ref, logits(model, batch, real))
            print(f"| {name} | {mx:.4f} | {mean:.4f} | {agree:.1%} | {module_bytes(model) / 1e6:.2f} | "
                  f"{len(model.quantization.skipped)} |", flush=True)
            del model
    print("\nWeight memory of the full shapes on a CUDA device (computed from the shapes):")
    print("| weights | v1 GB | v2 GB |")
    print("|---|---|---|")
    metas = {}
    for v in ("v1", "v2"):
        with torch.device("meta"):
            metas[v] = CogVLMForCausalLM(preset(v))
    for name, dtype, q, vision in VARIANTS:
        if dtype is torch.float32:
            continue
        gb = [weight_bytes(metas[v], dtype, q, "cuda", vision) / 1e9 for v in ("v1", "v2")]
        print(f"| {name} | {gb[0]:.1f} | {gb[1]:.1f} |")


if __name__ == "__main__":
    main()
