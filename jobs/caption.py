"""Caption / VQA / grounding over a dataset of images.

    python -m jobs.caption --config my.yaml [key=value ...]
    python -m jobs.caption --config my.yaml --mode enrich      # scheduled runs over a growing prefix
    ray job submit --working-dir . -- python -m jobs.caption --config my.yaml

Overrides use dotted keys, values parsed as YAML: `model.batch_size=16 tasks.vqa.questions='[a?, b?]'`.
Starts a local Ray unless one is reachable (RAY_ADDRESS, as under `ray job submit`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import yaml

from pipeline import ConfigError, InputError, JobError, load_config, run
from cogvlm.weights import CheckpointError

CONFIG_ENV = "COGVLM_JOB_CONFIG"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help=f"YAML job config (default: the YAML text in ${CONFIG_ENV}, as jobs.submit sends it)")
    p.add_argument("--mode", choices=["batch", "enrich"], default=None,
                   help="enrich: process only shards not yet in the ledger, safe to overlap (same as mode=enrich)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = list(a.overrides) + ([f"mode={a.mode}"] if a.mode else [])
    try:
        if a.config is None:
            text = os.environ.get(CONFIG_ENV)
            if not text:
                raise ConfigError(f"give --config FILE or set {CONFIG_ENV}")
            data = yaml.safe_load(text)
            if not isinstance(data, dict):
                raise ConfigError(f"{CONFIG_ENV} does not hold a YAML mapping")
            cfg = load_config(data=data, overrides=overrides)
        else:
            cfg = load_config(a.config, overrides)
        summary = run(cfg)
    except (ConfigError, InputError, JobError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
