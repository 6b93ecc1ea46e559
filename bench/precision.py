"""How far bf16 / fp16 / int8 / int4 / fp8 logits are from fp32 and from bf16, how many greedy
caption tokens stay those of bf16, and what each format costs in weight memory.

    python bench/precision.py --config small --batch-size 4

A random checkpoint of `--config`'s shape is written in the release format (bf16, as the release
ships) and loaded through `load_model` once per variant: fp32 is the reference for the logits
columns, bf16 (the format a job runs in) for the "vs bf16" columns; logits are compared at every
unpadded position of a batch mixing image and text-only rows, and `--new-tokens` greedy tokens
are generated for the image rows (eos ignored) and compared with bf16's. fp8 runs through
`Fp8Linear`'s reference path (the same float8 rounding, float32 matmul) on devices without fp8
GEMMs (a CPU), through `torch._scaled_mm` on GPUs of compute capability >= 8.9. Then the weight
memory of the full v1 and v2 shapes per variant, computed from the shapes (nothing loaded), for a
CUDA device.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cogvlm import load_model  # noqa: E402
from cogvlm.config import preset  # noqa: E402
from cogvlm.decoder import CogVLMForCausalLM  # noqa: E402
from cogvlm.generate import generate  # noqa: E402
from cogvlm.processor import Sample, collate  # noqa: E402
from cogvlm.quantization import Fp8Linear, fp8_gemm_error, module_bytes, quantize_linear_, weight_bytes  # noqa: E402
from cogvlm.tiny import write_checkpoint  # noqa: E402

# (name, dtype, quantization, quantize_vision)
VARIANTS = [("bf16", torch.bfloat16, None, True), ("fp16", torch.float16, None, True),
            ("bf16+int8", torch.bfloat16, "int8", True), ("bf16+int8 (decoder only)", torch.bfloat16, "int8", False),
            ("bf16+int4", torch.bfloat16, "int4", True), ("bf16+int4 (decoder only)", torch.bfloat16, "int4", False),
            ("bf16+fp8", torch.bfloat16, "fp8", True), ("bf16+fp8 (visual expert only)", torch.bfloat16, "fp8", False),
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


@torch.no_grad()
def captions(model, batch, new_tokens: int) -> list[list[int]]:
    """Greedy tokens of the batch's image rows (eos ignored: always `new_tokens` of them)."""
    rows = [i for i, img in enumerate(batch.images) if img is not None]
    out = generate(model, batch.input_ids[rows], batch.token_type_ids[rows], batch.attention_mask[rows],
                   [batch.images[i].to(model.device) for i in rows], max_new_tokens=new_tokens, ignore_eos=True)
    return out.tokens


def token_agreement(ref: list[list[int]], got: list[list[int]]) -> tuple[float, float]:
    """(share of positions whose token equals the reference's, share of tokens before each row's
    first difference: the part of the caption that is the reference's word for word)."""
    same = sum(a == b for r, g in zip(ref, got) for a, b in zip(r, g))
    prefix = 0
    for r, g in zip(ref, got):
        prefix += next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), len(r))
    total = sum(len(r) for r in ref)
    return same / total, prefix / total


@torch.no_grad()
def gemm_errors(seed: int = 0) -> dict[str, float]:
    """Relative error (Frobenius norm) of one linear layer's output against fp32, per format: a
    (512, 256) x (256, 688) GEMM (the `small` MLP's shape), Gaussian inputs and weights, bf16
    activations; int8 / int4 quantize the weight only, fp8 the weight and each input row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 256, generator=g)
    fp32 = torch.nn.Linear(256, 688, bias=False)
    fp32.weight.copy_(torch.randn(688, 256, generator=g) / 16)
    exact = fp32(x)
    errors = {}
    for name in ("bf16", "bf16+int8", "bf16+int4", "bf16+fp8"):
        layer = copy.deepcopy(fp32).to(torch.bfloat16)
        if name in ("bf16+int8", "bf16+int4"):
            quantize_linear_(layer, name[5:])
        elif name == "bf16+fp8":
            layer = Fp8Linear.from_linear(layer, reference=True)
        errors[name] = ((layer(x.bfloat16()).float() - exact).norm() / exact.norm()).item()
    return errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small", choices=["tiny", "small"])
    p.add_argument("--version", type=int, default=1, choices=[1, 2])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32, help="greedy caption tokens per image row")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    a = p.parse_args()
    fp8_reference = fp8_gemm_error(a.device) is not None
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_checkpoint(os.path.join(tmp, "ckpt"), version=a.version, preset_name=a.config)
        batch, real = drift_batch(cfg, a.batch_size)
        fp32 = load_model(os.path.join(tmp, "ckpt"), dtype=torch.float32, device=a.device)
        ref = logits(fp32, batch, real)
        del fp32
        bf16 = load_model(os.path.join(tmp, "ckpt"), dtype=torch.bfloat16, device=a.device)
        ref_bf16, tokens_bf16 = logits(bf16, batch, real), captions(bf16, batch, a.new_tokens)
        del bf16
        print(f"config {a.config} v{a.version}, batch {a.batch_size}, device {a.device}, {real.sum().item()} positions, "
              f"{len(tokens_bf16)} image rows x {a.new_tokens} greedy tokens; fp32 logits: max |x| {ref.abs().max():.3f}, "
              f"std {ref.std():.3f}; fp8: {'reference matmul (same rounding)' if fp8_reference else 'torch._scaled_mm'}")
        print("| weights | max abs diff | mean abs diff | top-1 agreement | mean abs diff vs bf16 | top-1 vs bf16 "
              "| caption tokens = bf16's | caption prefix = bf16's | weight MB | layers kept (shape) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, dtype, q, vision in VARIANTS:
            if a.only is not None and name not in a.only:
                continue
            if q == "int4" and dtype is not torch.bfloat16 and a.device != "cpu":
                continue  # torchao's CUDA int4 kernel takes bf16 only
            model = load_model(os.path.join(tmp, "ckpt"), dtype=dtype, device=a.device, quantization=q,
                               quantize_vision=vision, fp8_reference=fp8_reference)
            got = logits(model, batch, real)
            mx, mean, agree = drift(ref, got)
            _, mean_b, agree_b = drift(ref_bf16, got)
            same, prefix = token_agreement(tokens_bf16, captions(model, batch, a.new_tokens))
            print(f"| {name} | {mx:.4f} | {mean:.4f} | {agree:.1%} | {mean_b:.4f} | {agree_b:.1%} | {same:.1%} | "
                  f"{prefix:.1%} | {module_bytes(model) / 1e6:.2f} | {len(model.quantization.skipped)} |", flush=True)
            del model
    print("\nOne GEMM's relative error against fp32 (CPU, fp8 by the reference path):")
    print("| weights | relative error |")
    print("|---|---|")
    for name, err in gemm_errors().items():
        print(f"| {name} | {err:.4f} |")
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
