"""The first GPU run: one process, one model, phases in order of importance, JSON after each.

    python bench/gpu_first.py --out gpu_first.json                        # full v1, bf16, cuda
    python bench/gpu_first.py --config tiny --device cpu --images 4 --out /tmp/g.json   # CI shape

Random weights of the chosen shape are made on the device (no checkpoint). Phases, each timed
and written to `--out` as soon as it ends (a run killed at its limit keeps what it measured);
a phase that fails records its error and the run goes on:

1. `environment`: torch, device, capability, SDPA backends, FlexAttention importable.
2. `plan`: the engine's memory plan (blocks, rows, measured activations).
3. `caption_eager`: caption images/s (one prompt, `--new-tokens` tokens, eos ignored).
4. `decode_steps`: one decode step at 16, 64 and all rows, against its bandwidth floor (the
   language-expert weights + the key/value columns the step reads, at the card's bandwidth).
5. `prefill_share`: vision + prefill FLOP/s (counted analytically) against the bf16 peak.
6. `multi_vs_caption`: caption + 3 questions per image against captions: rows per step, images/s.
7. `vision_ahead`: caption images/s with the next round's vision pass on a second CUDA stream
   beside decode (`Engine(vision_ahead=True)`), against `caption_eager`'s.
8. `compiled`: the decode step compiled (CUDA graphs on a GPU): compile seconds, images/s.
9. `sampling`: the step's sampling and bookkeeping (`cogvlm.runner.advance`) eager vs compiled,
   greedy / sampled / top-k+top-p, at 64 rows and the model's vocabulary (`bench/sampling.py`).
10. `fp8`: the vision tower's and the visual expert's GEMMs in float8 (`model.quantization: fp8`,
   converted in place from the bf16 model): caption images/s and vision + prefill time against
   `caption_eager`'s. Skipped (with the reason) where the device has no fp8 GEMMs (CPUs, GPUs
   below compute capability 8.9) or the dtype is not bf16.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.engine import (BANDWIDTH, DTYPES, PEAK_BF16, build_random, language_expert_bytes,  # noqa: E402
                          prefill_flops, vision_flops)
from bench.sampling import KINDS, timed  # noqa: E402
from cogvlm.config import preset  # noqa: E402
from cogvlm.engine import Engine, Request  # noqa: E402
from cogvlm.quantization import fp8_gemm_error, quantize_model_  # noqa: E402
from cogvlm.compiled import compiled_advance  # noqa: E402
from cogvlm.runner import Rows, advance  # noqa: E402

PHASES = ["environment", "plan", "caption_eager", "decode_steps", "prefill_share", "multi_vs_caption",
          "vision_ahead", "compiled", "sampling", "fp8"]


class Report:
    def __init__(self, path: str, skip: list[str]) -> None:
        self.path, self.skip, self.data = path, skip, {"phases": {}, "order": PHASES}

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        t0 = time.perf_counter()
        try:
            res = {"status": "skipped", "why": "--skip"} if name in self.skip else fn()
            res["status"] = res.get("status", "ok")
        except Exception as e:  # noqa: BLE001 - record it, measure the rest
            res = {"status": "error", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        res["seconds"] = round(time.perf_counter() - t0, 3)
        self.data["phases"][name] = res
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=2, default=str)
        os.replace(tmp, self.path)
        print(f"[{name}] {json.dumps({k: v for k, v in res.items() if k != 'trace'}, default=str)}", flush=True)
        return res if res["status"] != "error" else None


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def work(cfg, n: int, new: int, questions: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g)
    vocab = min(cfg.vocab_size, 30000)
    prompts = []
    for i in range(n):
        ps = [(torch.randint(3, vocab, (20,), generator=g).tolist(), new)]
        ps += [(torch.randint(3, vocab, (12,), generator=g).tolist(), max(2, new // 2)) for _ in range(questions)]
        prompts.append(ps)
    return images, prompts


def run_all(engine: Engine, images: torch.Tensor, prompts: list) -> dict[str, float]:
    for i, ps in enumerate(prompts):
        engine.add([Request(ids, 0, new, ignore_eos=True) for ids, new in ps], images[i], tag=i)
    t0 = time.perf_counter()
    while engine.has_work:
        engine.step()
    sync(engine.device)
    wall = time.perf_counter() - t0
    s = engine.stats
    return {"wall_s": wall, "images_per_s": len(prompts) / wall, "rows_per_step": s["decode_rows"] / max(1, s["decode_steps"]),
            "decode_steps": s["decode_steps"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="v1")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=list(DTYPES))
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-slots", type=int, default=256)
    p.add_argument("--out", default="gpu_first.json")
    p.add_argument("--backend", default="inductor",
                   help="torch.compile backend of the compiled phases (CI's CPU run: eager, to trace without a compile)")
    p.add_argument("--skip", nargs="*", default=[], choices=PHASES, help="phases to leave out (recorded as skipped)")
    a = p.parse_args()
    dev = torch.device(a.device)
    dtype = DTYPES[a.dtype or ("bf16" if dev.type == "cuda" else "fp32")]
    cfg = preset(a.config)
    rep = Report(a.out, a.skip)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    bw = next((v for k, v in BANDWIDTH.items() if k in name), None)

    def environment() -> dict[str, Any]:
        out: dict[str, Any] = {"torch": torch.__version__, "device": name, "dtype": str(dtype), "config": a.config,
                               "threads": torch.get_num_threads(), "peak_bf16_flops": peak, "bandwidth": bw}
        if dev.type == "cuda":
            out["capability"] = torch.cuda.get_device_capability(dev)
            out["sdpa"] = {k: getattr(torch.backends.cuda, f"{k}_sdp_enabled")()
                           for k in ("flash", "mem_efficient", "math", "cudnn")}
        try:
            importlib.import_module("torch.nn.attention.flex_attention")
            out["flex_attention"] = True
        except Exception:  # noqa: BLE001
            out["flex_attention"] = False
        out["decode_attention"] = "matmul over prefix entries + suffix blocks, log-sum-exp merge (cogvlm/cascade.py)"
        return out

    rep.run("environment", environment)
    t0 = time.perf_counter()
    model = build_random(cfg, dtype, dev)
    rep.data["model_build_s"] = round(time.perf_counter() - t0, 2)
    kw = dict(max_prompt_tokens=32, max_new_tokens=a.new_tokens, max_slots=a.max_slots, timed=True, admission_images=8)
    state: dict[str, Any] = {}

    def plan() -> dict[str, Any]:
        eng = Engine(model, prompts_per_image=4, **kw)
        state["engine"] = eng
        pl = eng.plan
        return {"describe": pl.describe(), "blocks": pl.blocks, "rows": pl.slots, "block_bytes": pl.block_bytes,
                "prefill_bytes": pl.prefill_bytes, "decode_bytes_per_row": pl.decode_bytes_per_slot,
                "weights_bytes": pl.weights_bytes, "planned_bytes": pl.planned_bytes}

    if rep.run("plan", plan) is None:
        return
    eng: Engine = state["engine"]

    def caption_eager() -> dict[str, Any]:
        images, prompts = work(cfg, a.images, a.new_tokens)
        run_all(eng, images[:2], prompts[:2])  # warm-up
        eng.stats = dict.fromkeys(eng.stats, 0)
        eng.timings = dict.fromkeys(eng.timings, 0.0)
        res = run_all(eng, images, prompts)
        res["timings"] = dict(eng.timings)
        state["caption"] = res
        return res

    rep.run("caption_eager", caption_eager)

    def decode_steps() -> dict[str, Any]:
        out = {}
        col = cfg.num_hidden_layers * 2 * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize
        weights = language_expert_bytes(model)
        for rows in sorted({min(16, eng.slots), min(64, eng.slots), eng.slots}):
            images, prompts = work(cfg, rows, 4096, seed=rows)
            for i in range(rows):
                eng.add([Request(prompts[i][0][0], 0, eng.max_new_cap, ignore_eos=True)], images[i], tag=i)
            with torch.inference_mode():
                while eng.scheduler.waiting and eng.free:
                    before = len(eng.free)
                    eng._admit_safely()
                    if len(eng.free) == before:
                        break
            live = eng.slots - len(eng.free)
            with torch.inference_mode():
                eng._decode(2)
                sync(dev)
                c0, t0 = eng.stats["attn_columns"], time.perf_counter()
                eng._decode(8)
                sync(dev)
            ms = (time.perf_counter() - t0) / 8 * 1000
            cols = (eng.stats["attn_columns"] - c0) / 8
            floor = (weights + cols * col) / bw * 1000 if bw else None
            out[str(rows)] = {"live_rows": live, "step_ms": round(ms, 3), "columns_read": cols,
                              "floor_ms": None if floor is None else round(floor, 3)}
            eng.abort()
        return out

    rep.run("decode_steps", decode_steps)

    def prefill_share() -> dict[str, Any]:
        c = state.get("caption")
        if c is None:
            return {"status": "skipped", "why": "caption_eager failed"}
        t = c["timings"]
        flops = a.images * (vision_flops(cfg) + prefill_flops(cfg, 1 + cfg.num_vision_tokens + 20))
        busy = t["vision_s"] + t["prefill_s"]
        return {"vision_s": t["vision_s"], "prefill_s": t["prefill_s"], "flops_per_s": flops / max(busy, 1e-9),
                "share_of_peak": None if peak is None else flops / max(busy, 1e-9) / peak,
                "share_of_engine_time": busy / max(busy + t["decode_s"], 1e-9)}

    rep.run("prefill_share", prefill_share)

    def multi_vs_caption() -> dict[str, Any]:
        n = max(2, a.images // 2)
        images, prompts = work(cfg, n, a.new_tokens, questions=3, seed=5)
        eng.stats = dict.fromkeys(eng.stats, 0)
        m = run_all(eng, images, prompts)
        c = state.get("caption")
        out = {"multi": m}
        if c:
            out["rows_per_step_ratio"] = m["rows_per_step"] / max(1e-9, c["rows_per_step"])
        return out

    rep.run("multi_vs_caption", multi_vs_caption)

    def vision_ahead() -> dict[str, Any]:
        state.pop("engine", None)
        veng = Engine(model, prompts_per_image=4, vision_ahead=True, **kw)
        images, prompts = work(cfg, a.images, a.new_tokens)
        run_all(veng, images[:2], prompts[:2])  # warm-up, as caption_eager
        veng.stats = dict.fromkeys(veng.stats, 0)
        res = run_all(veng, images, prompts)
        res["images_ahead"] = veng.stats["vision_ahead"]
        c = state.get("caption")
        if c:
            res["speedup_vs_caption_eager"] = res["images_per_s"] / c["images_per_s"]
        return res

    rep.run("vision_ahead", vision_ahead)

    def compiled() -> dict[str, Any]:
        state.pop("engine", None)
        ceng = Engine(model, prompts_per_image=4, compile=True if a.backend == "inductor" else a.backend, **kw)
        t0 = time.perf_counter()
        ceng.warm_up()
        sync(dev)
        compile_s = time.perf_counter() - t0
        images, prompts = work(cfg, a.images, a.new_tokens)
        res = run_all(ceng, images, prompts)
        res.update(compile_s=compile_s, recompiles=ceng.recompiles())
        c = state.get("caption")
        if c:
            res["speedup_vs_eager"] = res["images_per_s"] / c["images_per_s"]
        return res

    rep.run("compiled", compiled)

    def sampling() -> dict[str, Any]:
        b = min(64, a.max_slots)
        rows = Rows(b, 64, 8, 0, dev)
        rows.max_new.fill_(1 << 30)
        rows.temperature.fill_(1.0)
        rows.top_k.fill_(50)
        rows.top_p.fill_(0.9)
        logits = torch.randn(b, cfg.vocab_size, device=dev, dtype=dtype)
        fn = compiled_advance(True if a.backend == "inductor" else a.backend)
        out: dict[str, Any] = {"rows": b, "backend": a.backend}
        with torch.inference_mode():
            for kind, (sampled, filtered) in KINDS.items():
                _, eager = timed(advance, logits, rows, b, sampled, filtered, 20)
                first, comp = timed(fn, logits, rows, b, sampled, filtered, 20)
                out[kind] = {"eager_ms": round(1e3 * eager, 4), "compiled_ms": round(1e3 * comp, 4),
                             "compile_s": round(first, 2)}
        return out

    rep.run("sampling", sampling)

    def fp8() -> dict[str, Any]:
        why = fp8_gemm_error(dev) or (None if dtype is torch.bfloat16 else "fp8 GEMMs need --dtype bf16")
        if why:
            return {"status": "skipped", "why": why}
        state.pop("engine", None)
        report = quantize_model_(model, "fp8")  # the last phase: the model stays converted
        feng = Engine(model, prompts_per_image=4, **kw)
        images, prompts = work(cfg, a.images, a.new_tokens)
        run_all(feng, images[:2], prompts[:2])  # warm-up, as caption_eager
        feng.stats = dict.fromkeys(feng.stats, 0)
        feng.timings = dict.fromkeys(feng.timings, 0.0)
        res = run_all(feng, images, prompts)
        t = dict(feng.timings)
        res.update(timings=t, layers=len(report.quantized), kept=len(report.skipped),
                   weights_bytes=feng.plan.weights_bytes, rows=feng.plan.slots)
        c = state.get("caption")
        if c:
            res["speedup_vs_bf16"] = res["images_per_s"] / c["images_per_s"]
            bf16_vp = c["timings"]["vision_s"] + c["timings"]["prefill_s"]
            res["vision_prefill_speedup"] = bf16_vp / max(t["vision_s"] + t["prefill_s"], 1e-9)
        return res

    rep.run("fp8", fp8)


if __name__ == "__main__":
    main()
