"""Shared fixtures: tiny random release-format checkpoints, a loopback S3 server, a local Ray."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# test-only credentials for the loopback S3 server; set before Ray starts so workers inherit them
for _k, _v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(_k, _v)

torch.manual_seed(0)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def ckpt_v1(tmp_path_factory) -> Path:
    from cogvlm.tiny import write_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "tiny-v1"
    write_checkpoint(out, version=1, shards=2, seed=1)
    return out


@pytest.fixture(scope="session")
def tokenizer_v1(ckpt_v1) -> Path:
    return ckpt_v1.parent / "tiny-v1-tokenizer"


@pytest.fixture(scope="session")
def ckpt_v2(tmp_path_factory) -> Path:
    from cogvlm.tiny import write_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "tiny-v2"
    write_checkpoint(out, version=2, shards=1, seed=2)
    return out


@pytest.fixture(scope="session")
def model_v1(ckpt_v1):
    from cogvlm import load_model

    return load_model(ckpt_v1, dtype=torch.float32)


@pytest.fixture(scope="session")
def model_v2(ckpt_v2):
    from cogvlm import load_model

    return load_model(ckpt_v2, dtype=torch.float32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto in server mode) on loopback; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    for k, v in S3_CREDENTIALS.items():
        os.environ.setdefault(k, v)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture()
def s3_bucket(s3_server, request):
    """A fresh bucket per test; yields (bucket name, endpoint URL)."""
    import boto3

    slug = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:40].strip("-")
    name = f"t-{slug}-{free_port()}"
    client = boto3.client("s3", endpoint_url=s3_server, **_boto_creds())
    client.create_bucket(Bucket=name)
    yield name, s3_server


def _boto_creds() -> dict:
    return {"aws_access_key_id": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_CREDENTIALS["AWS_DEFAULT_REGION"]}


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole run (init ~4 s); yields its GCS address."""
    import ray

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # CPU model actors share the cores
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
