"""Everything checked before any work, so that a run that cannot work fails in one line first.

    prepare(cfg) -> Prepared      paths made absolute, output writable, input listed, Parquet
                                  columns checked, the ledger read, the output's config compared
                                  (`_output.json`); the model's config on demand
    start_ray(prepared)           join or start Ray, check the cluster's resources and the GPU fit
    for_dataset(cfg, input_root)  the same model checks for the library API (no input, no output)

The CLI job, the cost plan and the processor all take a `Prepared`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import socket
from typing import Any

import cogvlm
from cogvlm.weights import CheckpointError, check_checkpoint, read_config, resolve_source

from .config import JobConfig
from .errors import METADATA_DEADLINE_S, JobError, describe, redact, retry
from .fit import check_fit
from .layout import OutputLayout
from .ledger import Ledger
from .listing import InputListing, Shard, check_parquet_columns, list_input
from .storage import filesystem, s3_options, write_bytes_atomic

log = logging.getLogger("pipeline")


@dataclasses.dataclass
class Prepared:
    """A run as checked before any work: its config (paths absolute), id, output, input listing and
    what the ledger has committed. `mcfg`, the checkpoint's config, is read when first asked for."""

    cfg: JobConfig
    run_id: str
    input_root: str  # where data-borne URIs may point besides input.allowed_uri_prefixes
    out_fs: Any = None
    layout: OutputLayout | None = None
    listing: InputListing | None = None
    done: set[str] = dataclasses.field(default_factory=set)
    ledger_error: str | None = None  # the ledger could not be read (the cost plan says so)
    _mcfg: cogvlm.CogVLMConfig | None = None

    @property
    def pending(self) -> list[Shard]:
        """The listed shards without a ledger marker, in listing order."""
        return [s for s in (self.listing.shards if self.listing else []) if s.shard_id not in self.done]

    @property
    def mcfg(self) -> cogvlm.CogVLMConfig:
        if self._mcfg is None:
            self._mcfg = model_config(self.cfg)
        return self._mcfg

    def ledger(self) -> Ledger:
        return Ledger(self.out_fs, self.layout.root, self.cfg.retry)


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"


def absolute_paths(cfg: JobConfig) -> JobConfig:
    """Local input/output paths made absolute here, so workers (other cwd) read the same place."""
    def fix(p: str) -> str:
        return p if "://" in p else os.path.abspath(os.path.expanduser(p))

    inp = dataclasses.replace(cfg.input, path=fix(cfg.input.path),
                              allowed_uri_prefixes=[fix(p) for p in cfg.input.allowed_uri_prefixes])
    return dataclasses.replace(cfg, input=inp, output=dataclasses.replace(cfg.output, path=fix(cfg.output.path)))


def prepare(cfg: JobConfig, *, writable: bool = True) -> Prepared:
    """The checks of a CLI run (`writable`: the output must take a write; the cost plan, which
    writes nothing, passes False and notes a ledger it cannot read instead of failing)."""
    cfg = absolute_paths(cfg)
    out_fs, out_root = filesystem(cfg.output.path, cfg.s3)
    layout = OutputLayout(out_root)
    if writable:
        _check_writable(out_fs, layout, cfg)
    listing = list_input(cfg.input, cfg.s3)
    if cfg.input.format == "parquet":
        check_parquet_columns(cfg.input, cfg.s3, listing.shards)
    prepared = Prepared(cfg, cfg.run_id or new_run_id(), listing.root, out_fs, layout, listing)
    try:
        prepared.done = prepared.ledger().done()
    except Exception as e:  # noqa: BLE001
        if writable:
            raise
        prepared.ledger_error = describe(e)
    check_output_config(prepared)
    return prepared


def output_identity(cfg: JobConfig) -> dict[str, Any]:
    """What decides an output's rows, as dotted keys: each task's prompts and generation settings
    (`tasks.<name>`: on or off), the questions column, the model and its weights format."""
    ident: dict[str, Any] = {}
    enabled = cfg.tasks.enabled()
    for name in ("caption", "vqa", "grounding"):
        ident[f"tasks.{name}"] = "on" if name in enabled else "off"
        if name not in enabled:
            continue
        for key, value in dataclasses.asdict(enabled[name]).items():
            ident[f"tasks.{name}.{key}"] = value
    ident["input.questions_column"] = cfg.input.questions_column
    for key in ("source", "tokenizer", "dtype", "quantization", "quantize_vision"):
        ident[f"model.{key}"] = getattr(cfg.model, key)
    return ident


def read_output_identity(prepared: Prepared) -> dict[str, Any] | None:
    """The identity recorded in the output's `_output.json`; None where there is none yet."""
    cfg = prepared.cfg

    def read() -> bytes | None:
        try:
            return prepared.out_fs.cat_file(prepared.layout.output_manifest)
        except FileNotFoundError:
            return None

    raw = retry(read, "reading the output's _output.json", min(METADATA_DEADLINE_S, cfg.retry.deadline_s),
                cfg.retry.backoff_s)
    return None if raw is None else json.loads(raw)["config"]


def check_output_config(prepared: Prepared) -> None:
    """Refuse (JobError, one line) a run whose config would make other rows than the output holds."""
    recorded = read_output_identity(prepared)
    if recorded is None:
        return
    mine = output_identity(prepared.cfg)
    switched = {k for k in mine if k.count(".") == 1 and k.startswith("tasks.") and recorded.get(k) != mine[k]}
    diffs = [f"{k}: {recorded.get(k, '(absent)')!r} there, {mine.get(k, '(absent)')!r} here"
             for k in sorted(set(recorded) | set(mine))
             if recorded.get(k) != mine.get(k) and k.rsplit(".", 1)[0] not in switched]
    if diffs:
        raise JobError(f"output {redact(prepared.cfg.output.path)} was made with another config "
                       f"({'; '.join(diffs[:4])}{'; ...' if len(diffs) > 4 else ''}); its rows would mix "
                       f"two configs: use a new output.path, or this output's config (its _output.json)")


def for_dataset(cfg: JobConfig, input_root: str) -> Prepared:
    """The library API's checks (a user's dataset, no output): the checkpoint reads, a replica fits."""
    prepared = Prepared(cfg, new_run_id(), input_root)
    if cfg.model.gpu_memory_gb is not None:
        check_fit(cfg, prepared.mcfg)
    else:
        prepared.mcfg  # noqa: B018 - read (and checked) now, before any work
    return prepared


def _check_writable(fs: Any, layout: OutputLayout, cfg: JobConfig) -> None:
    probe = layout.probe(str(os.getpid()))

    def write_and_remove() -> None:
        write_bytes_atomic(fs, probe, b"ok", tmp_root=layout.root)
        fs.rm(probe)

    try:
        retry(write_and_remove, f"checking that {cfg.output.path} is writable",
              min(METADATA_DEADLINE_S, cfg.retry.deadline_s), cfg.retry.backoff_s)
    except Exception as e:  # noqa: BLE001
        raise JobError(f"output {redact(cfg.output.path)} is not writable: {describe(e)}") from None


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


# --- Ray -------------------------------------------------------------------------------------------

def start_ray(prepared: Prepared) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`) or a live local one, else
    start a local Ray; then refuse what the cluster cannot run (GPUs, a replica's GPU memory)."""
    import ray

    cfg = prepared.cfg
    if not ray.is_initialized():
        _init_ray(cfg)
    _check_resources(cfg)
    if cfg.model.gpu_memory_gb is None:  # with it set, checked before starting Ray
        check_fit(cfg, prepared.mcfg)


def actor_wait_s(cfg: JobConfig) -> int:
    """How long Ray Data waits for the smallest actor pools before failing."""
    return int(cfg.model.wait_for_gpus_s) if cfg.model.wait_for_gpus_s > 0 else 1800


def _live_local_cluster() -> str | None:
    """The GCS address of a cluster started on this machine with `ray start`, if it answers.

    Ray would otherwise try to connect to the address left in `ray_current_cluster` by a cluster
    that died, and wait for it forever.
    """
    path = os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), "ray", "ray_current_cluster")
    try:
        address = open(path).read().strip()
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=2):
            return address
    except (OSError, ValueError):
        return None


def _init_ray(cfg: JobConfig) -> None:
    """RAY_ADDRESS or a live local cluster; otherwise a local Ray with enough logical CPUs for
    the stages (they may exceed cores)."""
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


def _check_resources(cfg: JobConfig) -> None:
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
                    actor_wait_s(cfg))
