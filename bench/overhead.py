"""The pipeline's own ceiling: the tiny model, 1 new token, so that the model costs next to nothing
and what is left is reading, Ray Data, the driver and the commits. Driver CPU is the driver
process's user + system time over the run (getrusage of the driver alone, not Ray's other processes).

    python bench/overhead.py --images 500 4000 --per-shard 100
    python bench/overhead.py --repo /tmp/before --repo .   # another checkout's pipeline, then this one

With several `--repo`, each checkout runs in turn in this one invocation, on the same inputs and
checkpoint, so their numbers compare as ratios. With two sizes, the driver CPU per row is also
given as the slope between them (what one more row costs the driver, start-up excluded).
Prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, os.getcwd())
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
import ray
from pipeline import load_config, run
data = json.loads(sys.argv[1])
ray.init(address="local", num_cpus=int(sys.argv[2]), include_dashboard=False, log_to_driver=False)
cfg = load_config(data=data)
r0, m0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.thread_time(), time.perf_counter()
summary = run(cfg)
r1, m1, wall = resource.getrusage(resource.RUSAGE_SELF), time.thread_time(), time.perf_counter() - t0
print("RESULT " + json.dumps({"wall_s": wall, "driver_cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
                              "main_thread_cpu_s": m1 - m0,
                              "images": summary["images"], "rows": summary["rows"],
                              "steady": summary.get("steady_images_per_s"), "first_commit_s": summary.get("first_commit_s")}))
ray.shutdown()
"""


def make_inputs(root: Path, n_images: int, per_shard: int) -> None:
    sys.path.insert(0, str(HERE))
    from tests.data import good_image, write_tar

    for s in range(0, n_images, per_shard):
        samples = [(f"{i:08d}", "jpg", good_image(i, (64, 48)), None) for i in range(s, min(n_images, s + per_shard))]
        write_tar(root / f"{s // per_shard:05d}.tar", samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, nargs="+", default=[500, 4000])
    p.add_argument("--per-shard", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--questions", type=int, default=0, help="VQA questions per image beside the caption (rows per image - 1)")
    p.add_argument("--repo", action="append", default=[], help="checkouts to run (default: this one)")
    a = p.parse_args()
    sys.path.insert(0, str(HERE))
    from cogvlm.tiny import write_checkpoint

    repos = [Path(r).resolve() for r in a.repo] or [HERE]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_checkpoint(root / "ckpt", version=1, preset_name="tiny", tokenizer_dir=root / "tok")
        for n in a.images:
            make_inputs(root / f"in-{n}", n, a.per_shard)
        for i, repo in enumerate(repos):
            rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                                 text=True).stdout.strip()
            for n in a.images:
                data = {
                    "input": {"path": str(root / f"in-{n}")}, "output": {"path": str(root / f"out-{i}-{n}")},
                    "tasks": {"caption": {"max_new_tokens": 1}, **({"vqa": {
                        "questions": [f"Question {q}?" for q in range(a.questions)], "max_new_tokens": 1}}
                        if a.questions else {})},
                    "model": {"source": str(root / "ckpt"), "tokenizer": str(root / "tok"), "dtype": "fp32",
                              "gpus_per_replica": 0, "cpus_per_replica": 1, "batch_size": a.batch_size,
                              "preprocess_workers": 1},
                }
                env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PYTHONPATH=str(repo))
                env.pop("RAY_ADDRESS", None)
                proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(data), str(a.cpus)], cwd=repo,
                                      env=env, capture_output=True, text=True)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{repo}: no result\n{proc.stderr[-3000:]}")
                results.append((f"{repo.name}@{rev}", n, json.loads(line[len("RESULT "):])))
    print(f"tiny v1, {'/'.join(map(str, a.images))} images ({a.per_shard}/shard), caption + {a.questions} VQA "
          f"questions, 1 new token, batch "
          f"{a.batch_size}, local Ray {a.cpus} logical CPUs on {os.cpu_count()} cores")
    # the main thread is the data path (it receives the output blocks and, before workers wrote,
    # tracked and committed every row); the process total adds Ray Data's executor and Ray's threads
    print("| checkout | images | wall s | images/s | steady images/s | driver CPU s (process) | per 1,000 rows "
          "| main-thread CPU s | per 1,000 rows |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, n, r in results:
        print(f"| {name} | {n} | {r['wall_s']:.1f} | {r['images'] / r['wall_s']:.1f} | {r['steady'] or 0:.1f} | "
              f"{r['driver_cpu_s']:.2f} | {1000 * r['driver_cpu_s'] / r['rows']:.3f} | "
              f"{r['main_thread_cpu_s']:.2f} | {1000 * r['main_thread_cpu_s'] / r['rows']:.3f} |")
    if len(a.images) < 2:
        return
    slopes = []
    for name in dict.fromkeys(name for name, _, _ in results):
        mine = sorted(((n, r) for m, n, r in results if m == name), key=lambda t: t[0])
        (n0, r0), (n1, r1) = mine[0], mine[-1]
        rows = r1["rows"] - r0["rows"]
        slope = {k: 1e6 * (r1[k] - r0[k]) / rows for k in ("driver_cpu_s", "main_thread_cpu_s")}
        slopes.append((name, slope, r1["images"] / r1["wall_s"], r1["steady"]))
        print(f"{name}: driver CPU per extra row ({n0} -> {n1} images): process {slope['driver_cpu_s']:.1f} us, "
              f"main thread {slope['main_thread_cpu_s']:.1f} us")
    if len(slopes) == 2:
        (b, sb, ib, stb), (c, sc, ic, stc) = slopes
        print(f"{b} / {c}: driver CPU per extra row {sb['driver_cpu_s'] / max(sc['driver_cpu_s'], 1e-9):.1f}x "
              f"(process), {sb['main_thread_cpu_s'] / max(sc['main_thread_cpu_s'], 1e-9):.1f}x (main thread); "
              f"images/s at {a.images[-1]} images {c} / {b}: {ic / ib:.2f}x (steady {stc / stb:.2f}x)")

if __name__ == "__main__":
    main()
