"""The pipeline's stages as one Ray Data building block.

    processor = build_processor(model={"source": "THUDM/cogvlm-chat-hf", "gpus_per_replica": 1},
                                tasks={"caption": {"max_new_tokens": 64}})
    out = processor(ray.data.read_parquet("s3://bucket/images/"))  # a column "image" of bytes
    out.write_parquet("s3://bucket/captions/")

`stages(ds, ...)` is what both the CLI job (`pipeline.job`, with its shard ledger, resume and
enrichment) and `build_processor` (on any user dataset) run: Preprocess (CPU actors) -> Generate
(one model replica per actor).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
from typing import Any, Iterable

import pandas as pd

import cogvlm

from .config import ConfigError, JobConfig, load_config
from .crashes import FAULT_ENV
from .ledger import SCHEMA, _boxes, _none
from .sink import WRITE_FAULT_ENV

PASSTHROUGH = "passthrough"  # internal column: the user's own columns, pickled per row

# what a processor adds to each row (the CLI's Parquet schema less the shard and run fields)
RESULT_COLUMNS = [f.name for f in SCHEMA if f.name not in ("shard_id", "image_index", "run_id", "timestamp")]
DATASET_INPUT = "ray-dataset://"  # stands for input/output paths a processor does not have


def stages(ds: Any, cfg: JobConfig, mcfg: Any, crash_ledger: Any, input_root: str,
           whole_batches: bool = False, sink: Any = None) -> Any:
    """Rows with the reader's columns (key, image | image_uri, questions, read_error, read_status,
    shard_id, source_uri, shard_total, image_index[, passthrough]) -> one row per (image, prompt).

    `whole_batches`: Generate emits a batch's rows together (for consumers that cannot drop the
    rows a retried batch repeats). `sink` (a `pipeline.sink.PartSink`, the CLI job's): Generate
    writes the rows itself and emits one small record per written part instead."""
    from ray.data import ActorPoolStrategy

    from .stages import Generate, Preprocess

    # the tests' fault-injection hook reaches the stage workers through their runtime env
    hooks = {k: os.environ[k] for k in (FAULT_ENV, WRITE_FAULT_ENV) if os.environ.get(k)}
    stage_env = {"runtime_env": {"env_vars": hooks}} if hooks else {}
    kwargs = {"job": cfg, "model_config": mcfg, "crash_ledger": crash_ledger}
    ds = ds.map_batches(Preprocess, fn_constructor_kwargs=dict(kwargs, input_root=input_root),
                        compute=ActorPoolStrategy(min_size=1, max_size=max(1, cfg.model.preprocess_workers)),
                        num_cpus=1, batch_size=16, batch_format="pandas", **stage_env)
    # Generate's __call__ is async: a replica takes `batches_in_flight` Ray batches at once and
    # feeds them all to its one engine, so the device never waits for the next batch
    return ds.map_batches(Generate, fn_constructor_kwargs=dict(kwargs, whole_batches=whole_batches, sink=sink),
                          compute=ActorPoolStrategy(min_size=cfg.model.min_replicas,
                                                    max_size=cfg.model.max_replicas,
                                                    max_tasks_in_flight_per_actor=cfg.model.batches_in_flight,
                                                    max_concurrent_calls_per_actor=cfg.model.batches_in_flight),
                          num_gpus=cfg.model.gpus_per_replica, num_cpus=cfg.model.cpus_per_replica,
                          batch_size=cfg.model.batch_size, batch_format="pandas", **stage_env)


@dataclasses.dataclass
class Processor:
    """`processor(ds) -> ds`: one output row per (input row, prompt); see `build_processor`."""

    config: JobConfig
    image_column: str | None
    uri_column: str | None
    key_column: str | None
    questions_column: str | None
    keep_image: bool
    model_config: Any = None
    prefix: str = ""  # put before the names of the columns the processor adds

    def output_names(self) -> list[str]:
        return [self.prefix + n for n in RESULT_COLUMNS]

    def check_columns(self, columns: Iterable[str]) -> None:
        """The dataset's columns: the named inputs exist, none collides with an output column."""
        columns = list(columns)
        mine = {self.key_column, self.image_column, self.uri_column, self.questions_column}
        clash = sorted((set(columns) & set(self.output_names())) - mine)
        if clash:
            raise ConfigError(f"input column(s) {', '.join(clash)} collide with the processor's output columns: "
                              f"pass prefix='cogvlm_' to build_processor, or rename them (ds.rename_columns)")
        for col in (self.image_column, self.uri_column, self.key_column, self.questions_column):
            if col is not None and col not in columns:
                raise ConfigError(f"the dataset has no column {col!r} (columns: {', '.join(map(str, columns))})")

    def __call__(self, ds: Any) -> Any:
        import ray

        from .crashes import CrashLedger

        schema = ds.schema(fetch_if_missing=False)  # known without running anything for most sources
        if schema is not None:
            self.check_columns(schema.names)
        crash_ledger = ray.remote(num_cpus=0)(CrashLedger).remote()
        # where data-borne URIs may point; with image bytes nothing is fetched (no location at all)
        root = self.config.input.allowed_uri_prefixes[0] if self.uri_column else os.devnull
        rows = ds.map_batches(_adapt, fn_kwargs={"p": self, "root": root}, batch_format="pandas",
                              zero_copy_batch=False)
        out = stages(rows, self.config, self.model_config, crash_ledger, root, whole_batches=True)
        return out.map_batches(_results, fn_kwargs={"prefix": self.prefix}, batch_format="pandas")


def build_processor(*, model: dict[str, Any] | str, tasks: dict[str, Any] | None = None,
                    image_column: str | None = "image", uri_column: str | None = None,
                    key_column: str | None = None, questions_column: str | None = None,
                    allowed_uri_prefixes: Iterable[str] = (), keep_image: bool = False,
                    s3: dict[str, Any] | None = None, errors: dict[str, Any] | None = None,
                    retry: dict[str, Any] | None = None, max_image_pixels: int | None = None,
                    max_image_bytes: int | None = None, prefix: str = "") -> Processor:
    """A `Dataset -> Dataset` callable running CogVLM on a user's own Ray dataset.

    - `model`: the job config's `model:` section (a dict, or just the checkpoint source), e.g.
      `{"source": ..., "tokenizer": ..., "dtype": "bf16", "min_replicas": 4, "max_replicas": 4,
      "gpus_per_replica": 1, "quantization": "int4"}`; `tasks`: the `tasks:` section (default:
      caption).
    - Input rows hold the image as bytes in `image_column`, or a path / `s3://` URI in
      `uri_column` (then `allowed_uri_prefixes` says where URIs may point); `questions_column`
      (a string or a list of strings) adds per-row VQA questions; `key_column` names a row id
      (default: a hash of the image bytes or URI).
    - Output rows keep every input column (the image bytes only with `keep_image`) and add
      `key` and RESULT_COLUMNS: task, task_index, prompt, response, boxes, box_errors, status,
      error_message, token counts, finish_reason, width, height, generation settings and the
      model's provenance. Bad images become rows with an error status, never exceptions.
      `prefix` (e.g. "cogvlm_") goes before those names, for inputs that already have such
      columns (img2dataset's Parquet has key, status, error_message, width, height).

    Config errors (unknown keys, bad values, a checkpoint that does not load) raise before any
    work, naming the key.
    """
    if (image_column is None) == (uri_column is None):
        raise ConfigError("build_processor: give exactly one of image_column (bytes) or uri_column (paths / URIs)")
    allowed = [str(p) for p in allowed_uri_prefixes]
    if uri_column and not allowed:
        raise ConfigError("build_processor: uri_column needs allowed_uri_prefixes (the locations the "
                          "dataset's URIs may point at; anything else becomes a read_error row)")
    inp: dict[str, Any] = {"path": allowed[0] if allowed else DATASET_INPUT, "format": "parquet",
                           "image_column": image_column, "uri_column": uri_column, "key_column": key_column,
                           "questions_column": questions_column, "allowed_uri_prefixes": allowed}
    for k, v in (("max_image_pixels", max_image_pixels), ("max_image_bytes", max_image_bytes)):
        if v is not None:
            inp[k] = v
    data: dict[str, Any] = {"input": inp, "output": {"path": DATASET_INPUT},
                            "model": {"source": model} if isinstance(model, str) else dict(model)}
    if tasks is not None:
        data["tasks"] = tasks
    for name, section in (("s3", s3), ("errors", errors), ("retry", retry)):
        if section is not None:
            data[name] = section
    cfg = load_config(data=data)
    from .job import JobError, check_fit, model_config

    try:
        mcfg = model_config(cfg)
        if cfg.model.gpu_memory_gb is not None:
            check_fit(cfg, mcfg)
    except JobError as e:
        raise ConfigError(str(e)) from None
    return Processor(cfg, image_column, uri_column, key_column, questions_column, keep_image, mcfg, prefix)


def _adapt(batch: pd.DataFrame, p: Processor, root: str) -> pd.DataFrame:
    """User rows -> the reader's row contract, the user's columns carried along pickled."""
    from .readers import _questions

    p.check_columns(batch.columns)
    keep = [c for c in batch.columns if c != p.image_column or p.keep_image]
    records = batch.to_dict("records")
    idents = []
    for row in records:
        value = row.get(p.image_column) if p.image_column else row.get(p.uri_column)
        data = bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else repr(value).encode()
        idents.append(hashlib.sha1(data).hexdigest()[:16])
    # the crash ledger's image ids: (batch, position), the same if Ray re-runs this batch, and
    # distinct across batches even for repeated images
    batch_id = hashlib.sha1("".join(idents).encode() + str(len(idents)).encode()).hexdigest()[:16]
    out = []
    for i, (row, ident) in enumerate(zip(records, idents)):
        image = row.get(p.image_column) if p.image_column else None
        uri = _none(row.get(p.uri_column)) if p.uri_column else None
        key = str(row[p.key_column]) if p.key_column else ident
        error = None
        if p.image_column and not isinstance(image, (bytes, bytearray, memoryview)):
            error = f"column {p.image_column!r} holds {type(image).__name__}, not image bytes"
            image = None
        elif p.uri_column and not isinstance(uri, str):
            error = f"column {p.uri_column!r} holds no URI"
        questions = _questions(_none(row.get(p.questions_column))) if p.questions_column else None
        out.append({"key": key, "image": bytes(image) if image is not None else None,
                    "image_uri": uri if p.uri_column else None, "questions": questions,
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
    boxes = [_boxes(r.get("boxes_json")) for r in rows]
    types = {f.name: f.type for f in SCHEMA}
    for name in RESULT_COLUMNS:
        if name == "project_version":
            values = [cogvlm.__version__] * len(rows)
        elif name in ("boxes", "box_errors"):
            values = [b[0] if name == "boxes" else b[1] for b in boxes]
        else:
            values = [_none(r.get(name)) for r in rows]
            if name == "source_uri":
                values = [v or None for v in values]
            if pa.types.is_integer(types[name]):
                values = [None if v is None else int(v) for v in values]
        cols[prefix + name] = pd.Series(pa.array(values, type=types[name]).to_pandas(types_mapper=pd.ArrowDtype),
                                        name=prefix + name)
    return pd.DataFrame(cols)
