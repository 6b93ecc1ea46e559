"""Slots kept full: live rows per decode step with a long queue, this engine and one before it.

    OMP_NUM_THREADS=1 python bench/fullness.py --baseline-src /tmp/engine-main

The issue's case: 128 rows, 64-token captions, `admission_images` 8, `sync_every` 8, 5x the
capacity queued (640 images), eos ignored; `tiny` shape by default (the fullness does not depend
on the shape; the wall-clock columns do). Fill: live rows / slots per step while work waits,
averaged after the first quarter of the steps.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.engine import build_random, load_package  # noqa: E402
from bench.kv_store import captions, drive  # noqa: E402
from cogvlm.config import preset  # noqa: E402
from cogvlm.engine import Engine, Request  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--slots", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--baseline-src", default=None)
    a = p.parse_args()
    cfg = preset(a.config)
    model = build_random(cfg, torch.float32, torch.device("cpu"))
    images, prompts = captions(cfg, 5 * a.slots, a.new_tokens)
    engines = [("kv store", Engine, Request)]
    if a.baseline_src:
        old = load_package(a.baseline_src)
        engines.append(("before", old.engine.Engine, old.engine.Request))
    for name, E, R in engines:
        e = E(model, max_prompt_tokens=32, max_new_tokens=a.new_tokens, max_slots=a.slots, admission_images=8,
              sync_every=8, timed=True)
        r = drive(e, R, images, prompts, e.slots)
        t = e.timings
        print(f"{name}: slots {e.slots}  fill {r['fill']:.2f}  rows/step {r['rows_per_step']:.1f}  "
              f"longest admission {r['stall_ms']:.0f} ms  wall {r['wall_s']:.1f} s  (vision {t['vision_s']:.1f} s, "
              f"prefill {t['prefill_s']:.1f} s, decode {t['decode_s']:.1f} s over {e.stats['decode_steps']} steps, "
              f"{e.stats['admissions']} admissions)", flush=True)


if __name__ == "__main__":
    main()
