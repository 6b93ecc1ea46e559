"""Caption / VQA / grounding over a dataset of images.

    python -m jobs.caption --config my.yaml [key=value ...]
    ray job submit --working-dir . -- python -m jobs.caption --config my.yaml

Overrides use dotted keys, values parsed as YAML: `model.batch_size=16 tasks.vqa.questions='[a?, b?]'`.
Starts a local Ray unless one is reachable (RAY_ADDRESS, as under `ray job submit`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline import ConfigError, InputError, JobError, load_config, run
from cogvlm.weights import CheckpointError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML job config")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(a.config, a.overrides)
        summary = run(cfg)
    except (ConfigError, InputError, JobError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
