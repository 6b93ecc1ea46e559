"""The job's configuration: a typed tree loaded from YAML, unknown keys rejected by name."""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration: the message names the key."""


@dataclass
class S3Config:
    """S3 settings; credentials come from the environment (or the named profile), never from here."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    anonymous: bool = False


@dataclass
class InputConfig:
    path: str = ""  # a prefix (folder) or one file; local or s3://
    format: str = "webdataset"  # webdataset | parquet | folder
    image_column: str | None = "image"  # parquet: image bytes column
    uri_column: str | None = None  # parquet: image path/URI column (used when set)
    key_column: str | None = None  # parquet: row key column (default: file stem + row number)
    questions_column: str | None = None  # parquet/webdataset json: per-row VQA question(s)
    images_per_shard: int = 256  # folder input: images per unit of work
    max_image_pixels: int = 89_478_485  # larger declared sizes are rejected before decoding
    max_image_bytes: int = 64 * 1024 * 1024


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


@dataclass
class TasksConfig:
    caption: CaptionTask | None = field(default_factory=CaptionTask)
    vqa: VQATask | None = None
    grounding: GroundingTask | None = None


@dataclass
class ModelConfig:
    source: str = ""  # local dir, s3:// prefix or hub id
    tokenizer: str | None = None  # path, s3:// prefix or hub id; default: the checkpoint's own
    dtype: str = "bf16"
    batch_size: int = 8  # images per model call (each image's prompts are decoded together)
    kv_cache_gb: float | None = None  # KV-cache budget of a decode batch; None: 90% of free GPU memory
    compile: bool = False  # torch.compile the decode step (CUDA graphs on GPUs)
    min_replicas: int = 1
    max_replicas: int = 1
    gpus_per_replica: float = 1  # 0 runs on CPU (tests, demo)
    cpus_per_replica: float = 1
    preprocess_workers: int = 2  # CPU actors decoding and tokenizing
    wait_for_gpus_s: float = 0  # 0: fail at once when the cluster lacks the GPUs; >0 for autoscalers
    cache_dir: str | None = None  # where s3:// checkpoints are downloaded (default ~/.cache/cogvlm)


@dataclass
class OutputConfig:
    path: str = ""  # Parquet dataset prefix, local or s3://


@dataclass
class JobConfig:
    input: InputConfig = field(default_factory=InputConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    s3: S3Config = field(default_factory=S3Config)
    run_id: str | None = None  # default: a timestamp
    # batch: process every shard without a ledger marker. enrich: the same, for an input prefix
    # that keeps growing, with claims so that overlapping runs split the new shards.
    mode: str = "batch"
    claim_ttl_s: float = 600.0  # enrich: a claim not refreshed for this long is taken over

    def validate(self) -> "JobConfig":
        if not self.input.path:
            raise ConfigError("input.path is required")
        if self.input.format not in ("webdataset", "parquet", "folder"):
            raise ConfigError(f"input.format must be webdataset, parquet or folder, got {self.input.format!r}")
        if self.mode not in ("batch", "enrich"):
            raise ConfigError(f"mode must be batch or enrich, got {self.mode!r}")
        if self.mode == "enrich" and self.input.format == "folder":
            raise ConfigError("mode enrich needs input.format webdataset or parquet: folder shards are "
                              "chunks of a listing, which shift when files are added")
        if not self.output.path:
            raise ConfigError("output.path is required")
        if not self.model.source:
            raise ConfigError("model.source is required")
        if self.model.dtype not in ("fp32", "bf16", "fp16", "float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype must be fp32, bf16 or fp16, got {self.model.dtype!r}")
        if self.model.batch_size < 1:
            raise ConfigError("model.batch_size must be >= 1")
        if not 1 <= self.model.min_replicas <= self.model.max_replicas:
            raise ConfigError("model.min_replicas must be >= 1 and <= model.max_replicas")
        t = self.tasks
        if t.caption is None and t.vqa is None and t.grounding is None:
            raise ConfigError("tasks: enable at least one of caption, vqa, grounding")
        if t.vqa is not None and not t.vqa.questions and not (t.vqa.use_column and self.input.questions_column):
            raise ConfigError("tasks.vqa.questions is empty and no input.questions_column is set")
        for name in ("caption", "vqa", "grounding"):
            task = getattr(t, name)
            if task is not None:
                if task.max_new_tokens < 1:
                    raise ConfigError(f"tasks.{name}.max_new_tokens must be >= 1")
                if task.template not in (None, "base", "chat", "vqa"):
                    raise ConfigError(f"tasks.{name}.template must be base, chat or vqa")
        return self


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
            raise ConfigError(f"{key} must be true or false, got {v!r}")
        return v
    if tp in (int, float):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{key} must be a number, got {v!r}")
        if tp is int and float(v) != int(v):
            raise ConfigError(f"{key} must be an integer, got {v!r}")
        return tp(v)
    if tp is str:
        if not isinstance(v, (str, int, float)):
            raise ConfigError(f"{key} must be a string, got {v!r}")
        return str(v)
    return v


def apply_override(data: dict[str, Any], item: str) -> None:
    """`a.b.c=value` (value parsed as YAML) into a nested dict."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict[str, Any] | None = None) -> JobConfig:
    """Load YAML (or a dict), apply `key=value` overrides, build and validate the typed tree."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from e
    if data:
        raw.update(copy.deepcopy(data))
    for o in overrides or []:
        apply_override(raw, o)
    return _build(JobConfig, raw, "").validate()


def to_dict(cfg: JobConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
