"""How far int8 / fp8 KV (`Engine(kv_cache_dtype="int8" | "fp8")`) moves the decode logits, and
their bytes.

    OMP_NUM_THREADS=1 python bench/kv_precision.py --config small --images 8 --steps 24

For each model dtype (fp32, bf16; random weights of `--config`'s shape) and each `--kv-dtype`
(default int8 and fp8), two engines on copies of the same model hold the same rows (one 20-token
caption per image plus, for every other image, a 12-token question), one with its KV in the
model's dtype (the reference) and one with the quantized KV. Both are teacher-forced for
`--steps` decode steps: each step feeds both the reference's greedy token, and their logits are
compared at every live row: mean |difference| and how often the argmax agrees (measured the way
`bench/precision.py` measures int8 / int4 weights). Then the bytes per KV block of each format
for the full v1 and v2 shapes.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.engine import DTYPES, build_random  # noqa: E402
from bench.kv_store import admit_all, captions  # noqa: E402
from cogvlm.config import preset  # noqa: E402
from cogvlm.engine import Engine, Request  # noqa: E402
from cogvlm.kv_store import KV_CACHE_DTYPES  # noqa: E402
from cogvlm.memory import block_bytes  # noqa: E402


def filled(model: Any, images: torch.Tensor, prompts: list, **kw: Any) -> Engine:
    e = Engine(model, max_prompt_tokens=32, max_new_tokens=64, max_slots=4 * len(prompts),
               admission_images=len(prompts), prompts_per_image=2, **kw)
    for i, ps in enumerate(prompts):
        e.add([Request(ids, 0, 64, ignore_eos=True) for ids, _ in ps], images[i], tag=i)
    admit_all(e)
    return e


def forced(ref: Engine, other: Engine, steps: int) -> tuple[float, float, int, float, float]:
    """Teacher-forced decode steps -> (mean |logit difference|, argmax agreement, positions, and
    the median seconds of a step of each engine, their steps alternated)."""
    rows = ref.book.running
    diff, agree = 0.0, 0
    spent: tuple[list[float], list[float]] = ([], [])
    with torch.inference_mode():
        first_r, first_o = ref.rows.tokens[:rows].clone(), other.rows.tokens[:rows].clone()
        agree_first = int((first_r == first_o).sum())
        other.rows.tokens[:rows] = first_r
        for _ in range(steps):
            b, nb, E = ref._shape(1)
            t0 = time.perf_counter()
            lr = ref.step_fn(*ref._step_args(b, nb, E))[:rows]
            t1 = time.perf_counter()
            lo = other.step_fn(*other._step_args(b, nb, E))[:rows]
            spent[0].append(t1 - t0)
            spent[1].append(time.perf_counter() - t1)
            diff += float((lo - lr).abs().mean())
            tok = lr.argmax(-1)
            agree += int((lo.argmax(-1) == tok).sum())
            for e in (ref, other):
                e.rows.tokens[:rows] = tok
                e.rows.positions[:rows] += 1
                e.rows.cols[:rows] += 1
                e.step_count += 1
    return (diff / steps, (agree + agree_first) / (rows * (steps + 1)), rows * (steps + 1),
            statistics.median(spent[0]), statistics.median(spent[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--kv-dtype", nargs="+", default=list(KV_CACHE_DTYPES), choices=list(KV_CACHE_DTYPES))
    a = p.parse_args()
    cfg = preset(a.config)
    images, prompts = captions(cfg, a.images, 64, seed=4)
    g = torch.Generator().manual_seed(5)
    for i, ps in enumerate(prompts):
        if i % 2:
            ps.append((torch.randint(3, 1000, (12,), generator=g).tolist(), 64))
    print(f"torch {torch.__version__} config {a.config} images {a.images} rows "
          f"{sum(len(ps) for ps in prompts)} steps {a.steps}")
    for name in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_random(cfg, DTYPES[name], torch.device("cpu"))
        for kv in a.kv_dtype:
            ref = filled(model, images, prompts)  # a fresh reference engine (and pool) per format
            q = filled(copy.deepcopy(model), images, prompts, kv_cache_dtype=kv)
            d, agree, n, t_ref, t_q = forced(ref, q, a.steps)
            print(f"{name} model: {kv} KV vs {name} KV: mean |logit diff| {d:.4f}, argmax agreement "
                  f"{100 * agree:.1f}% over {n} positions (first tokens included); decode step (model only) "
                  f"{1000 * t_q:.1f} vs {1000 * t_ref:.1f} ms ({t_q / t_ref:.2f}x: dequantized copies on the CPU)",
                  flush=True)
    for shape in ("v1", "v2"):
        c = preset(shape)
        bf = block_bytes(c, torch.bfloat16, 16)
        for kv in a.kv_dtype:
            q8 = block_bytes(c, torch.bfloat16, 16, KV_CACHE_DTYPES[kv])
            print(f"{shape}: KV per 16-column block, all layers: bf16 {bf / 1e6:.3f} MB, {kv} + scales "
                  f"{q8 / 1e6:.3f} MB ({q8 / bf:.3f}x)")


if __name__ == "__main__":
    main()
