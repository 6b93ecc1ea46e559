"""The job's configuration: a typed tree loaded from YAML, unknown keys rejected by name."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import redact


class ConfigError(ValueError):
    """A bad configuration: the message names the key."""


@dataclass
class S3Config:
    """S3 settings; credentials come from the environment (or the named profile), never from here."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    anonymous: bool = False
    max_attempts: int = 5  # botocore's retries of one request (standard mode, with backoff)
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0


@dataclass
class InputConfig:
    path: str = ""  # a prefix (folder) or one file; local or s3://
    format: str = "webdataset"  # webdataset | parquet | folder
    # parquet: image bytes column; auto: `image`, or img2dataset's (jpg/png/webp) in its Parquet
    image_column: str | None = "auto"
    uri_column: str | None = None  # parquet: image path/URI column (used when set)
    key_column: str | None = None  # parquet: row key column (default: file stem + row number)
    questions_column: str | None = None  # parquet/webdataset json: per-row VQA question(s)
    images_per_shard: int = 256  # folder input: images per unit of work
    max_image_pixels: int = 89_478_485  # larger declared sizes are rejected before decoding
    max_image_bytes: int = 64 * 1024 * 1024  # enforced while reading
    # a shard is read as a stream of blocks of at most this many MB of image bytes (one larger
    # image goes alone): a read task's memory follows this, not the shard's size
    read_block_mb: float = 64
    # uri_column values must lie under the input's own location or one of these prefixes
    # (local folders or s3://bucket/prefix); anything else is refused with a read_error row
    allowed_uri_prefixes: list[str] = field(default_factory=list)
    # img2dataset Parquet rows whose status is not `success` (dead URLs): skip (counted in the
    # summary) or rows (status download_error with img2dataset's error_message)
    failed_downloads: str = "skip"
    # source columns (parquet) or sidecar fields (webdataset: txt, keys of the .json) copied into
    # every output row as extra columns (pipeline.carry)
    carry_columns: list[str] = field(default_factory=list)


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0


@dataclass
class CaptionTask(GenerationSettings):
    prompt: str | None = None  # None: DEFAULT_CAPTION_PROMPT
    template: str | None = None  # None: the checkpoint's template_version


@dataclass
class VQATask(GenerationSettings):
    questions: list[str] = field(default_factory=list)
    use_column: bool = True  # also ask input.questions_column's questions when that is set
    template: str | None = None
    max_new_tokens: int = 32


@dataclass
class GroundingTask(GenerationSettings):
    prompt: str | None = None  # None: DEFAULT_GROUNDING_PROMPT
    template: str | None = None
    max_new_tokens: int = 128


TASK_NAMES = ("caption", "vqa", "grounding")  # the tasks, in the order of an image's prompts


@dataclass
class TasksConfig:
    caption: CaptionTask | None = field(default_factory=CaptionTask)
    vqa: VQATask | None = None
    grounding: GroundingTask | None = None

    def enabled(self) -> dict[str, GenerationSettings]:
        """The enabled tasks by name, in their fixed order (caption, vqa, grounding)."""
        return {name: task for name in TASK_NAMES if (task := getattr(self, name)) is not None}


@dataclass
class ModelConfig:
    source: str = ""  # local dir, s3:// prefix or hub id
    tokenizer: str | None = None  # path, s3:// prefix or hub id; default: the checkpoint's own
    dtype: str = "bf16"
    # quantization of the linear layers, applied while loading: int8 (weight-only, about half the
    # bf16 weight memory) or int4 (about a quarter), see README "24 GB GPUs"; fp8: float8 GEMMs for
    # the vision tower and the visual expert (GPUs of compute capability >= 8.9 only), see README
    # "fp8 on H100 / L40S / L4"; null: none
    quantization: str | None = None
    quantize_vision: bool = True  # quantize the vision tower too (its 4.4B parameters), not only the decoder
    # memory of each GPU, to check before starting that a replica fits; null: from the Ray nodes'
    # accelerator type where it is unambiguous (the replicas check their real GPU in any case)
    gpu_memory_gb: float | None = None
    # A replica runs one continuous-batching engine (cogvlm/engine.py): prompts join the decode
    # batch as soon as a KV slot frees up, whichever Ray batch they came in.
    batch_size: int = 8  # images per Ray batch handed to a replica (transport, not the decode batch)
    batches_in_flight: int = 8  # Ray batches a replica works on at once (feeds its engine)
    max_slots: int = 256  # most prompts decoding at once; the memory plan may allow fewer
    max_prompt_tokens: int = 256  # longest prompt text (after the image) a KV slot holds
    admission_images: int = 8  # images per vision + prefill round between decode steps
    sync_every: int = 8  # decode steps between checks for rows that stopped at eos
    kv_cache_gb: float | None = None  # cap on the KV cache; None: what the memory plan leaves
    # int8 / fp8: the KV cache in int8 / float8 e4m3 with a scale per token and head (about half of
    # bf16's bytes, so about twice the rows); null: the model's dtype. Drift measured in
    # docs/performance.md.
    kv_cache_dtype: str | None = None
    memory_margin_gb: float | None = None  # kept free by the plan; None: 5% of free memory (<= 2 GB)
    compile: bool = False  # compile the decode step and its sampling once at start-up (CUDA graphs on GPUs)
    compile_vision: bool = False  # compile the vision tower (one graph for any number of images)
    vision_ahead: bool = False  # the next round's vision pass beside decode (a second CUDA stream)
    min_replicas: int = 1
    max_replicas: int = 1
    gpus_per_replica: float = 1  # 0 runs on CPU (tests, demo)
    # the Ray accelerator type the replicas must run on (e.g. A10G, L4, H100: Ray's
    # `accelerator_type:<name>` node resource); null: any GPU. Also tells the fit check the GPU's size.
    accelerator_type: str | None = None
    cpus_per_replica: float = 1
    preprocess_workers: int = 2  # CPU actors decoding and tokenizing
    wait_for_gpus_s: float = 0  # 0: fail at once when the cluster lacks the GPUs; >0 for autoscalers
    # a run whose cluster has had no node that can run the stages (all lost, none replacing them)
    # for this long stops waiting: exit 3, naming the shards left for a rerun
    wait_for_nodes_s: float = 300
    cache_dir: str | None = None  # where s3:// checkpoints are downloaded (default ~/.cache/cogvlm)


@dataclass
class OutputConfig:
    path: str = ""  # Parquet dataset prefix, local or s3://
    # a rerun whose config enables tasks the output does not have (all else equal) adds them to
    # the output: only the new tasks run, over every image, as a pass of their own (README "Adding
    # a task"); without it such a rerun refuses, naming the difference. CLI: --add-tasks
    add_tasks: bool = False


@dataclass
class RetryConfig:
    """Transient failures (network, throttling, timeouts) of a shard read, an image fetch or a
    commit are retried with jittered exponential backoff for up to `deadline_s`."""

    deadline_s: float = 120.0
    backoff_s: float = 0.5


@dataclass
class ErrorsConfig:
    # stop the run (committing nothing) when more than guard_share of its first guard_images
    # images failed with the same error: wrong credentials, wrong column, unreachable store
    guard_images: int = 200  # 0: no guard
    guard_share: float = 0.5
    # an image during which a worker process died this many times (alone) becomes a worker_died row
    max_crashes_per_image: int = 2


@dataclass
class JobConfig:
    input: InputConfig = field(default_factory=InputConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    s3: S3Config = field(default_factory=S3Config)
    retry: RetryConfig = field(default_factory=RetryConfig)
    errors: ErrorsConfig = field(default_factory=ErrorsConfig)
    run_id: str | None = None  # default: a timestamp; letters, digits, '.', '_', '-'

    # batch: process every shard without a ledger marker. enrich: the same, for an input prefix
    # that keeps growing, with claims so that overlapping runs split the new shards.
    mode: str = "batch"
    claim_ttl_s: float = 600.0  # enrich: a claim not refreshed for this long is taken over
    progress_interval_s: float = 60.0  # a progress line (and _runs/<run_id>/progress.json) this often

    def validate(self) -> "JobConfig":
        _check_numbers(self, "")
        _check_no_credentials(self, "")
        if self.run_id is not None and not RUN_ID.fullmatch(self.run_id):
            raise ConfigError("run_id must be 1-128 letters, digits, '.', '_' or '-', not starting with "
                              "'.', '_' or '-'")
        if not self.input.path:
            raise ConfigError("input.path is required")
        if self.input.format not in ("webdataset", "parquet", "folder"):
            raise ConfigError(f"input.format must be webdataset, parquet or folder, got {self.input.format!r}")
        if self.input.failed_downloads not in ("skip", "rows"):
            raise ConfigError(f"input.failed_downloads must be skip or rows, got {self.input.failed_downloads!r}")
        _check_carry_columns(self.input)
        if self.mode not in ("batch", "enrich"):
            raise ConfigError(f"mode must be batch or enrich, got {self.mode!r}")
        if self.mode == "enrich" and self.input.format == "folder":
            raise ConfigError("mode enrich needs input.format webdataset or parquet: folder shards are "
                              "chunks of a listing, which shift when files are added")
        if not self.output.path:
            raise ConfigError("output.path is required")
        if not self.model.source:
            raise ConfigError("model.source is required")
        if self.model.dtype not in DTYPE_NAMES:
            raise ConfigError(f"model.dtype must be fp32, bf16 or fp16, got {self.model.dtype!r}")
        self.model.dtype = DTYPE_NAMES[self.model.dtype]  # one spelling from here on
        for key in ("batch_size", "batches_in_flight", "max_slots", "max_prompt_tokens", "admission_images",
                    "sync_every"):
            if getattr(self.model, key) < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {getattr(self.model, key)}")
        q = self.model.quantization
        if q is not None and str(q).lower() in ("none", "false", ""):
            self.model.quantization = q = None
        elif q is not None:
            self.model.quantization = q = str(q).lower()
        if q not in (None, "int8", "int4", "fp8"):
            raise ConfigError(f"model.quantization must be int8, int4, fp8 or null, got {q!r}")
        if q in ("int4", "fp8") and self.model.dtype != "bf16":
            # torchao's int4 kernels: bf16 only on GPUs; on CPUs fp32 works but ran 60x slower.
            # fp8: torch._scaled_mm with row-wise scales writes bf16 only
            raise ConfigError(f"model.quantization {q} needs model.dtype bf16, got {self.model.dtype!r}")
        if q == "fp8" and self.model.gpus_per_replica <= 0:
            raise ConfigError("model.quantization fp8 needs a CUDA GPU of compute capability 8.9 or newer (L4, "
                              "L40S, RTX 40xx, H100, H200) for its float8 GEMMs; this job runs on CPUs "
                              "(model.gpus_per_replica 0): use int8, int4 or null")
        kv = self.model.kv_cache_dtype
        self.model.kv_cache_dtype = kv = None if kv is None or str(kv).lower() in ("none", "auto", "") else str(kv).lower()
        if kv not in (None, "int8", "fp8"):  # the names of cogvlm.kv_store.KV_CACHE_DTYPES (no torch here)
            raise ConfigError(f"model.kv_cache_dtype must be int8, fp8 or null, got {kv!r}")
        if self.model.wait_for_nodes_s <= 0:
            raise ConfigError(f"model.wait_for_nodes_s must be > 0, got {self.model.wait_for_nodes_s:g}")
        if self.progress_interval_s <= 0:
            raise ConfigError(f"progress_interval_s must be > 0, got {self.progress_interval_s:g}")
        if self.model.gpu_memory_gb is not None and self.model.gpu_memory_gb <= 0:
            raise ConfigError(f"model.gpu_memory_gb must be > 0 or null, got {self.model.gpu_memory_gb:g}")
        for key in ("kv_cache_gb", "memory_margin_gb"):
            if getattr(self.model, key) is not None and getattr(self.model, key) < 0:
                raise ConfigError(f"model.{key} must be >= 0 or null, got {getattr(self.model, key):g}")
        if self.model.accelerator_type is not None and self.model.gpus_per_replica <= 0:
            raise ConfigError("model.accelerator_type needs model.gpus_per_replica > 0 (it picks a GPU type)")
        if not 1 <= self.model.min_replicas <= self.model.max_replicas:
            raise ConfigError("model.min_replicas must be >= 1 and <= model.max_replicas")
        t = self.tasks
        if not t.enabled():
            raise ConfigError("tasks: enable at least one of caption, vqa, grounding")
        if t.vqa is not None and not t.vqa.questions and not (t.vqa.use_column and self.input.questions_column):
            raise ConfigError("tasks.vqa.questions is empty and no input.questions_column is set")
        for name, task in t.enabled().items():
            if task.max_new_tokens < 1:
                raise ConfigError(f"tasks.{name}.max_new_tokens must be >= 1")
            if task.template not in (None, "base", "chat", "vqa"):
                raise ConfigError(f"tasks.{name}.template must be base, chat or vqa")
            if task.temperature < 0:
                raise ConfigError(f"tasks.{name}.temperature must be >= 0 (0 is greedy), got {task.temperature:g}")
            if not 0 < task.top_p <= 1:
                raise ConfigError(f"tasks.{name}.top_p must be in (0, 1], got {task.top_p:g}")
            for key in ("top_k", "seed"):
                if getattr(task, key) < 0:
                    raise ConfigError(f"tasks.{name}.{key} must be >= 0, got {getattr(task, key)}")
        for key, value, low in (
                ("input.images_per_shard", self.input.images_per_shard, 1),
                ("input.max_image_pixels", self.input.max_image_pixels, 1),
                ("input.max_image_bytes", self.input.max_image_bytes, 1),
                ("model.preprocess_workers", self.model.preprocess_workers, 1),
                ("model.gpus_per_replica", self.model.gpus_per_replica, 0),
                ("model.cpus_per_replica", self.model.cpus_per_replica, 0),
                ("s3.max_attempts", self.s3.max_attempts, 1),
                ("errors.guard_images", self.errors.guard_images, 0),
                ("errors.max_crashes_per_image", self.errors.max_crashes_per_image, 1),
                ("retry.deadline_s", self.retry.deadline_s, 0),
                ("retry.backoff_s", self.retry.backoff_s, 0)):
            if value < low:
                raise ConfigError(f"{key} must be >= {low}, got {value:g}")
        for key, value in (("claim_ttl_s", self.claim_ttl_s), ("s3.connect_timeout_s", self.s3.connect_timeout_s),
                           ("s3.read_timeout_s", self.s3.read_timeout_s)):
            if value <= 0:
                raise ConfigError(f"{key} must be > 0, got {value:g}")
        if not self.input.read_block_mb > 0:
            raise ConfigError(f"input.read_block_mb must be > 0, got {self.input.read_block_mb:g}")
        if not 0 < self.errors.guard_share <= 1:
            raise ConfigError(f"errors.guard_share must be in (0, 1], got {self.errors.guard_share:g}")
        return self


DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16",
               "float16": "fp16"}
def _check_carry_columns(inp: InputConfig) -> None:
    """`input.carry_columns`: only where the input has source columns, never an output column's name."""
    cols = inp.carry_columns
    if not cols:
        return
    from .rows import SCHEMA  # pyarrow: only when there is something to check

    if inp.format == "folder":
        raise ConfigError("input.carry_columns needs input.format parquet or webdataset (folder input has no "
                          "source columns)")
    clash = [c for c in cols if c in SCHEMA.names]
    if clash:
        raise ConfigError(f"input.carry_columns: {', '.join(map(repr, clash))} would replace the output column(s) "
                          f"of that name; carry other columns (e.g. original_width, not width)")
    if len(set(cols)) != len(cols):
        raise ConfigError("input.carry_columns names a column twice")


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _check_numbers(node: Any, prefix: str) -> None:
    """NaN and infinities are never meaningful settings."""
    for f in dataclasses.fields(node):
        v = getattr(node, f.name)
        if dataclasses.is_dataclass(v):
            _check_numbers(v, f"{prefix}{f.name}.")
        elif isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{prefix}{f.name} must be a finite number")


def has_credentials(url: str) -> bool:
    """True when a URL carries `user:secret@` (secrets may contain '/', ':' and '@')."""
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", url.strip(), re.S)
    if not m:
        return False
    scheme, rest = m.group(1).lower(), m.group(2)
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority:
        return True
    if ":" in authority:  # bucket names hold no ':'; elsewhere only host:port is legitimate
        return scheme in ("s3", "s3a", "gs", "gcs") or not authority.rsplit(":", 1)[1].isdigit()
    return False


def _check_no_credentials(node: Any, prefix: str) -> None:
    """Refuse credentials in any URL of the config. The message names the key, never the value."""
    for f in dataclasses.fields(node):
        v = getattr(node, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(v):
            _check_no_credentials(v, key + ".")
            continue
        for item in (v if isinstance(v, list) else [v]):
            if isinstance(item, str) and has_credentials(item):
                raise ConfigError(f"{key} holds credentials in its URL (user:secret@); remove them and use "
                                  f"the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), a profile "
                                  f"(s3.profile) or an instance/pod role")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}" +
                          (f" (and {', '.join(prefix + u for u in unknown[1:])})" if unknown[1:] else ""))
    kwargs: dict[str, Any] = {}
    if cls is TasksConfig:  # listing tasks enables exactly those
        kwargs = {n: None for n in names}
    for k, v in data.items():
        kwargs[k] = _coerce(hints[k], v, prefix + k)
    return cls(**kwargs)


def _coerce(tp: Any, v: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if v is None:
            return None
        tp = args[0]
        origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if v is True else v, key + ".")
    if origin is list:
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list):
            raise ConfigError(f"{key} must be a list")
        return [str(x) for x in v]
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{key} must be true or false, got {redact(repr(v))}")
        return v
    if tp in (int, float):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{key} must be a number, got {redact(repr(v))}")
        if tp is int and float(v) != int(v):
            raise ConfigError(f"{key} must be an integer, got {redact(repr(v))}")
        return tp(v)
    if tp is str:
        if not isinstance(v, (str, int, float)):
            raise ConfigError(f"{key} must be a string, got {redact(repr(v))}")
        return str(v)
    return v


def apply_override(data: dict[str, Any], item: str) -> None:
    """`a.b.c=value` (value parsed as YAML) into a nested dict."""
    if "=" not in item:
        raise ConfigError(f"override {redact(item)!r} is not key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key.strip()}: the value is not valid YAML ({_yaml_problem(e)})") from None
    node = data
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or 'syntax error'}{where}"


def parse_yaml(text: str, what: str) -> dict[str, Any]:
    """A YAML mapping, or a one-line ConfigError naming `what` and the position."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} is not valid YAML: {_yaml_problem(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must hold a YAML mapping (key: value), got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict[str, Any] | None = None) -> JobConfig:
    """Load YAML (or a dict), apply `key=value` overrides, build and validate the typed tree."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {path}: {type(e).__name__}") from None
        raw = parse_yaml(text, f"config file {path}")
    if data:
        raw.update(copy.deepcopy(data))
    for o in overrides or []:
        apply_override(raw, o)
    return _build(JobConfig, raw, "").validate()


def to_dict(cfg: JobConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
