"""The decode step's sampling and row bookkeeping (`cogvlm.runner.advance`), eager vs compiled.

    OMP_NUM_THREADS=1 python bench/sampling.py --rows 8 32 --vocab 32000

For each batch kind the engine meets (greedy; sampled; sampled with top-k/top-p), each row count
and each way of running it (eager, and `torch.compile` with `--backend`): the first call's
seconds (the compile) and the median of `--repeats` calls on the same rows. The engine runs a
kind compiled where this measures it faster (`cogvlm.compiled.DecodeFunctions.advance_for`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cogvlm.compiled import compiled_advance  # noqa: E402
from cogvlm.runner import Rows, advance  # noqa: E402

KINDS = {"greedy": (False, False), "sampled": (True, False), "top-k/top-p": (True, True)}


def timed(fn, logits: torch.Tensor, rows: Rows, b: int, sampled: bool, filtered: bool,
          repeats: int) -> tuple[float, float]:
    """(first call's seconds, median seconds of the next `repeats`), every row live each call."""
    eos = torch.tensor([2], device=logits.device)
    times = []
    for _ in range(repeats + 1):
        rows.lengths.zero_()
        rows.live.fill_(True)
        if logits.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(logits, rows, b, eos, 0, sampled, filtered)
        if logits.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[8, 32])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    dev = torch.device(a.device)
    g = torch.Generator().manual_seed(0)
    print(f"device {dev}, torch {torch.__version__}, vocab {a.vocab}, threads {torch.get_num_threads()}")
    print(f"{'rows':>4} {'kind':<12} {'eager ms':>9} {'compiled ms':>11} {'eager/compiled':>14} {'compile s':>9}")
    with torch.inference_mode():
        for b in a.rows:
            rows = Rows(b, 64, 8, 0, dev)
            rows.max_new.fill_(1 << 30)
            rows.temperature.fill_(1.0)
            rows.top_k.fill_(50)
            rows.top_p.fill_(0.9)
            rows.seeds.copy_(torch.arange(b, device=dev))
            logits = torch.randn(b, a.vocab, generator=g).to(dev)
            compiled = compiled_advance(a.backend)  # its own graphs for each row count
            for kind, (sampled, filtered) in KINDS.items():
                _, eager = timed(advance, logits, rows, b, sampled, filtered, a.repeats)
                first, comp = timed(compiled, logits, rows, b, sampled, filtered, a.repeats)
                print(f"{b:>4} {kind:<12} {1e3 * eager:>9.3f} {1e3 * comp:>11.3f} {eager / comp:>14.2f} {first:>9.2f}")


if __name__ == "__main__":
    main()
