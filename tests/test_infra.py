"""The deployment files in infra/, checked as an API server would check them (they cannot be
applied here): KubeRay objects against the v1.7.0 CRD schemas and Kubernetes objects against
the strict 1.31 schemas, unknown fields being errors; `ray up` against Ray's own schema; the
launcher script run for real on every terminal state."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline import load_config

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
MANIFESTS = sorted(INFRA.rglob("*.yaml"))
CRDS = ROOT / "tests" / "assets" / "kuberay-v1.7.0"  # see its README: source and licence

KNOWN = {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("ray.io/v1", "RayCronJob"),
         ("batch/v1", "CronJob"), ("v1", "ServiceAccount"), ("v1", "ConfigMap"),
         ("rbac.authorization.k8s.io/v1", "Role"), ("rbac.authorization.k8s.io/v1", "RoleBinding")}
SECRET_PATTERNS = [re.compile(p) for p in (r"AKIA[0-9A-Z]{16}", r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
                                           r"(?i)aws_secret_access_key\s*[:=]\s*\S+",
                                           r"(?i)ray_auth_token\s*[:=]\s*(?![$.<])\S+")]  # not `=$(...)`


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kube_docs() -> list[dict]:
    return [d for p in MANIFESTS if p.parent.name == "kuberay" for d in docs(p)]


def all_docs() -> list[dict]:
    """Every Kubernetes object, and the RayJob templates carried inside ConfigMaps."""
    out = []
    for d in kube_docs():
        out.append(d)
        if d.get("kind") == "ConfigMap":
            for key, text in d.get("data", {}).items():
                if key.endswith(".yaml"):
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


# --- schemas ---------------------------------------------------------------------------------------

def _strict(schema):
    """A structural schema with unknown fields as errors: an API server prunes them silently
    (or `kubectl apply` rejects them); either way they never reach the operator."""
    if isinstance(schema, dict):
        s = {k: _strict(v) for k, v in schema.items()}
        if "properties" in s and "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
        return s
    if isinstance(schema, list):
        return [_strict(x) for x in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, jsonschema.Draft7Validator]:
    out = {}
    for f in sorted(CRDS.glob("*.json")):
        crd = json.loads(f.read_text())
        out[crd["kind"]] = jsonschema.Draft7Validator(_strict(crd["openAPIV3Schema"]))
    assert set(out) == {"RayCluster", "RayJob", "RayCronJob"}
    return out


def _crd_errors(validators, doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validators[doc["kind"]].iter_errors(doc)]


def _k8s_errors(doc: dict) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, "1.31.0", strict=True)
    except kubernetes_validate.ValidationError as e:
        return [str(e)]
    return []


def test_every_manifest_parses_with_known_api_versions():
    assert {p.name for p in MANIFESTS} >= {"raycluster.yaml", "rayjob.yaml", "raycronjob.yaml",
                                           "cronjob-rayjob.yaml", "aws.yaml", "serviceaccount.yaml"}
    for p in MANIFESTS:
        for d in docs(p):
            if p.parent.name == "ray-up":
                assert d["provider"]["type"] == "aws"
                continue
            assert (d["apiVersion"], d["kind"]) in KNOWN, (p, d.get("apiVersion"), d.get("kind"))


def test_kuberay_objects_match_the_v1_7_crds_with_unknown_fields_as_errors(crd_validators):
    ray = [d for d in all_docs() if d["apiVersion"] == "ray.io/v1"]
    assert {d["kind"] for d in ray} == {"RayCluster", "RayJob", "RayCronJob"} and len(ray) == 4
    for d in ray:
        assert not _crd_errors(crd_validators, d), (d["kind"], d["metadata"], _crd_errors(crd_validators, d))
    # the check has teeth: a field the CRD lacks, at the top or deep in a pod template, fails it
    cron = copy.deepcopy(next(d for d in ray if d["kind"] == "RayCronJob"))
    cron["spec"]["concurrencyPolicy"] = "Forbid"
    assert any("concurrencyPolicy" in e for e in _crd_errors(crd_validators, cron))
    job = copy.deepcopy(next(d for d in ray if d["kind"] == "RayJob"))
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePullPolicey"] = "x"
    assert any("imagePullPolicey" in e for e in _crd_errors(crd_validators, job))


def test_kubernetes_objects_pass_strict_1_31_schemas():
    core = [d for d in kube_docs() if d["apiVersion"] != "ray.io/v1"]
    assert {d["kind"] for d in core} == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"}
    for d in core:
        assert not _k8s_errors(d), (d["kind"], _k8s_errors(d))
    bad = copy.deepcopy(next(d for d in core if d["kind"] == "CronJob"))
    bad["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["commmand"] = ["x"]
    assert _k8s_errors(bad)


# --- what every cluster must have -----------------------------------------------------------------

def test_clusters_are_authenticated_head_runs_no_work_gpu_group_asks_for_gpus():
    specs = cluster_specs()
    assert len(specs) == 4  # raycluster, rayjob, raycronjob, the launcher's template
    for spec in specs:
        assert spec["authOptions"] == {"mode": "token"}  # KubeRay >= 1.5.2 generates the token
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


def test_every_gpu_group_is_the_one_definition_with_cache_and_node_selector():
    """One GPU group, identical in every manifest: the model cache on an emptyDir at the job
    config's `model.cache_dir`, /dev/shm, a node selector for GPUs with enough memory, and as
    many workers as the job config asks replicas."""
    cfg = load_config(ROOT / "jobs" / "configs" / "cluster.yaml")
    groups = [next(g for g in s["workerGroupSpecs"] if g["groupName"] == "gpu") for s in cluster_specs()]
    assert all(g == groups[0] for g in groups[1:]), "the GPU groups of the manifests differ"
    gpu = groups[0]
    pod = gpu["template"]["spec"]
    assert pod["nodeSelector"]["nvidia.com/gpu.product"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["model-cache"] == cfg.model.cache_dir and "emptyDir" in volumes["model-cache"]
    assert mounts["dshm"] == "/dev/shm" and volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert gpu["maxReplicas"] >= cfg.model.max_replicas * cfg.model.gpus_per_replica


def test_every_image_is_pinned():
    images = [v for d in all_docs() for path, v in walk(d) if path.endswith(".image")]
    bases = [line.split()[1] for f in (INFRA / "docker").glob("Dockerfile.*")
             for line in f.read_text().splitlines() if line.startswith("FROM")]
    assert len(images) >= 9 and len(bases) == 2
    for ref in images + bases:
        name, _, tag = ref.rpartition(":") if "@" not in ref else (ref, ":", "digest")
        assert name and tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), ref
    assert "bitnami" not in " ".join(images)


# --- jobs and schedules ---------------------------------------------------------------------------

def test_jobs_run_the_real_entrypoint_and_config_and_clean_up():
    specs = rayjob_specs()
    assert len(specs) == 3  # rayjob, raycronjob, and the CronJob's template
    for spec in specs:
        argv = shlex.split(spec["entrypoint"])
        assert argv[:3] == ["python", "-m", "jobs.caption"]
        config = argv[argv.index("--config") + 1]
        assert (ROOT / config).exists(), config
        load_config(ROOT / config)  # the config it names is valid
        assert "RAY_DATA_DISABLE_PROGRESS_BARS" in spec["runtimeEnvYAML"]
        if "deletionStrategy" in spec:  # KubeRay: mutually exclusive with the two below
            assert "shutdownAfterJobFinishes" not in spec and "ttlSecondsAfterFinished" not in spec
        else:
            assert spec["shutdownAfterJobFinishes"] is True
    enrich = [s for s in specs if "--mode enrich" in s["entrypoint"]]
    assert len(enrich) == 2


def test_raycronjob_deletes_its_rayjobs_after_every_outcome():
    cron = next(d for d in all_docs() if d["kind"] == "RayCronJob")
    assert set(cron["spec"]) <= {"schedule", "jobTemplate", "suspend", "timeZone"}
    rules = cron["spec"]["jobTemplate"]["deletionStrategy"]["deletionRules"]
    self_deleted = {tuple(sorted(r["condition"].items() - {("ttlSeconds", r["condition"].get("ttlSeconds"))}))
                    for r in rules if r["policy"] == "DeleteSelf"}
    assert self_deleted == {(("jobStatus", "SUCCEEDED"),), (("jobStatus", "FAILED"),),
                            (("jobDeploymentStatus", "Failed"),)}
    for r in rules:  # the cluster goes no later than the RayJob that owns it
        if r["policy"] == "DeleteCluster":
            twin = next(s for s in rules if s["policy"] == "DeleteSelf"
                        and {k: v for k, v in s["condition"].items() if k != "ttlSeconds"}
                        == {k: v for k, v in r["condition"].items() if k != "ttlSeconds"})
            assert r["condition"]["ttlSeconds"] <= twin["condition"]["ttlSeconds"]


def _launcher() -> tuple[dict, str]:
    cron = next(d for d in all_docs() if d["kind"] == "CronJob")
    cm = next(d for d in all_docs() if d["kind"] == "ConfigMap")
    return cron, cm["data"]["launch.sh"]


_FAKE_KUBECTL = """#!/usr/bin/env bash
# stands in for kubectl: one RayJob deployment state from $STATES per `get` (ERR: the call fails,
# GONE: the RayJob is not found), then $JOB_STATUS; every call is logged
echo "$@" >> "$LOG"
case "$*" in
  create*) echo cogvlm-enrich-x7k2p ;;
  get*) n=$(cat "$COUNT" 2>/dev/null || echo 0); echo $((n + 1)) > "$COUNT"
        set -- $STATES; shift "$n"; state=${1:-Running}
        case "$state" in
          ERR) echo "Unable to connect to the server: i/o timeout" >&2; exit 1 ;;
          GONE) echo 'Error from server (NotFound): rayjobs.ray.io "x" not found' >&2; exit 1 ;;
        esac
        printf '%s|%s|%s' "$state" "$JOB_STATUS" "$REASON" ;;
  delete*) ;;
esac
"""


def _run_launcher(tmp_path, states: str, job_status: str, poll: str = "0", wait: bool = True):
    _, script = _launcher()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(_FAKE_KUBECTL)
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "launch.sh").write_text(script)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STATES=states, JOB_STATUS=job_status,
               REASON="", LOG=str(tmp_path / "log"), COUNT=str(tmp_path / "count"), POLL_SECONDS=poll)
    p = subprocess.Popen(["bash", str(tmp_path / "launch.sh")], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    if wait:
        p.wait(timeout=30)
    return p


@pytest.mark.parametrize("states,job_status,code", [
    ("Initializing Running Complete", "SUCCEEDED", 0),
    ("Running Running Failed", "FAILED", 1),  # a failed job ends the wait at once, exit 1
    ("ValidationFailed", "", 1),
    ("Running Complete", "FAILED", 1),
    ("Running ERR ERR Complete", "SUCCEEDED", 0),  # a failed read is retried, not a failed run
])
def test_launcher_waits_for_any_terminal_state_reports_it_and_deletes_the_rayjob(tmp_path, states, job_status, code):
    cron, _ = _launcher()
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["command"] == ["/bin/bash", "/template/launch.sh"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid" and pod["terminationGracePeriodSeconds"] >= 60
    assert pod["containers"][0]["image"].startswith("registry.k8s.io/kubectl:v1.")
    p = _run_launcher(tmp_path, states, job_status)
    assert p.returncode == code, p.stdout.read()
    calls = (tmp_path / "log").read_text().splitlines()
    assert calls[0].startswith("create -f /template/rayjob.yaml")
    assert calls[-1].startswith("delete rayjob/cogvlm-enrich-x7k2p")  # no RayJob left behind
    assert int((tmp_path / "count").read_text()) == len(states.split())  # stopped at the terminal state


def test_launcher_stops_when_its_rayjob_is_gone(tmp_path):
    p = _run_launcher(tmp_path, "Running GONE", "")
    assert p.returncode == 1 and "gone" in p.stdout.read()


def test_launcher_stopped_mid_wait_deletes_its_rayjob_at_once(tmp_path):
    import signal
    import time

    p = _run_launcher(tmp_path, "Running " * 50, "", poll="30", wait=False)
    for _ in range(100):  # until it polls
        if (tmp_path / "count").exists():
            break
        time.sleep(0.05)
    time.sleep(0.2)
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=20)
    assert time.monotonic() - t0 < 10 and p.returncode == 1  # not after the 30 s sleep
    assert (tmp_path / "log").read_text().splitlines()[-1].startswith("delete rayjob/cogvlm-enrich-x7k2p")


def test_operator_rules_the_schemas_do_not_express():
    """What KubeRay's own validation or the API server checks beyond the OpenAPI schema."""
    for d in all_docs():
        meta = d["metadata"]
        assert set(meta) <= {"name", "generateName", "labels", "annotations", "namespace"}, meta
        name = meta.get("name") or meta["generateName"]
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?-?", name), name
        limit = {"RayCronJob": 36, "RayJob": 47}.get(d["kind"], 63)  # room for generated suffixes
        assert len(name) <= limit, name
    for spec in rayjob_specs():
        assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
        rules = spec.get("deletionStrategy", {}).get("deletionRules", [])
        keys = [(tuple(sorted((k, v) for k, v in r["condition"].items() if k != "ttlSeconds")), r["policy"])
                for r in rules]
        assert len(keys) == len(set(keys))  # KubeRay: one rule per (condition, policy)
        autoscaling = spec["rayClusterSpec"]["enableInTreeAutoscaling"]
        assert not (autoscaling and any(r["policy"] == "DeleteWorkers" for r in rules))
    for d in all_docs():
        if d["kind"] in ("CronJob", "RayCronJob"):
            assert len(d["spec"]["schedule"].split()) == 5


# --- ray up and images ----------------------------------------------------------------------------

def test_ray_up_passes_rays_schema_installs_like_the_readme_and_authenticates():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = docs(INFRA / "ray-up" / "aws.yaml")[0]
    assert not [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(cfg)]
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert any(t["resources"].get("GPU", 0) > 0 for t in types.values())
    assert any(c.strip().endswith("make install") for c in cfg["setup_commands"])  # the README's command
    assert {".git", ".venv", "build"} <= set(cfg["rsync_exclude"])
    bashrc = [c for c in cfg["setup_commands"] if ".bashrc" in c]
    assert bashrc and all(c.startswith("grep -q") for c in bashrc)  # appended once, not per `ray up`
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd
    assert any(k.endswith(".ray/auth_token") for k in cfg["file_mounts"])
    profiles = {name: t["node_config"]["IamInstanceProfile"]["Arn"] for name, t in types.items()}
    head = profiles.pop(cfg["head_node_type"])
    assert head not in profiles.values() and len(set(profiles.values())) == 1  # workers: S3 only


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_images_install_like_the_readme_as_a_user_without_weights(name):
    text = (INFRA / "docker" / name).read_text()
    lines = text.splitlines()
    assert any(line.startswith("RUN make install") for line in lines)
    assert "requirements.lock" in (ROOT / "Makefile").read_text()  # the README's install
    for line in lines:
        if line.startswith("COPY"):
            src = line.split()[1]
            assert (ROOT / src).exists(), src
            assert "safetensors" not in line and "build" not in src
        assert not re.match(r"ENV .*(AWS_|TOKEN|SECRET|PIP_INDEX|PIP_EXTRA)", line)  # index settings: ARG
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M)  # not root
    base = next(line for line in lines if line.startswith("FROM"))
    assert "nvidia/cuda:12" not in base  # torch 2.13 from PyPI brings CUDA 13 itself
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "build"} <= set(ignore)


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
