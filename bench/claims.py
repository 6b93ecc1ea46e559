"""Shard claims at 100,000 shards, on a loopback S3 server (moto, in this process):

    python bench/claims.py [--shards 100000] [--in-progress 64] [--old-claims 1000] [--split 1000]

1. start-up: `list_input` of `in/<00000..>.tar`, the ledger listing of an empty output, then the
   first `ClaimKeeper.claim()` answering "mine": the time until the pipeline gets its first shard;
2. heartbeat: with all shards pending and `--in-progress` of them claimed, one round's writes and time;
3. old vs new: claiming `--old-claims` shards one after another up front (acquire + ledger check,
   as the old `_claim` did) and a sequential heartbeat round over them, per claim, and what that
   makes at `--shards` (labelled as extrapolated), against lazy claims and a concurrent round;
4. two runs in two processes claiming from one `--split`-shard backlog (claim, 20 ms of work, a
   ledger marker, release): shards per run and shards done twice.

The server runs in its own process, inputs and outputs in two buckets (moto scans a whole bucket
for every listing, where S3 seeks to the prefix). Times are of moto on this machine (its Python
answering one request at a time), not of AWS S3. Prints one table.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import socket
import sys
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for _k, _v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(_k, _v)  # loopback server only; set before the run processes start

from pipeline.claims import MINE, ClaimKeeper, Claims  # noqa: E402
from pipeline.config import InputConfig, RetryConfig, S3Config  # noqa: E402
from pipeline.ledger import Ledger  # noqa: E402
from pipeline.listing import list_input  # noqa: E402
from pipeline.storage import filesystem, join, list_files, write_bytes_atomic  # noqa: E402
from tests.test_scale_claims import CountingRelay  # noqa: E402

IN_BUCKET, OUT_BUCKET = "bench-in", "bench-out"
TTL_S = 600.0
RETRY = RetryConfig(deadline_s=60, backoff_s=0.2)
WORK_S = 0.02  # simulated processing of one shard in the two-run split


def serve(n: int, ready: Any, stop: Any) -> None:
    """The server process: moto on a free loopback port, with the two buckets and the input
    keys `in/<00000..>.tar` (1-byte bodies) put straight in its store (~100x faster than PUTs
    through HTTP); sends (endpoint, seconds to fill) and serves until `stop` is set."""
    import boto3
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    # quiet: moto's listing can fail (500, retried by the client) when a key is deleted meanwhile
    logging.getLogger("werkzeug").setLevel(logging.CRITICAL)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    client = boto3.client("s3", endpoint_url=endpoint)
    for bucket in (IN_BUCKET, OUT_BUCKET):
        client.create_bucket(Bucket=bucket)
    store = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    for i in range(n):
        store.put_object(IN_BUCKET, f"in/{i:05d}.tar", b"x")
    ready.put((endpoint, time.perf_counter() - t0))
    stop.wait()
    server.stop()


def timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def fresh_output() -> str:
    return f"s3://{OUT_BUCKET}/out-{uuid.uuid4().hex[:8]}"


def split_worker(endpoint: str, out: str, run_id: str, ids: list[str], barrier: Any, results: Any) -> None:
    """One run of the two-run split: claim the next shard (skipping busy and done ones), work,
    write its ledger marker, release; reports its shards and when it committed each."""
    keeper = ClaimKeeper(out, S3Config(endpoint_url=endpoint), run_id, TTL_S, RETRY)
    fs, root = filesystem(out, S3Config(endpoint_url=endpoint))
    mine: list[str] = []
    times: list[float] = []
    answers = {"mine": 0, "busy": 0, "done": 0}
    barrier.wait(300)
    t0 = time.time()
    try:
        for sid in ids:
            answer = keeper.claim(sid)
            answers[answer] += 1
            if answer != MINE:
                continue
            time.sleep(WORK_S)
            write_bytes_atomic(fs, join(root, "_ledger", f"{sid}.json"), json.dumps({"run_id": run_id}).encode())
            keeper.release(sid)
            mine.append(sid)
            times.append(time.time())
    finally:
        keeper.close()
    results.put({"run_id": run_id, "mine": mine, "start": t0, "commits": times, "answers": answers})


def two_runs(endpoint: str, ids: list[str]) -> dict[str, Any]:
    out = fresh_output()
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=split_worker, args=(endpoint, out, f"run-{i}", ids, barrier, results))
             for i in range(2)]
    for p in procs:
        p.start()
    runs = sorted((results.get(timeout=1800) for _ in procs), key=lambda r: r["run_id"])
    for p in procs:
        p.join(60)
    start = min(r["start"] for r in runs)
    end = max(r["commits"][-1] for r in runs if r["commits"])
    fs, root = filesystem(out, S3Config(endpoint_url=endpoint))
    markers = fs.find(join(root, "_ledger"))
    leftover = fs.find(join(root, "_claims"))
    return {"runs": runs, "wall_s": end - start, "twice": len(set(runs[0]["mine"]) & set(runs[1]["mine"])),
            "markers": len(markers), "claims_left": len(leftover), "start": start, "end": end}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=100_000)
    ap.add_argument("--in-progress", type=int, default=64)
    ap.add_argument("--old-claims", type=int, default=1000)
    ap.add_argument("--split", type=int, default=1000)
    ap.add_argument("--latency-ms", type=float, default=20.0, help="added per request in the latency rows")
    ap.add_argument("--compare-listing", action="store_true", help="also time list_files against the detailed listing")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=serve, args=(a.shards, ready, stop), daemon=True)
    server.start()
    endpoint, populate_s = ready.get(timeout=900)
    s3 = S3Config(endpoint_url=endpoint)
    rows: list[tuple[str, str, str]] = []
    try:
        rows.append(("setup: input keys put in the server's store", f"{a.shards:,} in {populate_s:.1f} s",
                     "not timed below"))

        # 1. start-up: plan -> ledger -> first claim
        plan, plan_s = timed(lambda: list_input(InputConfig(path=f"s3://{IN_BUCKET}/in", format="webdataset"), s3))
        out = fresh_output()
        fs, root = filesystem(out, s3)
        done, ledger_s = timed(lambda: Ledger(fs, root).done())
        pending = [s.shard_id for s in plan.shards if s.shard_id not in done]
        keeper, keeper_s = timed(lambda: ClaimKeeper(out, s3, "run-bench", TTL_S, RETRY))
        first, claim_s = timed(lambda: next(sid for sid in pending if keeper.claim(sid) == MINE))
        total = plan_s + ledger_s + keeper_s + claim_s
        rows += [("start-up: list_input (list + shard ids)", f"{plan_s:.2f} s", f"{len(plan.shards):,} shards"),
                 ("start-up: ledger listing (empty output)", f"{ledger_s:.3f} s", f"{len(pending):,} pending"),
                 ("start-up: ClaimKeeper + first claim() -> mine", f"{keeper_s + claim_s:.3f} s", f"shard {first}"),
                 ("start-up: total, to the first shard handed out", f"{total:.2f} s",
                  "target < 60 s: " + ("met" if total < 60 else "MISSED"))]
        if a.compare_listing:
            lfs, lroot = filesystem(f"s3://{IN_BUCKET}/in", s3)
            _, new_s = timed(lambda: list_files(lfs, lroot))
            lfs.invalidate_cache()
            _, old_s = timed(lambda: sorted(p for p, i in lfs.find(lroot, detail=True).items()
                                            if i.get("type") == "file" and not p.endswith("/")))
            rows.append(("listing: list_files names only / old detailed", f"{new_s:.2f} / {old_s:.2f} s", ""))

        # 2. heartbeat with every shard pending and N in progress
        taken = [first] + [sid for sid in pending[1:a.in_progress] if keeper.claim(sid) == MINE]
        writes, round_s = timed(keeper.beat)
        stats = keeper.stats()
        rows += [(f"heartbeat: PUTs per round, {len(pending):,} pending, {len(taken)} in progress",
                  f"{writes}", f"target = {len(taken)}: " + ("met" if writes == len(taken) == stats["held"] else
                                                               "MISSED")),
                 ("heartbeat: round wall time (16 threads)", f"{round_s:.3f} s",
                  f"ttl {TTL_S:.0f} s, every {keeper.interval_s:.0f} s")]
        keeper.close()

        # 3. old (all up front, sequential heartbeat) vs new (lazy, concurrent heartbeat)
        k = min(a.old_claims, len(pending))
        out = fresh_output()
        fs, root = filesystem(out, s3)
        ledger = Ledger(fs, root)
        old = Claims(fs, root, "run-old", TTL_S, threads=1)

        def claim_up_front() -> int:
            n = 0
            for sid in pending[:k]:
                if old.acquire(sid):
                    n += 1
                    if ledger.is_done(sid):
                        old.release(sid)
            return n

        _, up_front_s = timed(claim_up_front)
        per_claim = up_front_s / k
        old_writes, old_round_s = timed(old.refresh)
        new = Claims(fs, root, "run-old", TTL_S)  # the same claims, refreshed concurrently
        new.held = set(old.held)
        new_writes, new_round_s = timed(new.refresh)
        per_write = old_round_s / max(1, old_writes)
        rows += [(f"old: claim all up front, measured on k={k:,}", f"{up_front_s:.2f} s",
                  f"{per_claim * 1000:.1f} ms per claim"),
                 (f"old: claim all {len(pending):,} up front", f"{per_claim * len(pending) / 60:.1f} min",
                  f"extrapolated from k={k:,} claims"),
                 (f"old: sequential heartbeat round, measured on k={k:,}", f"{old_round_s:.2f} s",
                  f"{old_writes} PUTs, {per_write * 1000:.1f} ms per claim"),
                 (f"old: sequential round over all {len(pending):,}", f"{per_write * len(pending):.0f} s",
                  f"extrapolated from k={k:,} claims; ttl {TTL_S:.0f} s"),
                 (f"new: concurrent round over the same k={k:,}", f"{new_round_s:.2f} s",
                  f"{new_writes} PUTs, 16 threads"),
                 ("new: claims made up front", "0", f"first shard after {claim_s * 1000:.0f} ms of claiming")]
        for sid in list(old.held):
            old.release(sid)

        # the same rounds where each request waits like one to S3 (moto alone answers in a few ms,
        # its Python serving one request at a time, so threads cannot overlap much there)
        relay = CountingRelay(int(endpoint.rsplit(":", 1)[1]), delay_s=a.latency_ms / 1000)
        try:
            rfs, rroot = filesystem(fresh_output(), S3Config(endpoint_url=relay.url))
            seq = Claims(rfs, rroot, "run-latency", TTL_S, threads=1)
            for sid in pending[: a.in_progress]:
                seq.acquire(sid)
            conc = Claims(rfs, rroot, "run-latency", TTL_S)
            conc.held = set(seq.held)
            relay.reset()
            seq_writes, seq_s = timed(seq.refresh)
            seq_most = relay.most_waiting
            relay.reset()
            conc_writes, conc_s = timed(conc.refresh)
            rows += [(f"+{a.latency_ms:g} ms/request: sequential round, {len(seq.held)} claims", f"{seq_s:.2f} s",
                      f"{seq_writes} PUTs, at most {seq_most} request in flight"),
                     (f"+{a.latency_ms:g} ms/request: concurrent round, {len(conc.held)} claims", f"{conc_s:.2f} s",
                      f"{conc_writes} PUTs, at most {relay.most_waiting} requests in flight, {seq_s / conc_s:.1f}x")]
            for sid in list(seq.held):
                seq.release(sid)
        finally:
            relay.close()

        # 4. two runs split one backlog
        split = two_runs(endpoint, pending[: a.split])
        for r in split["runs"]:
            n = len(r["mine"])
            span = (r["commits"][-1] - split["start"]) / split["wall_s"] if r["commits"] else 0.0
            rows.append((f"split: {r['run_id']} shards of {a.split:,}", f"{n} ({n / a.split:.0%})",
                         f"busy answers {r['answers']['busy']}, done {r['answers']['done']}; "
                         f"last commit at {span:.0%} of the wall time"))
        both = all(len(r["mine"]) > 0.3 * a.split for r in split["runs"])
        rows += [("split: shards done twice", f"{split['twice']}",
                  "target 0: " + ("met" if split["twice"] == 0 else "MISSED")),
                 ("split: ledger markers / claims left", f"{split['markers']} / {split['claims_left']}",
                  f"expected {a.split} / 0"),
                 ("split: both runs busy (each > 30%)", "yes" if both else "no", f"wall {split['wall_s']:.1f} s, "
                  f"{WORK_S * 1000:.0f} ms of work per shard")]
    finally:
        stop.set()
        server.join(60)
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print(f"\n{'measure':<{w0}}  {'value':>{w1}}  note")
    for name, value, note in rows:
        print(f"{name:<{w0}}  {value:>{w1}}  {note}")


if __name__ == "__main__":
    main()
