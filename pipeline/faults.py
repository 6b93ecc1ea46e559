"""Fault hooks for the tests: real kills at chosen points, switched on by environment variables.

    COGVLM_FAULT_KILL_WORKER_ON="stage:key,..."   SIGKILL the Preprocess/Generate worker on that image
    COGVLM_WRITE_FAULT="<key>:<flag file>"        SIGKILL the first Generate worker that writes a part
                                                  holding <key>, right after the write
    COGVLM_KILL_AFTER_SHARDS=N                    SIGKILL the driver after its N-th commit
    COGVLM_FAULT_PAUSE="stage:seconds"            the stage's workers pause this long per batch
                                                  (slow work, so that a node dies mid-run)

Unset (as in every real run) each hook is one environment lookup. `worker_env()` forwards the set
ones to the stage workers (variables set in the driver after `ray.init` do not reach them).
"""

from __future__ import annotations

import os
import signal
from typing import Any

FAULT_ENV = "COGVLM_FAULT_KILL_WORKER_ON"
WRITE_FAULT_ENV = "COGVLM_WRITE_FAULT"
KILL_AFTER_ENV = "COGVLM_KILL_AFTER_SHARDS"
PAUSE_ENV = "COGVLM_FAULT_PAUSE"


def worker_env() -> dict[str, Any]:
    """Ray remote args that carry the set worker hooks to a stage's workers ({} when none is set)."""
    hooks = {k: os.environ[k] for k in (FAULT_ENV, WRITE_FAULT_ENV, PAUSE_ENV) if os.environ.get(k)}
    return {"runtime_env": {"env_vars": hooks}} if hooks else {}


def maybe_inject_fault(stage: str, key: str) -> None:
    """Die like a crashing decoder when FAULT_ENV names this stage and key."""
    spec = os.environ.get(FAULT_ENV)
    if spec and f"{stage}:{key}" in spec.split(","):
        os.kill(os.getpid(), signal.SIGKILL)


def pause_s(stage: str) -> float:
    """PAUSE_ENV's seconds for this stage (0: none)."""
    spec = os.environ.get(PAUSE_ENV, "")
    name, _, seconds = spec.partition(":")
    return float(seconds) if spec and name == stage else 0.0


def maybe_die_after_write(keys: list[str]) -> None:
    """WRITE_FAULT_ENV="<key>:<flag file>": the first worker to write a part holding <key> (the one
    that creates <flag file>) dies right after the write, before its record leaves, so Ray re-runs
    the batch and the images are written again into another part."""
    spec = os.environ.get(WRITE_FAULT_ENV)
    if not spec:
        return
    key, flag = spec.split(":", 1)
    if key not in keys:
        return
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def kill_after_commits() -> int:
    """KILL_AFTER_ENV's N (0: never)."""
    return int(os.environ.get(KILL_AFTER_ENV, "0") or 0)


def kill_driver() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
