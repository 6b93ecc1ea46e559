"""The run's record beside its outputs: `_runs/<run_id>/summary.json` and the resolved config
(`config.yaml`, credentials in URLs redacted), written whatever the run's outcome; and the
output's own record of the config that made it (`_output.json`, by its first run)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import yaml

import cogvlm

from .commit import Commits
from .config import to_dict
from .errors import IncompleteRun, StoppedShort, describe, redact, retry
from .preflight import Prepared, output_identity, read_output_manifest
from .progress import RATES_NOTE, run_rates
from .storage import write_bytes_atomic

log = logging.getLogger("pipeline")


def base_summary(prepared: Prepared) -> dict[str, Any]:
    """What every summary holds, whether or not the run had work."""
    listing = prepared.listing
    return {"run_id": prepared.run_id, "mode": prepared.cfg.mode, "project_version": cogvlm.__version__,
            "tasks": list(prepared.cfg.tasks.enabled()), "tasks_pass": prepared.layout.tasks_pass,
            "shards_total": len(listing.shards), "shards_skipped": len(listing.shards) - len(prepared.pending),
            "files_skipped": listing.skipped_files, "files_skipped_examples": listing.skipped_examples,
            "files_skipped_reasons": listing.skipped_reasons}


def nothing_to_do(prepared: Prepared, t0: float) -> dict[str, Any]:
    return dict(base_summary(prepared), shards_processed=0, shards=[], images=0, rows=0, status_counts={},
                message="nothing new to process", **run_rates(0, time.perf_counter() - t0, None))


def summarize(prepared: Prepared, commits: Commits, crash_stats: dict[str, Any],
              elsewhere: int, wall_s: float | None = None) -> dict[str, Any]:
    """The summary of a run that worked: counts, rates (`progress.run_rates`), start-up, what was
    left. `elsewhere`: shards other runs held at the end (enrich: left to them; batch: committed by
    them); `wall_s`: the run's wall time as its final progress report had it (default: now)."""
    c = commits
    wall = time.perf_counter() - c.t0 if wall_s is None else wall_s
    summary = dict(
        base_summary(prepared), shards_claimed_elsewhere=elsewhere,
        shards_processed=len(c.committed), shards=sorted(c.committed),
        shards_failed=sorted(c.failed), images=c.images, rows=sum(c.counts.values()),
        status_counts=dict(c.counts), failed_downloads_skipped=c.failed_downloads_skipped,
        prompt_tokens=c.prompt_tokens, output_tokens=c.output_tokens,
        batches_retried_after_worker_death=crash_stats.get("retried_batches", 0),
        engine=engine_summary(crash_stats),
        # wall_s, images_per_s (wall); first_commit_s (start-up: actors, model load), steady_images_per_s
        **run_rates(c.images, wall, c.first_commit),
        output_tokens_per_s=round(c.output_tokens / wall, 2) if wall else None,
        rates=RATES_NOTE,
    )
    if prepared.cfg.mode == "enrich" and elsewhere and not c.committed and not c.failed:
        summary["message"] = "new shards are being processed by other runs"
    return summary


def incomplete(commits: Commits, summary: dict[str, Any], stopped: StoppedShort | None) -> IncompleteRun:
    """The one-line error of a run that left shards for a rerun (`stopped`: why the run stopped
    taking work early, if it did: no nodes, the output store down)."""
    names = sorted(commits.failed)
    listed = f"{', '.join(names[:10])}{', ...' if len(names) > 10 else ''}"
    if stopped is not None:
        return IncompleteRun(f"{stopped}: {len(names)} shards left uncommitted ({listed}). Rerun the same config "
                             f"{stopped.rerun_when}", summary)
    return IncompleteRun(f"{len(names)} shards left uncommitted after transient failures ({listed}): "
                         f"{redact(commits.failed[names[0]])[:300]}. Rerun the same config to finish them", summary)


def engine_summary(crash_stats: dict[str, Any]) -> dict[str, Any]:
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


def write_output_manifest(prepared: Prepared) -> None:
    """At an output's first run: `_output.json` with the config that makes its rows (what
    `preflight.check_output_config` compares later runs with); at a run that adds tasks, the
    config with them, and their pass appended to `passes`."""
    cfg, layout = prepared.cfg, prepared.layout
    recorded = read_output_manifest(prepared)
    if recorded is not None and prepared.added is None:
        return
    recorded = recorded or {"first_run": prepared.run_id, "passes": []}
    passes = [p for p in recorded.get("passes", []) if prepared.added is None or p["name"] != prepared.added.name]
    if prepared.added is not None:
        passes.append({"name": prepared.added.name, "tasks": list(prepared.added.tasks),
                       "first_run": prepared.run_id})
    body = json.dumps({"config": output_identity(cfg), "first_run": recorded["first_run"], "passes": passes,
                       "project_version": cogvlm.__version__}, indent=2, default=str).encode()
    retry(lambda: write_bytes_atomic(prepared.out_fs, layout.output_manifest, body, tmp_root=layout.root),
          "writing the output's _output.json", cfg.retry.deadline_s, cfg.retry.backoff_s)


def write_record(prepared: Prepared, summary: dict[str, Any]) -> dict[str, Any]:
    """Write the run's record (summary + redacted resolved config); a failure is logged, never
    raised (the shards are committed; only the record is missing). Returns the summary."""
    cfg, layout, fs = prepared.cfg, prepared.layout, prepared.out_fs
    summary["output"] = cfg.output.path
    run_id = summary["run_id"]

    def write() -> None:
        write_bytes_atomic(fs, layout.summary(run_id), json.dumps(summary, indent=2).encode(), tmp_root=layout.root)
        write_bytes_atomic(fs, layout.config(run_id), yaml.safe_dump(_redacted(to_dict(cfg)), sort_keys=False).encode(),
                           tmp_root=layout.root)

    try:
        retry(write, f"writing the run record {run_id}", cfg.retry.deadline_s, cfg.retry.backoff_s)
    except Exception as e:  # noqa: BLE001
        log.error("could not write the run record under %s: %s", redact(cfg.output.path), describe(e))
    return summary


def _redacted(d: Any) -> Any:
    """Drop user:secret@ from URLs in the saved config (load_config refuses them anyway)."""
    if isinstance(d, dict):
        return {k: _redacted(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_redacted(v) for v in d]
    if isinstance(d, str):
        return redact(d)
    return d
