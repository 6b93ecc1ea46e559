"""The deployment files in infra/: parsed and checked for what matters (they cannot be applied here)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline import load_config

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
MANIFESTS = sorted(INFRA.rglob("*.yaml"))

KNOWN = {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("ray.io/v1", "RayCronJob"),
         ("batch/v1", "CronJob"), ("v1", "ServiceAccount"), ("v1", "ConfigMap"),
         ("rbac.authorization.k8s.io/v1", "Role"), ("rbac.authorization.k8s.io/v1", "RoleBinding")}
SECRET_PATTERNS = [re.compile(p) for p in (r"AKIA[0-9A-Z]{16}", r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
                                           r"(?i)aws_secret_access_key\s*[:=]\s*\S+",
                                           r"(?i)ray_auth_token\s*[:=]\s*\S+")]


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_docs() -> list[dict]:
    out = []
    for p in MANIFESTS:
        for d in docs(p):
            out.append(d)
            if d.get("kind") == "ConfigMap":  # templates carried inside ConfigMaps
                for text in d.get("data", {}).values():
                    out += [x for x in yaml.safe_load_all(text) if x]
    return out


def walk(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")
    else:
        yield path, node


def rayjob_specs() -> list[dict]:
    specs = []
    for d in all_docs():
        if d.get("kind") == "RayJob":
            specs.append(d["spec"])
        elif d.get("kind") == "RayCronJob":
            specs.append(d["spec"]["jobTemplate"])
    return specs


def cluster_specs() -> list[dict]:
    out = [d["spec"] for d in all_docs() if d.get("kind") == "RayCluster"]
    return out + [s["rayClusterSpec"] for s in rayjob_specs()]


def test_every_manifest_parses_with_known_api_versions():
    assert {p.name for p in MANIFESTS} >= {"raycluster.yaml", "rayjob.yaml", "raycronjob.yaml",
                                           "cronjob-rayjob.yaml", "aws.yaml", "serviceaccount.yaml"}
    for p in MANIFESTS:
        for d in docs(p):
            if p.parent.name == "ray-up":
                assert d["provider"]["type"] == "aws"
                continue
            assert (d["apiVersion"], d["kind"]) in KNOWN, (p, d.get("apiVersion"), d.get("kind"))


def test_clusters_head_runs_no_work_and_gpu_group_asks_for_gpus():
    specs = cluster_specs()
    assert len(specs) >= 4
    for spec in specs:
        assert spec["rayVersion"] == "2.60.0" and spec["enableInTreeAutoscaling"] is True
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert set(groups) == {"cpu", "gpu"}
        for g in groups.values():
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        pod = groups["gpu"]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert "cuda" in pod["containers"][0]["image"]
        assert "nvidia.com/gpu" not in str(groups["cpu"])


def test_jobs_run_the_real_entrypoint_and_config_and_clean_up():
    specs = rayjob_specs()
    assert len(specs) == 3  # rayjob, raycronjob, and the CronJob's template
    for spec in specs:
        argv = shlex.split(spec["entrypoint"])
        assert argv[:3] == ["python", "-m", "jobs.caption"]
        assert (ROOT / "jobs" / "caption.py").exists()
        config = argv[argv.index("--config") + 1]
        assert (ROOT / config).exists(), config
        load_config(ROOT / config)  # the config it names is valid
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    scheduled = [d for d in all_docs() if d.get("kind") in ("RayCronJob", "CronJob")]
    assert {d["kind"] for d in scheduled} == {"RayCronJob", "CronJob"}
    for d in scheduled:
        assert d["spec"]["concurrencyPolicy"] == "Forbid" and d["spec"]["schedule"]
    enrich = [s for s in specs if "--mode enrich" in s["entrypoint"]]
    assert len(enrich) == 2


def test_ray_up_has_gpu_nodes_and_installs_like_the_readme():
    cfg = docs(INFRA / "ray-up" / "aws.yaml")[0]
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert any(t["resources"].get("GPU", 0) > 0 for t in types.values())
    assert any("requirements.lock" in c for c in cfg["setup_commands"])


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_images_install_like_the_readme_without_weights(name):
    text = (INFRA / "docker" / name).read_text()
    assert any(line.startswith("RUN make install") for line in text.splitlines())
    assert "requirements.lock" in (ROOT / "Makefile").read_text()  # the README's install
    for line in text.splitlines():
        if line.startswith("COPY"):
            src = line.split()[1]
            assert (ROOT / src).exists(), src
            assert "safetensors" not in line and "build" not in src
        assert not re.match(r"ENV .*(AWS_|TOKEN|SECRET)", line)
    base = next(line for line in text.splitlines() if line.startswith("FROM"))
    assert ("cuda" in base) == (name == "Dockerfile.cuda")


def test_no_secret_values_anywhere_in_infra():
    for p in sorted(INFRA.rglob("*")):
        if p.is_file():
            text = p.read_text()
            for pat in SECRET_PATTERNS:
                assert not pat.search(text), (p, pat.pattern)
    for d in all_docs():
        for path, value in walk(d):
            if re.search(r"\.env\[\d+\]\.name$", path) and re.search(r"(?i)key|secret|token|password", str(value)):
                env_entry = path.rsplit(".name", 1)[0]
                assert f"{env_entry}.value" not in dict(walk(d)), f"secret-looking env {value} has a value"
