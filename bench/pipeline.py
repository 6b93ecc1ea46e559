"""The Ray pipeline against a plain in-process loop: same images, same model, same batch size.

    python bench/pipeline.py --config small --images 64 --batch-size 8 --new-tokens 16

Both sides run the same stage code: the loop calls read -> Preprocess -> Generate one batch at a
time in this process; the pipeline runs `pipeline.job` on a local Ray (started before timing, as
on a cluster). Both times include loading the model. Prints one table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from cogvlm.tiny import write_checkpoint  # noqa: E402
from cogvlm.weights import read_config  # noqa: E402
from pipeline import load_config, run  # noqa: E402
from pipeline.listing import list_input  # noqa: E402
from pipeline.readers import read_shard  # noqa: E402
from pipeline.rows import ROW_COLUMNS  # noqa: E402
from pipeline.stages import Generate, Preprocess  # noqa: E402


def make_inputs(root: Path, n_images: int, per_shard: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.data import good_image, write_tar

    for s in range(0, n_images, per_shard):
        samples = [(f"{i:08d}", "jpg", good_image(i, (320, 240)), None)
                   for i in range(s, min(n_images, s + per_shard))]
        write_tar(root / f"{s // per_shard:05d}.tar", samples)


def in_process(cfg) -> float:
    t0 = time.perf_counter()
    mcfg = read_config(Path(cfg.model.source))
    pre, gen = Preprocess(cfg, mcfg), Generate(cfg, mcfg)
    n = 0
    for shard in list_input(cfg.input, cfg.s3).shards:
        rows = pd.DataFrame(read_shard(shard, cfg.input, cfg.s3), columns=ROW_COLUMNS)
        for i in range(0, len(rows), cfg.model.batch_size):
            out = gen.run(pre(rows.iloc[i:i + cfg.model.batch_size]))
            n += int((out.status == "ok").sum())
    dt = time.perf_counter() - t0
    assert n > 0
    return dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small", choices=["tiny", "small"])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--per-shard", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="threads for the model")
    a = p.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_checkpoint(root / "ckpt", version=1, preset_name=a.config, tokenizer_dir=root / "tok")
        make_inputs(root / "in", a.images, a.per_shard)
        data = {
            "input": {"path": str(root / "in")},
            "tasks": {"caption": {"max_new_tokens": a.new_tokens}},
            "model": {"source": str(root / "ckpt"), "tokenizer": str(root / "tok"), "dtype": "fp32",
                      "gpus_per_replica": 0, "cpus_per_replica": a.cpus, "batch_size": a.batch_size,
                      "preprocess_workers": 1},
        }
        torch.set_num_threads(a.cpus)
        loop_s = in_process(load_config(data=dict(data, output={"path": str(root / "out-loop")})))
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # as pipeline.run sets it when it starts Ray itself
        ray.init(address="local", num_cpus=a.cpus + 2, include_dashboard=False, log_to_driver=False)
        t0 = time.perf_counter()
        summary = run(load_config(data=dict(data, output={"path": str(root / "out-ray")})))
        ray_s = time.perf_counter() - t0
        ray.shutdown()
    print(f"config {a.config}, {a.images} images ({a.per_shard}/shard), batch {a.batch_size}, "
          f"{a.new_tokens} new tokens, caption, fp32, {os.cpu_count()} CPU cores, model threads {a.cpus}")
    print("| runner | wall s | images/s |")
    print("|---|---|---|")
    print(f"| in-process loop | {loop_s:.2f} | {a.images / loop_s:.2f} |")
    print(f"| Ray pipeline | {ray_s:.2f} | {a.images / ray_s:.2f} |")
    print(f"| ratio pipeline/loop | | {loop_s / ray_s:.2f} |")
    steady = summary["steady_images_per_s"]
    print(f"| Ray pipeline after its first shard (startup {summary['first_commit_s']:.1f} s excluded) "
          f"| | {steady:.2f} |")
    print(f"| ratio steady pipeline/loop | | {steady / (a.images / loop_s):.2f} |")
    e = summary.get("engine") or {}
    print(f"pipeline engine: {e.get('avg_rows_per_step')} rows per decode step, slot occupancy "
          f"{e.get('avg_slot_occupancy')}, steps shared by several Ray batches {e.get('shared_step_fraction')}, "
          f"recompiles {e.get('recompiles')}, slots {e.get('slots')}")
    assert summary["images"] == a.images


if __name__ == "__main__":
    main()
