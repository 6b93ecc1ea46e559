"""Submit the caption job to a Ray cluster, stream its logs, exit non-zero if it fails.

    python -m jobs.submit --config my.yaml [key=value ...] [--address http://HEAD:8265]
        [--mode enrich] [--env AWS_ACCESS_KEY_ID --env AWS_SECRET_ACCESS_KEY] [--no-wait]
    python -m jobs.submit --demo        # jobs.demo on the cluster (its tiny checkpoint built there)

The config travels in the job's runtime environment (`COGVLM_JOB_CONFIG`), the repository as its
working directory. `--env NAME` copies NAME from your environment into the job's (values are
never printed); prefer cluster-side credentials (pod/instance roles) where you can.

Before a new job it submits a probe (`python -c "import jobs.caption"`, a few seconds) and stops
with one line if the cluster's Python lacks the project's dependencies (torch, ...).

The submission id is deterministic: `cogvlm-<mode>-<hash of config, overrides>`, so re-running
this command attaches to the job already running, or reports the one that already succeeded,
instead of starting a second. Enrich adds a hash of the pending shards (listed here from the
input and the ledger): a run after new shards landed is a new job at any time, a concurrent
submit over the same pending shards follows the first, and nothing is submitted when nothing is
pending. Where this machine cannot list the input (no access, or relative local paths), every
enrich submit is a new job and the job itself finds what is pending. After a failed or stopped
job it submits `<id>-retry-N`; the job's own ledger makes the retry resume rather than redo.

Clusters with token authentication (all of infra/'s) need the token on this side:
`export RAY_AUTH_MODE=token` and either `RAY_AUTH_TOKEN=...` or the token in ~/.ray/auth_token.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import os
import re
import shlex
import sys
import time
from pathlib import Path

from jobs.caption import CONFIG_ENV

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "jobs" / "configs" / "demo.yaml"
EXCLUDES = [".venv", "build", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache", "out"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
PROBE = "python -c 'import jobs.caption'"  # the project's imports, as the job's entrypoint runs them


class SubmitError(Exception):
    """Said in one line; nothing (more) was submitted."""


def submission_id(config_text: str, overrides: list[str], mode: str, pending: list[str] | None = None,
                  now: dt.datetime | None = None) -> str:
    """`cogvlm-<mode>-<config hash>`; enrich adds the pending shards' hash (`p...`), or, when they
    could not be listed here (`pending` None), the time (a new job each submit)."""
    h = hashlib.sha256("\n".join([config_text, *overrides, mode]).encode()).hexdigest()[:12]
    sid = f"cogvlm-{mode}-{h}"
    if mode == "enrich":
        if pending is None:
            sid += "-t" + (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y%m%dT%H%M%S%f")
        else:
            sid += "-p" + hashlib.sha256("\n".join(sorted(pending)).encode()).hexdigest()[:12]
    return sid


def entrypoint(mode: str, overrides: list[str], demo: bool = False) -> str:
    if demo:
        return " ".join(["python", "-m", "jobs.demo", *map(shlex.quote, overrides)])
    return " ".join(["python", "-m", "jobs.caption", "--mode", mode, *map(shlex.quote, overrides)])


def pending_shards(cfg) -> list[str] | None:
    """The ids of the input's shards without a ledger marker, listed from here; None when this
    machine cannot see what the job will see (relative local paths, no access)."""
    from pipeline.errors import describe
    from pipeline.preflight import prepare

    local = [p for p in (cfg.input.path, cfg.output.path) if "://" not in p]
    if any(not os.path.isabs(os.path.expanduser(p)) for p in local):
        print("note: input.path or output.path is a relative local path, so the pending shards are not "
              "listed here; submitting a new enrich job (it finds what is pending itself)", flush=True)
        return None
    try:
        prepared = prepare(cfg, writable=False)
    except Exception as e:  # noqa: BLE001 - the job lists for itself
        print(f"note: could not list the pending shards from here ({describe(e)}); submitting a new "
              f"enrich job (it finds what is pending itself)", flush=True)
        return None
    if prepared.ledger_error:
        print(f"note: could not read the ledger from here ({prepared.ledger_error}); submitting a new "
              f"enrich job", flush=True)
        return None
    # every pass of the output's tasks (README "Adding a task") counts: its shards left
    return [s.shard_id + (f"+{one.layout.tasks_pass}" if one.layout.tasks_pass else "")
            for one in prepared.pass_runs() for s in one.pending]


async def _stream(client, sid: str) -> None:
    async for lines in client.tail_job_logs(sid):
        print(lines, end="", flush=True)


def _status(client, sid: str) -> str | None:
    from ray.exceptions import AuthenticationError

    try:
        return str(client.get_job_status(sid)).split(".")[-1]
    except AuthenticationError:
        raise
    except Exception:  # noqa: BLE001 - no such job
        return None


def _submit(client, agent_wait_s: float, **kwargs) -> str:
    deadline = time.time() + agent_wait_s
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as e:  # a head that just started may not have its job agent yet
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


def probe(client, runtime_env: dict, agent_wait_s: float, timeout_s: float = 300) -> None:
    """Run the project's imports on the cluster, as the job would; SubmitError if they fail."""
    pid = _submit(client, agent_wait_s, entrypoint=PROBE, runtime_env=runtime_env,
                  metadata={"project": "cogvlm-ray", "probe": "imports"})
    deadline = time.time() + timeout_s
    while (status := _status(client, pid)) not in TERMINAL:
        if time.time() > deadline:
            raise SubmitError(f"the probe job {pid} did not finish in {timeout_s:.0f} s (is the cluster busy?)")
        time.sleep(0.5)
    if status == "SUCCEEDED":
        return
    logs = client.get_job_logs(pid)
    m = re.search(r"No module named '([^']+)'", logs)
    fix = ("start Ray from the project's environment (`.venv/bin/ray start --head` after `make install`), "
           "use the project's image (infra/docker/), or install requirements.lock into the cluster's Python")
    if m:
        raise SubmitError(f"the cluster's Python cannot import {m.group(1).split('.')[0]!r} (a dependency of "
                          f"this project): {fix}; nothing submitted")
    if re.search(r"python: (command )?not found", logs):
        raise SubmitError(f"the cluster has no `python` on its PATH: {fix}; nothing submitted")
    last = [ln for ln in logs.strip().splitlines() if ln.strip()][-1:] or [status]
    raise SubmitError(f"the probe job {pid} ({PROBE}) failed on the cluster: {last[0][:300]}; nothing submitted")


def auth_hint(address: str) -> str:
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return (f"{address} requires token authentication: export RAY_AUTH_MODE=token, with the cluster's "
                f"token in ~/.ray/auth_token or RAY_AUTH_TOKEN (`ray get-auth-token` on the head prints it)")
    return (f"{address} did not accept this machine's token: put the cluster's token "
            f"(`ray get-auth-token` on the head) in ~/.ray/auth_token or RAY_AUTH_TOKEN")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                   help="Ray dashboard / job server address (default $RAY_ADDRESS)")
    p.add_argument("--config", default=None, help="the job's YAML config (required unless --demo)")
    p.add_argument("--demo", action="store_true",
                   help="run jobs.demo on the cluster: builds its tiny checkpoint where the job runs")
    p.add_argument("--mode", choices=["batch", "enrich"], default="batch")
    p.add_argument("--add-tasks", action="store_true",
                   help="add the config's new tasks to the existing output (same as output.add_tasks=true)")
    p.add_argument("--env", action="append", default=[], metavar="NAME",
                   help="copy this variable from the local environment into the job's")
    p.add_argument("--working-dir", default=str(ROOT))
    p.add_argument("--submission-id", default=None, help="override the deterministic id")
    p.add_argument("--no-wait", action="store_true", help="submit (or find) the job and return")
    p.add_argument("--no-probe", action="store_true", help="skip the check of the cluster's Python")
    p.add_argument("--agent-wait-s", type=float, default=120,
                   help="how long to retry while a freshly started head has no job agent yet")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    if a.demo == (a.config is not None):
        p.error("give --config FILE or --demo")
    if a.demo and a.mode != "batch":
        p.error("--demo runs in batch mode")
    if a.add_tasks:  # travels to the job as an override
        a.overrides = [*a.overrides, "output.add_tasks=true"]
    try:
        return _main(a)
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(a: argparse.Namespace) -> int:
    import logging

    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    from pipeline.config import ConfigError, load_config

    for name in ("ray", "ray.dashboard.modules.dashboard_sdk"):  # packaging chatter (the job's logs still stream)
        logging.getLogger(name).setLevel(logging.ERROR)

    config_path = DEMO_CONFIG if a.demo else Path(a.config)
    try:  # a bad config is named here, before anything reaches the cluster
        cfg = load_config(str(config_path), list(a.overrides) + [f"mode={a.mode}"])
    except ConfigError as e:
        raise SubmitError(e) from None
    text = config_path.read_text()
    env_vars = {} if a.demo else {CONFIG_ENV: text}
    for name in a.env:
        if name not in os.environ:
            raise SubmitError(f"--env {name}: not set in this environment")
        env_vars[name] = os.environ[name]
    try:
        client = JobSubmissionClient(a.address)
        pending = pending_shards(cfg) if a.mode == "enrich" and not a.submission_id else None
        if pending == []:
            print("nothing pending: every input shard is in the ledger; nothing submitted")
            return 0
        base = a.submission_id or submission_id(text, a.overrides, "demo" if a.demo else a.mode, pending)
        return _follow_or_submit(a, client, base, env_vars)
    except AuthenticationError:
        raise SubmitError(auth_hint(a.address)) from None
    except ConnectionError as e:
        raise SubmitError(f"no Ray job server answers at {a.address} ({e}); set --address or RAY_ADDRESS "
                          f"to the head's dashboard address (port 8265)") from None


def _follow_or_submit(a: argparse.Namespace, client, base: str, env_vars: dict[str, str]) -> int:
    sid, status, n = base, _status(client, base), 1
    while status in ("FAILED", "STOPPED"):
        n += 1
        sid = f"{base}-retry-{n}"
        status = _status(client, sid)
    if status == "SUCCEEDED":
        print(f"job {sid} already succeeded; nothing submitted")
        return 0
    if status is None:
        code = {"working_dir": a.working_dir, "excludes": EXCLUDES}
        if not a.no_probe:
            probe(client, code, a.agent_wait_s)
        _submit(client, a.agent_wait_s,
                entrypoint=entrypoint(a.mode, a.overrides, a.demo), submission_id=sid,
                runtime_env={**code, "env_vars": env_vars},
                metadata={"project": "cogvlm-ray", "mode": "demo" if a.demo else a.mode,
                          "config": DEMO_CONFIG.name if a.demo else Path(a.config).name})
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
