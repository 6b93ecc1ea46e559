"""The KV store's targets, as ratios inside one run (random weights, torch only).

    OMP_NUM_THREADS=1 python bench/kv_store.py --config small --baseline-src /tmp/engine-main

Three measurements on the same model (default `small` shape, fp32 on CPU), all images queued at
once (the queue is `--queue` x the engine's capacity), eos ignored:

1. fullness: a caption workload; per decode step, live rows / rows the KV memory holds for it
   (the capacity: rows, or blocks if those run out first), averaged over the steps while the
   queue still has work (steady state), and the longest admission round.
2. live columns: the same captions with `max_prompt_tokens` 1500 and 32, same KV memory: decode
   seconds and key columns read per step, long / short.
3. sharing: caption + 3 questions per image against captions alone in the same KV memory: rows
   decoded per step (over the whole run, ramp-up and drain included; and steady, as in 1: while
   work waits, after the first quarter of the steps), and KV blocks per image in flight. Two
   cases: the issue's (every question a
   20-token prompt with the caption's `--new-tokens`, eos ignored), and short questions (12-token
   prompts, `--question-tokens` new tokens each; default 8-16).

`--parts 3` runs only the captions and the sharing cases (1's caption run is their reference).

`--baseline-src DIR` (a checkout of the engine before the KV store, e.g. `git worktree add DIR
main`) runs its engine on the same work in the same process for 1-3 (its capacity: slots).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.engine import DTYPES, build_random, load_package, make_work  # noqa: E402
from cogvlm.config import PRESETS, preset  # noqa: E402
from cogvlm.engine import Engine, Request  # noqa: E402


def drive(engine: Any, request_cls: Any, images: torch.Tensor, prompts: list, cap: int) -> dict[str, float]:
    """Queue everything, step to the end; per-step live rows while work waits."""
    for i, ps in enumerate(prompts):
        engine.add([request_cls(ids, 0, new, ignore_eos=True) for ids, new in ps], images[i], tag=i)
    fill, steps0 = [], 0
    t0 = time.perf_counter()
    while engine.has_work:
        waiting = bool(engine.waiting)
        s0 = engine.stats["decode_steps"]
        r0 = engine.stats["decode_rows"]
        engine.step()
        n = engine.stats["decode_steps"] - s0
        if waiting and n:
            fill.append((engine.stats["decode_rows"] - r0) / n)
        steps0 += n
    wall = time.perf_counter() - t0
    s, t = engine.stats, engine.timings
    half = fill[len(fill) // 4:] or [0.0]  # steady state: after the first quarter of the steps
    steady = sum(half) / len(half)
    return {"wall_s": wall, "fill": steady / cap, "steady_rows": steady,
            "rows_per_step": s["decode_rows"] / max(1, s["decode_steps"]),
            "decode_s": t["decode_s"], "steps": s["decode_steps"], "stall_ms": 1000 * t["max_admission_s"],
            "columns_per_step": s.get("attn_columns", 0) / max(1, s["decode_steps"]),
            "blocks_per_step": s.get("kv_blocks_used", 0) / max(1, s["decode_steps"]),
            "images_per_step": s.get("prefix_entries", 0) / max(1, s["decode_steps"])}


def admit_all(e: Any) -> None:
    """Admission rounds until nothing waits or nothing more fits (no decode step)."""
    with torch.inference_mode():
        while e.waiting and e.free:
            before = len(e.free)
            e._admit_safely()
            if len(e.free) == before:
                break


def same_weight_engines(model: Any, config: str, sources: list[str]) -> list[tuple[str, Any, Any, Any]]:
    """(name, Engine, Request, model) for this checkout and each older checkout in `sources`, every
    model holding `model`'s weights."""
    engines: list[tuple[str, Any, Any, Any]] = [("this", Engine, Request, model)]
    for i, src in enumerate(sources):
        pkg = load_package(src, f"cogvlm_baseline{i}")
        m = build_random(pkg.config.preset(config), torch.float32, torch.device("cpu"), package=pkg)
        m.load_state_dict(model.state_dict())
        engines.append((src, pkg.engine.Engine, pkg.engine.Request, m))
    return engines


def filled(E: Any, R: Any, model, images: torch.Tensor, prompts: list, rows: int, **kw: Any) -> Any:
    """An engine holding the first prompt of each of `rows` images (all admitted, none decoded)."""
    e = E(model, **dict(kw, timed=False, admission_images=rows))
    for i in range(rows):
        ids, new = prompts[i][0]
        e.add([R(ids, 0, new, ignore_eos=True)], images[i], tag=i)
    admit_all(e)
    # engines on one model keep their KV on its layers: remember this one's, to put back (`alternate`)
    e.bench_kv = [(m.self_attn.kv_cache, getattr(m.self_attn, "kv_pool", None)) for m in model.model.layers]
    e.bench_model = model
    return e


def pair(makers: list) -> list:
    """Engines from `makers` (each: rows -> engine) holding the same rows: as many as the first holds."""
    first = makers[0](10**9)
    rows = first.slots - len(first.free)
    rest = [m(rows) for m in makers[1:]]
    assert all(e.slots - len(e.free) == rows for e in rest), "not the same rows"
    return [first] + rest


def alternate(engines: list, rounds: int = 6, steps: int = 4) -> list[float]:
    """Seconds per decode step of each engine, their steps alternated (a busy machine's drift
    hits all alike)."""
    spent = [0.0] * len(engines)
    with torch.inference_mode():
        for _ in range(rounds):
            for k, e in enumerate(engines):
                for m, (cache, pool) in zip(e.bench_model.model.layers, e.bench_kv):
                    m.self_attn.kv_cache, m.self_attn.kv_pool = cache, pool
                t0 = time.perf_counter()
                e._decode(steps)
                if e.device.type == "cuda":
                    torch.cuda.synchronize(e.device)
                spent[k] += time.perf_counter() - t0
    return [t / (rounds * steps) for t in spent]


def captions(cfg, n: int, new: int, questions: int = 0, seed: int = 0, question_tokens: int = 0,
             question_len: int = 12):
    """n images, one 20-token caption each (+ `questions` questions of `question_len` tokens and
    `question_tokens` new tokens, or 8-16 if 0)."""
    images, prompts = make_work(cfg, "caption", n, new, seed)
    if questions:
        g = torch.Generator().manual_seed(seed + 1)
        for i, ps in enumerate(prompts):
            ps += [(torch.randint(3, 1000, (question_len,), generator=g).tolist(), question_tokens or 8 + (i + q) % 9)
                   for q in range(questions)]
    return images, prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=list(DTYPES))
    p.add_argument("--rows", type=int, default=32, help="caption rows the KV memory holds (sets kv_cache_gb)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--queue", type=float, default=5.0, help="images queued, in multiples of the capacity")
    p.add_argument("--admission-images", type=int, default=8)
    p.add_argument("--sync-every", type=int, default=8)
    p.add_argument("--question-tokens", type=int, default=0, help="new tokens per question (0: 8-16)")
    p.add_argument("--image-size", type=int, default=None,
                   help="the vision tower's image size (490: v1's 1,228-column prefix at the preset's widths)")
    p.add_argument("--baseline-src", default=None)
    p.add_argument("--parts", default="1,2,3", help="which measurements (3 alone still runs 1's captions)")
    a = p.parse_args()
    parts = {int(x) for x in a.parts.split(",")}
    device = torch.device(a.device)
    dtype = DTYPES[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    cfg = preset(a.config) if a.image_size is None else preset(a.config, vision_config=dict(
        PRESETS[a.config].get("vision_config", {}), image_size=a.image_size))
    model = build_random(cfg, dtype, device)
    P = 1 + cfg.num_vision_tokens
    col_bytes = cfg.num_hidden_layers * 2 * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize
    prompt, new = 32, a.new_tokens
    kv_gb = a.rows * (P + prompt + new) * col_bytes / 1e9  # what the old engine's slots of this many rows took
    n_img = int(a.queue * a.rows)
    print(f"device {device} dtype {dtype} torch {torch.__version__} threads {torch.get_num_threads()} "
          f"config {a.config} (prefix {P} columns) kv_cache_gb {kv_gb:.4f} images {n_img}", flush=True)
    kw = dict(max_new_tokens=new, max_slots=256, kv_cache_gb=kv_gb, admission_images=a.admission_images,
              sync_every=a.sync_every, timed=True)
    engines: list[tuple[str, Any, Any]] = [("kv store", Engine, Request)]
    if a.baseline_src:
        pkg = load_package(a.baseline_src)
        engines.append(("before", pkg.engine.Engine, pkg.engine.Request))
    out: dict[str, dict[str, Any]] = {}
    for name, E, R in engines:
        res: dict[str, Any] = {}
        images, prompts = captions(cfg, min(n_img, a.rows), new, seed=1)  # warm-up
        drive(E(model, max_prompt_tokens=prompt, **kw), R, images, prompts, a.rows)
        # 1. fullness (capacity: the rows this memory holds for captions)
        eng = E(model, max_prompt_tokens=prompt, **kw)
        images, prompts = captions(cfg, n_img, new)
        res["caption"] = drive(eng, R, images, prompts, min(eng.slots, a.rows) if name == "kv store" else eng.slots)
        res["caption"]["slots"] = eng.slots
        if 2 in parts:
            # 2. live columns: the same work with max_prompt_tokens 1500
            eng = E(model, max_prompt_tokens=1500, **kw)
            res["long"] = drive(eng, R, images, prompts, max(1, eng.slots))
            res["long"]["slots"] = eng.slots
            rows_both = min(a.rows, eng.slots)  # what both settings hold (the engine before: fewer slots at 1500)
            both = pair([lambda r, n=n: filled(E, R, model, images, prompts, min(r, rows_both), max_prompt_tokens=n, **kw)
                         for n in ((1500, prompt) if name == "before" else (prompt, 1500))])
            if name == "before":
                both.reverse()
            res["interleaved"] = alternate(both)
            res["interleaved_rows"] = both[0].slots - len(both[0].free)
        # 3. sharing: caption + 3 questions per image, the same KV memory: the case (every
        # prompt 20 tokens, the caption's new tokens), then short questions
        if 3 in parts:
            for key, qlen, qnew in (("multi", 20, new), ("multi_short", 12, a.question_tokens)):
                eng = E(model, max_prompt_tokens=prompt, prompts_per_image=4, **kw)
                images, prompts = captions(cfg, n_img // 2, new, questions=3, question_tokens=qnew, question_len=qlen)
                res[key] = drive(eng, R, images, prompts, max(1, eng.slots))
                res[key]["slots"] = eng.slots
        out[name] = res
        c = res["caption"]
        print(f"\n## {name}", flush=True)
        print(f"1. steady live rows / capacity ({a.rows} caption rows): {c['fill']:.2f}   rows/step "
              f"{c['rows_per_step']:.1f}   longest admission {c['stall_ms']:.0f} ms   slots {c['slots']}")
        if 2 in parts:
            lg = res["long"]
            print(f"2. max_prompt_tokens 1500 vs 32: decode time {lg['decode_s'] / c['decode_s']:.2f}x "
                  f"({lg['decode_s']:.2f} s vs {c['decode_s']:.2f} s, {lg['steps']} vs {c['steps']} steps); "
                  f"columns read per step {lg['columns_per_step'] / max(1, c['columns_per_step']):.2f}x; "
                  f"rows/step {lg['rows_per_step']:.1f} vs {c['rows_per_step']:.1f}")
            s32, s1500 = res["interleaved"]
            print(f"2b. the same {res['interleaved_rows']} rows, steps alternated: {1000 * s1500:.1f} ms vs "
                  f"{1000 * s32:.1f} ms per step: {s1500 / s32:.2f}x")
        # KV per image in flight; the engine before kept a whole slot per row
        col = P + prompt + new
        blocks_img_c = c["blocks_per_step"] / max(1e-9, c["images_per_step"]) if c["images_per_step"] else col / 16
        for key, what in (("multi", f"20-token questions, {new} new tokens each (the issue's case)"),
                          ("multi_short", f"12-token questions, {a.question_tokens or '8-16'} new tokens")):
            if key not in res:
                continue
            m = res[key]
            blocks_img_m = m["blocks_per_step"] / max(1e-9, m["images_per_step"]) if m["images_per_step"] else 4 * col / 16
            print(f"3. caption + 3 questions ({what}) vs caption, same KV memory: rows/step "
                  f"{m['rows_per_step'] / c['rows_per_step']:.2f}x over the whole run ({m['rows_per_step']:.1f} vs "
                  f"{c['rows_per_step']:.1f}), {m['steady_rows'] / c['steady_rows']:.2f}x steady ({m['steady_rows']:.1f} "
                  f"vs {c['steady_rows']:.1f}, while work waits, after the first quarter), slots {m['slots']}; KV blocks per image in flight {blocks_img_m / max(1e-9, blocks_img_c):.2f}x "
                  f"({blocks_img_m:.1f} vs {blocks_img_c:.1f}); wall {m['wall_s']:.1f} s vs {c['wall_s']:.1f} s", flush=True)
    if len(out) == 2:
        images, prompts = captions(cfg, a.rows, new, seed=2)
        kv_e, before_e = pair([lambda r, E=E, R=R: filled(E, R, model, images, prompts, min(r, a.rows),
                                                            max_prompt_tokens=prompt, **kw) for _, E, R in engines])
        rows = kv_e.slots - len(kv_e.free)
        kv, before = alternate([kv_e, before_e])
        print(f"\ndecode step, the same {rows} caption rows, steps alternated: kv store {1000 * kv:.1f} ms, "
              f"before {1000 * before:.1f} ms ({kv / before:.2f}x)")
        k, b = out["kv store"], out["before"]
        line = f"\nkv store / before, caption images/s: {b['caption']['wall_s'] / k['caption']['wall_s']:.2f}"
        for key in ("multi", "multi_short"):
            if key in k:
                line += f"; {key} images/s: {b[key]['wall_s'] / k[key]['wall_s']:.2f}"
        print(line)


if __name__ == "__main__":
    main()
