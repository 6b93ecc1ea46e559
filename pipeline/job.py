"""The CLI job, in phases: prepare -> start Ray -> claim -> execute -> commit -> record.

    shards --read (tasks; each claims its shard, streams it in bounded blocks)--> raw bytes
           --Preprocess (CPU actors)--> pixels + token ids
           --Generate (GPU actors)--> rows, written by the replicas as Parquet parts (pipeline.sink)
           --driver: one small record per part--> merge task --> data/<shard>.parquet + marker

No result row passes through the driver: it counts each shard's images from the part records and
commits a shard as soon as all of them are in (`pipeline.commit`). Runs on one output claim shards
as they read them (`pipeline.claims`), so concurrent runs split the work.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from typing import Any, Iterator

from . import plan
from .actors import on_driver_node
from .claims import MINE, Claiming
from .commit import Committer, PartTracker, ShardParts
from .config import JobConfig
from .crashes import CrashLedger
from .errors import JobError, NoNodes, RunStopped, StoppedShort, describe, root_cause
from .fit import check_fit
from .listing import Shard
from .preflight import NodeWatch, Prepared, actor_wait_s, prepare, start_ray
from .progress import Progress
from .readers import carried_schema, read_block_bytes, shard_blocks_fn
from .record import incomplete, nothing_to_do, summarize, write_output_manifest, write_record
from .rows import TOTAL_UNKNOWN
from .sink import PartSink, delete_late_parts, delete_parts, sweep_parts
from .stages import model_stages

log = logging.getLogger("pipeline")


def run(cfg: JobConfig) -> dict[str, Any]:
    """Run the job to the end (or raise JobError/InputError before any work); returns the summary.

    The output's tasks run pass by pass (`Prepared.pass_runs`: its first tasks, then each pass of
    added tasks), each with its own ledger and run record; the summary returned is the last pass's
    that had work, with `passes` naming the run of each. Raises IncompleteRun (after writing the
    summary) if shards were left for a rerun."""
    t0 = time.perf_counter()
    prepared = prepare(cfg)
    passes = [p for p in prepared.pass_runs() if p.pending]
    if not passes:
        log.info("run %s: all %d shards are already committed; nothing new to process", prepared.run_id,
                 len(prepared.listing.shards))
        return write_record(prepared, nothing_to_do(prepared, t0))
    prepared.listing.log_skipped(prepared.cfg.input.format)
    if prepared.cfg.model.gpu_memory_gb is not None:  # before Ray: the GPU's size is configured
        check_fit(prepared.cfg, prepared.mcfg)
    plan.log_one_line(passes[0])
    start_ray(prepared)
    write_output_manifest(prepared)  # every check passed: this config makes the output's rows
    summaries = []
    for one in passes:
        if one.layout.tasks_pass:
            log.info("run %s: tasks %s, added to this output: %d of %d shards to process", one.run_id,
                     ", ".join(one.cfg.tasks.enabled()), len(one.pending), len(one.listing.shards))
        if one is not passes[0]:
            plan.log_one_line(one)
        summaries.append(_run_pass(one, t0 if not summaries else time.perf_counter()))
    if len(summaries) > 1:
        summaries[-1]["passes"] = [s["run_id"] for s in summaries]
    return summaries[-1]


def _run_pass(prepared: Prepared, t0: float) -> dict[str, Any]:
    """Claim, execute, commit and record one pass of the output's tasks."""
    import cogvlm

    cfg, pending, listing = prepared.cfg, prepared.pending, prepared.listing
    tasks_pass = prepared.layout.tasks_pass
    claiming = Claiming(cfg, prepared.run_id, tasks_pass)
    carried = carried_schema(cfg.input, cfg.s3, pending)
    sink = PartSink(cfg.output.path, cfg.s3, cfg.retry, prepared.run_id, cogvlm.__version__, carry=carried,
                    tasks_pass=tasks_pass)
    sweep_parts(prepared.out_fs, prepared.layout.root, prepared.done, cfg.retry, tasks_pass)
    crash_ledger = on_driver_node(CrashLedger)
    progress = Progress(prepared.out_fs, prepared.layout.root, prepared.run_id, shards=len(pending), t0=t0)
    committer = Committer(cfg, prepared.ledger(), claiming, prepared.run_id, t0, progress, carried)
    watch = NodeWatch(cfg, progress)
    final, wall_s = "failed", None
    stopped = None
    try:
        with _ticking(progress, cfg.progress_interval_s):
            log.info("run %s: %d shards, %d already committed, %d to process (each claimed as it is read)",
                     prepared.run_id, len(listing.shards), len(listing.shards) - len(pending), len(pending))
            try:
                for shards in claiming.rounds(pending):
                    _execute(prepared, shards, committer, claiming, crash_ledger, sink, watch)
            except StoppedShort as e:  # no nodes, or the output store down: what was committed stays
                stopped = e
                log.error("%s: stopping; the shards not committed are left for a rerun", e)
                committer.stop()
                elsewhere = claiming.held_elsewhere()
                committer.leave([s.shard_id for s in pending if s.shard_id not in elsewhere], str(e))
            final = "incomplete" if committer.result().failed else "done"
    finally:
        committer.close()
        claiming.close()
        crash_stats = _close_crash_ledger(crash_ledger)
        try:
            progress.report(final)
            wall_s = progress.wall_s  # the summary's too: one clock, one reading
        except Exception as e:  # noqa: BLE001 - never hide the run's own outcome
            log.warning("no final progress report: %s", describe(e))

    commits = committer.result()
    summary = write_record(prepared, summarize(prepared, commits, crash_stats, len(claiming.elsewhere), wall_s))
    if commits.failed:
        raise incomplete(commits, summary, stopped)
    return summary


def build_dataset(prepared: Prepared, shards: list[Shard], claiming: Claiming, crash_ledger: Any,
                  sink: PartSink) -> Any:
    """Shards -> part records. Each read task claims its shard first (through the keeper), so a run
    claims only as far ahead as Ray Data reads, and skips shards other runs hold or committed."""
    import ray
    from ray.data import TaskPoolStrategy

    cfg = prepared.cfg
    ray.data.DataContext.get_current().wait_for_min_actors_s = actor_wait_s(cfg)
    keeper, out, s3 = claiming.keeper, cfg.output.path, cfg.s3
    blocks = shard_blocks_fn(cfg.input, s3, cfg.retry)

    def read(shard: dict[str, Any]) -> Iterator[dict[str, Any]]:
        sid = str(shard["shard_id"])
        if ray.get(keeper.claim.remote(sid)) != MINE:
            return
        delete_parts(out, s3, sid, keep_run=sink.run_id, tasks_pass=sink.tasks_pass)  # a killed run's parts
        files = [str(f) for f in (shard["files"] if shard["files"] is not None else [])]
        yield from blocks(Shard(sid, str(shard["uri"]), files))

    # one shard per read task; flat_map (unlike map_batches) is not fused into the batched
    # actor stage below, so shards stay separate blocks and results stream back shard by shard.
    # Reads reserve no CPU (they are I/O-bound): with a CPU reservation, two jobs whose actor
    # pools held every CPU of a cluster deadlocked, each waiting for a CPU for its reads.
    ds = ray.data.from_items([s.to_dict() for s in shards], override_num_blocks=len(shards))
    # Ray cuts a read task's rows into blocks of this size (this dataset's plan only; the default,
    # 128 MiB, would hold a smaller shard whole): a read task holds a few blocks, never a shard
    ds.context.target_max_block_size = read_block_bytes(cfg.input)
    ds = ds.flat_map(read, num_cpus=0, compute=TaskPoolStrategy(size=max(2, 2 * cfg.model.preprocess_workers)))
    return model_stages(ds, prepared, crash_ledger, sink=sink)  # the same block as pipeline.build_processor


def _execute(prepared: Prepared, shards: list[Shard], committer: Committer, claiming: Claiming,
             crash_ledger: Any, sink: PartSink, watch: NodeWatch) -> None:
    """Run the pipeline over `shards`; the driver receives one small record per written part and
    hands each complete shard to the committer."""
    tracker = PartTracker()
    source = {s.shard_id: s.uri for s in shards}
    try:
        dataset = build_dataset(prepared, shards, claiming, crash_ledger, sink)
        for batch in _batches(dataset, watch):
            for rec in batch.to_dict("records"):
                sp = tracker.add(rec)
                written = sp or tracker.open.get(str(rec["shard_id"]))
                if written is not None and committer.progress is not None:  # images count as written
                    committer.progress.add_written(written.shard_id, len(written.images))
                if sp is not None:
                    committer.shard_done(sp, source[sp.shard_id])
            committer.check()
    except JobError:  # StoppedShort included
        raise
    except Exception as e:  # noqa: BLE001 - Ray's errors are pages long; the log has the details
        log.exception("the pipeline failed")
        raise RunStopped(f"the pipeline failed: {describe(root_cause(e))}") from None
    mine = claiming.mine()
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
    delete_late_parts(prepared.out_fs, prepared.layout.root, tracker.late)


def _batches(dataset: Any, watch: NodeWatch) -> Iterator[Any]:
    """The dataset's output batches, read on a thread so that the run can stop waiting for them:
    `watch.check()` runs while none comes and raises NoNodes when the cluster has no node for the
    stages for too long (Ray Data would wait for one forever); the executor is then shut down
    and nothing read after that is committed."""
    end = object()
    q: queue.Queue = queue.Queue()
    executors: list[Any] = []  # Ray Data keeps no public handle on a running iteration's executor
    create = dataset._create_executor
    dataset._create_executor = lambda: executors.append(create()) or executors[-1]

    def pump() -> None:
        try:
            for batch in dataset.iter_batches(batch_format="pandas", batch_size=None):
                q.put(batch)
            q.put(end)
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
            q.put(e)

    reader = threading.Thread(target=pump, name="stream", daemon=True)
    reader.start()
    while True:
        try:
            item = q.get(timeout=1.0)
        except queue.Empty:
            try:
                watch.check()
            except NoNodes:
                _stop_streaming(executors, reader)
                raise
            continue
        if item is end:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def _stop_streaming(executors: list[Any], reader: threading.Thread) -> None:
    """Shut the dataset's executor down (its tasks and actors end) and let the reading thread
    end, so that nothing calls Ray after the driver lets it go."""
    try:
        for executor in executors:
            executor.shutdown(force=True)
    except Exception as e:  # noqa: BLE001 - the driver ends anyway
        log.warning("could not stop the pipeline's executor: %s", describe(e))
    reader.join(timeout=10)


@contextlib.contextmanager
def _ticking(progress: Progress, interval_s: float) -> Iterator[None]:
    """A progress report every `interval_s` while the block runs."""
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(interval_s):
            progress.report()

    ticker = threading.Thread(target=tick, name="progress", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join(timeout=60)


def _close_crash_ledger(crash_ledger: Any) -> dict[str, Any]:
    """The crash ledger's statistics (retried batches, the replicas' engine counters); {} if it is gone."""
    import ray

    try:
        stats = ray.get(crash_ledger.stats.remote(), timeout=30)
        ray.kill(crash_ledger)
        return stats
    except Exception:  # noqa: BLE001
        return {}
