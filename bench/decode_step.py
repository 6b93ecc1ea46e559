"""One decode step's cost, this checkout against other checkouts, on the same rows (CPU overhead).

    OMP_NUM_THREADS=1 python bench/decode_step.py --config tiny --images 128 --baseline-src /tmp/a /tmp/b

Each engine (this checkout's and each `--baseline-src` checkout's, every one on its own model
built by its own package, with the same weights) is filled with the same images' prompts (one
20-token caption each, or with `--multi` a caption and three 20-token questions, 32 new tokens,
eos ignored), all admitted, none decoded. Then rounds of 2 decode steps each, the engines'
order rotated every round, so that a busy machine's drift hits all alike; the median over rounds
is printed, and whether the engines with the same row state produced the same tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.engine import build_random  # noqa: E402
from bench.kv_store import admit_all, captions, same_weight_engines  # noqa: E402
from cogvlm.config import preset  # noqa: E402


def filled(E: Any, R: Any, model: Any, images: torch.Tensor, prompts: list, **kw: Any) -> Any:
    e = E(model, **kw)
    for i, ps in enumerate(prompts):
        e.add([R(ids, 0, new, ignore_eos=True) for ids, new in ps], images[i], tag=i)
    admit_all(e)
    return e


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--multi", action="store_true", help="caption + 3 questions per image")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--baseline-src", nargs="*", default=[])
    a = p.parse_args()
    cfg = preset(a.config)
    torch.manual_seed(0)
    model = build_random(cfg, torch.float32, torch.device("cpu"))
    engines = same_weight_engines(model, a.config, a.baseline_src)
    per_image = 4 if a.multi else 1
    images, prompts = captions(cfg, a.images, 32, seed=2, questions=per_image - 1, question_tokens=32, question_len=20)
    rows = a.images * per_image
    P = 1 + cfg.num_vision_tokens
    col_bytes = cfg.num_hidden_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4
    kw = dict(max_prompt_tokens=32, max_new_tokens=32, max_slots=rows, admission_images=a.images, sync_every=8,
              prompts_per_image=per_image, kv_cache_gb=1.4 * rows * (P + 64) * col_bytes / 1e9)
    es = [filled(E, R, m, images, prompts, **kw) for _, E, R, m in engines]
    print(f"torch {torch.__version__} threads {torch.get_num_threads()} config {a.config} rows held "
          f"{[e.slots - len(e.free) for e in es]}", flush=True)
    times: list[list[float]] = [[] for _ in es]
    with torch.inference_mode():
        for e in es:
            e._decode(3)
        same = [torch.equal(es[0].rows.out[:rows], e.rows.out[:rows]) for e in es[1:] if hasattr(e, "rows")]
        for i in range(a.rounds):
            order = list(range(len(es)))
            for k in order[i % len(es):] + order[:i % len(es)]:
                t0 = time.perf_counter()
                es[k]._decode(2)
                times[k].append((time.perf_counter() - t0) / 2)
    print(f"same tokens as this checkout (engines with a `rows` state): {same}")
    ref = statistics.median(times[0])
    for (name, *_), ts in zip(engines, times):
        med = statistics.median(ts)
        print(f"{name}: {1000 * med:.2f} ms per step (median of {a.rounds}, min {1000 * min(ts):.2f}), "
              f"{med / ref:.2f}x this; {1000 * med / rows:.3f} ms per row")


if __name__ == "__main__":
    main()
