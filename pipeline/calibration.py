"""Calibration: measure a job's throughput by running its first images through the real pipeline.

    calibration_config(cfg, images, workdir)   a copy of the job over a small copy of its input
    calibration_result(cfg, summary, images)   the rate and start-up, as `plan.make_plan` takes them
"""

from __future__ import annotations

import dataclasses
import math
import os
import posixpath
import tarfile
from typing import Any

from .config import JobConfig
from .listing import IMAGE_EXTENSIONS, Shard, list_input, sample_key
from .storage import filesystem


def in_flight(cfg: JobConfig) -> int:
    """Images one replica works on at once: its Ray batches in flight."""
    return cfg.model.batch_size * cfg.model.batches_in_flight


def calibration_result(cfg: JobConfig, summary: dict[str, Any], requested: int) -> dict[str, Any]:
    """The rate and start-up of a calibration run's summary (`pipeline.run`), for make_plan.

    Start-up is the time to the first committed shard; the steady rate is the images after it
    over the time after it. Images that were in flight at the first commit count after it, so
    that rate is used only when at least 4x `in_flight` images came after the first commit (it
    may then read high by up to a quarter); otherwise the end-to-end rate, start-up included, is
    used: a lower bound."""
    n, wall, first = summary["images"], summary["wall_s"], summary.get("first_commit_s")
    steady = summary.get("steady_images_per_s")
    after = round(steady * (wall - first)) if steady else 0
    need = 4 * in_flight(cfg)
    head = f"--calibrate {requested}: {n} images through pipeline.run on one replica in {wall:.1f} s"
    if steady and after >= need:
        rate, startup = steady, first
        how = (f"{head}; start-up = time to the first committed shard ({first:.1f} s, with that shard's images), "
               f"rate = the {after} images after it / the time after it (may read high by up to "
               f"{in_flight(cfg) / after:.0%}: images in flight at the first commit)")
    else:
        rate, startup = (n / wall if wall else 0.0), 0.0
        how = (f"{head}; too few images after the first commit ({after}, need {need} = 4 x model.batch_size x "
               f"model.batches_in_flight) to separate the start-up: the rate includes it and is a lower bound; "
               f"calibrate with more images, about {need + 2 * in_flight(cfg)}")
    rows, ok = summary.get("rows", 0), summary.get("status_counts", {}).get("ok", 0)
    if rows and ok < 0.9 * rows:
        how += f"; WARNING: only {ok} of {rows} rows were ok, and failed rows are cheaper than real ones"
    return {"images": n, "wall_s": wall, "first_commit_s": first, "steady": bool(steady and after >= need),
            "images_per_s": round(rate, 4), "startup_s": round(startup or 0.0, 3), "replicas": 1,
            "status_counts": summary.get("status_counts", {}), "source": how}


def calibration_config(cfg: JobConfig, images: int, workdir: str) -> JobConfig:
    """A copy of `cfg` whose input is the first `images` images of its input, rewritten as small
    shards under `workdir` (of at most the images a replica holds in flight, so that the run has a
    first commit and a steady part after it), whose output is `workdir/output`, with one replica
    and no error guard (it would hold the commits)."""
    inp = list_input(cfg.input, cfg.s3)
    out_dir = os.path.join(workdir, "input")
    os.makedirs(out_dir, exist_ok=True)
    per_part = max(1, min(in_flight(cfg), math.ceil(images / 4)), math.ceil(images / 64))
    if cfg.input.format == "webdataset":
        _copy_tar_samples(cfg, inp.shards, images, per_part, out_dir)
    elif cfg.input.format == "parquet":
        _copy_parquet_rows(cfg, inp.shards, images, per_part, out_dir)
    else:
        _copy_folder_images(cfg, inp.shards, images, out_dir)
    new_input = dataclasses.replace(cfg.input, path=out_dir, images_per_shard=per_part,
                                    allowed_uri_prefixes=list(cfg.input.allowed_uri_prefixes) + [inp.root])
    return dataclasses.replace(
        cfg, input=new_input, output=dataclasses.replace(cfg.output, path=os.path.join(workdir, "output")),
        model=dataclasses.replace(cfg.model, min_replicas=1, max_replicas=1),
        errors=dataclasses.replace(cfg.errors, guard_images=0), run_id="calibration", mode="batch")


def _copy_tar_samples(cfg: JobConfig, shards: list[Shard], images: int, per_part: int, out_dir: str) -> None:
    import io

    samples: dict[str, list[tuple[tarfile.TarInfo, bytes]]] = {}
    with_image: list[str] = []
    for shard in shards:
        fs, path = filesystem(shard.uri, cfg.s3)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for m in tar:
                sample = sample_key(m.name) if m.isfile() else None
                if sample is None:
                    continue
                key = f"{shard.shard_id}/{sample[0]}"
                if key not in samples and len(with_image) >= images:
                    break  # samples are consecutive in a WebDataset tar: the first `images` are whole
                data = tar.extractfile(m)
                samples.setdefault(key, []).append((m, data.read() if data is not None else b""))
                if sample[1] in IMAGE_EXTENSIONS and key not in with_image:
                    with_image.append(key)
        if len(with_image) >= images:
            break
    keys = [k for k in samples if k in set(with_image[:images])]
    for part in range(0, len(keys), per_part):
        with tarfile.open(os.path.join(out_dir, f"{part // per_part:05d}.tar"), "w") as out:
            for i, key in enumerate(keys[part:part + per_part]):
                for m, data in samples[key]:
                    info = tarfile.TarInfo(f"{part + i:09d}.{posixpath.basename(m.name).split('.', 1)[1]}")
                    info.size = len(data)
                    out.addfile(info, io.BytesIO(data))


def _copy_parquet_rows(cfg: JobConfig, shards: list[Shard], images: int, per_part: int, out_dir: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    batches, got = [], 0
    for shard in shards:
        fs, path = filesystem(shard.uri, cfg.s3)
        with fs.open(path, "rb") as f:
            for b in pq.ParquetFile(f).iter_batches(batch_size=max(1, min(1024, images))):
                batches.append(b.slice(0, images - got))
                got += batches[-1].num_rows
                if got >= images:
                    break
        if got >= images:
            break
    table = pa.Table.from_batches(batches) if batches else None
    for part in range(0, got, per_part):
        pq.write_table(table.slice(part, per_part), os.path.join(out_dir, f"{part // per_part:05d}.parquet"))


def _copy_folder_images(cfg: JobConfig, shards: list[Shard], images: int, out_dir: str) -> None:
    uris = [u for s in shards for u in s.files][:images]
    for i, uri in enumerate(uris):
        fs, path = filesystem(uri, cfg.s3)
        fs.get_file(path, os.path.join(out_dir, f"{i:09d}-{posixpath.basename(path)}"))

