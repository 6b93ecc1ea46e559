"""Peak memory of reading one img2dataset-sized tar shard: the whole shard as a list (the old way,
`read_shard`) against streaming it in blocks (`iter_shard`) with the default and a small
`input.read_block_mb`.

    python bench/read_memory.py [--images 10000] [--dir /tmp/read_memory_bench] [--small-mb 4]

The shard (jpg + json + txt per sample, image sizes 50-100 KB, incompressible bytes behind a JPEG
signature: the reader never decodes) is written once and reused. Each measurement runs in a fresh
Python process and reports the peak RSS over the read (ru_maxrss minus the RSS before it) and the
tracemalloc peak (the Python heap). Prints one table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MB = 1024 * 1024


def write_shard(path: Path, n: int) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    tmp = path.with_suffix(".partial")
    with tarfile.open(tmp, "w") as tar:
        for i in range(n):
            key = f"{i:09d}"
            image = b"\xff\xd8\xff\xe0" + rng.bytes(int(rng.integers(50_000, 100_000)) - 4)
            meta = json.dumps({"url": f"https://example.com/{key}.jpg", "key": key}).encode()
            for name, payload in ((f"{key}.jpg", image), (f"{key}.json", meta), (f"{key}.txt", b"a caption")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    tmp.rename(path)


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def measure(mode: str, tar: str, block_mb: float) -> dict:
    """In this (fresh) process: read the shard one way; peak memory and rows."""
    from pipeline.config import InputConfig, S3Config
    from pipeline.listing import Shard
    from pipeline.readers import iter_shard, read_shard

    cfg, shard = InputConfig(path=os.path.dirname(tar), read_block_mb=block_mb), Shard("bench", tar)
    before = _rss_kb()
    tracemalloc.start()
    start = time.perf_counter()
    rows = blocks = 0
    if mode == "list":
        whole = read_shard(shard, cfg, S3Config())
        rows, blocks = len(whole), 1
        del whole
    else:
        for block in iter_shard(shard, cfg, S3Config()):
            rows, blocks = rows + len(block), blocks + 1
            del block
    seconds = time.perf_counter() - start
    heap = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
    return {"rows": rows, "blocks": blocks, "rss_mb": (peak - before) / 1024, "heap_mb": heap / MB,
            "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--dir", default="/tmp/read_memory_bench")
    ap.add_argument("--small-mb", type=float, default=4.0)
    ap.add_argument("--child", nargs=3, metavar=("MODE", "TAR", "BLOCK_MB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], float(args.child[2]))))
        return

    from pipeline.config import InputConfig

    tar = Path(args.dir) / f"shard-{args.images}.tar"
    if not tar.exists():
        tar.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        write_shard(tar, args.images)
        print(f"wrote {tar} in {time.perf_counter() - t:.0f} s")
    default_mb = InputConfig().read_block_mb
    runs = [("whole shard as a list (read_shard)", "list", default_mb),
            (f"stream, read_block_mb={default_mb:g} (default)", "stream", default_mb),
            (f"stream, read_block_mb={args.small_mb:g}", "stream", args.small_mb)]
    print(f"shard: {args.images} images, {tar.stat().st_size / MB:.0f} MB tar; one fresh process per row")
    print(f"{'read':<40} {'rows':>6} {'blocks':>6} {'peak RSS MB':>12} {'heap peak MB':>13} {'s':>6}")
    for label, mode, mb in runs:
        out = subprocess.run([sys.executable, __file__, "--child", mode, str(tar), str(mb)], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{label:<40} {r['rows']:>6} {r['blocks']:>6} {r['rss_mb']:>12.1f} {r['heap_mb']:>13.1f} "
              f"{r['seconds']:>6.1f}")


if __name__ == "__main__":
    main()
