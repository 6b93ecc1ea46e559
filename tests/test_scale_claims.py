"""Claims for a large backlog, against a real S3 server (moto): shards are claimed one by one as
they are asked for, a heartbeat round rewrites only the claims held (concurrently), two runs in
two processes split one backlog, released claims are gone, a dead run's claim is taken over, and
the keeper works as a Ray actor called from Ray tasks."""

from __future__ import annotations

import json
import multiprocessing
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import pytest

from pipeline.claims import BUSY, DONE, MINE, ClaimError, ClaimKeeper, Claims
from pipeline.config import InputConfig, RetryConfig, S3Config
from pipeline.listing import list_input
from pipeline.storage import filesystem, join, write_bytes_atomic

ROOT = Path(__file__).resolve().parent.parent
N_BACKLOG = 2000
TTL_S = 3000.0  # the heartbeat thread (every TTL/3) never beats during a test: rounds are called
RETRY = RetryConfig(deadline_s=20, backoff_s=0.1)


class CountingRelay:
    """A TCP relay on loopback in front of the S3 server that holds each request `delay_s`,
    records its first line, and how many requests it held at once at most."""

    def __init__(self, target_port: int, delay_s: float = 0.02) -> None:
        self.target = ("127.0.0.1", target_port)
        self.delay_s = delay_s
        self.requests: list[bytes] = []
        self.waiting = self.most_waiting = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.requests, self.most_waiting = [], 0

    def close(self) -> None:
        self._stop.set()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
        self._listener.close()

    def _pump(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        try:
            while data := src.recv(65536):
                if requests and data.split(b" ", 1)[0] in (b"GET", b"HEAD", b"PUT", b"POST", b"DELETE"):
                    with self._lock:
                        self.requests.append(data.split(b"\r\n", 1)[0])
                        self.waiting += 1
                        self.most_waiting = max(self.most_waiting, self.waiting)
                    time.sleep(self.delay_s)
                    with self._lock:
                        self.waiting -= 1
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass


def _client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                        aws_secret_access_key="testing", region_name="us-east-1")


@pytest.fixture(scope="module")
def backlog(s3_server):
    """A bucket with N_BACKLOG input shards `in/<00000..>.tar`; yields (bucket, endpoint, the
    shard ids as planning lists them)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    bucket = f"t-claims-{uuid.uuid4().hex[:8]}"
    _client(s3_server).create_bucket(Bucket=bucket)
    store = s3_backends[DEFAULT_ACCOUNT_ID]["global"]  # the server runs in this process: fill it directly
    for i in range(N_BACKLOG):
        store.put_object(bucket, f"in/{i:05d}.tar", b"x")
    shards = list_input(InputConfig(path=f"s3://{bucket}/in", format="webdataset"),
                        S3Config(endpoint_url=s3_server)).shards
    ids = [s.shard_id for s in shards]
    assert len(ids) == N_BACKLOG
    yield bucket, s3_server, ids


@pytest.fixture()
def out(backlog) -> str:
    """A fresh output prefix in the backlog's bucket."""
    return f"s3://{backlog[0]}/{uuid.uuid4().hex[:8]}/out"


def _claim_bodies(endpoint: str, out: str) -> dict[str, dict]:
    """shard id -> body of every claim object under `out`, read from the server."""
    bucket, prefix = out[len("s3://"):].split("/", 1)
    client = _client(endpoint)
    bodies = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/_claims/"):
        for o in page.get("Contents", []):
            sid = o["Key"].rsplit("/", 1)[-1][: -len(".json")]
            bodies[sid] = json.loads(client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read())
    return bodies


def _commit_marker(endpoint: str, out: str, shard_id: str, run_id: str) -> None:
    fs, root = filesystem(out, S3Config(endpoint_url=endpoint))
    write_bytes_atomic(fs, join(root, "_ledger", f"{shard_id}.json"), json.dumps({"run_id": run_id}).encode(),
                       tmp_root=root)


def test_shards_are_claimed_only_when_asked_for(backlog, out):
    _, endpoint, ids = backlog
    keeper = ClaimKeeper(out, S3Config(endpoint_url=endpoint), "run-a", TTL_S, RETRY)
    try:
        _commit_marker(endpoint, out, ids[7], "run-earlier")  # committed since the run listed
        asked = ids[:10] + ids[1500:1505]
        answers = {sid: keeper.claim(sid) for sid in asked}
        mine = [sid for sid in asked if sid != ids[7]]
        assert answers == {sid: (DONE if sid == ids[7] else MINE) for sid in asked}
        bodies = _claim_bodies(endpoint, out)
        assert sorted(bodies) == sorted(mine)  # 14 claim objects for a backlog of 2,000
        assert {b["run_id"] for b in bodies.values()} == {"run-a"}
        assert keeper.held() == sorted(mine)
        assert keeper.outcomes() == {MINE: mine, BUSY: [], DONE: [ids[7]]}
        for sid in mine[:5]:
            keeper.release(sid)
        assert sorted(_claim_bodies(endpoint, out)) == sorted(mine[5:])  # released claims are gone
        assert keeper.stats()["held"] == len(mine) - 5
    finally:
        keeper.close()
    assert _claim_bodies(endpoint, out) == {} and keeper.held() == []


def test_a_heartbeat_round_rewrites_only_the_claims_held_concurrently(backlog, out):
    _, endpoint, ids = backlog
    relay = CountingRelay(int(endpoint.rsplit(":", 1)[1]))
    keeper = ClaimKeeper(out, S3Config(endpoint_url=relay.url), "run-a", TTL_S, RETRY)
    other = ClaimKeeper(out, S3Config(endpoint_url=endpoint), "run-b", TTL_S, RETRY)
    try:
        mine, theirs = ids[100:120], ids[500:505]
        assert [keeper.claim(s) for s in mine] == [MINE] * 20
        assert [other.claim(s) for s in theirs] == [MINE] * 5
        before = _claim_bodies(endpoint, out)
        relay.reset()
        assert keeper.beat() == 20
        puts = [r for r in relay.requests if r.startswith(b"PUT ") and b"/_claims/" in r]
        assert len(puts) == 20 and all(any(f"/_claims/{s}.json".encode() in r for r in puts) for s in mine)
        assert relay.most_waiting > 1  # the claims were rewritten concurrently, not one by one
        after = _claim_bodies(endpoint, out)
        assert sorted(after) == sorted(before)
        assert all(after[s]["expires_at"] > before[s]["expires_at"] for s in mine)
        assert all(after[s] == before[s] for s in theirs)
        stats = keeper.stats()
        assert (stats["held"], stats["last_round_writes"], stats["rounds"]) == (20, 20, 1)
        for sid in mine[:5]:
            keeper.release(sid)
        assert keeper.beat() == 15 and keeper.stats()["rounds"] == 2
    finally:
        keeper.close()
        other.close()
        relay.close()


def test_a_claim_taken_over_is_dropped_from_the_next_round(backlog, out):
    _, endpoint, ids = backlog
    s3 = S3Config(endpoint_url=endpoint)
    fs, root = filesystem(out, s3)
    late = Claims(fs, root, "run-late", ttl_s=-1)  # its claims are born expired
    assert late.acquire(ids[0]) and late.acquire(ids[1])
    keeper = ClaimKeeper(out, s3, "run-a", TTL_S, RETRY)
    try:
        assert keeper.claim(ids[0]) == MINE
        assert late.refresh() == 1  # rewrites its ids[1]; finds ids[0] taken over
        assert late.holding() == [ids[1]]
        late.release(ids[0])  # nor does it delete the new owner's claim
        assert _claim_bodies(endpoint, out)[ids[0]]["run_id"] == "run-a"
    finally:
        keeper.close()
        late.release(ids[1])


def test_heartbeat_on_a_local_output(tmp_path):
    keeper = ClaimKeeper(str(tmp_path / "out"), S3Config(), "run-a", TTL_S, RETRY)
    try:
        ids = [f"{i:05d}" for i in range(12)]
        assert [keeper.claim(s) for s in ids] == [MINE] * 12
        before = {s: json.loads((tmp_path / "out" / "_claims" / f"{s}.json").read_text()) for s in ids}
        keeper.release(ids[0])
        assert keeper.beat() == 11
        after = {s: json.loads((tmp_path / "out" / "_claims" / f"{s}.json").read_text()) for s in ids[1:]}
        assert all(after[s]["expires_at"] > before[s]["expires_at"] for s in ids[1:])
        assert not (tmp_path / "out" / "_claims" / f"{ids[0]}.json").exists()
    finally:
        keeper.close()
    assert not list((tmp_path / "out" / "_claims").glob("*.json"))


def _split_worker(endpoint: str, out: str, run_id: str, ids: list[str], barrier, results) -> None:
    """One run: claim each shard in turn; for each one it gets, commit a marker and release it.
    It holds its first shard until the other run has one too, so both surely take part."""
    keeper = ClaimKeeper(out, S3Config(endpoint_url=endpoint), run_id, TTL_S, RETRY)
    mine: list[str] = []
    try:
        for sid in ids:
            if keeper.claim(sid) != MINE:
                continue
            if not mine:
                barrier.wait(120)
            _commit_marker(endpoint, out, sid, run_id)
            keeper.release(sid)
            mine.append(sid)
        results.put((run_id, mine, keeper.outcomes()))
    finally:
        keeper.close()


def test_two_runs_in_two_processes_split_one_backlog(backlog, out):
    _, endpoint, ids = backlog
    ids = ids[:200]
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_split_worker, args=(endpoint, out, f"run-{i}", ids, barrier, results))
             for i in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=300)[:2] for _ in procs)
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    a, b = set(got["run-0"]), set(got["run-1"])
    print(f"\nrun-0 took {len(a)} shards, run-1 {len(b)}, of {len(ids)}")
    assert a and b and not a & b and a | b == set(ids)
    fs, root = filesystem(out, S3Config(endpoint_url=endpoint))
    markers = {p.rsplit("/", 1)[-1][: -len(".json")] for p in fs.find(join(root, "_ledger"))}
    assert markers == set(ids)
    assert _claim_bodies(endpoint, out) == {}  # every claim was released


def test_a_dead_runs_claim_is_taken_over_and_a_live_ones_is_not(backlog, out):
    _, endpoint, ids = backlog
    s3 = S3Config(endpoint_url=endpoint)
    fs, root = filesystem(out, s3)
    assert Claims(fs, root, "run-expired", ttl_s=-1).acquire(ids[0])  # a run that stopped refreshing
    # a run whose process is gone (this machine), its claim not yet expired
    code = (f"from pipeline.claims import Claims; from pipeline.config import S3Config; "
            f"from pipeline.storage import filesystem; "
            f"fs, root = filesystem({out!r}, S3Config(endpoint_url={endpoint!r})); "
            f"assert Claims(fs, root, 'run-killed', ttl_s=600).acquire({ids[1]!r})")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
    live = Claims(fs, root, "run-live", ttl_s=600)
    assert live.acquire(ids[2])
    keeper = ClaimKeeper(out, s3, "run-a", TTL_S, RETRY)
    try:
        assert [keeper.claim(s) for s in ids[:3]] == [MINE, MINE, BUSY]
        bodies = _claim_bodies(endpoint, out)
        assert [bodies[s]["run_id"] for s in ids[:3]] == ["run-a", "run-a", "run-live"]
        assert keeper.outcomes() == {MINE: ids[:2], BUSY: [ids[2]], DONE: []}
    finally:
        keeper.close()
        live.release(ids[2])


def test_wait_busy_takes_the_shards_other_runs_let_go(backlog, out):
    _, endpoint, ids = backlog
    s3 = S3Config(endpoint_url=endpoint)
    fs, root = filesystem(out, s3)
    other = Claims(fs, root, "run-other", ttl_s=600)
    s1, s2 = ids[10], ids[11]
    assert other.acquire(s1) and other.acquire(s2)
    keeper = ClaimKeeper(out, s3, "run-a", TTL_S, RETRY)
    try:
        assert keeper.claim(s1) == BUSY and keeper.claim(s2) == BUSY
        result: list[list[str]] = []
        waiter = threading.Thread(target=lambda: result.append(keeper.wait_busy([s1, s2], poll_s=0.05)))
        waiter.start()
        other.release(s1)  # left uncommitted by the other run: this one takes it
        waiter.join(120)
        assert result == [[s1]] and keeper.held() == [s1]
        _commit_marker(endpoint, out, s2, "run-other")  # the other run commits its shard
        other.release(s2)
        assert keeper.wait_busy([s2], poll_s=0.05) == []
        assert keeper.outcomes() == {MINE: [s1], BUSY: [], DONE: [s2]}
    finally:
        keeper.close()


def test_a_store_that_keeps_failing_is_one_error_line(backlog):
    bucket, endpoint, ids = backlog
    with socket.socket() as s:  # a port nothing listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    keeper = ClaimKeeper(f"s3://{bucket}/out", S3Config(endpoint_url=dead, max_attempts=1), "run-a", TTL_S,
                         RetryConfig(deadline_s=1, backoff_s=0.1))
    try:
        with pytest.raises(ClaimError, match=f"could not claim shard {ids[0]} .*still failing") as e:
            keeper.claim(ids[0])
        assert "\n" not in str(e.value) and keeper.held() == []
    finally:
        keeper.close()
    with pytest.raises(ClaimError, match="closed"):  # nothing would refresh a claim made now
        keeper.claim(ids[0])


def test_the_keeper_as_a_ray_actor_answers_read_tasks(ray_cluster, backlog, out):
    import ray

    _, endpoint, ids = backlog
    s3 = S3Config(endpoint_url=endpoint)
    fs, root = filesystem(out, s3)
    live = Claims(fs, root, "run-live", ttl_s=600)
    assert live.acquire(ids[3])
    keeper = ray.remote(num_cpus=0, max_concurrency=32)(ClaimKeeper).remote(out, s3, "run-ray", TTL_S, RETRY)

    @ray.remote(num_cpus=0)
    def read(keeper, shard_id: str) -> str:
        return ray.get(keeper.claim.remote(shard_id))  # as a read task does before reading

    try:
        answers = ray.get([read.remote(keeper, s) for s in ids[:8]], timeout=120)
        assert answers == [BUSY if s == ids[3] else MINE for s in ids[:8]]
        mine = [s for s in ids[:8] if s != ids[3]]
        assert ray.get(keeper.held.remote()) == mine
        assert sorted(b for b, v in _claim_bodies(endpoint, out).items() if v["run_id"] == "run-ray") == mine
        assert ray.get(keeper.beat.remote()) == 7
        assert ray.get(keeper.stats.remote())["last_round_writes"] == 7
        ray.get(keeper.close.remote())
        assert sorted(_claim_bodies(endpoint, out)) == [ids[3]]
    finally:
        ray.kill(keeper)
        live.release(ids[3])
