"""The library API: CogVLM as one Ray Data building block on a user's own dataset.

    processor = build_processor(model={"source": "THUDM/cogvlm-chat-hf", "gpus_per_replica": 1},
                                tasks={"caption": {"max_new_tokens": 64}})
    out = processor(ray.data.read_parquet("s3://bucket/images/"))  # a column "image" of bytes
    out.write_parquet("s3://bucket/captions/")

It runs the same stages as the CLI job (`pipeline.stages.model_stages`), without the job's shard
ledger, claims and Parquet commits: the user's dataset in, the user's dataset out.
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
from .errors import JobError
from .preflight import Prepared, for_dataset
from .rows import PASSTHROUGH, RESULT_COLUMNS, SCHEMA, boxes_from_json, none_if_missing, questions_json

DATASET_INPUT = "ray-dataset://"  # stands for input/output paths a processor does not have


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
        from .actors import on_driver_node
        from .crashes import CrashLedger
        from .stages import model_stages

        schema = ds.schema(fetch_if_missing=False)  # known without running anything for most sources
        if schema is not None:
            self.check_columns(schema.names)
        crash_ledger = on_driver_node(CrashLedger)
        rows = ds.map_batches(_adapt, fn_kwargs={"p": self}, batch_format="pandas", zero_copy_batch=False)
        out = model_stages(rows, self.prepared, crash_ledger, whole_batches=True)
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
    # where data-borne URIs may point; with image bytes nothing is fetched (no location at all)
    root = allowed[0] if uri_column else os.devnull
    try:
        prepared = for_dataset(cfg, root)
    except JobError as e:
        raise ConfigError(str(e)) from None
    return Processor(cfg, image_column, uri_column, key_column, questions_column, keep_image, prepared, prefix)


def _adapt(batch: pd.DataFrame, p: Processor) -> pd.DataFrame:
    """User rows -> the reader's row contract, the user's columns carried along pickled."""
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
        uri = none_if_missing(row.get(p.uri_column)) if p.uri_column else None
        key = str(row[p.key_column]) if p.key_column else ident
        error = None
        if p.image_column and not isinstance(image, (bytes, bytearray, memoryview)):
            error = f"column {p.image_column!r} holds {type(image).__name__}, not image bytes"
            image = None
        elif p.uri_column and not isinstance(uri, str):
            error = f"column {p.uri_column!r} holds no URI"
        questions = questions_json(none_if_missing(row.get(p.questions_column))) if p.questions_column else None
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
    boxes = [boxes_from_json(r.get("boxes_json")) for r in rows]
    types = {f.name: f.type for f in SCHEMA}
    for name in RESULT_COLUMNS:
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
