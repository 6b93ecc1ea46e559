"""Demo: the caption job on the bundled images with a tiny RANDOM-weight checkpoint, on CPU.

    python -m jobs.demo [key=value ...]          # overrides for jobs/configs/demo.yaml
    python -m jobs.submit --demo                 # the same on a Ray cluster (RAY_ADDRESS)

Builds the checkpoint (release format) under build/demo/ where it runs (under jobs.submit: in the
job's working directory on the node of the job's driver, so the demo suits a one-node cluster),
runs `jobs.caption` with jobs/configs/demo.yaml on a local Ray or the cluster it runs on, and
prints the Parquet output. The weights are random, so the text is meaningless: the demo shows the pipeline end to end, not model quality.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "demo"


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    os.chdir(ROOT)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from cogvlm.tiny import write_checkpoint

    if not (BUILD / "tiny-v1" / "config.json").exists():
        write_checkpoint(BUILD / "tiny-v1", version=1, preset_name="tiny", shards=2,
                         tokenizer_dir=BUILD / "tiny-v1-tokenizer")
    shutil.rmtree(BUILD / "out", ignore_errors=True)  # the demo always starts fresh
    from jobs.caption import main as caption

    rc = caption(["--config", "jobs/configs/demo.yaml", *overrides])
    if rc:
        return rc
    import pandas as pd

    df = pd.read_parquet(BUILD / "out" / "data")
    pd.set_option("display.width", 160, "display.max_colwidth", 48)
    print("\nNOTE: random weights -- the responses below are meaningless text.\n")
    print(df[["key", "task", "status", "response", "output_tokens", "finish_reason"]].to_string(index=False))
    print(f"\nParquet output: {BUILD / 'out' / 'data'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
