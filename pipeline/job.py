"""The job, in phases: plan -> claim -> execute -> commit -> record.

    shards --read (tasks; each claims its shard, streams it in bounded blocks)--> raw bytes
           --Preprocess (CPU actors)--> pixels + token ids
           --Generate (GPU actors)--> rows, written by the replicas as Parquet parts (pipeline.sink)
           --driver: one small record per part--> merge task --> data/<shard>.parquet + marker

No result row passes through the driver: it counts each shard's images from the part records and
commits a shard as soon as all of them are in (a Ray task merges the parts into the shard's file,
then the driver writes the ledger marker). A shard with a transient failure left (network,
throttling, out of memory, after retries) is not committed: the run ends non-zero naming it and a
rerun redoes it. Runs on one output claim shards as they read them, so concurrent runs split the work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Iterator

import yaml

import cogvlm
from cogvlm.weights import CheckpointError, check_checkpoint, read_config, resolve_source

from . import fit
from . import plan as plan_job
from .config import JobConfig, to_dict
from .crashes import CrashLedger
from .claims import ClaimKeeper
from .carry import carry_schema
from .errors import DOWNLOAD_ERROR, describe, redact, retry
from .ledger import Ledger
from .processor import stages
from .progress import Progress
from .readers import (TOTAL_UNKNOWN, InputPlan, Shard, check_parquet_columns, plan_input, read_block_bytes,
                      shard_blocks_fn)
from .sink import PartSink, delete_parts, sweep_parts
from .storage import filesystem, join, s3_options, write_bytes_atomic

log = logging.getLogger("pipeline")

KILL_AFTER_ENV = "COGVLM_KILL_AFTER_SHARDS"  # testing hook: SIGKILL the driver after N commits


class JobError(RuntimeError):
    """The job cannot run as configured (resources, output, checkpoint), or stopped; one line."""


class RunStopped(JobError):
    """The run stopped after work began (store down, error guard, pipeline failure); what was
    committed is kept and a rerun resumes."""


class IncompleteRun(RunStopped):
    """Some shards were left uncommitted (transient failures after retries): rerun to finish."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"


def _redact(d: Any) -> Any:
    """Drop user:secret@ from URLs in the saved config (load_config refuses them anyway)."""
    if isinstance(d, dict):
        return {k: _redact(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_redact(v) for v in d]
    if isinstance(d, str):
        return redact(d)
    return d


def absolute_paths(cfg: JobConfig) -> JobConfig:
    """Local input/output paths made absolute here, so workers (other cwd) read the same place."""
    def fix(p: str) -> str:
        return p if "://" in p else os.path.abspath(os.path.expanduser(p))

    inp = dataclasses.replace(cfg.input, path=fix(cfg.input.path),
                              allowed_uri_prefixes=[fix(p) for p in cfg.input.allowed_uri_prefixes])
    return dataclasses.replace(cfg, input=inp, output=dataclasses.replace(cfg.output, path=fix(cfg.output.path)))


def check_output_writable(fs: Any, root: str, uri: str, cfg: JobConfig) -> None:
    probe = join(root, "_runs", f".probe-{os.getpid()}")

    def write_and_remove() -> None:
        write_bytes_atomic(fs, probe, b"ok", tmp_root=root)
        fs.rm(probe)

    try:
        retry(write_and_remove, f"checking that {uri} is writable", min(30.0, cfg.retry.deadline_s),
              cfg.retry.backoff_s)
    except Exception as e:  # noqa: BLE001
        raise JobError(f"output {redact(uri)} is not writable: {describe(e)}") from None


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
        raise JobError(f"model.source {cfg.model.source}: {describe(e)}") from None


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
    # Other jobs on the cluster may hold what this one's minimal actor pools need: say so, since
    # Ray Data then waits silently (read tasks reserve no CPU, so whoever has actors progresses)
    cpus = 1 + cfg.model.min_replicas * cfg.model.cpus_per_replica
    free = ray.available_resources()
    if free.get("CPU", 0) < cpus or free.get("GPU", 0) < need:
        log.warning("waiting for the cluster: this job's smallest actor pools need %g CPUs and %g GPUs; "
                    "free now: %g CPUs, %g GPUs (other jobs hold the rest; this job starts when they "
                    "finish, or fails after %d s)", cpus, need, free.get("CPU", 0), free.get("GPU", 0),
                    _actor_wait_s(cfg))


PLAN_LINE_S = 30.0  # the start-up plan line waits this long at most for its counts


def log_plan(cfg: JobConfig, mcfg: cogvlm.CogVLMConfig, plan: InputPlan, done: set[str]) -> None:
    """The same one-line estimate as `jobs.plan`, from the listing and ledger the run already has
    and 2 shards counted; advice only: skipped (said so) after PLAN_LINE_S or on any error."""
    result: list[str] = []

    def make() -> None:
        try:
            result.append(plan_job.one_line(plan_job.make_plan(cfg, model_config=mcfg, count_shards=2,
                                                               input_plan=plan, done=done)))
        except Exception as e:  # noqa: BLE001 - the plan is advice; the run does not depend on it
            result.append(f"no plan line: {describe(e)}")

    t = threading.Thread(target=make, name="plan-line", daemon=True)
    t.start()
    t.join(PLAN_LINE_S)
    log.info("%s", result[0] if result else f"no plan line: counting took over {PLAN_LINE_S:g} s")


def check_fit(cfg: JobConfig, mcfg: cogvlm.CogVLMConfig) -> None:
    """Refuse, before any actor starts, a GPU that cannot hold one replica (see `pipeline.fit`)."""
    if cfg.model.gpus_per_replica <= 0:
        return
    if cfg.model.gpu_memory_gb is not None:
        gpu, where = int(cfg.model.gpu_memory_gb * 1e9), "model.gpu_memory_gb is"
    else:
        gpu, where = fit.cluster_gpu_bytes()
        if gpu is None:
            log.info("GPU memory not checked before the start (%s; set model.gpu_memory_gb to check it); "
                     "each replica checks its GPU when it starts", where)
            return
    share = fit.gpu_bytes_per_replica(cfg, gpu)
    if share < gpu:
        where = f"{where} {gpu / 1e9:.0f} GB, of which a replica gets (model.gpus_per_replica)"
    err = fit.replica_fit_error(cfg, mcfg, share, where)
    if err:
        raise JobError(err)
    log.info("a replica fits its GPU (%s %.0f GB)", where, share / 1e9)


def _actor_wait_s(cfg: JobConfig) -> int:
    return int(cfg.model.wait_for_gpus_s) if cfg.model.wait_for_gpus_s > 0 else 1800


@dataclasses.dataclass
class ShardParts:
    """What the driver knows of one shard in flight: its parts and the images they cover."""

    shard_id: str
    parts: list[str] = dataclasses.field(default_factory=list)
    images: set[int] = dataclasses.field(default_factory=set)
    total: int = TOTAL_UNKNOWN  # known once the reader's last block of the shard is through
    transient: str | None = None  # a transient failure's message: the shard is left for a rerun
    failures: dict[int, tuple[str, str]] = dataclasses.field(default_factory=dict)  # image -> (status, message)


class PartTracker:
    """Part records in, complete shards out: a shard is complete when its parts cover every one
    of its images. Records repeated by a re-run batch add no image twice."""

    def __init__(self) -> None:
        self.open: dict[str, ShardParts] = {}
        self.finished: set[str] = set()
        self.late: list[str] = []  # parts written for shards already complete (a re-run batch's)

    def add(self, rec: dict[str, Any]) -> ShardParts | None:
        sid = str(rec["shard_id"])
        if sid in self.finished:
            if rec["part"]:
                self.late.append(str(rec["part"]))
            return None
        sp = self.open.setdefault(sid, ShardParts(sid))
        if rec["part"]:
            sp.parts.append(str(rec["part"]))
        sp.images.update(json.loads(rec["images"]))
        if int(rec["shard_total"]) != TOTAL_UNKNOWN:
            sp.total = int(rec["shard_total"])
        if rec["transient"] and sp.transient is None:
            sp.transient = str(rec["transient"])
        for i, status, msg in json.loads(rec["failures"]):
            sp.failures.setdefault(int(i), (status, msg))
        if sp.total != TOTAL_UNKNOWN and len(sp.images) >= sp.total:
            self.finished.add(sid)
            return self.open.pop(sid)
        return None


def build_dataset(cfg: JobConfig, shards: list[Shard], mcfg: cogvlm.CogVLMConfig, crash_ledger: Any,
                  input_root: str, keeper: Any, sink: PartSink) -> Any:
    """Shards -> part records. Each read task claims its shard first (through `keeper`), so a run
    claims only as far ahead as Ray Data reads, and skips shards other runs hold or committed."""
    import ray
    from ray.data import TaskPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.wait_for_min_actors_s = _actor_wait_s(cfg)
    input_cfg, s3, policy, out = cfg.input, cfg.s3, cfg.retry, cfg.output.path
    blocks = shard_blocks_fn(input_cfg, s3, policy)

    def read(shard: dict[str, Any]) -> Iterator[dict[str, Any]]:
        sid = str(shard["shard_id"])
        if ray.get(keeper.claim.remote(sid)) != "mine":
            return
        delete_parts(out, s3, sid, keep_run=sink.run_id)  # a killed run's parts: never to be merged
        files = [str(f) for f in (shard["files"] if shard["files"] is not None else [])]
        yield from blocks(Shard(sid, str(shard["uri"]), files))

    # one shard per read task; flat_map (unlike map_batches) is not fused into the batched
    # actor stage below, so shards stay separate blocks and results stream back shard by shard.
    # Reads reserve no CPU (they are I/O-bound): with a CPU reservation, two jobs whose actor
    # pools held every CPU of a cluster deadlocked, each waiting for a CPU for its reads.
    ds = ray.data.from_items([s.to_dict() for s in shards], override_num_blocks=len(shards))
    # Ray cuts a read task's rows into blocks of this size (this dataset's plan only; the default,
    # 128 MiB, would hold a smaller shard whole): a read task holds a few blocks, never a shard
    ds.context.target_max_block_size = read_block_bytes(input_cfg)
    ds = ds.flat_map(read, num_cpus=0, compute=TaskPoolStrategy(size=max(2, 2 * cfg.model.preprocess_workers)))
    return stages(ds, cfg, mcfg, crash_ledger, input_root, sink=sink)  # the same block as pipeline.build_processor


class ErrorGuard:
    """Stops a run whose first images mostly fail the same way (wrong credentials, wrong column,
    unreachable store) before it commits them: shards are held until `images` images are in
    (or the stream ends with at least MIN_IMAGES), then judged once."""

    MIN_IMAGES = 10

    def __init__(self, images: int, share: float) -> None:
        self.limit, self.share = images, share
        self.decided = images <= 0
        self.seen = 0
        self.kinds: Counter = Counter()
        self.example: dict[tuple[str, str], str] = {}

    def add(self, images: int, failures: list[tuple[str, str]]) -> None:
        """`images` more images, of which `failures` (status, message) failed. img2dataset's
        failed downloads are not images: they count neither way."""
        self.seen += images
        for status, msg in failures:
            if status == DOWNLOAD_ERROR:
                self.seen -= 1
                continue
            kind = (status, msg.split(":", 1)[0][:80])
            self.kinds[kind] += 1
            self.example.setdefault(kind, msg)

    def ready(self, stream_ended: bool) -> bool:
        return not self.decided and (self.seen >= self.limit or (stream_ended and self.seen >= self.MIN_IMAGES))

    def verdict(self) -> str | None:
        """A one-line reason to stop, or None; decides once."""
        self.decided = True
        if not self.kinds:
            return None
        kind, n = self.kinds.most_common(1)[0]
        if n <= self.share * self.seen:
            return None
        return (f"stopped before committing anything: {n} of the first {self.seen} images failed with "
                f"{kind[0]} ({redact(self.example[kind])[:300]}). Fix the cause (credentials, column "
                f"names, input paths) and rerun, or raise errors.guard_share to accept such rows")


@dataclasses.dataclass
class RunState:
    """What one run did: its commits, its failures and counts, for the summary."""

    t0: float
    counts: Counter = dataclasses.field(default_factory=Counter)
    images: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    committed: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # shard -> why it was left
    first_commit: list[float] = dataclasses.field(default_factory=list)  # (seconds, images so far)
    failed_downloads_skipped: int = 0  # img2dataset's failed downloads left out (input.failed_downloads: skip)


COMMIT_THREADS = 8  # shards merged and marked at once (each waits on a Ray task and two writes)


class Committer:
    """Commits complete shards: a Ray task merges a shard's parts into its data file, then the
    driver writes its ledger marker (store failures retried). Shards with transient failures are
    left uncommitted; commits wait until the error guard has judged the first images."""

    def __init__(self, cfg: JobConfig, ledger: Ledger, keeper: Any, state: RunState, run_id: str,
                 progress: Progress | None = None, merge_options: dict[str, Any] | None = None) -> None:
        import ray

        from .sink import merge_parts

        self.progress = progress
        self.merge_options = merge_options or {}  # merge_parts' carry / skip_failed_downloads
        self.cfg, self.ledger, self.keeper, self.state, self.run_id = cfg, ledger, keeper, state, run_id
        self.merge = ray.remote(num_cpus=0, max_retries=3)(merge_parts)
        self.guard = ErrorGuard(cfg.errors.guard_images, cfg.errors.guard_share)
        self.held: list[tuple[ShardParts, str]] = []
        self.kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
        self.pool = ThreadPoolExecutor(COMMIT_THREADS, thread_name_prefix="commit")
        self.running: set[Future] = set()
        self.lock = threading.Lock()

    def shard_done(self, sp: ShardParts, source: str) -> None:
        if sp.transient is not None:
            self.state.failed[sp.shard_id] = sp.transient
            log.error("shard %s left uncommitted (a rerun redoes it): rows failed transiently: %s",
                      sp.shard_id, redact(sp.transient))
            self.keeper.release.remote(sp.shard_id)
            return
        if self.guard.decided:
            self._submit(sp, source)
            return
        self.guard.add(len(sp.images), list(sp.failures.values()))
        self.held.append((sp, source))
        if self.guard.ready(stream_ended=False):
            self._judge()

    def check(self) -> None:
        """Raise the first failed commit's error (RunStopped)."""
        for f in [f for f in self.running if f.done()]:
            self.running.discard(f)
            f.result()

    def stream_ended(self) -> None:
        if self.guard.ready(stream_ended=True):
            self._judge()
        for sp, source in self.held:
            self._submit(sp, source)
        self.held = []
        self.drain()

    def drain(self) -> None:
        while self.running:
            wait(self.running, return_when=FIRST_COMPLETED)
            self.check()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _judge(self) -> None:
        reason = self.guard.verdict()
        if reason is not None:
            raise RunStopped(reason)
        for sp, source in self.held:
            self._submit(sp, source)
        self.held = []

    def _submit(self, sp: ShardParts, source: str) -> None:
        self.running.add(self.pool.submit(self._commit, sp, source))

    def _commit(self, sp: ShardParts, source: str) -> None:
        import ray

        s, sid, out = self.state, sp.shard_id, self.cfg.output.path
        try:
            rec = ray.get(self.merge.remote(out, self.cfg.s3, self.cfg.retry, sid, source, sp.parts, self.run_id,
                                            **self.merge_options))
            retry(lambda: self.ledger.mark(rec), f"committing shard {sid}", self.cfg.retry.deadline_s,
                  self.cfg.retry.backoff_s)
        except Exception as e:  # noqa: BLE001 - the store is down or full: stop with one line
            e = getattr(e, "cause", None) or e  # a Ray task's error: the exception it raised
            with contextlib.suppress(Exception):
                if self.ledger.is_done(sid):  # another run (which took the claim over) committed it
                    log.warning("shard %s was committed by another run meanwhile", sid)
                    return
            raise RunStopped(f"could not commit shard {sid} to {redact(out)}: {describe(e)}. "
                             f"{len(s.committed)} shards were committed by this run and are kept; "
                             f"rerun to finish") from None
        delete_parts(out, self.cfg.s3, sid)
        self.keeper.release.remote(sid)
        with self.lock:
            s.counts.update(rec["status"])
            s.images += rec["images"]
            s.prompt_tokens += rec["prompt_tokens"]
            s.output_tokens += rec["output_tokens"]
            s.failed_downloads_skipped += rec.get("failed_downloads_skipped", 0)
            s.committed.append(sid)
            if not s.first_commit:
                s.first_commit.extend([time.perf_counter() - s.t0, s.images])
            log.info("shard %s committed: %d images, %d rows %s (%d committed)", sid, rec["images"],
                     rec["rows"], rec["status"], len(s.committed))
            if self.kill_after and len(s.committed) >= self.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        if self.progress is not None:
            self.progress.add_shard(rec["images"], Counter(rec["status"]))
            self.progress.report()


def _execute(cfg: JobConfig, shards: list[Shard], mcfg: cogvlm.CogVLMConfig, committer: Committer,
             crash_ledger: Any, input_root: str, keeper: Any, sink: PartSink) -> None:
    """Run the pipeline over `shards`; the driver receives one small record per written part."""
    import ray

    tracker = PartTracker()
    source = {s.shard_id: s.uri for s in shards}
    try:
        dataset = build_dataset(cfg, shards, mcfg, crash_ledger, input_root, keeper, sink)
        for batch in dataset.iter_batches(batch_format="pandas", batch_size=None):
            for rec in batch.to_dict("records"):
                sp = tracker.add(rec)
                if sp is not None:
                    committer.shard_done(sp, source[sp.shard_id])
            committer.check()
    except JobError:
        raise
    except Exception as e:  # noqa: BLE001 - Ray's errors are pages long; the log has the details
        log.exception("the pipeline failed")
        raise RunStopped(f"the pipeline failed: {describe(e)}") from None
    mine = set(ray.get(keeper.outcomes.remote())["mine"])
    for s in shards:
        if s.shard_id in tracker.finished or s.shard_id not in mine:
            continue
        if s.shard_id in tracker.open:
            sp = tracker.open[s.shard_id]
            raise JobError(f"shard {s.shard_id}: stream ended with {len(sp.images)} of "
                           f"{sp.total if sp.total != TOTAL_UNKNOWN else 'an unknown number of'} images "
                           f"(this is a bug)")
        committer.shard_done(ShardParts(s.shard_id, total=0), s.uri)  # a shard with no samples
    committer.stream_ended()
    if tracker.late:  # parts a re-run batch wrote after its shard was merged
        fs, root = filesystem(cfg.output.path, cfg.s3)
        for rel in tracker.late:
            with contextlib.suppress(Exception):
                fs.rm(join(root, rel))


def _wait_for_others(keeper: Any, busy: list[Shard], cfg: JobConfig) -> list[Shard]:
    """Batch mode: wait until every shard another run holds is committed, and take over those
    whose claim expires (their run died). Returns the shards taken over."""
    import ray

    poll = max(1.0, min(10.0, cfg.claim_ttl_s / 3))
    last_log = 0.0
    left = list(busy)
    while left:
        got = {s.shard_id: ray.get(keeper.claim.remote(s.shard_id)) for s in left}
        taken = [s for s in left if got[s.shard_id] == "mine"]
        left = [s for s in left if got[s.shard_id] == "busy"]
        if taken:  # the next pass's reads claim them again: already ours, so "mine"
            return taken
        if left:
            if time.monotonic() - last_log > 60:
                log.info("waiting for %d shards that other runs are processing (%s%s)", len(left),
                         ", ".join(s.shard_id for s in left[:5]), ", ..." if len(left) > 5 else "")
                last_log = time.monotonic()
            time.sleep(poll)
    return []


def run(cfg: JobConfig) -> dict[str, Any]:
    """Run the job to the end (or raise JobError/InputError before any work); returns the summary.

    Raises IncompleteRun (after writing the summary) if shards were left for a rerun."""
    import ray

    state = RunState(t0=time.perf_counter())
    cfg = absolute_paths(cfg)
    run_id = cfg.run_id or new_run_id()
    # plan
    out_fs, out_root = filesystem(cfg.output.path, cfg.s3)
    check_output_writable(out_fs, out_root, cfg.output.path, cfg)
    plan: InputPlan = plan_input(cfg.input, cfg.s3)
    shards = plan.shards
    if cfg.input.format == "parquet":
        check_parquet_columns(cfg.input, cfg.s3, shards)
    ledger = Ledger(out_fs, out_root)
    done = retry(ledger.done, "listing the ledger", cfg.retry.deadline_s, cfg.retry.backoff_s)
    pending = [s for s in shards if s.shard_id not in done]
    base = {"run_id": run_id, "mode": cfg.mode, "project_version": cogvlm.__version__,
            "shards_total": len(shards), "shards_skipped": len(shards) - len(pending),
            "files_skipped": plan.skipped_files, "files_skipped_examples": plan.skipped_examples,
            "files_skipped_reasons": plan.skipped_reasons}
    if plan.skipped_files:
        log.info("%d files under the input are not %s and were skipped (e.g. %s)", plan.skipped_files,
                 "images" if cfg.input.format == "folder" else "shards", ", ".join(plan.skipped_examples))
        for why, skipped in plan.skipped_reasons.items():
            log.info("  skipped %d files: %s (e.g. %s)", skipped["files"], why, ", ".join(skipped["examples"]))
    if not pending:
        log.info("run %s: all %d shards are already committed; nothing new to process", run_id, len(shards))
        return _finish(cfg, out_fs, out_root, dict(base, shards_processed=0, shards=[], images=0, rows=0,
                                                   status_counts={}, message="nothing new to process",
                                                   wall_s=round(time.perf_counter() - state.t0, 3)))
    mcfg = model_config(cfg)
    if cfg.model.gpu_memory_gb is not None:
        check_fit(cfg, mcfg)
    log_plan(cfg, mcfg, plan, done)
    if not ray.is_initialized():
        init_ray(cfg)
    check_resources(cfg)
    if cfg.model.gpu_memory_gb is None:
        check_fit(cfg, mcfg)
    # claim: batch and enrich runs alike, so that concurrent runs on one output split the work;
    # each read task claims its shard just before reading it (see build_dataset)
    # (on the driver's node: a claim names its process, and a rerun on this machine takes over at
    # once the claims of a process that is gone; the keeper dies with the driver)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    keeper = ray.remote(num_cpus=0, max_concurrency=32)(ClaimKeeper).options(scheduling_strategy=here).remote(
        cfg.output.path, cfg.s3, run_id, cfg.claim_ttl_s, cfg.retry)
    carried = carry_schema(cfg.input, cfg.s3, shards)
    sink = PartSink(cfg.output.path, cfg.s3, cfg.retry, run_id, cogvlm.__version__, carry=carried)
    sweep_parts(out_fs, out_root, done, cfg.retry)
    crash_ledger = ray.remote(num_cpus=0)(CrashLedger).remote()
    progress = Progress(out_fs, out_root, run_id, shards=len(pending))
    committer = Committer(cfg, ledger, keeper, state, run_id, progress, merge_options={
        "carry": carried, "skip_failed_downloads": cfg.input.failed_downloads == "skip"})
    stop_progress = threading.Event()

    def ticker() -> None:
        while not stop_progress.wait(cfg.progress_interval_s):
            progress.report()

    final = "failed"
    busy: list[Shard] = []
    ticking = threading.Thread(target=ticker, name="progress", daemon=True)
    try:
        log.info("run %s: %d shards, %d already committed, %d to process (each claimed as it is read)",
                 run_id, len(shards), len(shards) - len(pending), len(pending))
        ticking.start()
        # execute -> commit, then (batch mode) wait for the shards other runs hold, taking over
        # those whose run died, until every shard of the input is committed
        todo = pending
        while True:
            _execute(cfg, todo, mcfg, committer, crash_ledger, plan.root, keeper, sink)
            held = set(ray.get(keeper.outcomes.remote())["busy"])  # each shard's latest answer
            busy = [s for s in pending if s.shard_id in held]
            if busy:
                log.info("%d shards are being processed by other runs", len(busy))
            if cfg.mode != "batch" or not busy:
                break
            todo = _wait_for_others(keeper, busy, cfg)
            if not todo:  # all committed by the runs that held them
                break
        final = "incomplete" if state.failed else "done"
    finally:
        stop_progress.set()
        if ticking.is_alive():
            ticking.join(timeout=60)
        committer.close()
        try:
            ray.get(keeper.close.remote(), timeout=60)
            ray.kill(keeper)
        except Exception as e:  # noqa: BLE001 - claims left behind expire (or their owner is gone)
            log.warning("could not release this run's claims: %s", describe(e))
        try:
            crash_stats = ray.get(crash_ledger.stats.remote(), timeout=30)
            ray.kill(crash_ledger)
        except Exception:  # noqa: BLE001
            crash_stats = {}
        try:
            progress.report(final)
        except Exception as e:  # noqa: BLE001 - never hide the run's own outcome
            log.warning("no final progress report: %s", describe(e))
    # record
    wall = time.perf_counter() - state.t0
    summary = dict(
        # enrich: shards left to the runs that hold them; batch: shards those runs committed
        base, shards_claimed_elsewhere=len(busy),
        shards_processed=len(state.committed), shards=sorted(state.committed),
        shards_failed=sorted(state.failed), images=state.images, rows=sum(state.counts.values()),
        status_counts=dict(state.counts), failed_downloads_skipped=state.failed_downloads_skipped,
        prompt_tokens=state.prompt_tokens, output_tokens=state.output_tokens,
        batches_retried_after_worker_death=crash_stats.get("retried_batches", 0),
        engine=_engine_summary(crash_stats),
        wall_s=round(wall, 3), images_per_s=round(state.images / wall, 4) if wall else None,
        output_tokens_per_s=round(state.output_tokens / wall, 2) if wall else None,
        # time to the first committed shard (startup: actors, model load), and the rate after it
        first_commit_s=round(state.first_commit[0], 3) if state.first_commit else None,
        steady_images_per_s=(round((state.images - state.first_commit[1]) / (wall - state.first_commit[0]), 4)
                             if state.first_commit and wall > state.first_commit[0] else None),
    )
    if cfg.mode == "enrich" and busy and not state.committed and not state.failed:
        summary["message"] = "new shards are being processed by other runs"
    summary = _finish(cfg, out_fs, out_root, summary)
    if state.failed:
        names = sorted(state.failed)
        raise IncompleteRun(f"{len(names)} shards left uncommitted after transient failures "
                            f"({', '.join(names[:10])}{', ...' if len(names) > 10 else ''}): "
                            f"{redact(state.failed[names[0]])[:300]}. Rerun the same config to finish them", summary)
    return summary


def _engine_summary(crash_stats: dict[str, Any]) -> dict[str, Any]:
    """The replicas' engine counters summed, with the averages a reader wants."""
    e = dict(crash_stats.get("engine", {}))
    if not e:
        return {}
    e["replicas"] = crash_stats.get("replicas", 0)
    steps = e.get("decode_steps", 0)
    e["avg_rows_per_step"] = round(e.get("decode_rows", 0) / steps, 2) if steps else None
    e["avg_slot_occupancy"] = round(e.get("decode_rows", 0) / e["decode_slots"], 3) if e.get("decode_slots") else None
    e["shared_step_fraction"] = round(e.get("shared_steps", 0) / steps, 3) if steps else None
    return e


def _finish(cfg: JobConfig, out_fs: Any, out_root: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Write the run's record (summary + redacted resolved config) beside the outputs."""
    summary["output"] = cfg.output.path
    run_dir = join(out_root, "_runs", summary["run_id"])

    def write() -> None:
        write_bytes_atomic(out_fs, join(run_dir, "summary.json"), json.dumps(summary, indent=2).encode(),
                           tmp_root=out_root)
        write_bytes_atomic(out_fs, join(run_dir, "config.yaml"),
                           yaml.safe_dump(_redact(to_dict(cfg)), sort_keys=False).encode(), tmp_root=out_root)

    try:
        retry(write, f"writing the run record {summary['run_id']}", cfg.retry.deadline_s, cfg.retry.backoff_s)
    except Exception as e:  # noqa: BLE001 - the shards are committed; only the record is missing
        log.error("could not write the run record under %s: %s", redact(cfg.output.path), describe(e))
    return summary
