"""The job: plan shards, skip committed ones, stream the Ray Data plan, commit shard by shard.

    shards --read (tasks)--> raw bytes --Preprocess (CPU actors)--> pixels + token ids
           --Generate (GPU actors)--> one row per (image, prompt) --driver--> data/<shard>.parquet

The driver only receives small text rows; it groups them by shard and commits a shard as soon as
every prompt of every image of it has come back.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import signal
import threading
import time
from collections import Counter, defaultdict
from typing import Any

import yaml

import cogvlm
from cogvlm.weights import CheckpointError, check_checkpoint, read_config, resolve_source

from .config import JobConfig, to_dict
from .ledger import Claims, Ledger
from .readers import Shard, plan_shards, read_shard
from .stages import Generate, Preprocess
from .storage import filesystem, join, s3_options, write_bytes_atomic

log = logging.getLogger("pipeline")

KILL_AFTER_ENV = "COGVLM_KILL_AFTER_SHARDS"  # testing hook: SIGKILL the driver after N commits


class JobError(RuntimeError):
    """The job cannot run as configured (resources, output, checkpoint)."""


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"


def _redact(d: Any) -> Any:
    """Drop user:password from URLs in the saved config (credentials never live in the config)."""
    if isinstance(d, dict):
        return {k: _redact(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_redact(v) for v in d]
    if isinstance(d, str):
        return re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", d)
    return d


def check_output_writable(fs: Any, root: str, uri: str) -> None:
    probe = join(root, "_runs", f".probe-{os.getpid()}")
    try:
        write_bytes_atomic(fs, probe, b"ok")
        fs.rm(probe)
    except Exception as e:  # noqa: BLE001
        raise JobError(f"output {uri} is not writable: {type(e).__name__}: {e}") from e


def model_config(cfg: JobConfig) -> cogvlm.CogVLMConfig:
    """The checkpoint's config, read without loading weights (and checked fully when local)."""
    try:
        local = resolve_source(cfg.model.source, cfg.model.cache_dir, s3_options(cfg.s3),
                               patterns=None if os.path.isdir(cfg.model.source) else
                               ["config.json", "model.safetensors.index.json"])
        if os.path.isdir(cfg.model.source):
            return check_checkpoint(local)
        return read_config(local)
    except (CheckpointError, OSError, ValueError) as e:
        raise JobError(f"model.source {cfg.model.source}: {e}") from e


def _live_local_cluster() -> str | None:
    """The GCS address of a cluster started on this machine with `ray start`, if it answers.

    Ray would otherwise try to connect to the address left in `ray_current_cluster` by a cluster
    that died, and wait for it forever.
    """
    import socket

    path = os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), "ray", "ray_current_cluster")
    try:
        address = open(path).read().strip()
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=2):
            return address
    except (OSError, ValueError):
        return None


def init_ray(cfg: JobConfig) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`) or a live local one;
    otherwise start a local Ray with enough logical CPUs for the stages (they may exceed cores)."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    # CPU replicas share cores with reading/Preprocess workers; OpenMP threads that spin while
    # waiting then stall each other (measured: 17x slower). Passive waiting avoids that.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    address = _live_local_cluster()
    if address:
        ray.init(address=address)
        return
    m = cfg.model
    needed = m.preprocess_workers + m.max_replicas * m.cpus_per_replica + 1
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)))


def check_resources(cfg: JobConfig) -> None:
    import ray

    need = cfg.model.min_replicas * cfg.model.gpus_per_replica
    have = ray.cluster_resources().get("GPU", 0)
    if need > 0 and have < need and cfg.model.wait_for_gpus_s <= 0:
        raise JobError(f"model.min_replicas x model.gpus_per_replica = {need:g} GPUs, but the cluster "
                       f"has {have:g}. Lower them, use gpus_per_replica=0 for CPU, or set "
                       f"model.wait_for_gpus_s for an autoscaling cluster.")


class ShardTracker:
    """Collects result rows per shard; a shard is complete when all prompts of all images arrived."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.total: dict[str, int] = {}
        self.tasks: dict[str, dict[int, int]] = defaultdict(dict)
        self.got: dict[str, Counter] = defaultdict(Counter)
        self.done_images: dict[str, int] = Counter()

    def add(self, r: dict[str, Any]) -> str | None:
        sid = r["shard_id"]
        i = int(r["image_index"])
        self.rows[sid].append(r)
        self.total[sid] = int(r["shard_total"])
        self.tasks[sid][i] = int(r["image_tasks"])
        self.got[sid][i] += 1
        if self.got[sid][i] == self.tasks[sid][i]:
            self.done_images[sid] += 1
        return sid if self.done_images[sid] == self.total[sid] else None

    def pop(self, sid: str) -> list[dict[str, Any]]:
        rows = self.rows.pop(sid)
        for d in (self.total, self.tasks, self.got, self.done_images):
            d.pop(sid, None)
        return rows


def build_dataset(cfg: JobConfig, shards: list[Shard], mcfg: cogvlm.CogVLMConfig) -> Any:
    import ray
    from ray.data import ActorPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.wait_for_min_actors_s = int(cfg.model.wait_for_gpus_s) if cfg.model.wait_for_gpus_s > 0 else 1800
    input_cfg, s3 = cfg.input, cfg.s3

    def read(shard: dict[str, Any]) -> list[dict[str, Any]]:
        files = [str(f) for f in (shard["files"] if shard["files"] is not None else [])]
        s = Shard(str(shard["shard_id"]), str(shard["uri"]), files)
        return read_shard(s, input_cfg, s3)

    # one shard per read task; flat_map (unlike map_batches) is not fused into the batched
    # actor stage below, so shards stay separate blocks and results stream back shard by shard
    ds = ray.data.from_items([s.to_dict() for s in shards], override_num_blocks=len(shards))
    ds = ds.flat_map(read, num_cpus=0.25)  # I/O-bound: must not wait behind the actor pools' CPUs
    ds = ds.map_batches(Preprocess, fn_constructor_kwargs={"job": cfg, "model_config": mcfg},
                        compute=ActorPoolStrategy(min_size=1, max_size=max(1, cfg.model.preprocess_workers)),
                        num_cpus=1, batch_size=16, batch_format="pandas")
    return ds.map_batches(Generate, fn_constructor_kwargs={"job": cfg, "model_config": mcfg},
                          compute=ActorPoolStrategy(min_size=cfg.model.min_replicas,
                                                    max_size=cfg.model.max_replicas),
                          num_gpus=cfg.model.gpus_per_replica, num_cpus=cfg.model.cpus_per_replica,
                          batch_size=cfg.model.batch_size, batch_format="pandas")


def run(cfg: JobConfig) -> dict[str, Any]:
    """Run the job to the end (or raise JobError/InputError before any work); returns the summary."""
    import ray

    t0 = time.perf_counter()
    run_id = cfg.run_id or new_run_id()
    out_fs, out_root = filesystem(cfg.output.path, cfg.s3)
    check_output_writable(out_fs, out_root, cfg.output.path)
    shards = plan_shards(cfg.input, cfg.s3)
    ledger = Ledger(out_fs, out_root)
    done = ledger.done()
    pending = [s for s in shards if s.shard_id not in done]
    claims = Claims(out_fs, out_root, run_id, cfg.claim_ttl_s) if cfg.mode == "enrich" else None
    base = {"run_id": run_id, "mode": cfg.mode, "project_version": cogvlm.__version__,
            "shards_total": len(shards), "shards_skipped": len(shards) - len(pending)}
    if not pending:
        log.info("run %s: all %d shards are already committed; nothing new to process", run_id, len(shards))
        return _finish(cfg, out_fs, out_root, dict(base, shards_processed=0, shards=[], images=0, rows=0,
                                                   status_counts={}, message="nothing new to process",
                                                   wall_s=round(time.perf_counter() - t0, 3)))
    mcfg = model_config(cfg)
    if not ray.is_initialized():
        init_ray(cfg)
    check_resources(cfg)
    busy: list[str] = []
    if claims is not None:
        mine = []
        for s in pending:
            if claims.acquire(s.shard_id):
                if ledger.is_done(s.shard_id):  # committed by another run since we listed
                    claims.release(s.shard_id)
                    continue
                mine.append(s)
            else:
                busy.append(s.shard_id)
        pending = mine
        if not pending:
            log.info("run %s: the %d new shards are claimed by other runs; nothing to do", run_id, len(busy))
            return _finish(cfg, out_fs, out_root, dict(
                base, shards_claimed_elsewhere=len(busy), shards_processed=0, shards=[], images=0,
                rows=0, status_counts={}, message="new shards are being processed by other runs",
                wall_s=round(time.perf_counter() - t0, 3)))
    log.info("run %s: %d shards, %d already committed, %d claimed by other runs, %d to process",
             run_id, len(shards), len(shards) - len(pending) - len(busy), len(busy), len(pending))
    stop_heartbeat = threading.Event()
    if claims is not None:
        def heartbeat() -> None:
            while not stop_heartbeat.wait(max(1.0, cfg.claim_ttl_s / 3)):
                claims.refresh()

        threading.Thread(target=heartbeat, name="claims-heartbeat", daemon=True).start()

    meta = {"project_version": cogvlm.__version__, "run_id": run_id,
            "timestamp": dt.datetime.now(dt.timezone.utc)}
    counts: Counter = Counter()
    images = prompt_tokens = output_tokens = 0
    committed: list[str] = []
    first_commit: list[float] = []  # (seconds from start, images so far) at the first commit
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)

    def commit(sid: str, rows: list[dict[str, Any]], source: str) -> None:
        nonlocal images, prompt_tokens, output_tokens
        rec = ledger.commit(sid, source, rows, meta)
        counts.update(r["status"] for r in rows)
        images += rec["images"]
        prompt_tokens += sum(int(r["prompt_tokens"]) for r in rows if r["status"] == "ok")
        output_tokens += sum(int(r["output_tokens"]) for r in rows if r["status"] == "ok")
        committed.append(sid)
        if claims is not None:
            claims.release(sid)
        if not first_commit:
            first_commit.extend([time.perf_counter() - t0, images])
        log.info("shard %s committed: %d images, %d rows %s (%d/%d)", sid, rec["images"], rec["rows"],
                 rec["status"], len(committed), len(pending))
        if kill_after and len(committed) >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    try:
        tracker = ShardTracker()
        source = {s.shard_id: s.uri for s in pending}
        for batch in build_dataset(cfg, pending, mcfg).iter_batches(batch_format="pandas", batch_size=None):
            for r in batch.to_dict("records"):
                sid = tracker.add(r)
                if sid is not None:
                    commit(sid, tracker.pop(sid), source[sid])
        leftover = [s.shard_id for s in pending if s.shard_id not in committed]
        for sid in leftover:
            if sid in tracker.rows:
                raise JobError(f"shard {sid}: stream ended with {len(tracker.rows[sid])} rows of an "
                               f"incomplete shard (this is a bug)")
            commit(sid, [], source[sid])  # a shard with no samples
    finally:
        stop_heartbeat.set()
        if claims is not None:
            for sid in list(claims.held):
                claims.release(sid)

    wall = time.perf_counter() - t0
    summary = dict(
        base,
        shards_skipped=len(shards) - len(pending) - len(busy),
        shards_claimed_elsewhere=len(busy), shards_processed=len(committed), shards=committed,
        images=images, rows=sum(counts.values()), status_counts=dict(counts),
        prompt_tokens=prompt_tokens, output_tokens=output_tokens,
        wall_s=round(wall, 3), images_per_s=round(images / wall, 4) if wall else None,
        output_tokens_per_s=round(output_tokens / wall, 2) if wall else None,
        # time to the first committed shard (startup: actors, model load), and the rate after it
        first_commit_s=round(first_commit[0], 3) if first_commit else None,
        steady_images_per_s=(round((images - first_commit[1]) / (wall - first_commit[0]), 4)
                             if first_commit and wall > first_commit[0] else None),
    )
    return _finish(cfg, out_fs, out_root, summary)


def _finish(cfg: JobConfig, out_fs: Any, out_root: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Write the run's record (summary + redacted resolved config) beside the outputs."""
    summary["output"] = cfg.output.path
    run_dir = join(out_root, "_runs", summary["run_id"])
    write_bytes_atomic(out_fs, join(run_dir, "summary.json"), json.dumps(summary, indent=2).encode())
    write_bytes_atomic(out_fs, join(run_dir, "config.yaml"),
                       yaml.safe_dump(_redact(to_dict(cfg)), sort_keys=False).encode())
    return summary
