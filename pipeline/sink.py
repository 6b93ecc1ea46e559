"""Result rows written by the workers; the driver sees one small record per written part.
(Paths: `pipeline.layout`; the record's columns: `rows.RECORD_COLUMNS`.)

    Generate (each Ray batch) --> _parts/<shard_id>/<run_id>-<uuid>.parquet  + a part record
    driver: a shard is complete when its records cover all its images --> merge_parts (a Ray
            task) writes data/<shard_id>.parquet from the listed parts --> the driver writes the
            ledger marker --> the parts are deleted

A part holds every row of the images it covers (Generate emits an image's rows together). A batch
that Ray re-runs after a worker died writes its images again into a new part; the merge keeps one
row per (image_index, task_index), so the shard's file has each exactly once. Parts sit under
`_parts/`, which dataset readers skip, and are only ever read through the list the driver built;
parts no marker accounts for (a killed run's) are deleted by the next run that claims the shard.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import uuid
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import errors as st
from .carry import add_columns, output_schema
from .config import RetryConfig, S3Config
from .errors import describe, retry
from .faults import maybe_die_after_write
from .layout import OutputLayout
from .rows import to_table
from .storage import filesystem, join, write_bytes_atomic

log = logging.getLogger("pipeline")


@dataclasses.dataclass
class PartSink:
    """Where a replica writes its rows (picklable: built on the driver, used on the workers)."""

    output_path: str
    s3: S3Config
    retry: RetryConfig
    run_id: str
    project_version: str
    carry: Any = None  # the pa.Schema of input.carry_columns (pipeline.carry), appended to each row
    tasks_pass: str = ""  # the pass of added tasks the rows belong to ("" : the output's first tasks)

    def write(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One part per shard among `rows` (Generate's output rows of one batch): their records."""
        by_shard: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_shard.setdefault(str(r["shard_id"]), []).append(r)
        return [self._write_part(sid, part) for sid, part in by_shard.items()]

    def _write_part(self, sid: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
        fs, root = filesystem(self.output_path, self.s3)
        layout = OutputLayout(root, self.tasks_pass)
        images = sorted({int(r["image_index"]) for r in rows})
        first = {}
        for r in sorted(rows, key=lambda r: int(r["task_index"])):
            first.setdefault(int(r["image_index"]), r)
        # the error guard's sample: each image's first row, when it is not OK
        failures = [[i, r["status"], str(r.get("error_message") or "")[:300]]
                    for i, r in first.items() if r["status"] != st.OK]
        transient = next((str(r.get("error_message") or "transient failure") for r in rows
                          if r["status"] == st.TRANSIENT), None)
        rec = {"shard_id": sid, "part": None, "images": json.dumps(images),
               "shard_total": max(int(r["shard_total"]) for r in rows), "rows": len(rows),
               "transient": transient, "failures": json.dumps(failures)}
        if transient is not None:  # never committed: no need to store the rows
            return rec
        table = to_table(rows, {"run_id": self.run_id, "project_version": self.project_version,
                                "timestamp": dt.datetime.now(dt.timezone.utc)})
        table = add_columns(table, rows, self.carry)
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue().to_pybytes()
        rel = layout.part_rel(sid, self.run_id, uuid.uuid4().hex)
        path = join(root, rel)
        try:
            retry(lambda: write_bytes_atomic(fs, path, data, tmp_root=root), f"writing a part of shard {sid}",
                  self.retry.deadline_s, self.retry.backoff_s)
        except Exception as e:  # noqa: BLE001 - the rows cannot be stored: leave the shard to the rerun
            rec["transient"] = f"could not write result rows: {describe(e)}"
            return rec
        maybe_die_after_write([str(r["key"]) for r in rows])
        rec["part"] = rel
        return rec


def merge_parts(output_path: str, s3: S3Config, policy: RetryConfig, shard_id: str, source_uri: str,
                parts: list[str], run_id: str, carry: Any = None, skip_failed_downloads: bool = False,
                tasks_pass: str = "") -> dict[str, Any]:
    """Write data/<shard_id>.parquet from the shard's parts (one row per (image, task), sorted);
    returns the ledger record. Runs as a Ray task, so that no row passes through the driver.
    `carry`: the carried columns' schema (PartSink.carry); `skip_failed_downloads`: leave out the
    download_error rows (img2dataset's dead URLs), counted as `failed_downloads_skipped` images."""
    fs, root = filesystem(output_path, s3)
    schema = output_schema(carry)

    def read(rel: str) -> pa.Table:
        with fs.open(join(root, rel), "rb") as f:
            return pq.read_table(f, schema=schema)

    tables = [retry(lambda: read(p), f"reading a part of shard {shard_id}", policy.deadline_s, policy.backoff_s)
              for p in parts]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    table = _one_row_per_task(table)
    table, skipped = _without_failed_downloads(table) if skip_failed_downloads else (table, 0)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue().to_pybytes()
    rel = OutputLayout(root, tasks_pass).data_rel(shard_id)
    retry(lambda: write_bytes_atomic(fs, join(root, rel), data, tmp_root=root), f"writing shard {shard_id}",
          policy.deadline_s, policy.backoff_s)
    status = Counter(table.column("status").to_pylist())
    ok = pa.compute.equal(table.column("status"), st.OK)
    tokens = {name: int(pa.compute.sum(pa.compute.if_else(ok, table.column(name), 0)).as_py() or 0)
              for name in ("prompt_tokens", "output_tokens")}
    return {"shard_id": shard_id, "source_uri": source_uri, "file": rel, "rows": table.num_rows,
            "images": len(set(table.column("image_index").to_pylist())), "status": dict(status),
            "run_id": run_id, "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(), **tokens,
            **({"failed_downloads_skipped": skipped} if skipped else {})}


def _without_failed_downloads(table: pa.Table) -> tuple[pa.Table, int]:
    """The table less its download_error rows, and how many images those were."""
    failed = pa.compute.equal(table.column("status"), st.DOWNLOAD_ERROR)
    if not pa.compute.any(failed).as_py():
        return table, 0
    images = len(set(table.filter(failed).column("image_index").to_pylist()))
    return table.filter(pa.compute.invert(failed)), images


def _one_row_per_task(table: pa.Table) -> pa.Table:
    """Sorted by (image_index, task_index), repeats (a re-run batch's second part) dropped."""
    if table.num_rows == 0:
        return table
    table = table.sort_by([("image_index", "ascending"), ("task_index", "ascending")])
    img = table.column("image_index").to_numpy()
    task = table.column("task_index").to_numpy()
    keep = [0] + [i for i in range(1, table.num_rows) if img[i] != img[i - 1] or task[i] != task[i - 1]]
    return table.take(keep) if len(keep) < table.num_rows else table


def delete_parts(output_path: str, s3: S3Config, shard_id: str, keep_run: str | None = None,
                 tasks_pass: str = "") -> None:
    """Remove the shard's parts (all, once it is committed; at its claim, those of other runs
    but `keep_run`'s, which a re-run read task must not take from under the driver); never raises."""
    fs, root = filesystem(output_path, s3)
    path = OutputLayout(root, tasks_pass).parts_dir(shard_id)
    try:
        fs.invalidate_cache(path)
        if not fs.exists(path):
            return
        if keep_run is None:
            fs.rm(path, recursive=True)
            return
        stale = [p for p in fs.ls(path, detail=False)
                 if not OutputLayout.is_part_of_run(p.rstrip("/").rsplit("/", 1)[-1], keep_run)]
        if stale:
            fs.rm(stale, recursive=True)
    except FileNotFoundError:
        pass
    except Exception as e:  # noqa: BLE001 - leftovers are removed by the next run
        log.warning("could not delete the parts of shard %s: %s", shard_id, describe(e))


def sweep_parts(fs: Any, root: str, committed: set[str], policy: RetryConfig, tasks_pass: str = "") -> None:
    """Delete the parts left under committed shards (a batch re-run after its shard's merge, a
    run killed between its marker and the deletion); never raises."""
    base = OutputLayout(root, tasks_pass).parts_root
    try:
        fs.invalidate_cache(base)
        if not fs.exists(base):
            return
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)]
        stale = [join(base, n) for n in names if n in committed]
        if stale:
            fs.rm(stale, recursive=True)
            log.info("deleted the leftover parts of %d committed shards", len(stale))
    except Exception as e:  # noqa: BLE001 - leftovers are harmless (readers never look there)
        log.warning("could not sweep %s: %s", base, describe(e))


def delete_late_parts(fs: Any, root: str, parts: list[str]) -> None:
    """Delete parts a re-run batch wrote after its shard was merged (paths relative to the root);
    never raises (leftovers are swept by the next run)."""
    for rel in parts:
        try:
            fs.rm(join(root, rel))
        except Exception:  # noqa: BLE001
            pass
