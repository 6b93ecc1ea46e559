"""Engine throughput on pipeline-shaped work, random weights made on the device (torch only).

    python bench/engine.py --config small --workload caption varied multi
    python bench/engine.py --config small --workload varied --baseline-src /tmp/static-engine
    python bench/engine.py --config v1 --device cuda --dtype bf16 --workload caption multi --images 512

Images arrive in groups of `--group` (a Ray batch); the continuous engine keeps `--in-flight`
groups queued (the Generate stage's `batches_in_flight`) and takes the next group as one
finishes. Workloads (eos ignored; random weights would otherwise stop at random places):

- `caption`: one 20-token prompt per image, exactly `--new-tokens` new tokens.
- `varied`: the same with each caption's length drawn uniformly from 8..`--new-tokens`.
- `multi`: a varied caption, two 12-token questions (4-16 new tokens) and a 30-token grounding
  prompt (16-48 new tokens) per image.

`--baseline-src DIR` also runs the static engine of an older checkout (`git worktree add DIR
2f7a85f`: one `Engine.generate` call per group, prompts decoded in batches that are never
refilled) on the same model shapes and prompts, in the same process, and prints the ratio.
Columns: images/s, generated tokens/s, average rows per decode step and slot occupancy,
vision+prefill share of the engine's time, recompilations after warm-up, the slot count and
memory plan, and on GPUs the peak memory, the vision+prefill fraction of the bf16 peak and the
decode step time against the memory-bandwidth floor.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cogvlm.decoder  # noqa: E402
import cogvlm.tiny  # noqa: E402
from cogvlm.config import CogVLMConfig, preset  # noqa: E402
from cogvlm.engine import Engine, Request  # noqa: E402
from cogvlm.quantization import module_bytes, quantize_model_, tensor_bytes  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# dense bf16 peak FLOP/s and memory bandwidth (bytes/s) by device name
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12, "A10G": 0.6e12}


def build_random(cfg: CogVLMConfig, dtype: torch.dtype, device: torch.device, seed: int = 0,
                 package: Any = None):
    """A model of `cfg`'s shape with random weights, made on the device (from `package`, an
    older checkout's `cogvlm`, when given)."""
    decoder = package.decoder if package is not None else cogvlm.decoder
    tiny = package.tiny if package is not None else cogvlm.tiny
    with torch.device("meta"):
        model = decoder.CogVLMForCausalLM(cfg)
    model = model.to(dtype).to_empty(device=device)
    tiny.init_random_(model, seed)
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


def language_expert_bytes(model: torch.nn.Module) -> int:
    """Weights one decode step reads: the language expert of every layer, the norms, lm_head
    (as stored: quantized weights count their real bytes)."""
    return sum(tensor_bytes(t) for name, t in model.named_parameters()
               if ("vision" not in name and "embed_tokens" not in name))


# workloads ---------------------------------------------------------------------------------------

def image_prompts(name: str, new_tokens: int, rng: random.Random) -> list[tuple[int, int]]:
    """(prompt text tokens, new tokens) for each prompt of one image."""
    if name == "caption":
        return [(20, new_tokens)]
    if name == "varied":
        return [(20, rng.randint(min(8, new_tokens), new_tokens))]
    if name == "multi":
        return [(20, rng.randint(min(8, new_tokens), new_tokens)), (12, rng.randint(4, 16)), (12, rng.randint(4, 16)),
                (30, rng.randint(16, 48))]
    raise ValueError(f"unknown workload {name!r}")


def make_work(cfg: CogVLMConfig, workload: str, n_images: int, new_tokens: int, seed: int = 0):
    """Images (N, 3, S, S) on the CPU and per image its prompts as (text ids, new tokens)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, 3, cfg.image_size, cfg.image_size, generator=g)
    vocab = min(cfg.vocab_size, 30000)
    prompts = [[(torch.randint(3, vocab, (n,), generator=g).tolist(), new)
                for n, new in image_prompts(workload, new_tokens, rng)] for _ in range(n_images)]
    return images, prompts


@dataclass
class Result:
    engine: str
    images_per_s: float
    tokens_per_s: float
    rows_per_step: float | None = None
    occupancy: float | None = None
    prefill_share: float | None = None
    stall_ms: float | None = None
    recompiles: int | None = None
    slots: int | None = None
    plan_gb: float | None = None
    peak_gb: float | None = None
    mfu: float | None = None
    step_ms: float | None = None
    floor_ms: float | None = None


def run_continuous(model, workload: str, n_images: int, new_tokens: int, group: int, in_flight: int,
                   engine_kw: dict[str, Any]) -> Result:
    cfg, dev = model.config, model.device
    max_new = 48 if workload == "multi" else new_tokens
    engine = Engine(model, max_prompt_tokens=32, max_new_tokens=max(max_new, new_tokens), timed=True,
                    prompts_per_image=4 if workload == "multi" else 1, **engine_kw)

    def one_pass(n: int, seed: int) -> tuple[float, int]:
        images, prompts = make_work(cfg, workload, n, new_tokens, seed)
        groups = [list(range(i, min(n, i + group))) for i in range(0, n, group)]
        left: dict[int, int] = {}
        tokens = 0
        t0 = time.perf_counter()
        nxt = 0
        while nxt < len(groups) or engine.has_work:
            while nxt < len(groups) and len(left) < in_flight:
                for i in groups[nxt]:
                    engine.add([Request(ids, 0, new, ignore_eos=True) for ids, new in prompts[i]], images[i],
                               tag=i, origin=nxt)
                left[nxt] = sum(len(prompts[i]) for i in groups[nxt])
                nxt += 1
            for c in engine.step():
                tokens += len(c.tokens)
                gi = c.tag // group
                left[gi] -= 1
                if not left[gi]:
                    del left[gi]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0, tokens

    one_pass(min(n_images, group * in_flight), seed=1)  # warm-up (allocator, kernels)
    engine.stats = dict.fromkeys(engine.stats, 0)
    engine.timings = dict.fromkeys(engine.timings, 0.0)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    wall, tokens = one_pass(n_images, seed=0)
    s, t = engine.stats, engine.timings
    busy = t["vision_s"] + t["prefill_s"] + t["decode_s"]
    res = Result("continuous", n_images / wall, tokens / wall, s["decode_rows"] / max(1, s["decode_steps"]),
                 s["decode_rows"] / max(1, s["decode_slots"]), (t["vision_s"] + t["prefill_s"]) / max(busy, 1e-9),
                 1000 * t["max_admission_s"], engine.recompiles(), engine.slots, engine.plan.planned_bytes / 1e9)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        res.peak_gb = (torch.cuda.max_memory_allocated(dev) - engine.plan.weights_bytes) / 1e9
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        if peak:
            L = 1 + cfg.num_vision_tokens + 20
            n_prompts = 4 if workload == "multi" else 1
            flops = n_images * (vision_flops(cfg) + prefill_flops(cfg, L)
                                + (n_prompts - 1) * prefill_flops(cfg, 15))  # useful work
            res.mfu = flops / max(t["vision_s"] + t["prefill_s"], 1e-9) / peak
        bw = next((v for k, v in BANDWIDTH.items() if k in name), None)
        res.step_ms = 1000 * t["decode_s"] / max(1, s["decode_steps"])
        if bw:
            kv_token = cfg.num_hidden_layers * 2 * cfg.num_kv_heads * cfg.head_dim * model.dtype.itemsize
            avg_bucket = s["decode_slots"] / max(1, s["decode_steps"])
            read = language_expert_bytes(model) + avg_bucket * engine.max_len * kv_token
            res.floor_ms = 1000 * read / bw
    return res


def load_package(src: str, name: str = "cogvlm_baseline") -> Any:
    """The `cogvlm` package of another checkout, imported under another name."""
    path = os.path.join(src, "cogvlm", "__init__.py")
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=[os.path.dirname(path)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[name] = pkg
    spec.loader.exec_module(pkg)
    for sub in ("decoder", "tiny", "engine"):
        importlib.import_module(f"{name}.{sub}")
    return pkg


def run_static(pkg: Any, cfg_name: str, dtype: torch.dtype, device: torch.device, workload: str, n_images: int,
               new_tokens: int, group: int) -> Result:
    """The older engine: one `generate` call per group of images."""
    cfg = pkg.config.preset(cfg_name)
    model = build_random(cfg, dtype, device, package=pkg)
    engine = pkg.engine.Engine(model, vision_batch_size=group)

    def one_pass(n: int, seed: int) -> tuple[float, int]:
        images, prompts = make_work(cfg, workload, n, new_tokens, seed)
        images = images.to(device)
        tokens = 0
        t0 = time.perf_counter()
        for start in range(0, n, group):
            reqs = [pkg.engine.Request(ids, i - start, new) for i in range(start, min(n, start + group))
                    for ids, new in prompts[i]]
            out = engine.generate(reqs, images[start:start + group], ignore_eos=True)
            tokens += sum(out.num_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0, tokens

    one_pass(min(n_images, group), seed=1)
    wall, tokens = one_pass(n_images, seed=0)
    return Result("static (baseline)", n_images / wall, tokens / wall)


def fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", default=["tiny"], choices=["tiny", "small", "v1", "v2"])
    p.add_argument("--workload", nargs="+", default=["varied"], choices=["caption", "varied", "multi"])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--group", type=int, default=8, help="images per Ray-sized group")
    p.add_argument("--in-flight", type=int, default=8, help="groups queued in the continuous engine")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default=None, choices=list(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="compile the decode step (CUDA graphs on GPUs)")
    p.add_argument("--compile-vision", action="store_true", help="compile the vision tower")
    p.add_argument("--max-slots", type=int, default=256)
    p.add_argument("--admission-images", type=int, default=8)
    p.add_argument("--sync-every", type=int, default=8)
    p.add_argument("--kv-cache-gb", type=float, default=None)
    p.add_argument("--baseline-src", default=None, help="a checkout whose static engine runs too")
    p.add_argument("--quantization", nargs="+", default=["none"], choices=["none", "int8", "int4"],
                   help="weight-only quantization of the linear layers (each value is a separate model)")
    p.add_argument("--decoder-only", action="store_true", help="quantize the decoder only, not the vision tower")
    a = p.parse_args()
    device = torch.device(a.device)
    dtype = DTYPES[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {dev_name}  dtype: {dtype}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
          f"images {a.images}  group {a.group}  in flight {a.in_flight}  new tokens {a.new_tokens}")
    baseline = load_package(a.baseline_src) if a.baseline_src else None
    hdr = ("config", "weights", "weights GB", "workload", "engine", "img/s", "tok/s", "rows/step", "occupancy", "v+p share",
           "max stall ms", "recompiles", "slots", "plan GB", "peak GB", "MFU v+p", "decode ms/step", "BW floor ms")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    engine_kw = dict(max_slots=a.max_slots, admission_images=a.admission_images, sync_every=a.sync_every,
                     kv_cache_gb=a.kv_cache_gb, compile=a.compile, compile_vision=a.compile_vision)
    runs = [(c, q) for c in a.config for q in a.quantization]
    for c, q in runs:
        model = build_random(preset(c), dtype, device)
        quantize_model_(model, None if q == "none" else q, vision=not a.decoder_only)
        weights = str(dtype).removeprefix("torch.") + ("" if q == "none" else f"+{q}")
        weights_gb = module_bytes(model) / 1e9
        for w in a.workload:
            rows = [run_continuous(model, w, a.images, a.new_tokens, a.group, a.in_flight, engine_kw)]
            if baseline is not None:
                rows.append(run_static(baseline, c, dtype, device, w, a.images, a.new_tokens, a.group))
            for r in rows:
                print(f"| {c} | {weights} | {weights_gb:.3f} | {w} | {r.engine} | {r.images_per_s:.2f} | {r.tokens_per_s:.0f} | "
                      f"{fmt(r.rows_per_step, '.1f')} | {fmt(r.occupancy, '.0%')} | {fmt(r.prefill_share, '.0%')} | "
                      f"{fmt(r.stall_ms, '.0f')} | "
                      f"{fmt(r.recompiles, 'd')} | {fmt(r.slots, 'd')} | {fmt(r.plan_gb, '.2f')} | "
                      f"{fmt(r.peak_gb, '.2f')} | {fmt(r.mfu, '.1%')} | {fmt(r.step_ms, '.1f')} | "
                      f"{fmt(r.floor_ms, '.1f')} |", flush=True)
            if baseline is not None:
                print(f"ratio continuous / static images/s ({c}, {w}): {rows[0].images_per_s / rows[1].images_per_s:.2f}",
                      flush=True)


if __name__ == "__main__":
    main()
