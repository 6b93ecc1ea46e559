"""The library API: CogVLM as one Ray Data building block on a user's own dataset.

    config = CogVLMProcessorConfig(model_source="THUDM/cogvlm-chat-hf", tokenizer="lmsys/vicuna-7b-v1.5",
                                   concurrency=4, batch_size=8, accelerator_type="A10G",
                                   tasks={"caption": {"max_new_tokens": 64}})
    processor = build_processor(config, postprocess=lambda row: {"path": row["path"], "caption": row["response"]})
    out = processor(ray.data.read_images("s3://bucket/images/", include_paths=True))
    out.write_parquet("s3://bucket/captions/")

The names follow Ray Data LLM's processors where the idea is the same (`concurrency`, `batch_size`,
`accelerator_type`, `preprocess=`, `postprocess=`). The older keyword form,
`build_processor(model={"source": ..., ...}, tasks=...)`, takes the same fields.

It runs the same stages as the CLI job (`pipeline.stages.model_stages`), without the job's shard
ledger, claims and Parquet commits: the user's dataset in, the user's dataset out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import pickle
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

import cogvlm

from .config import ConfigError, JobConfig, load_config
from .errors import JobError
from .preflight import Prepared, actor_wait_s, check_cluster, for_dataset
from .rows import PASSTHROUGH, RESULT_COLUMNS, SCHEMA, boxes_from_json, none_if_missing, questions_json

log = logging.getLogger("pipeline")

DATASET_INPUT = "ray-dataset://"  # stands for input/output paths a processor does not have

# Output columns that mean the same as an input column of that name: the image's size (img2dataset
# writes width/height, and users add them to filter on) and the row id (img2dataset's key). Where
# the input has them (and no prefix is set), the input's columns are kept, unchanged, and the
# processor does not add its own; the input's `key` is then the row id.
SAME_MEANING = ("key", "width", "height")


@dataclasses.dataclass
class CogVLMProcessorConfig:
    """What `build_processor` runs. Fields left None take the job config's defaults.

    - `model_source`: the checkpoint: a local folder, an `s3://` prefix or a hub id.
    - `tokenizer`: where its tokenizer is (v1 checkpoints ship none); None: the checkpoint's own.
    - `concurrency`: Generate replicas (one model each): `n` for a pool of n, `(m, n)` for a
      pool that autoscales between m and n (default 1). The job config's min/max_replicas.
    - `batch_size`: images per Ray batch sent to a replica (default 8).
    - `accelerator_type`: the GPU type the replicas run on, as Ray names it ("A10G", "L4",
      "H100"...); None: any GPU. Also gives the fit check the GPU's memory.
    - `gpus_per_replica`: default 1; 0 runs the replicas on CPUs.
    - `model`: any other key of the job config's `model:` section (`dtype`, `quantization`,
      `cpus_per_replica`, `preprocess_workers`, `max_slots`, ...); `tasks`: the `tasks:` section
      (default: caption); `s3`, `errors`, `retry`: those sections.
    - Images: `image_column` holds bytes (an image file), a numpy array (HxW or HxWxC uint8, as
      `ray.data.read_images` gives) or a PIL image; or `uri_column` holds paths / `s3://` URIs,
      which may point only under `allowed_uri_prefixes`. `questions_column` (a string or a list
      of strings) adds per-row VQA questions; `key_column` names a row id (default: the input's
      `key` column if it has one, else a hash of the image). `keep_image` keeps the image column.
    - `prefix` (e.g. "cogvlm_") goes before the names of the columns the processor adds.
    """

    model_source: str = ""
    tokenizer: str | None = None
    concurrency: int | tuple[int, int] | None = None
    batch_size: int | None = None
    accelerator_type: str | None = None
    gpus_per_replica: float | None = None
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    tasks: dict[str, Any] | None = None
    image_column: str | None = "image"
    uri_column: str | None = None
    key_column: str | None = None
    questions_column: str | None = None
    allowed_uri_prefixes: list[str] = dataclasses.field(default_factory=list)
    keep_image: bool = False
    prefix: str = ""
    max_image_pixels: int | None = None
    max_image_bytes: int | None = None
    s3: dict[str, Any] | None = None
    errors: dict[str, Any] | None = None
    retry: dict[str, Any] | None = None


# config fields that the job config's `model:` section also names (the keyword form's spelling)
_MODEL_KEYS = {"source": "model_source", "tokenizer": "tokenizer", "batch_size": "batch_size",
               "accelerator_type": "accelerator_type", "gpus_per_replica": "gpus_per_replica",
               "concurrency": "concurrency"}


@dataclasses.dataclass
class Processor:
    """`processor(ds) -> ds`: one output row per (input row, prompt); see `build_processor`."""

    config: JobConfig
    image_column: str | None
    uri_column: str | None
    key_column: str | None
    questions_column: str | None
    keep_image: bool
    prepared: Prepared | None = None
    prefix: str = ""  # put before the names of the columns the processor adds
    preprocess: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    postprocess: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    preprocess_map_kwargs: dict[str, Any] | None = None
    postprocess_map_kwargs: dict[str, Any] | None = None

    def output_names(self) -> list[str]:
        return [self.prefix + n for n in RESULT_COLUMNS]

    def for_columns(self, columns: Iterable[str]) -> "Processor":
        """This processor for a dataset with these columns: the input's `key` is the row id
        (SAME_MEANING) unless `key_column` names another."""
        columns = list(columns)
        if (not self.prefix and self.key_column is None and "key" in columns
                and "key" not in (self.image_column, self.uri_column)):
            return dataclasses.replace(self, key_column="key")
        return self

    def check_columns(self, columns: Iterable[str]) -> None:
        """The dataset's columns: the named inputs exist, none collides with an output column
        (bar SAME_MEANING's, which the input keeps)."""
        columns = list(columns)
        mine = {self.key_column, self.image_column, self.uri_column, self.questions_column}
        kept = {"width", "height"} | ({"key"} if self.key_column == "key" else set())
        clash = sorted((set(columns) & set(self.output_names())) - mine - kept)
        if clash:
            raise ConfigError(f"input column(s) {', '.join(clash)} collide with the processor's output columns: "
                              f"pass prefix='cogvlm_' to build_processor, or rename them (ds.rename_columns)")
        for col in (self.image_column, self.uri_column, self.key_column, self.questions_column):
            if col is not None and col not in columns:
                raise ConfigError(f"the dataset has no column {col!r} (columns: {', '.join(map(str, columns))})")

    def check_schema(self, schema: Any) -> None:
        """Refuse, once, an image or URI column of a type the processor cannot read (the Arrow
        types in the schema; pandas-only schemata are checked row by row)."""
        import pyarrow as pa

        for name, typ in zip(schema.names, schema.types):
            if not isinstance(typ, pa.DataType) or name not in (self.image_column, self.uri_column):
                continue
            kind = type(typ).__name__
            if name == self.uri_column:
                if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_null(typ)):
                    raise ConfigError(f"column {name!r} (uri_column) holds {typ}, not paths or URIs (strings)")
            elif "Tensor" in kind:  # Ray's tensor columns: numpy arrays, e.g. ray.data.read_images
                scalar = getattr(typ, "scalar_type", None) or getattr(typ, "value_type", None)
                if scalar is not None and scalar != pa.uint8():
                    raise ConfigError(f"column {name!r} (image_column) holds arrays of {scalar} pixels; "
                                      f"give uint8 pixels (HxW or HxWxC), as ray.data.read_images does")
            elif pa.types.is_string(typ) or pa.types.is_large_string(typ):
                raise ConfigError(f"column {name!r} (image_column) holds {typ}, not images: for paths or URIs "
                                  f"pass uri_column={name!r} (with allowed_uri_prefixes) and image_column=None")
            elif not (pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or pa.types.is_null(typ)
                      or "PythonObject" in kind or getattr(pa.types, "is_binary_view", lambda t: False)(typ)):
                raise ConfigError(f"column {name!r} (image_column) holds {typ}, not images (bytes of an image "
                                  f"file, a numpy array of uint8 pixels, or a PIL image)")

    def __call__(self, ds: Any) -> Any:
        import ray

        from .actors import on_driver_node
        from .crashes import CrashLedger
        from .stages import model_stages

        if not ray.is_initialized():
            ray.init()  # what Ray Data would do on the first execution; the check below needs the cluster
        try:
            # the dataset's own tasks (reads, maps) need a CPU beside the stages' actor pools
            check_cluster(self.config, task_cpus=1, replicas="concurrency (model.min_replicas)")
        except JobError as e:
            raise ConfigError(str(e)) from None
        if self.preprocess is not None:
            ds = ds.map(self.preprocess, **(self.preprocess_map_kwargs or {}))
        # the columns, before the stages run: known without running anything for many sources,
        # else from the first block (ray.data.read_images, a map)
        schema = ds.schema()
        p = self
        if schema is not None:
            p = self.for_columns(schema.names)
            p.check_columns(schema.names)
            p.check_schema(schema)
        crash_ledger = on_driver_node(CrashLedger)
        rows = ds.map_batches(_adapt, fn_kwargs={"p": p}, batch_format="pandas", zero_copy_batch=False)
        rows.context.wait_for_min_actors_s = actor_wait_s(self.config)
        out = model_stages(rows, self.prepared, crash_ledger, whole_batches=True)
        out = out.map_batches(_results, fn_kwargs={"prefix": self.prefix}, batch_format="pandas")
        if self.postprocess is not None:
            out = out.map(self.postprocess, **(self.postprocess_map_kwargs or {}))
        return out


def _config(config: CogVLMProcessorConfig | dict[str, Any] | None, keywords: dict[str, Any]) -> CogVLMProcessorConfig:
    """The config object from any form: a CogVLMProcessorConfig, the same as a dict, or keywords;
    `model` may be the checkpoint source alone, or a dict of the job config's `model:` keys, some
    of which are the config's own fields (source, tokenizer, batch_size, min/max_replicas, ...)."""
    if config is not None and keywords:
        raise ConfigError(f"build_processor: give a config or keywords, not both (got {', '.join(sorted(keywords))})")
    if isinstance(config, CogVLMProcessorConfig):
        data = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    elif isinstance(config, dict) or config is None:
        data = dict(config if config is not None else keywords)
    else:
        raise ConfigError(f"build_processor: config must be a CogVLMProcessorConfig or a dict, got "
                          f"{type(config).__name__}")
    fields = {f.name for f in dataclasses.fields(CogVLMProcessorConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"build_processor: unknown config key {unknown[0]} (keys: {', '.join(sorted(fields))})")
    model = data.get("model")
    if isinstance(model, str):
        model = {"source": model}
    if model is not None and not isinstance(model, dict):
        raise ConfigError(f"model must be a mapping of the job config's model keys or a source, got "
                          f"{type(model).__name__}")
    model = dict(model or {})
    if "min_replicas" in model or "max_replicas" in model:
        if "concurrency" in model:
            raise ConfigError("model: give concurrency or min_replicas/max_replicas, not both")
        lo, hi = model.pop("min_replicas", None), model.pop("max_replicas", None)
        model["concurrency"] = (lo if lo is not None else 1, hi if hi is not None else max(1, lo or 1))
    for key, name in _MODEL_KEYS.items():
        if key in model:
            value = model.pop(key)
            if data.get(name) not in (None, "") and data[name] != value:
                raise ConfigError(f"model.{key} and {name} are the same setting: give one")
            data[name] = value
    data["model"] = model
    return CogVLMProcessorConfig(**data)


def _replicas(concurrency: Any) -> tuple[int, int]:
    """`n` or `(m, n)` -> (min_replicas, max_replicas)."""
    if concurrency is None:
        return 1, 1
    if isinstance(concurrency, (list, tuple)) and len(concurrency) == 2:
        lo, hi = concurrency
    else:
        lo = hi = concurrency
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)) or not 1 <= lo <= hi:
        raise ConfigError(f"concurrency must be a number of replicas n >= 1 or a pair (m, n) with 1 <= m <= n, "
                          f"got {concurrency!r}")
    return lo, hi


def build_processor(config: CogVLMProcessorConfig | dict[str, Any] | None = None, *,
                    preprocess: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                    postprocess: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                    preprocess_map_kwargs: dict[str, Any] | None = None,
                    postprocess_map_kwargs: dict[str, Any] | None = None, **keywords: Any) -> Processor:
    """A `Dataset -> Dataset` callable running CogVLM on a user's own Ray dataset.

    `config`: a `CogVLMProcessorConfig`, or a dict of its fields, or its fields as keywords
    (`model=` may then be a dict of the job config's `model:` keys, source included).
    `preprocess` / `postprocess`: functions of one row (a dict) returning a row, applied
    (`Dataset.map`, with `preprocess_map_kwargs` / `postprocess_map_kwargs`) before the processor
    reads the image and after it adds its columns, as in Ray Data LLM's `build_processor`.

    Output rows keep every input column (the image only with `keep_image`) and add `key` and
    RESULT_COLUMNS: task, task_index, prompt, response, boxes, box_errors, status, error_message,
    token counts, finish_reason, width, height, generation settings and the model's provenance.
    Bad images become rows with an error status, never exceptions. An input's `key`, `width`
    and `height` mean the same and are kept as they are (SAME_MEANING); any other input column
    with an output's name is refused unless `prefix` (e.g. "cogvlm_") renames the added columns.

    Config errors (unknown keys, bad values, a checkpoint or tokenizer that does not load) raise
    ConfigError here, before any work, naming the key; a cluster that cannot hold the stages
    (CPUs, GPUs, GPU type) and an image column of an unreadable type raise it at `processor(ds)`,
    before the stages run.
    """
    pc = _config(config, keywords)
    if (pc.image_column is None) == (pc.uri_column is None):
        raise ConfigError("build_processor: give exactly one of image_column (bytes) or uri_column (paths / URIs)")
    for name, fn in (("preprocess", preprocess), ("postprocess", postprocess)):
        if fn is not None and not callable(fn):
            raise ConfigError(f"build_processor: {name} must be a function of a row, got {type(fn).__name__}")
    allowed = [str(p) for p in pc.allowed_uri_prefixes]
    if pc.uri_column and not allowed:
        raise ConfigError("build_processor: uri_column needs allowed_uri_prefixes (the locations the "
                          "dataset's URIs may point at; anything else becomes a read_error row)")
    inp: dict[str, Any] = {"path": allowed[0] if allowed else DATASET_INPUT, "format": "parquet",
                           "image_column": pc.image_column, "uri_column": pc.uri_column,
                           "key_column": pc.key_column, "questions_column": pc.questions_column,
                           "allowed_uri_prefixes": allowed}
    for k, v in (("max_image_pixels", pc.max_image_pixels), ("max_image_bytes", pc.max_image_bytes)):
        if v is not None:
            inp[k] = v
    model = dict(pc.model, source=pc.model_source)
    model["min_replicas"], model["max_replicas"] = _replicas(pc.concurrency)
    for key in ("tokenizer", "batch_size", "accelerator_type", "gpus_per_replica"):
        if getattr(pc, key) is not None:
            model[key] = getattr(pc, key)
    data: dict[str, Any] = {"input": inp, "output": {"path": DATASET_INPUT}, "model": model}
    if pc.tasks is not None:
        data["tasks"] = pc.tasks
    for name in ("s3", "errors", "retry"):
        if getattr(pc, name) is not None:
            data[name] = getattr(pc, name)
    cfg = load_config(data=data)
    # where data-borne URIs may point; with image bytes nothing is fetched (no location at all)
    root = allowed[0] if pc.uri_column else os.devnull
    try:
        prepared = for_dataset(cfg, root)
    except JobError as e:
        raise ConfigError(str(e)) from None
    return Processor(cfg, pc.image_column, pc.uri_column, pc.key_column, pc.questions_column, pc.keep_image,
                     prepared, pc.prefix, preprocess, postprocess, preprocess_map_kwargs, postprocess_map_kwargs)


def image_bytes(value: Any) -> bytes:
    """An image cell -> the bytes of an image file: bytes as they are; a numpy array of uint8
    pixels (HxW, HxWx1, HxWx3, HxWx4) or a PIL image encoded losslessly (PPM, PNG with alpha).
    Anything else raises ValueError naming what it is."""
    from PIL import Image

    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, np.ndarray):
        a = value
        if a.dtype != np.uint8:
            raise ValueError(f"a numpy array of {a.dtype}, not of uint8 pixels")
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
            raise ValueError(f"a numpy array of shape {tuple(value.shape)}, not HxW, HxWx1, HxWx3 or HxWx4 pixels")
        value = Image.fromarray(np.ascontiguousarray(a))
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        if value.mode in ("L", "RGB"):
            value.save(buf, format="PPM")  # uncompressed: no encoding cost, decoded at once
        else:
            value.save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
    raise ValueError(f"{type(value).__name__}, not image bytes, a numpy array or a PIL image")


def _adapt(batch: pd.DataFrame, p: Processor) -> pd.DataFrame:
    """User rows -> the reader's row contract, the user's columns carried along pickled."""
    p = p.for_columns(batch.columns)
    p.check_columns(batch.columns)
    keep = [c for c in batch.columns if c != p.image_column or p.keep_image]
    records = batch.to_dict("records")
    images: list[bytes | None] = []
    errors: list[str | None] = []
    idents = []
    for row in records:
        image, error = None, None
        if p.image_column:
            try:
                image = image_bytes(row.get(p.image_column))
            except ValueError as e:
                error = f"column {p.image_column!r} holds {e}"
            value = image if image is not None else repr(row.get(p.image_column)).encode()
        else:
            value = repr(row.get(p.uri_column)).encode()
        images.append(image)
        errors.append(error)
        idents.append(hashlib.sha1(value).hexdigest()[:16])
    # the crash ledger's image ids: (batch, position), the same if Ray re-runs this batch, and
    # distinct across batches even for repeated images
    batch_id = hashlib.sha1("".join(idents).encode() + str(len(idents)).encode()).hexdigest()[:16]
    out = []
    for i, (row, ident, image, error) in enumerate(zip(records, idents, images, errors)):
        uri = none_if_missing(row.get(p.uri_column)) if p.uri_column else None
        key = str(row[p.key_column]) if p.key_column else ident
        if p.uri_column and not isinstance(uri, str):
            error = f"column {p.uri_column!r} holds no URI"
        questions = questions_json(none_if_missing(row.get(p.questions_column))) if p.questions_column else None
        out.append({"key": key, "image": image, "image_uri": uri if p.uri_column else None, "questions": questions,
                    "read_error": error, "read_status": "read_error" if error else None,
                    "shard_id": batch_id, "image_index": i, "shard_total": len(records),
                    "source_uri": uri if isinstance(uri, str) else "",
                    PASSTHROUGH: pickle.dumps({c: row[c] for c in keep})})
    return pd.DataFrame(out)


def _results(batch: pd.DataFrame, prefix: str = "") -> pd.DataFrame:
    """Generate's rows -> the user's columns + key + RESULT_COLUMNS (typed as in the CLI's
    Parquet schema, so that every block has the same types)."""
    import pyarrow as pa

    rows = batch.to_dict("records")
    users = [pickle.loads(r[PASSTHROUGH]) if r.get(PASSTHROUGH) is not None else {} for r in rows]
    cols: dict[str, Any] = {}
    for name in dict.fromkeys(c for u in users for c in u):
        cols[name] = pd.Series([u.get(name) for u in users])
    boxes = [boxes_from_json(r.get("boxes_json")) for r in rows]
    types = {f.name: f.type for f in SCHEMA}
    for name in RESULT_COLUMNS:
        if not prefix and name in SAME_MEANING and name in cols:  # the input's own, kept
            continue
        if name == "project_version":
            values = [cogvlm.__version__] * len(rows)
        elif name in ("boxes", "box_errors"):
            values = [b[0] if name == "boxes" else b[1] for b in boxes]
        else:
            values = [none_if_missing(r.get(name)) for r in rows]
            if name == "source_uri":
                values = [v or None for v in values]
            if pa.types.is_integer(types[name]):
                values = [None if v is None else int(v) for v in values]
        cols[prefix + name] = pd.Series(pa.array(values, type=types[name]).to_pandas(types_mapper=pd.ArrowDtype),
                                        name=prefix + name)
    return pd.DataFrame(cols)
