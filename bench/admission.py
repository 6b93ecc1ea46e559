"""An admission round's cost (vision + prefills), this checkout against other checkouts.

    OMP_NUM_THREADS=1 python bench/admission.py --config small --images 8 --baseline-src /tmp/before

Each engine (this checkout's and each `--baseline-src` checkout's, each on its own model built
by its own package, same weights) admits the same `--images` images in one round (one 20-token
caption each, or with `--multi` a caption and three 20-token questions), then drops them
(`abort`); rounds alternate between the engines, the order rotated each round. Printed: the
median seconds of the vision pass and of the prefills per round, and whether the first tokens agree.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.engine import build_random  # noqa: E402
from bench.kv_store import captions, same_weight_engines  # noqa: E402
from cogvlm.config import preset  # noqa: E402


def round_(e: Any, R: Any, images: torch.Tensor, prompts: list) -> tuple[float, float, list[int]]:
    for i, ps in enumerate(prompts):
        e.add([R(ids, 0, new, ignore_eos=True) for ids, new in ps], images[i], tag=i)
    v0, p0 = e.timings["vision_s"], e.timings["prefill_s"]
    with torch.inference_mode():
        e._admit_safely()
    first = e.rows.out[:, 0].tolist() if hasattr(e, "rows") else []
    e.abort()
    return e.timings["vision_s"] - v0, e.timings["prefill_s"] - p0, first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--multi", action="store_true")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--baseline-src", nargs="*", default=[])
    a = p.parse_args()
    cfg = preset(a.config)
    torch.manual_seed(0)
    model = build_random(cfg, torch.float32, torch.device("cpu"))
    engines = same_weight_engines(model, a.config, a.baseline_src)
    per_image = 4 if a.multi else 1
    images, prompts = captions(cfg, a.images, 32, seed=3, questions=per_image - 1, question_tokens=32, question_len=20)
    kw = dict(max_prompt_tokens=32, max_new_tokens=32, max_slots=a.images * per_image, admission_images=a.images,
              prompts_per_image=per_image, timed=True)
    es = [E(m, **kw) for _, E, _, m in engines]
    for (_, _, R, _), e in zip(engines, es):  # a first round makes the one-time allocations
        round_(e, R, images, prompts)
    res: list[list[tuple[float, float]]] = [[] for _ in es]
    firsts: list[list[int]] = [[] for _ in es]
    for r in range(a.rounds):
        order = list(range(len(es)))
        for k in order[r % len(es):] + order[:r % len(es)]:
            v, pf, first = round_(es[k], engines[k][2], images, prompts)
            res[k].append((v, pf))
            firsts[k] = first
    print(f"torch {torch.__version__} threads {torch.get_num_threads()} config {a.config} images {a.images} "
          f"prompts per image {per_image}; same first tokens: {[f == firsts[0] for f in firsts[1:] if f]}")
    ref = statistics.median(x[1] for x in res[0])
    for (name, *_), rs in zip(engines, res):
        vis, pre = statistics.median(x[0] for x in rs), statistics.median(x[1] for x in rs)
        print(f"{name}: vision {1000 * vis:.1f} ms, prefills {1000 * pre:.1f} ms per round "
              f"(medians of {a.rounds}); prefills {pre / ref:.2f}x this")


if __name__ == "__main__":
    main()
