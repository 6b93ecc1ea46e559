"""Plan a job before running it: images left, tokens, memory and fit, GPU-hours, wall time, cost.

    python -m jobs.plan --config my.yaml [key=value ...] [--replicas N] [--gpu-hour-price P]
                        [--calibrate K] [--count-shards N] [--json]

Counts images without decoding any (img2dataset sidecars, tar headers, Parquet footers, listings)
and subtracts the shards the output's ledger has committed. Throughput comes from the table of
measured rates in `pipeline.plan.MEASURED` or, with `--calibrate K`, from running the first ~K
images through the real pipeline (one replica, output in a temporary directory); where neither
gives a rate, GPU-hours, wall time and cost are printed as unknown, never guessed.

Exit codes: 0 planned; 2 bad config, input or checkpoint; 1 the calibration run failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from typing import Any

from cogvlm.weights import CheckpointError
from pipeline import ConfigError, InputError, JobConfig, JobError, load_config, run
from pipeline.calibration import calibration_config, calibration_result
from pipeline.listing import COUNT_SHARDS
from pipeline.plan import make_plan, render
from pipeline.preflight import Prepared, prepare


def calibrate(cfg: JobConfig, images: int) -> dict[str, Any]:
    """Run the first ~`images` images through `pipeline.run` (one replica, a temporary output) and
    return the rate and start-up, as `make_plan(calibration=...)` takes them."""
    with tempfile.TemporaryDirectory(prefix="cogvlm-calibrate-") as workdir:
        summary = run(calibration_config(cfg, images, workdir))
    return calibration_result(cfg, summary, images)


def _first_with_work(prepared: Prepared) -> Prepared:
    """The pass of the output's tasks the run would do first (README: Adding a task): with tasks
    added to the output, the plan is that pass's (its tasks, its ledger); else the run's own."""
    if prepared.ledger_error or len(prepared.passes) < 2:
        return prepared
    try:
        return next((p for p in prepared.pass_runs() if p.pending), prepared)
    except Exception:  # noqa: BLE001 - a pass's ledger could not be read: plan the first tasks
        return prepared


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML job config, as for jobs.caption")
    p.add_argument("--replicas", type=int, default=None, help="replicas for the wall time (default model.max_replicas)")
    p.add_argument("--gpu-hour-price", type=float, default=None, help="price of one GPU-hour, for the cost")
    p.add_argument("--calibrate", type=int, default=None, metavar="K",
                   help="measure the rate by running ~K images through the real pipeline first")
    p.add_argument("--count-shards", type=int, default=COUNT_SHARDS,
                   help="most shards opened to count images; more are extrapolated by size")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for flag, value, low in (("--replicas", a.replicas, 1), ("--calibrate", a.calibrate, 1),
                             ("--count-shards", a.count_shards, 1), ("--gpu-hour-price", a.gpu_hour_price, 0)):
        if value is not None and value < low:
            print(f"error: {flag} must be >= {low}", file=sys.stderr)
            return 2
    try:
        cfg = load_config(a.config, a.overrides)
        calibration = None
        if a.calibrate:
            try:
                calibration = calibrate(cfg, a.calibrate)
            except (ConfigError, InputError, CheckpointError):
                raise
            except Exception as e:  # noqa: BLE001 - JobError/RunStopped and the rest: one line
                print(f"error: the calibration run failed: {e}", file=sys.stderr)
                return 1
        plan = make_plan(_first_with_work(prepare(cfg, writable=False)), a.replicas, a.gpu_hour_price,
                         calibration, count_shards=a.count_shards)
    except (ConfigError, InputError, JobError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if a.json else render(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
