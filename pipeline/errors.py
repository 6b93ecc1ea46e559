"""The error taxonomy: row statuses, transient vs permanent failures, one-line messages, retries.

A *permanent* failure belongs to the input (bad bytes, a missing file, no access): it becomes the
row's final status. A *transient* failure belongs to the moment (network, throttling, timeouts,
out of memory): it is retried with backoff and, if it persists, the row gets TRANSIENT, which is
never committed: its shard is left for the rerun.

The exceptions that end a job live here too (every layer raises them, `jobs/` maps them to exit
codes): `InputError`, `JobError`, `RunStopped`, `IncompleteRun`.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import time
from typing import Callable, Iterator, TypeVar

log = logging.getLogger("pipeline")

# --- row statuses -------------------------------------------------------------------------------
OK = "ok"
DECODE_ERROR = "decode_error"  # the bytes are not a decodable image
IMAGE_TOO_LARGE = "image_too_large"  # declared pixels or file bytes over the limits
READ_ERROR = "read_error"  # missing file, refused URI, sample without image, broken shard
PROMPT_TOO_LONG = "prompt_too_long"
GENERATION_ERROR = "generation_error"
NO_QUESTIONS = "no_questions"
WORKER_DIED = "worker_died"  # the image killed its worker process again and again
TRANSIENT = "transient_error"  # internal: retries ran out; the shard is not committed
DOWNLOAD_ERROR = "download_error"  # img2dataset could not download the URL (its error_message says why)

FINAL_STATUSES = (OK, DECODE_ERROR, IMAGE_TOO_LARGE, READ_ERROR, PROMPT_TOO_LONG, GENERATION_ERROR,
                  NO_QUESTIONS, WORKER_DIED, DOWNLOAD_ERROR)

# --- classification -----------------------------------------------------------------------------
_TRANSIENT_CODES = {
    "Throttling", "ThrottlingException", "ThrottledException", "SlowDown", "RequestTimeout",
    "RequestTimeoutException", "RequestLimitExceeded", "TooManyRequestsException", "InternalError",
    "ServiceUnavailable", "PriorRequestNotComplete", "ProvisionedThroughputExceededException",
    "500", "502", "503", "504", "429", "408",
}
_TRANSIENT_ERRNOS = {errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN, errno.EBUSY,
                     errno.EPIPE, getattr(errno, "EREMOTEIO", 121)}
_TRANSIENT_NAMES = {
    # botocore / aiobotocore / aiohttp / fsspec names, matched by class name so that this module
    # imports none of them (read tasks stay light) and a missing optional package is no problem
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "HTTPClientError", "ProxyConnectionError", "ResponseStreamingError", "IncompleteReadError",
    "ClientConnectionError", "ClientConnectorError", "ServerDisconnectedError", "ClientOSError",
    "ServerTimeoutError", "ClientPayloadError", "FSTimeoutError", "OutOfMemoryError",
    "IncompleteRead", "ProtocolError", "ResponseParserError", "ChunkedEncodingError",
    "RemoteDisconnected",
    # Ray: the process, node or object an operation needed went away (a lost node, a killed
    # worker); the work is redone elsewhere, it is never the input's answer
    "RayActorError", "ActorDiedError", "ActorUnavailableError", "NodeDiedError", "ObjectLostError",
    "OwnerDiedError", "WorkerCrashedError", "LocalRayletDiedError", "ObjectFetchTimedOutError",
}


class TransientError(RuntimeError):
    """A failure that may pass: retried with backoff, and never committed as a final answer."""


# --- what ends a job (jobs.caption: exit 2 for InputError / JobError, 1 RunStopped, 3 IncompleteRun)

class InputError(ValueError):
    """The input cannot be read at all (missing prefix, no shards, wrong columns)."""


class JobError(RuntimeError):
    """The job cannot run as configured (resources, output, checkpoint), or stopped; one line."""


class RunStopped(JobError):
    """The run stopped after work began (store down, error guard, pipeline failure); what was
    committed is kept and a rerun resumes."""


class StoppedShort(RunStopped):
    """The run stopped taking work for a condition that passes (no nodes, the output store down):
    what it committed stays, the other shards are left for a rerun (exit 3). `rerun_when` ends the
    one-line message: when a rerun will finish them."""

    rerun_when = "to finish them"


class NoNodes(StoppedShort):
    """No node of the cluster could run the stages for longer than `model.wait_for_nodes_s`."""

    rerun_when = "when the cluster has nodes for the stages to finish them"


class OutputDown(StoppedShort):
    """Commits in a row failed transiently past `retry.deadline_s`: the output store is down."""

    rerun_when = "when the output store answers again to finish them"


class IncompleteRun(RunStopped):
    """Some shards were left uncommitted (transient failures after retries): rerun to finish."""

    def __init__(self, message: str, summary: dict) -> None:
        super().__init__(message)
        self.summary = summary


# a listing or a file's metadata read (small, idempotent) is retried this long, whatever the
# job's retry.deadline_s, which is meant for whole shard reads and commits
METADATA_DEADLINE_S = 30.0


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def error_code(exc: BaseException) -> str | None:
    """The service's error code (S3 `Error.Code`, else the HTTP status) anywhere in the chain."""
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = (response.get("Error") or {}).get("Code")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if code or status:
                return str(code or status)
    return None


def root_cause(exc: BaseException) -> BaseException:
    """The exception a Ray task or actor raised, unwrapped from Ray's wrappers (RayTaskError keeps
    it as `.cause`), so that a run's last line names a full disk, not a Ray traceback."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            exc = cause
            continue
        break
    return exc


def is_transient(exc: BaseException) -> bool:
    """True for network, throttling, timeout and out-of-memory failures (anywhere in the chain)."""
    code = error_code(exc)
    if code is not None:
        return code in _TRANSIENT_CODES
    for e in _chain(exc):
        if isinstance(e, TransientError):
            return True
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        if isinstance(e, (TimeoutError, ConnectionError, MemoryError)):
            return True
        if any(c.__name__ in _TRANSIENT_NAMES for c in type(e).__mro__):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        if isinstance(e, RuntimeError) and "out of memory" in str(e).lower():  # CUDA / allocator OOM
            return True
    return False


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")  # terminal colours (Ray's), cursor codes
_OBJECT_REPR = re.compile(r"\s*<[^<>]*? (?:object )?at 0x[0-9a-fA-F]+>")
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^\s'\"<>]*@")


def redact(text: str) -> str:
    """Drop `user:secret@` from every URL in `text` (secrets may hold `/` and `@`)."""
    return _USERINFO.sub(r"\1***@", text)


_FULL = re.compile(r"No space left on device|\[Errno 28\]|Disk quota exceeded|\[Errno 122\]")


def is_disk_full(exc: BaseException) -> bool:
    """Whether a full disk (or quota) caused `exc`: ENOSPC/EDQUOT in the chain, or named in a
    message (a Ray task's error keeps only the text of what it wrapped)."""
    return any((isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or _FULL.search(str(e))
               for e in _chain(exc))


def describe(exc: BaseException) -> str:
    """`Type: message` on one line: no object addresses, no credentials, no working directory,
    no terminal colour codes; a full disk says so first."""
    msg = str(exc) or (str(exc.args[0]) if exc.args else "")
    msg = _ANSI.sub("", msg)
    msg = _OBJECT_REPR.sub("", msg)
    cwd = os.getcwd()
    if len(cwd) > 1:
        msg = msg.replace(cwd + os.sep, "")
    msg = redact(" ".join(msg.split()))
    if len(msg) > 500:
        msg = msg[:500] + "..."
    code = error_code(exc)
    name = type(exc).__name__
    if code and code not in msg:
        name += f" [{code}]"
    text = f"{name}: {msg}" if msg else name
    return f"the disk is full ({text})" if is_disk_full(exc) and "the disk is full" not in text else text


# --- retries ------------------------------------------------------------------------------------
T = TypeVar("T")


def retry(fn: Callable[[], T], what: str, deadline_s: float, backoff_s: float = 0.5,
          max_backoff_s: float = 15.0) -> T:
    """Call `fn` until it succeeds, retrying transient failures with jittered exponential backoff
    for up to `deadline_s`; then raise TransientError. Permanent failures are raised at once.

    botocore already retries single requests (standard mode, see storage.s3_options); this loop
    is for whole operations that a request-level retry cannot resume (a tar streamed from its
    start, a commit of several objects) and for outages longer than botocore's few seconds.
    """
    start = time.monotonic()
    wait = backoff_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            if not is_transient(e):
                raise
            left = deadline_s - (time.monotonic() - start)
            if left <= 0:
                raise TransientError(f"{what}: still failing after {attempt} attempts in "
                                     f"{time.monotonic() - start:.0f} s: {describe(e)}") from e
            pause = min(left, wait * (0.5 + random.random()))
            log.warning("%s: transient failure (attempt %d), retrying in %.1f s: %s", what, attempt, pause,
                        describe(e))
            time.sleep(pause)
            wait = min(max_backoff_s, wait * 2)
