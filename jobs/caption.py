"""Caption / VQA / grounding over a dataset of images.

    python -m jobs.caption --config my.yaml [key=value ...]
    python -m jobs.caption --config my.yaml --mode enrich      # scheduled runs over a growing prefix
    python -m jobs.caption --config more-tasks.yaml --add-tasks  # add tasks to an existing output
    ray job submit --working-dir . -- python -m jobs.caption --config my.yaml

Overrides use dotted keys, values parsed as YAML (quote strings with `?` or `:`):
`model.batch_size=16 tasks.vqa.questions='["Is it red?", "How many people?"]'`.
Starts a local Ray unless one is reachable (RAY_ADDRESS, as under `ray job submit`).

Exit codes: 0 done; 2 bad config or setup (nothing was done); 3 some shards were left for a rerun
(transient failures after retries; the summary lists them); 1 the run stopped (store down, error
guard, pipeline failure). Errors are one line on stderr; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from cogvlm.weights import CheckpointError
from pipeline import ConfigError, InputError, JobError, load_config, run
from pipeline.config import parse_yaml
from pipeline.errors import IncompleteRun, RunStopped, describe

CONFIG_ENV = "COGVLM_JOB_CONFIG"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help=f"YAML job config (default: the YAML text in ${CONFIG_ENV}, as jobs.submit sends it)")
    p.add_argument("--mode", choices=["batch", "enrich"], default=None,
                   help="enrich: process only shards not yet in the ledger, safe to overlap (same as mode=enrich)")
    p.add_argument("--add-tasks", action="store_true",
                   help="add the config's tasks that the existing output lacks: only they run, over every "
                        "image (same as output.add_tasks=true; README: Adding a task)")
    p.add_argument("--debug", action="store_true", help="print tracebacks with errors")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if a.debug:  # the pipeline's tracebacks (a failed commit's) too
        logging.getLogger("pipeline").setLevel(logging.DEBUG)
    overrides = (list(a.overrides) + ([f"mode={a.mode}"] if a.mode else [])
                 + (["output.add_tasks=true"] if a.add_tasks else []))
    try:
        if a.config is None:
            text = os.environ.get(CONFIG_ENV)
            if not text:
                raise ConfigError(f"give --config FILE or set {CONFIG_ENV}")
            cfg = load_config(data=parse_yaml(text, CONFIG_ENV), overrides=overrides)
        else:
            cfg = load_config(a.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = run(cfg)
    except IncompleteRun as e:
        print(json.dumps(e.summary, indent=2))
        print(f"error: {e}", file=sys.stderr)
        return 3
    except RunStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, InputError, JobError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line, not a page of traceback
        if a.debug:
            raise
        print(f"error: {describe(e)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
