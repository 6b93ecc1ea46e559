"""Submit the caption job to a Ray cluster, stream its logs, exit non-zero if it fails.

    python -m jobs.submit --address http://HEAD:8265 --config my.yaml [key=value ...]
        [--mode enrich] [--env AWS_ACCESS_KEY_ID --env AWS_SECRET_ACCESS_KEY] [--no-wait]

The config travels in the job's runtime environment (`COGVLM_JOB_CONFIG`), the repository as its
working directory. `--env NAME` copies NAME from your environment into the job's (values are
never printed); prefer cluster-side credentials (pod/instance roles) where you can.

The submission id is deterministic: `cogvlm-<mode>-<hash of config, overrides>` (enrich adds the
UTC hour), so re-running this command attaches to the job already running, or reports the one
that already succeeded, instead of starting a second. After a failed or stopped job it submits
`<id>-retry-N`; the job's own ledger makes the retry resume rather than redo.

Clusters with token authentication (all of infra/'s) need the token on this side:
`export RAY_AUTH_MODE=token` and either `RAY_AUTH_TOKEN=...` or the token in ~/.ray/auth_token.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import os
import shlex
import sys
import time
from pathlib import Path

from jobs.caption import CONFIG_ENV

ROOT = Path(__file__).resolve().parent.parent
EXCLUDES = [".venv", "build", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache", "out"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def submission_id(config_text: str, overrides: list[str], mode: str, now: dt.datetime | None = None) -> str:
    h = hashlib.sha256("\n".join([config_text, *overrides, mode]).encode()).hexdigest()[:12]
    sid = f"cogvlm-{mode}-{h}"
    if mode == "enrich":  # a scheduled run each hour is a new job; a retried submit is not
        sid += "-" + (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y%m%d%H")
    return sid


def entrypoint(mode: str, overrides: list[str]) -> str:
    return " ".join(["python", "-m", "jobs.caption", "--mode", mode, *map(shlex.quote, overrides)])


async def _stream(client, sid: str) -> None:
    async for lines in client.tail_job_logs(sid):
        print(lines, end="", flush=True)


def _status(client, sid: str) -> str | None:
    try:
        return str(client.get_job_status(sid)).split(".")[-1]
    except Exception:  # noqa: BLE001 - no such job
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                   help="Ray dashboard / job server address (default $RAY_ADDRESS)")
    p.add_argument("--config", required=True)
    p.add_argument("--mode", choices=["batch", "enrich"], default="batch")
    p.add_argument("--env", action="append", default=[], metavar="NAME",
                   help="copy this variable from the local environment into the job's")
    p.add_argument("--working-dir", default=str(ROOT))
    p.add_argument("--submission-id", default=None, help="override the deterministic id")
    p.add_argument("--no-wait", action="store_true", help="submit (or find) the job and return")
    p.add_argument("--agent-wait-s", type=float, default=120,
                   help="how long to retry while a freshly started head has no job agent yet")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    from ray.job_submission import JobSubmissionClient

    from pipeline.config import ConfigError, load_config

    try:  # a bad config is named here, before anything reaches the cluster
        load_config(a.config, list(a.overrides) + [f"mode={a.mode}"])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = Path(a.config).read_text()
    env_vars = {CONFIG_ENV: text}
    for name in a.env:
        if name not in os.environ:
            print(f"error: --env {name}: not set in this environment", file=sys.stderr)
            return 2
        env_vars[name] = os.environ[name]
    client = JobSubmissionClient(a.address)
    base = a.submission_id or submission_id(text, a.overrides, a.mode)
    sid, status, n = base, _status(client, base), 1
    while status in ("FAILED", "STOPPED"):
        n += 1
        sid = f"{base}-retry-{n}"
        status = _status(client, sid)
    if status == "SUCCEEDED":
        print(f"job {sid} already succeeded; nothing submitted")
        return 0
    if status is None:
        deadline = time.time() + a.agent_wait_s
        while True:
            try:
                client.submit_job(
                    entrypoint=entrypoint(a.mode, a.overrides), submission_id=sid,
                    runtime_env={"working_dir": a.working_dir, "excludes": EXCLUDES, "env_vars": env_vars},
                    metadata={"project": "cogvlm-ray", "mode": a.mode, "config": Path(a.config).name},
                )
                break
            except RuntimeError as e:  # a head that just started may not have its job agent yet
                if "No available agent" not in str(e) or time.time() > deadline:
                    raise
                time.sleep(2)
        print(f"submitted job {sid}", flush=True)
    else:
        print(f"job {sid} is already {status}; following it", flush=True)
    if a.no_wait:
        return 0
    asyncio.run(_stream(client, sid))
    while (status := _status(client, sid)) not in TERMINAL:
        time.sleep(1)
    print(f"job {sid}: {status}")
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
