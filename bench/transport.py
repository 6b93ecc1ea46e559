"""What an image costs between Preprocess (CPU actors) and Generate (GPU actors): object-store bytes
and CPU time per image, for each way it can travel.

    python bench/transport.py [--images 16] [--repeat 5]

Sources: photo-like images (smooth gradients, shapes, blur, sensor-like grain) as JPEG at quality 90
(640x480, 1024x768) and as PNG (1024x768, lossless: a file larger than v1's pixels). For v1's
S = 490 and v2's S = 1344, each option builds one Preprocess batch of `--images` rows:

  before         today: resized uint8 pixels as `bytes` in the pandas batch
  before/pickle  the same DataFrame given to `ray.put` as it is (pickled pandas), for comparison
  tensor         resized uint8 pixels as an (N, S, S, 3) numpy column (Ray Data: an Arrow tensor column)
  after          `pipeline.transport.pack`: the file's bytes when smaller than the pixels, else the pixels

Bytes: `ray.put` of the block exactly as Ray Data makes it from the batch (`BlockAccessor.batch_to_block`),
sized by the object store (`ray.experimental.get_object_locations(...)["object_size"]`), and the block
a real `map_batches` task returned for the same batch. CPU (the calling thread's time, torch on one thread): the
Preprocess side's work per image (decode, resize, pack) and the Generate side's (to the normalized
float tensor, decoding forwarded files). Block ms: wall time per image of batch -> block -> put -> get
-> pandas -> row dicts, i.e. Ray Data's conversions and the object store on both sides. Prints one table.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

from cogvlm.processor import normalize, open_image, resize_image  # noqa: E402
from pipeline.transport import pack, unpack  # noqa: E402

MAX_PIXELS = 89_478_485  # the pipeline's default input.max_image_pixels


def photo(seed: int, w: int, h: int) -> Image.Image:
    """A photo-like RGB image: smooth colour fields, 40 shapes, a slight blur, grain (sigma 4)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        a, b, p = rng.uniform(-1, 1, 3)
        arr[..., c] = 128 + 60 * np.sin(6 * (a * x / w + b * y / h + p)) + 40 * np.cos(x * y / (w * h) * rng.uniform(2, 8))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(10, w // 3)), y0 + int(rng.integers(10, h // 3))]
        fill = tuple(int(v) for v in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(1.2)), np.float32) + rng.normal(0, 4, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def cpu_ms(fn: Callable[[], Any], n: int, repeat: int) -> tuple[float, Any]:
    """Median over `repeat` runs of the CPU ms (this thread) of `fn()` divided by `n`; the last result."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.thread_time()
        out = fn()
        times.append((time.thread_time() - t0) * 1000 / n)
    return statistics.median(times), out


def _emit(batch: pd.DataFrame, refs: list) -> Any:
    import ray

    return ray.get(refs[0])


def store_bytes(obj: Any) -> int:
    import ray

    ref = ray.put(obj)
    size = ray.experimental.get_object_locations([ref])[ref]["object_size"]
    del ref
    return size


def map_batches_bytes(batch: Any) -> int:
    """Object-store bytes of the block(s) a real `map_batches` task made of `batch`."""
    import ray

    ref = ray.put(batch)
    ds = ray.data.range(1, override_num_blocks=1).map_batches(_emit, fn_kwargs={"refs": [ref]},
                                                               batch_format="pandas").materialize()
    refs = [r for bundle in ds.iter_internal_ref_bundles() for r in bundle.block_refs]
    return sum(ray.experimental.get_object_locations(refs)[r]["object_size"] for r in refs)


def block_ms(batch: Any, n: int, repeat: int) -> float:
    """Wall ms per image: batch -> block -> object store -> block -> pandas -> row dicts."""
    import ray
    from ray.data.block import BlockAccessor

    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        block = BlockAccessor.batch_to_block(batch)
        ref = ray.put(block)
        rows = BlockAccessor.for_block(ray.get(ref)).to_pandas().to_dict("records")
        times.append((time.perf_counter() - t0) * 1000 / n)
        del ref, rows
    return statistics.median(times)


def measure(data: list[bytes], S: int, repeat: int) -> list[dict[str, Any]]:
    """One row per option for these files at image size S."""
    from ray.data.block import BlockAccessor

    n = len(data)
    keys = [f"{i:09d}" for i in range(n)]
    out = []

    def before() -> list[bytes]:
        return [resize_image(open_image(d, max_pixels=MAX_PIXELS), S).tobytes() for d in data]

    pre_ms, raw = cpu_ms(before, n, repeat)
    df = pd.DataFrame({"key": keys, "status": "ok", "pixels": raw})
    gen_ms, px_before = cpu_ms(lambda: [normalize(np.frombuffer(r, np.uint8).reshape(S, S, 3).copy()) for r in raw], n, repeat)
    out.append(dict(option="before", fmt="raw", batch=df, pre_ms=pre_ms, gen_ms=gen_ms,
                    bytes=store_bytes(BlockAccessor.batch_to_block(df))))
    out.append(dict(option="before/pickle", fmt="raw", batch=None, pre_ms=pre_ms, gen_ms=gen_ms,
                    bytes=store_bytes(df)))

    def tensor() -> np.ndarray:
        return np.stack([resize_image(open_image(d, max_pixels=MAX_PIXELS), S) for d in data])

    pre_ms, arr = cpu_ms(tensor, n, repeat)
    batch = {"key": np.array(keys), "status": np.array(["ok"] * n), "pixels": arr}
    gen_ms, _ = cpu_ms(lambda: [normalize(a.copy()) for a in arr], n, repeat)
    out.append(dict(option="tensor", fmt="raw", batch=batch, pre_ms=pre_ms, gen_ms=gen_ms,
                    bytes=store_bytes(BlockAccessor.batch_to_block(batch))))

    pre_ms, packed = cpu_ms(lambda: [pack(d, S, max_pixels=MAX_PIXELS)[0] for d in data], n, repeat)
    df = pd.DataFrame({"key": keys, "status": "ok", "pixels": [p["pixels"] for p in packed],
                       "pixels_format": [p["pixels_format"] for p in packed]})
    rows = df.to_dict("records")
    gen_ms, px_after = cpu_ms(lambda: [normalize(unpack(r, S)) for r in rows], n, repeat)
    assert all(torch.equal(a, b) for a, b in zip(px_before, px_after)), "pixels differ from today's path"
    out.append(dict(option="after", fmt="/".join(sorted(set(df.pixels_format))), batch=df, pre_ms=pre_ms,
                    gen_ms=gen_ms, bytes=store_bytes(BlockAccessor.batch_to_block(df))))

    for o in out:
        o["per_image"] = o["bytes"] / n
        o["map_batches"] = map_batches_bytes(o["batch"]) / n if o["batch"] is not None else None
        o["block_ms"] = block_ms(o["batch"], n, repeat) if o["batch"] is not None else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=16, help="images per block (Preprocess's batch_size)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    import ray

    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=2 * 1024**3)
    sources = {"jpeg q90 640x480": (640, 480, "JPEG"), "jpeg q90 1024x768": (1024, 768, "JPEG"),
               "png 1024x768": (1024, 768, "PNG")}
    header = (f"{'source':<18} {'file KB':>8} {'S':>5} {'option':<14} {'format':<10} {'store B/img':>12} "
              f"{'map_batches':>12} {'x smaller':>9} {'Pre CPU ms':>10} {'Gen CPU ms':>10} {'block ms':>9}")
    lines = [header, "-" * len(header)]
    for name, (w, h, fmt) in sources.items():
        data = [encode(photo(i, w, h), fmt) for i in range(args.images)]
        kb = statistics.mean(len(d) for d in data) / 1000
        for S in (490, 1344):
            rows = measure(data, S, args.repeat)
            base = rows[0]["per_image"]
            for r in rows:
                mb = f"{r['map_batches']:>12,.0f}" if r["map_batches"] is not None else f"{'-':>12}"
                bm = f"{r['block_ms']:>9.2f}" if r["block_ms"] is not None else f"{'-':>9}"
                lines.append(f"{name:<18} {kb:>8.1f} {S:>5} {r['option']:<14} {r['fmt']:<10} {r['per_image']:>12,.0f} "
                             f"{mb} {base / r['per_image']:>9.1f} {r['pre_ms']:>10.2f} {r['gen_ms']:>10.2f} {bm}")
            lines.append("")
    ray.shutdown()
    print(f"{args.images} images per block; CPU: thread time per image, median of {args.repeat}; "
          f"x smaller: 'before' bytes / the option's")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
