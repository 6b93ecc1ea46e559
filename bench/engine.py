"""Engine throughput with random weights made on the device (no checkpoint, torch only).

    python bench/engine.py --config small --workload caption --batch-size 4
    python bench/engine.py --config v1 --device cuda --dtype bf16 --workload caption multi

Workloads: `caption` (one ~20-token prompt per image, `--new-tokens` new tokens, eos ignored) and
`multi` (caption + three short questions per image, 16 new tokens each). Prints one table row per
(config, workload): images/s, prefill and decode tokens/s, vision share of the vision+prefill
time, peak memory, and on GPUs the achieved fraction of the device's bf16 peak for vision+prefill.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cogvlm.config import CogVLMConfig, preset  # noqa: E402
from cogvlm.decoder import CogVLMForCausalLM  # noqa: E402
from cogvlm.engine import Engine, Request  # noqa: E402
from cogvlm.tiny import init_random_  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# dense bf16 peak FLOP/s by device name (no sparsity)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def build_random(cfg: CogVLMConfig, dtype: torch.dtype, device: torch.device, seed: int = 0):
    with torch.device("meta"):
        model = CogVLMForCausalLM(cfg)
    model = model.to(dtype).to_empty(device=device)
    init_random_(model, seed)
    model.reset_buffers()
    return model.eval()


def vision_flops(cfg: CogVLMConfig) -> float:
    """Forward FLOPs of the vision tower + adapter for one image (matmuls and attention)."""
    v = cfg.vision_config
    P = v.grid_size**2
    T = P + 1
    C, I = v.hidden_size, v.intermediate_size
    per_layer = 2 * T * (3 * C * C + C * C + 2 * C * I) + 4 * T * T * C
    f = v.num_hidden_layers * per_layer + 2 * P * C * v.in_channels * v.patch_size**2
    if cfg.version == 2:
        f += 2 * (P // 4) * C * C * 4
        P //= 4
    D, Il = cfg.hidden_size, cfg.intermediate_size
    return f + 2 * P * (C * D + 3 * D * Il)


def prefill_flops(cfg: CogVLMConfig, length: int) -> float:
    """Decoder prefill FLOPs for one sequence (each token through one expert, causal attention)."""
    D, I = cfg.hidden_size, cfg.intermediate_size
    per_token = 2 * (D * cfg.qkv_size + D * D + 3 * D * I)
    attn = 2 * length * length * D  # QK^T and PV over the causal half
    return cfg.num_hidden_layers * (length * per_token + attn) + 2 * D * cfg.vocab_size


@dataclass
class Result:
    config: str
    workload: str
    batch: int
    images_per_s: float
    prefill_tok_per_s: float
    decode_tok_per_s: float
    vision_share: float
    peak_mem_gb: float
    mfu: float | None
    vision_prefill_s_per_image: float
    prefill_s_per_batch: float
    decode_ms_per_step: float


def workload_prompts(name: str, new_tokens: int) -> list[tuple[int, int]]:
    """(prompt text tokens, new tokens) per prompt of one image."""
    if name == "caption":
        return [(20, new_tokens)]
    if name == "multi":
        return [(20, 16), (12, 16), (12, 16), (12, 16)]
    raise ValueError(f"unknown workload {name!r}")


def run(cfg_name: str, workload: str, batch: int, n_images: int, new_tokens: int,
        dtype: torch.dtype, device: torch.device, share: bool = True, compile: bool = False,
        kv_cache_gb: float | None = None, warmup: int = 1) -> Result:
    """`batch` images per engine call; each image's prompts are decoded together (prefix shared,
    unless `share=False`, which gives every prompt its own copy of the image: the 4x baseline)."""
    cfg = preset(cfg_name)
    model = build_random(cfg, dtype, device)
    engine = Engine(model, kv_cache_gb=kv_cache_gb, vision_batch_size=batch, compile=compile)
    g = torch.Generator().manual_seed(0)
    prompts = workload_prompts(workload, new_tokens)

    def call(n: int) -> tuple[dict[str, float], int, int]:
        images = torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g).to(device)
        reqs = []
        for i in range(n):
            for text, new in prompts:
                ids = torch.randint(3, min(cfg.vocab_size, 30000), (text,), generator=g).tolist()
                reqs.append(Request(ids, i, new))
        if not share:  # every prompt gets its own image copy: its own vision pass and prefix
            images = images[[r.image for r in reqs]]
            for k, r in enumerate(reqs):
                r.image = k
        t: dict[str, float] = {}
        out = engine.generate(reqs, images, ignore_eos=True, timings=t)
        return t, sum(out.prompt_tokens), sum(out.num_tokens)

    def one_pass(n_img: int) -> dict[str, float]:
        tot = {"vision_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0, "prefill_tokens": 0, "new_tokens": 0,
               "calls": 0, "steps": 0}
        for start in range(0, n_img, batch):
            t, p_tok, n_tok = call(min(batch, n_img - start))
            for k in ("vision_s", "prefill_s", "decode_s"):
                tot[k] += t[k]
            tot["prefill_tokens"] += p_tok
            tot["new_tokens"] += n_tok
            tot["calls"] += 1
            tot["steps"] += max(new for _, new in prompts) - 1
        return tot

    for _ in range(warmup):
        one_pass(min(batch, n_images))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    tot = one_pass(n_images)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
    mfu = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak_flops = next((v for k, v in PEAK_BF16.items() if k in name), None)
        if peak_flops:
            L = 1 + cfg.num_vision_tokens + prompts[0][0]
            flops = n_images * (vision_flops(cfg) + prefill_flops(cfg, L))  # useful work of one image
            mfu = flops / tot["prefill_s"] / peak_flops
    return Result(cfg_name, workload + ("" if share else " (no sharing)"), batch, n_images / wall,
                  tot["prefill_tokens"] / tot["prefill_s"], tot["new_tokens"] / tot["decode_s"],
                  tot["vision_s"] / tot["prefill_s"], peak, mfu, tot["prefill_s"] / n_images,
                  tot["prefill_s"] / tot["calls"], 1000 * tot["decode_s"] / max(1, tot["steps"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", default=["tiny"], choices=["tiny", "small", "v1", "v2"])
    p.add_argument("--workload", nargs="+", default=["caption"], choices=["caption", "multi"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default=None, choices=list(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-share", action="store_true", help="also run without prefix sharing")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--kv-cache-gb", type=float, default=None)
    a = p.parse_args()
    device = torch.device(a.device)
    dtype = DTYPES[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {dev_name}  dtype: {dtype}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    hdr = ("config", "workload", "batch", "img/s", "prefill tok/s", "decode tok/s", "vision share",
           "v+p s/img", "prefill s/batch", "decode ms/step", "peak GB", "MFU v+p")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for c in a.config:
        for w in a.workload:
            for share in ([True, False] if a.no_share and w == "multi" else [True]):
                r = run(c, w, a.batch_size, a.images, a.new_tokens, dtype, device, share=share,
                        compile=a.compile, kv_cache_gb=a.kv_cache_gb)
                mfu = f"{r.mfu:.1%}" if r.mfu is not None else "-"
                print(f"| {r.config} | {r.workload} | {r.batch} | {r.images_per_s:.2f} | "
                      f"{r.prefill_tok_per_s:.0f} | {r.decode_tok_per_s:.0f} | {r.vision_share:.1%} | "
                      f"{r.vision_prefill_s_per_image:.4f} | {r.prefill_s_per_batch:.3f} | "
                      f"{r.decode_ms_per_step:.1f} | {r.peak_mem_gb:.2f} | {mfu} |", flush=True)


if __name__ == "__main__":
    main()
