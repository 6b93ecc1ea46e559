"""The job, in phases: plan -> claim -> execute -> commit -> record.

    shards --read (tasks)--> raw bytes --Preprocess (CPU actors)--> pixels + token ids
           --Generate (GPU actors)--> one row per (image, prompt) --driver--> data/<shard>.parquet

The driver only receives small text rows; it groups them by shard and commits a shard as soon as
every prompt of every image of it has come back. A shard with a transient failure left (network,
throttling, out of memory, after retries) is not committed: the run ends non-zero naming it and a
rerun redoes it. Runs on one output claim shards, so concurrent runs split the work.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import signal
import threading
import time
from collections import Counter, defaultdict
from typing import Any

import yaml

import cogvlm
from cogvlm.weights import CheckpointError, check_checkpoint, read_config, resolve_source

from . import errors as st
from . import fit
from . import plan as plan_job
from .config import JobConfig, to_dict
from .crashes import CrashLedger
from .errors import describe, redact, retry
from .ledger import Claims, Ledger
from .readers import InputPlan, Shard, check_parquet_columns, plan_input, read_shard
from .processor import stages
from .progress import Progress
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


class ShardTracker:
    """Collects result rows per shard; a shard is complete when all prompts of all images arrived."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.total: dict[str, int] = {}
        self.tasks: dict[str, dict[int, int]] = defaultdict(dict)
        self.got: dict[str, Counter] = defaultdict(Counter)
        self.done_images: dict[str, int] = Counter()
        self.seen: dict[str, set[tuple[int, int]]] = defaultdict(set)

    def add(self, r: dict[str, Any]) -> str | None:
        sid = r["shard_id"]
        i = int(r["image_index"])
        row_id = (i, int(r["task_index"]))
        if row_id in self.seen[sid]:  # a re-executed task's repeat: already have this row
            return None
        self.seen[sid].add(row_id)
        self.rows[sid].append(r)
        self.total[sid] = int(r["shard_total"])
        self.tasks[sid][i] = int(r["image_tasks"])
        self.got[sid][i] += 1
        if self.got[sid][i] == self.tasks[sid][i]:
            self.done_images[sid] += 1
        return sid if self.done_images[sid] == self.total[sid] else None

    def pop(self, sid: str) -> list[dict[str, Any]]:
        rows = self.rows.pop(sid)
        for d in (self.total, self.tasks, self.got, self.done_images, self.seen):
            d.pop(sid, None)
        return rows


def build_dataset(cfg: JobConfig, shards: list[Shard], mcfg: cogvlm.CogVLMConfig, crash_ledger: Any,
                  input_root: str) -> Any:
    import ray
    from ray.data import TaskPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.wait_for_min_actors_s = _actor_wait_s(cfg)
    input_cfg, s3, policy = cfg.input, cfg.s3, cfg.retry

    def read(shard: dict[str, Any]) -> list[dict[str, Any]]:
        files = [str(f) for f in (shard["files"] if shard["files"] is not None else [])]
        s = Shard(str(shard["shard_id"]), str(shard["uri"]), files)
        return read_shard(s, input_cfg, s3, policy)

    # one shard per read task; flat_map (unlike map_batches) is not fused into the batched
    # actor stage below, so shards stay separate blocks and results stream back shard by shard.
    # Reads reserve no CPU (they are I/O-bound): with a CPU reservation, two jobs whose actor
    # pools held every CPU of a cluster deadlocked, each waiting for a CPU for its reads.
    ds = ray.data.from_items([s.to_dict() for s in shards], override_num_blocks=len(shards))
    ds = ds.flat_map(read, num_cpus=0, compute=TaskPoolStrategy(size=max(2, 2 * cfg.model.preprocess_workers)))
    return stages(ds, cfg, mcfg, crash_ledger, input_root)  # the same block as pipeline.build_processor


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

    def add(self, rows: list[dict[str, Any]]) -> None:
        first: dict[int, dict[str, Any]] = {}
        for r in sorted(rows, key=lambda r: int(r["task_index"])):
            first.setdefault(int(r["image_index"]), r)
        for r in first.values():
            self.seen += 1
            if r["status"] != st.OK:
                msg = str(r.get("error_message") or "")
                kind = (r["status"], msg.split(":", 1)[0][:80])
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


class Committer:
    """Commits complete shards (retrying transient store failures), leaves shards with transient
    rows uncommitted, and holds commits until the error guard has judged the first images."""

    def __init__(self, cfg: JobConfig, ledger: Ledger, claims: Claims, state: RunState, run_id: str,
                 progress: Progress | None = None) -> None:
        self.progress = progress
        self.cfg, self.ledger, self.claims, self.state = cfg, ledger, claims, state
        self.meta = {"project_version": cogvlm.__version__, "run_id": run_id,
                     "timestamp": dt.datetime.now(dt.timezone.utc)}
        self.guard = ErrorGuard(cfg.errors.guard_images, cfg.errors.guard_share)
        self.held: list[tuple[str, list[dict[str, Any]], str]] = []
        self.kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)

    def shard_done(self, sid: str, rows: list[dict[str, Any]], source: str) -> None:
        transient = [r for r in rows if r["status"] == st.TRANSIENT]
        if transient:
            why = str(transient[0].get("error_message") or "transient failure")
            self.state.failed[sid] = why
            log.error("shard %s left uncommitted (a rerun redoes it): %d rows failed transiently: %s",
                      sid, len(transient), redact(why))
            self.claims.release(sid)
            return
        if self.guard.decided:
            self._commit(sid, rows, source)
            return
        self.guard.add(rows)
        self.held.append((sid, rows, source))
        if self.guard.ready(stream_ended=False):
            self._judge()

    def stream_ended(self) -> None:
        if self.guard.ready(stream_ended=True):
            self._judge()
        for sid, rows, source in self.held:
            self._commit(sid, rows, source)
        self.held = []

    def _judge(self) -> None:
        reason = self.guard.verdict()
        if reason is not None:
            raise RunStopped(reason)
        for sid, rows, source in self.held:
            self._commit(sid, rows, source)
        self.held = []

    def _commit(self, sid: str, rows: list[dict[str, Any]], source: str) -> None:
        s = self.state
        try:
            rec = retry(lambda: self.ledger.commit(sid, source, rows, self.meta), f"committing shard {sid}",
                        self.cfg.retry.deadline_s, self.cfg.retry.backoff_s)
        except Exception as e:  # noqa: BLE001 - the store is down or full: stop with one line
            raise RunStopped(f"could not commit shard {sid} to {redact(self.cfg.output.path)}: {describe(e)}. "
                           f"{len(s.committed)} shards were committed by this run and are kept; "
                           f"rerun to finish") from None
        s.counts.update(r["status"] for r in rows)
        s.images += rec["images"]
        s.prompt_tokens += sum(int(r["prompt_tokens"]) for r in rows if r["status"] == st.OK)
        s.output_tokens += sum(int(r["output_tokens"]) for r in rows if r["status"] == st.OK)
        s.committed.append(sid)
        self.claims.release(sid)
        if not s.first_commit:
            s.first_commit.extend([time.perf_counter() - s.t0, s.images])
        log.info("shard %s committed: %d images, %d rows %s (%d committed)", sid, rec["images"], rec["rows"],
                 rec["status"], len(s.committed))
        if self.progress is not None:
            self.progress.add_shard(rec["images"], Counter(r["status"] for r in rows))
            self.progress.report()
        if self.kill_after and len(s.committed) >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)


def _claim(claims: Claims, ledger: Ledger, shards: list[Shard], cfg: JobConfig) -> tuple[list[Shard], list[Shard]]:
    """(shards this run now holds, shards other runs hold); committed shards are in neither."""
    def claim(s: Shard) -> bool | None:
        if not claims.acquire(s.shard_id):
            return False
        if ledger.is_done(s.shard_id):  # committed by another run since we listed
            claims.release(s.shard_id)
            return None
        return True

    mine, busy = [], []
    for s in shards:
        got = retry(lambda: claim(s), f"claiming shard {s.shard_id}", cfg.retry.deadline_s, cfg.retry.backoff_s)
        if got:
            mine.append(s)
        elif got is False:
            busy.append(s)
    return mine, busy


def _execute(cfg: JobConfig, shards: list[Shard], mcfg: cogvlm.CogVLMConfig, committer: Committer,
             crash_ledger: Any, input_root: str) -> None:
    tracker = ShardTracker()
    source = {s.shard_id: s.uri for s in shards}
    finished: set[str] = set()
    try:
        dataset = build_dataset(cfg, shards, mcfg, crash_ledger, input_root)
        for batch in dataset.iter_batches(batch_format="pandas", batch_size=None):
            for r in batch.to_dict("records"):
                sid = tracker.add(r)
                if sid is not None:
                    finished.add(sid)
                    committer.shard_done(sid, tracker.pop(sid), source[sid])
    except JobError:
        raise
    except Exception as e:  # noqa: BLE001 - Ray's errors are pages long; the log has the details
        log.exception("the pipeline failed")
        raise RunStopped(f"the pipeline failed: {describe(e)}") from None
    for s in shards:
        if s.shard_id in finished:
            continue
        if s.shard_id in tracker.rows:
            raise JobError(f"shard {s.shard_id}: stream ended with {len(tracker.rows[s.shard_id])} rows of an "
                           f"incomplete shard (this is a bug)")
        committer.shard_done(s.shard_id, [], s.uri)  # a shard with no samples
    committer.stream_ended()


def _wait_for_others(claims: Claims, ledger: Ledger, busy: list[Shard], cfg: JobConfig) -> list[Shard]:
    """Batch mode: wait until every shard another run holds is committed, and take over those
    whose claim expires (their run died). Returns the shards taken over."""
    poll = max(1.0, min(10.0, cfg.claim_ttl_s / 3))
    last_log = 0.0
    left = list(busy)
    while left:
        taken, left = _claim(claims, ledger, left, cfg)
        if taken:
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
            "files_skipped": plan.skipped_files, "files_skipped_examples": plan.skipped_examples}
    if plan.skipped_files:
        log.info("%d files under the input are not %s and were skipped (e.g. %s)", plan.skipped_files,
                 "images" if cfg.input.format == "folder" else "shards", ", ".join(plan.skipped_examples))
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
    # claim: batch and enrich runs alike, so that concurrent runs on one output split the work
    claims = Claims(out_fs, out_root, run_id, cfg.claim_ttl_s)
    stop_heartbeat = threading.Event()

    def heartbeat() -> None:
        while not stop_heartbeat.wait(max(1.0, cfg.claim_ttl_s / 3)):
            try:
                claims.refresh()
            except Exception as e:  # noqa: BLE001 - try again next beat; the TTL covers several
                log.warning("claims heartbeat failed: %s", describe(e))

    beat = threading.Thread(target=heartbeat, name="claims-heartbeat", daemon=True)
    beat.start()
    crash_ledger = ray.remote(num_cpus=0)(CrashLedger).remote()
    progress = Progress(out_fs, out_root, run_id, shards=0)
    committer = Committer(cfg, ledger, claims, state, run_id, progress)
    stop_progress = threading.Event()

    def ticker() -> None:
        while not stop_progress.wait(cfg.progress_interval_s):
            progress.report()

    final = "failed"
    ticking = threading.Thread(target=ticker, name="progress", daemon=True)
    try:
        mine, busy = _claim(claims, ledger, pending, cfg)
        log.info("run %s: %d shards, %d already committed, %d claimed by other runs, %d to process",
                 run_id, len(shards), len(shards) - len(pending), len(busy), len(mine))
        progress.add_shards(len(mine))
        ticking.start()
        # execute -> commit, then (batch mode) wait for the shards other runs hold, taking over
        # those whose run died, until every shard of the input is committed
        while True:
            if mine:
                _execute(cfg, mine, mcfg, committer, crash_ledger, plan.root)
            if cfg.mode != "batch" or not busy:
                break
            mine = _wait_for_others(claims, ledger, busy, cfg)
            if not mine:
                break
            progress.add_shards(len(mine))
            busy = [s for s in busy if s not in mine]
        final = "incomplete" if state.failed else "done"
    finally:
        stop_progress.set()
        if ticking.is_alive():
            ticking.join(timeout=60)
        stop_heartbeat.set()
        beat.join(timeout=60)
        for sid in list(claims.held):
            claims.release(sid)
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
        status_counts=dict(state.counts), prompt_tokens=state.prompt_tokens, output_tokens=state.output_tokens,
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
