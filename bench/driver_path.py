"""The driver's own work per result row, on each checkout's real code, without Ray or a store.

    python bench/driver_path.py --before /tmp/before          # a worktree of dbfb39c

Before workers wrote (dbfb39c): every output row reached the driver in the blocks Generate
emitted (an image's rows at a time), went through `to_dict`, the `ShardTracker`, and at the shard's
end `to_table` and Parquet encoding (then two PUTs, not counted here). Now: the driver receives one
record per written part (a Ray batch's rows of one shard) and feeds it to the `PartTracker`; the
merge runs in a Ray task. Both sides get the same rows (3 prompts per image, 200-character
responses); CPU is this process's time. Prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

CHILD = r"""
import io, json, sys, time
import pandas as pd
import pyarrow.parquet as pq
side, shards, per_shard, prompts, batch = sys.argv[1], *map(int, sys.argv[2:6])

def rows(sid, images):
    return [{"key": f"{sid}-{i}", "source_uri": f"/in/{sid}.tar", "shard_id": sid, "shard_total": per_shard,
             "image_index": i, "image_tasks": prompts, "task": "caption", "task_index": j, "prompt": "Describe it.",
             "response": "x" * 200, "boxes_json": None, "status": "ok", "error_message": None, "prompt_tokens": 30,
             "output_tokens": 64, "finish_reason": "length", "generation_s": 0.1, "width": 640, "height": 480,
             "generation_settings": '{"max_new_tokens": 64}', "model_source": "m", "model_fingerprint": "f",
             "passthrough": None} for i in images for j in range(prompts)]

n = 0
if side == "before":
    from pipeline.job import ShardTracker
    from pipeline.ledger import to_table
    blocks = [pd.DataFrame(rows(f"s{s}", [i])) for s in range(shards) for i in range(per_shard)]  # an image's rows
    run = {"run_id": "r", "project_version": "0", "timestamp": None}
    t0 = time.process_time()
    tracker = ShardTracker()
    for b in blocks:
        for r in b.to_dict("records"):
            n += 1
            sid = tracker.add(r)
            if sid is not None:
                pq.write_table(to_table(tracker.pop(sid), run), io.BytesIO(), compression="zstd")
else:
    from pipeline.commit import PartTracker
    from pipeline.rows import RECORD_COLUMNS
    # what Generate's writer sends per part: computed on the workers, so built before timing
    recs = []
    for s in range(shards):
        for i0 in range(0, per_shard, batch):
            imgs = list(range(i0, min(per_shard, i0 + batch)))
            recs.append({"shard_id": f"s{s}", "part": f"_parts/s{s}/r-{i0}.parquet", "images": json.dumps(imgs),
                         "shard_total": per_shard if imgs[-1] == per_shard - 1 else -1, "rows": len(imgs) * prompts,
                         "transient": None, "failures": "[]"})
    blocks = [pd.DataFrame([r], columns=RECORD_COLUMNS) for r in recs]
    n = shards * per_shard * prompts
    t0 = time.process_time()
    tracker, done = PartTracker(), 0
    for b in blocks:
        for r in b.to_dict("records"):
            done += tracker.add(r) is not None
    assert done == shards
print("RESULT " + json.dumps({"rows": n, "cpu_s": time.process_time() - t0}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="a checkout of the pipeline before workers wrote (dbfb39c)")
    p.add_argument("--shards", type=int, default=20)
    p.add_argument("--per-shard", type=int, default=1000, help="images per shard")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32, help="images per Ray batch (per part)")
    a = p.parse_args()
    out = {}
    for side, repo in (("before", Path(a.before).resolve()), ("after", HERE)):
        env = dict(os.environ, PYTHONPATH=str(repo))
        proc = subprocess.run([sys.executable, "-c", CHILD, side, str(a.shards), str(a.per_shard), str(a.prompts),
                               str(a.batch_size)], cwd=repo, env=env, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{side}: no result\n{proc.stderr[-3000:]}")
        out[side] = json.loads(line[len("RESULT "):])
    print(f"{a.shards} shards x {a.per_shard} images x {a.prompts} prompts = {out['after']['rows']:,} rows; "
          f"parts of {a.batch_size} images")
    print("| driver | CPU s | per 1,000 rows (ms) | per row (us) |")
    print("|---|---|---|---|")
    for side, r in out.items():
        print(f"| {side} | {r['cpu_s']:.3f} | {1000 * r['cpu_s'] / r['rows'] * 1000:.3f} | {1e6 * r['cpu_s'] / r['rows']:.2f} |")
    print(f"before / after: {out['before']['cpu_s'] / max(out['after']['cpu_s'], 1e-9):.0f}x less driver CPU per row")


if __name__ == "__main__":
    main()
