"""Everything checked before any work, so that a run that cannot work fails in one line first.

    prepare(cfg) -> Prepared      the checkpoint and tokenizer load (check_model), paths made
                                  absolute, output writable, input listed, Parquet columns
                                  checked, the ledger read, the output's config compared
                                  (`_output.json`: refused, or tasks added as a pass of their own)
    prepared.pass_runs()          one Prepared per pass of the output's tasks, each with its ledger
    start_ray(prepared)           join or start Ray, check the cluster's resources and the GPU fit
    for_dataset(cfg, input_root)  the same model checks for the library API (no input, no output)
    check_cluster(cfg)            the stages' smallest actor pools fit the connected cluster
    NodeWatch(cfg, progress)      the cluster watched while the run goes: nodes lost and none to
                                  replace them stop the run after `model.wait_for_nodes_s`

The CLI job, the cost plan and the processor all take a `Prepared`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fnmatch
import json
import logging
import os
import posixpath
import socket
import time
from typing import Any, Callable

import cogvlm
from cogvlm.weights import CheckpointError, check_checkpoint, read_config, resolve_source

from .config import TASK_NAMES, JobConfig
from .errors import METADATA_DEADLINE_S, JobError, NoNodes, describe, redact, retry
from .fit import PREPROCESS_CPUS, PREPROCESS_MIN_ACTORS, check_fit, pools_minimum
from .layout import OutputLayout
from .ledger import Ledger
from .listing import InputListing, Shard, check_parquet_columns, list_input
from .progress import Progress, duration
from .storage import filesystem, is_s3, s3_options, to_uri, write_bytes_atomic

log = logging.getLogger("pipeline")


@dataclasses.dataclass(frozen=True)
class TaskPass:
    """Tasks of an output made together: its first tasks (name "") or tasks added later
    (`output.add_tasks`), named by them (`vqa`, `vqa-grounding`); each pass has its own ledger."""

    name: str
    tasks: tuple[str, ...]


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
    # the output's passes under this config (`check_output_config`), and the one this run adds
    passes: list[TaskPass] = dataclasses.field(default_factory=list)
    added: TaskPass | None = None

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
        return Ledger(self.out_fs, self.layout.root, self.cfg.retry, self.layout.tasks_pass)

    def pass_runs(self) -> list["Prepared"]:
        """One Prepared per pass of the output's tasks (`passes`), in order: its tasks only, its
        ledger (read afresh) and layout, its own run id (`<run_id>.<pass>` for added tasks)."""
        out = []
        for p in self.passes:
            tasks = dataclasses.replace(self.cfg.tasks, **{n: None for n in TASK_NAMES if n not in p.tasks})
            one = dataclasses.replace(self, cfg=dataclasses.replace(self.cfg, tasks=tasks),
                                      run_id=f"{self.run_id}.{p.name}" if p.name else self.run_id,
                                      layout=self.layout.for_pass(p.name), passes=[p])
            if p.name:
                one.done = one.ledger().done()
            out.append(one)
        return out


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
    """The checks of a CLI run (`writable`: a run that will work: the checkpoint and tokenizer must
    load, the output must take a write; the cost plan, which writes nothing, passes False, reads
    the model's config on demand and notes a ledger it cannot read instead of failing)."""
    cfg = absolute_paths(cfg)
    mcfg = check_model(cfg) if writable else None  # first: a run that cannot load writes nothing
    out_fs, out_root = filesystem(cfg.output.path, cfg.s3)
    layout = OutputLayout(out_root)
    if writable:
        _check_writable(out_fs, layout, cfg)
    listing = list_input(cfg.input, cfg.s3)
    if cfg.input.format == "parquet":
        check_parquet_columns(cfg.input, cfg.s3, listing.shards)
    prepared = Prepared(cfg, cfg.run_id or new_run_id(), listing.root, out_fs, layout, listing, _mcfg=mcfg)
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
    for name in TASK_NAMES:
        ident[f"tasks.{name}"] = "on" if name in enabled else "off"
        if name not in enabled:
            continue
        for key, value in dataclasses.asdict(enabled[name]).items():
            ident[f"tasks.{name}.{key}"] = value
    ident["input.questions_column"] = cfg.input.questions_column
    for key in ("source", "tokenizer", "dtype", "quantization", "quantize_vision"):
        ident[f"model.{key}"] = getattr(cfg.model, key)
    return ident


def read_output_manifest(prepared: Prepared) -> dict[str, Any] | None:
    """The output's `_output.json` (`config`: the identity; `passes`: tasks added since); None
    where there is none yet."""
    cfg = prepared.cfg

    def read() -> bytes | None:
        try:
            return prepared.out_fs.cat_file(prepared.layout.output_manifest)
        except FileNotFoundError:
            return None

    raw = retry(read, "reading the output's _output.json", min(METADATA_DEADLINE_S, cfg.retry.deadline_s),
                cfg.retry.backoff_s)
    return None if raw is None else json.loads(raw)


def check_output_config(prepared: Prepared) -> None:
    """Refuse (JobError, one line) a run whose config would make other rows than the output holds;
    set `prepared.passes`. A config that only enables tasks the output lacks (all else equal)
    adds them as a new pass (`prepared.added`) under `output.add_tasks`, and is refused without."""
    cfg = prepared.cfg
    enabled = tuple(cfg.tasks.enabled())
    manifest = read_output_manifest(prepared)
    if manifest is None:
        prepared.passes = [TaskPass("", enabled)]
        return
    recorded = manifest["config"]
    added = [TaskPass(str(p["name"]), tuple(p["tasks"])) for p in manifest.get("passes", [])]
    mine = output_identity(cfg)
    switched = {k for k in mine if k.count(".") == 1 and k.startswith("tasks.") and recorded.get(k) != mine[k]}
    keys = [k for k in sorted(set(recorded) | set(mine))
            if recorded.get(k) != mine.get(k) and k.rsplit(".", 1)[0] not in switched]
    diffs = [f"{k}: {recorded.get(k, '(absent)')!r} there, {mine.get(k, '(absent)')!r} here" for k in keys]
    said = f"{'; '.join(diffs[:4])}{'; ...' if len(diffs) > 4 else ''}"
    new = tuple(n for n in TASK_NAMES if recorded.get(f"tasks.{n}") == "off" and mine.get(f"tasks.{n}") == "on")
    only_new = bool(new) and set(keys) == {f"tasks.{n}" for n in new}
    where = redact(cfg.output.path)
    if keys and only_new and cfg.output.add_tasks:
        prepared.added = TaskPass("-".join(new), new)
        added.append(prepared.added)
    elif keys and only_new:
        raise JobError(f"output {where} was made with another config ({said}): to add "
                       f"{' and '.join(new)} to it (only the new tasks run, over every image), rerun with "
                       f"--add-tasks (output.add_tasks=true); or use a new output.path")
    elif keys:
        raise JobError(f"output {where} was made with another config ({said}); its rows would mix "
                       f"two configs: use a new output.path, or this output's config (its _output.json)")
    later = {t for p in added for t in p.tasks}
    prepared.passes = [TaskPass("", tuple(n for n in enabled if n not in later)), *added]


def for_dataset(cfg: JobConfig, input_root: str) -> Prepared:
    """The library API's checks (a user's dataset, no output): the checkpoint and tokenizer load, a
    replica fits."""
    prepared = Prepared(cfg, new_run_id(), input_root, _mcfg=check_model(cfg))
    if cfg.model.gpu_memory_gb is not None or cfg.model.accelerator_type is not None:
        check_fit(cfg, prepared.mcfg)
    return prepared


def _check_writable(fs: Any, layout: OutputLayout, cfg: JobConfig) -> None:
    """Write and remove a probe file; what the probe made (the output folder, `_runs/`, `_tmp/`)
    is removed again when empty, so that a run that stops before any work leaves nothing."""
    probe = layout.probe(str(os.getpid()))
    local = not is_s3(to_uri(fs, layout.root))
    made = [d for d in (layout.root, posixpath.dirname(probe), layout.tmp_dir) if local and not fs.exists(d)]

    def write_and_remove() -> None:
        write_bytes_atomic(fs, probe, b"ok", tmp_root=layout.root)
        fs.rm(probe)

    try:
        retry(write_and_remove, f"checking that {cfg.output.path} is writable",
              min(METADATA_DEADLINE_S, cfg.retry.deadline_s), cfg.retry.backoff_s)
    except Exception as e:  # noqa: BLE001
        raise JobError(f"output {redact(cfg.output.path)} is not writable: {describe(e)}") from None
    finally:
        for d in reversed(made):  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(d)


def model_config(cfg: JobConfig) -> cogvlm.CogVLMConfig:
    """The checkpoint's config, read without loading weights (and checked fully when local: every
    weight file whole, every key and shape as the model has it)."""
    try:
        local = resolve_source(cfg.model.source, cfg.model.cache_dir, s3_options(cfg.s3),
                               patterns=None if os.path.isdir(cfg.model.source) else
                               ["config.json", "model.safetensors.index.json"])
        if os.path.isdir(cfg.model.source):
            return check_checkpoint(local)
        return read_config(local)
    except (CheckpointError, OSError, ValueError) as e:
        raise JobError(f"model.source {cfg.model.source}: {describe(e)}") from None


TOKENIZER_FILES = ["tokenizer*", "special_tokens_map.json", "*.model", "vocab*", "merges.txt",
                   "added_tokens.json", "config.json"]


def load_tokenizer(job: JobConfig) -> Any:
    from transformers import AutoTokenizer

    source = job.model.tokenizer or job.model.source
    local = resolve_source(source, job.model.cache_dir, storage_options=s3_options(job.s3),
                           patterns=TOKENIZER_FILES)
    names = [n for n in os.listdir(local) if n != "config.json"]
    if not any(fnmatch.fnmatch(n, p) for n in names for p in TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer files in {local} (tokenizer.json, tokenizer.model, "
                                f"tokenizer_config.json, vocab...)")
    # never run code shipped with a checkpoint (and never ask about it on stdin: workers have none)
    return AutoTokenizer.from_pretrained(str(local), trust_remote_code=False)


def check_model(cfg: JobConfig) -> cogvlm.CogVLMConfig:
    """Everything the replicas will load, checked on the driver before any actor starts: the
    checkpoint (`model_config`) and the tokenizer, which must load and fit the model's vocabulary.
    One JobError naming the key and the file."""
    mcfg = model_config(cfg)
    key = "model.tokenizer" if cfg.model.tokenizer else "model.source (its tokenizer; set model.tokenizer)"
    where = cfg.model.tokenizer or cfg.model.source
    try:
        tokenizer = load_tokenizer(cfg)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, TypeError, ...
        raise JobError(f"{key} {where}: no tokenizer loads from it ({describe(e)})") from None
    if len(tokenizer) > mcfg.vocab_size:
        raise JobError(f"{key} {where}: the tokenizer has {len(tokenizer)} tokens, more than the model's "
                       f"vocabulary ({mcfg.vocab_size}): the tokenizer of another model?")
    return mcfg


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


def check_cluster(cfg: JobConfig, task_cpus: float = 0, replicas: str = "model.min_replicas") -> None:
    """Refuse (JobError) model stages the connected cluster can never schedule: the smallest actor
    pools (`fit.pools_minimum`) plus `task_cpus` for the dataset's own tasks (reads, maps) against
    the cluster's total CPUs and GPUs, and a `model.accelerator_type` no node has. Ray Data would
    otherwise wait for them forever, saying only that it is backpressured. An autoscaling cluster
    (`model.wait_for_gpus_s` > 0) may still grow: there the shortfall is logged, not refused.
    `replicas`: the setting that holds `model.min_replicas`, as the caller's users know it."""
    import ray

    m = cfg.model
    cpus, gpus = pools_minimum(cfg)
    cpus += task_cpus
    total = ray.cluster_resources()
    have_cpus, have_gpus = total.get("CPU", 0), total.get("GPU", 0)
    problems = []
    if gpus > 0 and have_gpus < gpus:
        problems.append(f"{replicas} x model.gpus_per_replica = {gpus:g} GPUs, but the cluster "
                        f"has {have_gpus:g}. Lower them, use gpus_per_replica=0 for CPU, or set "
                        f"model.wait_for_gpus_s for an autoscaling cluster.")
    if gpus > 0 and m.accelerator_type:
        kinds: dict[str, float] = {}
        for node in ray.nodes():
            res = node.get("Resources", {}) if node.get("Alive") else {}
            for k in res:
                if k.startswith("accelerator_type:") and res.get("GPU", 0) > 0:
                    kinds[k.split(":", 1)[1]] = kinds.get(k.split(":", 1)[1], 0) + res["GPU"]
        if kinds.get(m.accelerator_type, 0) < gpus:
            problems.append(f"model.accelerator_type {m.accelerator_type}: the replicas need {gpus:g} such GPUs "
                            f"and the cluster has {kinds.get(m.accelerator_type, 0):g} (its GPU types: "
                            f"{', '.join(f'{k} x {v:g}' for k, v in sorted(kinds.items())) or 'none'}). Set "
                            f"the type the cluster has, null for any GPU, or model.wait_for_gpus_s for an "
                            f"autoscaling cluster.")
    if have_cpus < cpus:
        room = (have_cpus - task_cpus - PREPROCESS_MIN_ACTORS * PREPROCESS_CPUS) / m.min_replicas
        lower = (f"model.cpus_per_replica to {room:g}{' or less' if room else ''}" if 0 <= room < m.cpus_per_replica
                 else replicas)
        problems.append(f"the model stages need {cpus:g} CPUs at once and the cluster has {have_cpus:g}: "
                        f"Preprocess {PREPROCESS_MIN_ACTORS} x {PREPROCESS_CPUS} CPU, Generate "
                        f"{replicas} {m.min_replicas} x model.cpus_per_replica {m.cpus_per_replica:g}"
                        + (f", {task_cpus:g} for the dataset's own tasks" if task_cpus else "") +
                        f". Lower {lower}, or start Ray with more logical CPUs (ray.init(num_cpus=...) or "
                        f"ray start --num-cpus; they may exceed the cores)")
    if problems and m.wait_for_gpus_s <= 0:
        raise JobError(problems[0])
    for p in problems:
        log.warning("%s (waiting up to model.wait_for_gpus_s = %g s for the cluster to grow)", p, m.wait_for_gpus_s)


def _check_resources(cfg: JobConfig) -> None:
    import ray

    check_cluster(cfg)
    # Other jobs on the cluster may hold what this one's minimal actor pools need: say so, since
    # Ray Data then waits silently (read tasks reserve no CPU, so whoever has actors progresses)
    cpus, need = pools_minimum(cfg)
    free = ray.available_resources()
    if free.get("CPU", 0) < cpus or free.get("GPU", 0) < need:
        log.warning("waiting for the cluster: this job's smallest actor pools need %g CPUs and %g GPUs; "
                    "free now: %g CPUs, %g GPUs (other jobs hold the rest; this job starts when they "
                    "finish, or fails after %d s)", cpus, need, free.get("CPU", 0), free.get("GPU", 0),
                    actor_wait_s(cfg))


def stages_can_run(cfg: JobConfig, nodes: list[dict[str, Any]]) -> bool:
    """Whether the live nodes (`ray.nodes()`) can host a Preprocess actor and a Generate replica."""
    m = cfg.model
    live = [n.get("Resources") or {} for n in nodes if n.get("Alive")]
    preprocess = any(r.get("CPU", 0) >= 1 for r in live)
    generate = any(r.get("CPU", 0) >= m.cpus_per_replica and r.get("GPU", 0) >= m.gpus_per_replica for r in live)
    return preprocess and generate


class NodeWatch:
    """While the run waits for its stages' results: whether any node can still run them. Nodes
    lost with none to replace them (or an autoscaler that brings none) stop the run with NoNodes
    after `model.wait_for_nodes_s` (at least `model.wait_for_gpus_s`); meanwhile the progress line
    says that the run waits for resources."""

    EVERY_S = 2.0  # the cluster's nodes are asked at most this often

    def __init__(self, cfg: JobConfig, progress: Progress | None = None,
                 nodes: Callable[[], list[dict[str, Any]]] | None = None, clock: Callable[[], float] = time.monotonic):
        self.cfg, self.progress, self.clock = cfg, progress, clock
        self.limit = max(cfg.model.wait_for_nodes_s, cfg.model.wait_for_gpus_s)
        self.nodes = nodes or _ray_nodes
        self.since: float | None = None
        self.asked = float("-inf")

    def check(self) -> None:
        """Raise NoNodes once no node could run the stages for longer than the limit."""
        now = self.clock()
        if now - self.asked >= self.EVERY_S:
            self.asked = now
            try:
                ok = stages_can_run(self.cfg, self.nodes())
            except Exception as e:  # noqa: BLE001 - the GCS did not answer: judge next time
                log.warning("could not list the cluster's nodes: %s", describe(e))
                return
            if ok:
                if self.since is not None:
                    log.info("a node that can run the stages is back")
                self.since = None
                self._note(None)
                return
            if self.since is None:
                self.since = now
                log.warning("no node of the cluster can run the stages (lost?); waiting up to %s for one "
                            "(model.wait_for_nodes_s)", duration(self.limit))
        if self.since is None:
            return
        waited = now - self.since
        self._note(f"waiting for resources: no node can run the stages for {duration(waited)} "
                   f"(gives up after {duration(self.limit)})")
        if waited > self.limit:
            raise NoNodes(f"no node could run the stages for {duration(waited)} (model.wait_for_nodes_s="
                          f"{self.limit:g})")

    def _note(self, text: str | None) -> None:
        if self.progress is not None:
            self.progress.waiting = text


def _ray_nodes() -> list[dict[str, Any]]:
    import ray

    return ray.nodes()
