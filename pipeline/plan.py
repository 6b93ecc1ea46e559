"""A job's plan before it runs: how much work is left, what a replica needs, what it will cost.

    make_plan(cfg) -> dict     counts, ledger, prompts and tokens, memory and fit, throughput, estimate
    describe(plan) -> str      the same as text, each number with its basis
    one_line(plan) -> str      one line for the job's start-up log

Counting never decodes an image: a WebDataset shard is counted from its img2dataset
`<shard>_stats.json` sidecar ("successes") or else from its tar headers, a Parquet file from its
footer (img2dataset's Parquet, whose failed downloads are skipped: from its sidecar), a folder
from its listing. Inputs with more shards than `count_shards` are counted on an
evenly spaced sample of shards and extrapolated by file size, and say so.

Throughput comes from a calibration run (`jobs.plan --calibrate K`) or from MEASURED, the table of
rates measured in docs/performance.md; where neither applies the GPU-hours, wall time and cost are
None with the reason, never a guess.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import posixpath
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import fit
from .config import JobConfig
from .errors import describe as describe_error
from .errors import retry
from .ledger import Ledger
from .readers import IMAGE_EXTENSIONS, Shard, plan_input, tar_kind, unsupported_tar
from .storage import filesystem, to_uri
from .tasks import expand

if TYPE_CHECKING:
    from cogvlm.config import CogVLMConfig

COUNT_SHARDS = 200  # most shards opened to count images; the rest are extrapolated by size
CHARS_PER_TOKEN = 4  # the prompt-length estimate when the tokenizer is not at hand (Llama-style BPE, English)

EXACT, ESTIMATED = "exact", "estimated"
MEASURED_BASIS, CALIBRATED, NOT_MEASURED = "measured", "calibrated", "not measured"


# --- throughput measured so far (docs/performance.md) ------------------------------------------

@dataclass(frozen=True)
class Measured:
    """Images/s of one replica running the whole pipeline, for one device kind, model shape and
    workload, under the conditions given; None: not measured."""

    device: str  # cpu | gpu
    model: str  # a cogvlm preset name: tiny, small, v1, v2
    workload: str  # caption | multi (caption + questions + grounding) | custom
    images_per_s: float | None
    startup_s: float | None
    source: str
    dtype: str | None = None
    quantization: str | None = None
    max_new_tokens: int | None = None  # of the caption task


_GPU_TODO = ("docs/performance.md, Targets: not measured (no GPU was lent to the tasks that wrote it); "
             "`bash bench/gpu.sh` measures it")
MEASURED: list[Measured] = [
    Measured("cpu", "small", "caption", 14.18, 27.7,
             "docs/performance.md, 'The same with 2,048 images', OMP_WAIT_POLICY=PASSIVE row: "
             "bench/pipeline.py --config small --images 2048 --per-shard 64 --batch-size 8, one replica on "
             "the 2-core x86-64 development machine, 2026-11-27: 12.22 img/s end to end, 14.18 after the first "
             "shard, start-up 27.7 s", dtype="fp32", max_new_tokens=16),
    Measured("gpu", "v1", "caption", None, None, _GPU_TODO),
    Measured("gpu", "v1", "multi", None, None, _GPU_TODO),
    Measured("gpu", "v2", "caption", None, None, _GPU_TODO),
    Measured("gpu", "v2", "multi", None, None, _GPU_TODO),
]


def model_shape(mcfg: "CogVLMConfig") -> str | None:
    """The preset whose structure the checkpoint has (vocabulary and token ids aside), or None."""
    from cogvlm.config import PRESETS, preset

    def key(c: "CogVLMConfig") -> tuple:
        v = c.vision_config
        return (c.version, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
                v.hidden_size, v.num_hidden_layers, v.image_size)

    for name in PRESETS:
        if key(preset(name, version=mcfg.version)) == key(mcfg):
            return name
    return None


def workload(cfg: JobConfig) -> str:
    t = cfg.tasks
    if t.caption is not None and t.vqa is None and t.grounding is None:
        return "caption"
    if t.caption is not None and t.vqa is not None and t.grounding is not None:
        return "multi"
    return "custom"


# --- counting ------------------------------------------------------------------------------------

def _tar_images(fs: Any, path: str) -> int:
    """Samples with an image in a tar, from its headers (keys and extensions as `readers._tar_samples`
    groups them); member data is seeked over, not read, where the file can seek."""
    keys: set[str] = set()
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
        for member in tar:
            base = posixpath.basename(member.name)
            if not member.isfile() or "." not in base or base.startswith("."):
                continue
            if base.split(".", 1)[1].lower().rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:  # "a.b.c.jpg": a jpg
                keys.add(posixpath.join(posixpath.dirname(member.name), base.split(".", 1)[0]))
    return len(keys)


def _sidecar_successes(fs: Any, path: str) -> int | None:
    try:
        n = json.loads(fs.cat_file(path)).get("successes")
    except (ValueError, AttributeError):
        return None
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None


def _parquet_rows(fs: Any, path: str) -> int:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def _count_one(cfg: JobConfig, shard: Shard, files: set[str]) -> tuple[int | None, str, str | None]:
    """(images, method, error) for one shard, opened."""
    fs, path = filesystem(shard.uri, cfg.s3)
    try:
        if cfg.input.format == "parquet":
            sidecar = path[: -len(".parquet")] + "_stats.json"  # img2dataset's: its failed downloads are
            if cfg.input.failed_downloads == "skip" and sidecar in files:  # rows, but not images to do
                n = retry(lambda: _sidecar_successes(fs, sidecar), f"reading {sidecar}", 30.0)
                if n is not None:
                    return n, "img2dataset sidecar", None
            n = retry(lambda: _parquet_rows(fs, path), f"reading the footer of {shard.uri}", 30.0)
            return n, "parquet footer", None
        if unsupported_tar(shard.uri):
            return None, "unreadable", unsupported_tar(shard.uri)
        sidecar = path[: -len(tar_kind(path) or ".tar")] + "_stats.json"  # a.tar.gz -> a_stats.json
        if sidecar in files:
            n = retry(lambda: _sidecar_successes(fs, sidecar), f"reading {sidecar}", 30.0)
            if n is not None:
                return n, "img2dataset sidecar", None
        return retry(lambda: _tar_images(fs, path), f"reading the headers of {shard.uri}", 30.0), "tar headers", None
    except Exception as e:  # noqa: BLE001 - one unreadable shard is reported, not fatal to a plan
        return None, "unreadable", describe_error(e)


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), first and last included."""
    if k >= n:
        return list(range(n))
    if k <= 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def count_images(cfg: JobConfig, shards: list[Shard], count_shards: int = COUNT_SHARDS) -> dict[str, Any]:
    """Images per shard without decoding any: `per_shard` (shard id -> count), whether the total
    is exact, and how it was counted."""
    if cfg.input.format == "folder":
        per = {s.shard_id: len(s.files) for s in shards}
        return {"per_shard": per, "images": sum(per.values()), "basis": EXACT,
                "how": f"the listing of {len(shards)} chunks of up to {cfg.input.images_per_shard} images",
                "methods": {"listing": len(shards)}, "errors": []}
    fs, root = filesystem(cfg.input.path, cfg.s3)
    found = fs.find(root, detail=True) if not fs.isfile(root) else {root: fs.info(root)}
    sizes = {to_uri(fs, p): int(info.get("size") or 0) for p, info in found.items()}
    files = set(found)
    chosen = [shards[i] for i in _spread(len(shards), max(1, count_shards))]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda s: _count_one(cfg, s, files), chosen))
    per: dict[str, int] = {}
    methods: dict[str, int] = {}
    errors = []
    for s, (n, method, err) in zip(chosen, results):
        methods[method] = methods.get(method, 0) + 1
        if n is None:
            errors.append(f"{s.uri}: {err}")
        else:
            per[s.shard_id] = n
    counted_bytes = sum(sizes.get(s.uri, 0) for s in chosen if s.shard_id in per)
    rest = [s for s in shards if s.shard_id not in per]
    if rest and not counted_bytes:  # nothing could be counted: no number rather than zero
        return {"per_shard": {}, "images": None, "basis": "unknown", "methods": methods, "errors": errors[:5],
                "how": f"no shard could be counted ({len(errors)} failed)"}
    per_byte = sum(per.values()) / counted_bytes if counted_bytes else 0.0
    for s in rest:
        per[s.shard_id] = round(sizes.get(s.uri, 0) * per_byte)
    what = " and ".join(f"{n} by {m}" for m, n in sorted(methods.items()))
    if not rest:
        how = f"all {len(shards)} shards counted: {what}"
    else:
        how = (f"estimated from {len(chosen) - len(errors)} shards ({what}), the other {len(rest)} "
               f"extrapolated by file size at {per_byte * 1e6:.3g} images per MB")
    return {"per_shard": per, "images": sum(per.values()), "basis": EXACT if not rest else ESTIMATED,
            "how": how, "methods": methods, "errors": errors[:5]}


# --- tokens, memory, fit ----------------------------------------------------------------------

def _tokenizer(cfg: JobConfig) -> tuple[Any | None, str]:
    """The tokenizer when it is a local directory (cheap); else None and why."""
    source = cfg.model.tokenizer or cfg.model.source
    if "://" in source or not os.path.isdir(os.path.expanduser(source)):
        return None, f"the tokenizer {source} is not a local directory"
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.path.expanduser(source), trust_remote_code=False), "the tokenizer"
    except Exception as e:  # noqa: BLE001
        return None, f"the tokenizer did not load ({describe_error(e)})"


def prompt_plan(cfg: JobConfig, mcfg: "CogVLMConfig") -> dict[str, Any]:
    from cogvlm.processor import build_prompt

    tok, source = _tokenizer(cfg)
    vision = mcfg.num_vision_tokens
    tasks = []
    for p in expand(cfg.tasks, mcfg.template_version, None):
        text = build_prompt(p.query, (), p.template)
        if tok is not None:
            n = len(tok.encode(text, add_special_tokens=False))
        else:
            n = math.ceil(len(text) / CHARS_PER_TOKEN)
        tasks.append({"task": p.task, "query": p.query, "template": p.template, "text_tokens": n,
                      "prompt_tokens": 1 + vision + n, "max_new_tokens": p.settings.max_new_tokens,
                      "too_long": n > cfg.model.max_prompt_tokens})
    per_image = fit.prompts_per_image(cfg, mcfg.template_version)
    column = per_image - len(tasks)
    return {
        "per_image": per_image, "vision_tokens": vision, "tasks": tasks,
        "text_tokens_basis": "tokenized with " + source if tok is not None else
        f"estimated at {CHARS_PER_TOKEN} characters per token ({source})",
        "row_questions": (f"plus the rows' own questions ({cfg.input.questions_column}), counted as {column} per "
                          f"image (a guess: their number varies by row)") if column else None,
        # the image's vision tokens are computed once for all its prompts (prefix sharing)
        "prompt_tokens_per_image": sum(t["prompt_tokens"] for t in tasks),
        "max_new_tokens_per_image": sum(t["max_new_tokens"] for t in tasks),
    }


def _gpu_bytes(cfg: JobConfig) -> tuple[int | None, str]:
    """A replica's GPU memory as check_fit finds it, without starting Ray."""
    if cfg.model.gpu_memory_gb is not None:
        return int(cfg.model.gpu_memory_gb * 1e9), "model.gpu_memory_gb is"
    import ray

    if not ray.is_initialized():
        return None, "Ray is not connected and model.gpu_memory_gb is not set"
    return fit.cluster_gpu_bytes()


def memory_plan(cfg: JobConfig, mcfg: "CogVLMConfig") -> tuple[dict[str, Any], dict[str, Any]]:
    """(a replica's memory from the checkpoint's shapes, the fit check)."""
    from cogvlm.memory import GB, estimate_replica
    from cogvlm.weights import DTYPES

    m = cfg.model
    on_gpu = m.gpus_per_replica > 0
    gpu, where = _gpu_bytes(cfg) if on_gpu else (None, "")
    share = fit.gpu_bytes_per_replica(cfg, gpu) if gpu is not None else None
    kw = dict(fit.replica_kwargs(cfg, mcfg), device_type="cuda" if on_gpu else "cpu")  # as the fit check
    est = estimate_replica(mcfg, DTYPES[m.dtype], m.quantization, device_bytes=share, **kw)
    memory = {"device": "gpu" if on_gpu else "cpu", "model": est.label,
              "weights_gb": round(est.weights_bytes / GB, 2), "activations_gb": round(est.activation_bytes / GB, 2),
              "kv_per_slot_mb": round(est.slot_bytes / 1e6, 2), "min_slots": est.min_slots,
              "margin_gb": round(est.margin_bytes / GB, 2), "total_gb": round(est.total_bytes / GB, 2),
              "basis": "computed from the checkpoint's shapes (weights exact, activations an upper estimate)"}
    if not on_gpu:
        return memory, {"status": "not needed", "message": "CPU replicas (model.gpus_per_replica 0): no GPU to fit"}
    if share is None:
        return memory, {"status": "not checked", "gpu_gb": None,
                        "message": f"{where}; each replica checks its GPU when it starts"}
    if share < gpu:
        where = f"{where} {gpu / GB:.0f} GB, of which a replica gets (model.gpus_per_replica)"
    err = fit.replica_fit_error(cfg, mcfg, share, where)
    free = share - est.weights_bytes - est.activation_bytes - est.margin_bytes
    slots = max(0, min(m.max_slots, free // max(1, est.slot_bytes)))
    memory["kv_slots_that_fit"] = int(slots) if err is None else None
    return memory, {"status": "fits" if err is None else "does not fit", "gpu_gb": round(share / GB, 1),
                    "message": err or f"a replica fits: {where} {share / GB:.1f} GB, about {slots} KV slots"}


# --- throughput and the estimate --------------------------------------------------------------

def throughput(cfg: JobConfig, mcfg: "CogVLMConfig", calibration: dict[str, Any] | None) -> dict[str, Any]:
    if calibration is not None:
        return {"images_per_s": calibration["images_per_s"], "startup_s": calibration["startup_s"],
                "basis": CALIBRATED, "source": calibration["source"]}
    device = "gpu" if cfg.model.gpus_per_replica > 0 else "cpu"
    shape, kind = model_shape(mcfg) or "unknown shape", workload(cfg)
    what = f"{device}, model {shape}, workload {kind}"
    entry = next((e for e in MEASURED if (e.device, e.model, e.workload) == (device, shape, kind)), None)
    advice = f"run `python -m jobs.plan --calibrate {max(500, 8 * in_flight(cfg))}` (or more) on the target hardware"
    if entry is None or entry.images_per_s is None:
        source = entry.source if entry is not None else "no entry in pipeline.plan.MEASURED"
        return {"images_per_s": None, "startup_s": None, "basis": NOT_MEASURED,
                "source": f"{what}: {source}", "advice": advice}
    caption = cfg.tasks.caption
    dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(cfg.model.dtype, cfg.model.dtype)
    job = (dtype, cfg.model.quantization, caption.max_new_tokens if caption else None)
    if (entry.dtype, entry.quantization, entry.max_new_tokens) != job:
        return {"images_per_s": None, "startup_s": None, "basis": NOT_MEASURED,
                "source": (f"{what}: measured {entry.images_per_s} img/s only for dtype {entry.dtype}, quantization "
                           f"{entry.quantization}, {entry.max_new_tokens} new tokens (this job: {job[0]}, {job[1]}, "
                           f"{job[2]}); not applied. Measured by {entry.source}"), "advice": advice}
    return {"images_per_s": entry.images_per_s, "startup_s": entry.startup_s, "basis": MEASURED_BASIS,
            "source": f"{what}: {entry.source}"}


def _sig(x: float) -> float:
    """Four significant digits: small jobs' hours are not rounded to zero."""
    return float(f"{x:.4g}")


def estimate(images_left: int | None, replicas: int, gpus_per_replica: float, rate: dict[str, Any],
             price: float | None) -> dict[str, Any]:
    """GPU-hours, wall time and cost; None with `why` where the throughput is unknown."""
    out: dict[str, Any] = {"replicas": replicas, "gpus_per_replica": gpus_per_replica, "gpu_hour_price": price,
                           "gpu_hours": None, "replica_hours": None, "wall_s": None, "cost": None, "why": None}
    per_s = rate["images_per_s"]
    if images_left == 0:
        return dict(out, gpu_hours=0.0, replica_hours=0.0, wall_s=0.0, cost=0.0 if price is not None else None,
                    why=None if price is not None else "no --gpu-hour-price given")
    if images_left is None:
        return dict(out, why="the number of images is unknown")
    if not per_s:
        return dict(out, why=f"throughput not measured for this job; {rate.get('advice') or 'no rate'}")
    replica_hours = images_left / per_s / 3600
    gpu_hours = replica_hours * gpus_per_replica
    out.update(replica_hours=_sig(replica_hours), gpu_hours=_sig(gpu_hours),
               wall_s=round((rate["startup_s"] or 0.0) + images_left / (per_s * replicas), 1))
    if price is None:
        out["why"] = "no --gpu-hour-price given"
    else:
        out["cost"] = _sig(gpu_hours * price)
    return out


def make_plan(cfg: JobConfig, replicas: int | None = None, gpu_hour_price: float | None = None,
              calibration: dict | None = None, *, count_shards: int = COUNT_SHARDS,
              model_config: "CogVLMConfig | None" = None, input_plan: Any = None,
              done: set[str] | None = None) -> dict:
    """The plan as a JSON-ready dict (see the module docstring). `model_config`: the checkpoint's
    config when the caller has read it (the job has); else it is read here (config.json only).
    `input_plan` (`readers.plan_input`) and `done` (the ledger's committed shards): when the
    caller has them, so that they are not listed again."""
    if model_config is None:
        from .job import model_config as read_model_config  # here: job.py may import this module

        model_config = read_model_config(cfg)
    mcfg = model_config
    inp = input_plan if input_plan is not None else plan_input(cfg.input, cfg.s3)
    counts = count_images(cfg, inp.shards, count_shards)
    per = counts.pop("per_shard")
    ledger_error = None
    if done is None:
        out_fs, out_root = filesystem(cfg.output.path, cfg.s3)
        try:
            done = retry(Ledger(out_fs, out_root).done, "listing the ledger", cfg.retry.deadline_s,
                         cfg.retry.backoff_s)
        except Exception as e:  # noqa: BLE001
            done, ledger_error = set(), describe_error(e)
    committed = [s.shard_id for s in inp.shards if s.shard_id in done]
    if counts["images"] is None:
        committed_images = images_left = None
    else:
        committed_images = sum(per[s] for s in committed)
        images_left = counts["images"] - committed_images
    memory, fit_check = memory_plan(cfg, mcfg)
    rate = throughput(cfg, mcfg, calibration)
    n = replicas if replicas is not None else cfg.model.max_replicas
    plan = {
        "input": dict({"path": cfg.input.path, "format": cfg.input.format, "shards": len(inp.shards),
                       "skipped_files": inp.skipped_files}, **counts),
        "ledger": {"output": cfg.output.path, "committed_shards": len(committed),
                   "committed_share": round(len(committed) / len(inp.shards), 4),
                   "committed_images": committed_images, "pending_shards": len(inp.shards) - len(committed),
                   "images_left": images_left, "images_left_basis": counts["basis"], "error": ledger_error},
        "model": {"source": cfg.model.source, "shape": model_shape(mcfg), "workload": workload(cfg),
                  "dtype": cfg.model.dtype, "quantization": cfg.model.quantization},
        "prompts": prompt_plan(cfg, mcfg),
        "memory": memory,
        "fit": fit_check,
        "throughput": rate,
        "estimate": estimate(images_left, n, cfg.model.gpus_per_replica, rate, gpu_hour_price),
        "calibration": calibration,
    }
    return plan


# --- text ---------------------------------------------------------------------------------------

def _count(x: int | None) -> str:
    return "an unknown number of" if x is None else f"{x:,}"


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.2f}" if x >= 1 or x == 0 else f"{x:.3g}"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def describe(plan: dict) -> str:
    i, led, p, mem, f, r, e = (plan[k] for k in ("input", "ledger", "prompts", "memory", "fit", "throughput",
                                                  "estimate"))
    lines = [f"input     {i['path']} ({i['format']}): {i['shards']:,} shards, {_count(i['images'])} images "
             f"[{i['basis']}: {i['how']}]"]
    if i["skipped_files"]:
        lines.append(f"          {i['skipped_files']} other files under the input are skipped")
    for err in i["errors"]:
        lines.append(f"          unreadable, extrapolated: {err}")
    lines.append(f"ledger    {led['output']}: {led['committed_shards']:,} shards committed "
                 f"({led['committed_share']:.0%}), {_count(led['committed_images'])} images; "
                 f"{_count(led['images_left'])} images left in {led['pending_shards']:,} shards [{led['images_left_basis']}]"
                 + (f" (ledger not read: {led['error']})" if led["error"] else ""))
    lines.append(f"prompts   {p['per_image']} per image, {p['vision_tokens']} vision tokens each "
                 f"(computed once per image) [text tokens {p['text_tokens_basis']}]")
    for t in p["tasks"]:
        lines.append(f"          {t['task']:<9} {t['prompt_tokens']} prompt tokens (1 + {p['vision_tokens']} + "
                     f"{t['text_tokens']} text), up to {t['max_new_tokens']} new"
                     + ("  TOO LONG for model.max_prompt_tokens" if t["too_long"] else ""))
    if p["row_questions"]:
        lines.append(f"          {p['row_questions']}")
    lines.append(f"memory    {mem['model']}, per replica on {mem['device']}: weights {mem['weights_gb']} GB + "
                 f"activations {mem['activations_gb']} GB + KV {mem['kv_per_slot_mb']} MB per slot x "
                 f"{mem['min_slots']} slots at least + margin {mem['margin_gb']} GB = {mem['total_gb']} GB "
                 f"[{mem['basis']}]")
    lines.append(f"fit       {f['status']}: {f['message']}")
    if r["images_per_s"]:
        lines.append(f"speed     {r['images_per_s']:.3g} images/s per replica, start-up {r['startup_s']:.0f} s "
                     f"[{r['basis']}: {r['source']}]")
    else:
        lines.append(f"speed     unknown [{r['basis']}: {r['source']}]")
        lines.append(f"          to measure it: {r['advice']}")
    gpus = e["gpus_per_replica"]
    if e["wall_s"] is None:
        lines.append(f"estimate  {_count(led['images_left'])} images on {e['replicas']} replicas x {gpus:g} GPUs: "
                     f"GPU-hours, wall time and cost unknown ({e['why']})")
    else:
        cost = (f"cost {_num(e['cost'])} at {e['gpu_hour_price']:g} per GPU-hour" if e["cost"] is not None
                else f"cost unknown ({e['why']})")
        lines.append(f"estimate  {_count(led['images_left'])} images: {_num(e['gpu_hours'])} GPU-hours "
                     f"({_num(e['replica_hours'])} replica-hours x {gpus:g} GPUs, start-up excluded); "
                     f"wall {_duration(e['wall_s'])} on {e['replicas']} replicas (start-up included, "
                     f"replicas assumed to scale linearly); {cost} [{r['basis']} throughput, "
                     f"{led['images_left_basis']} counts]")
    cal = plan.get("calibration")
    if cal:
        lines.append(f"calibration {cal['images']} images in {cal['wall_s']:.1f} s, first shard committed after "
                     f"{cal['first_commit_s']} s; statuses {cal['status_counts']}")
    return "\n".join(lines)


def one_line(plan: dict) -> str:
    i, led, f, r, e = (plan[k] for k in ("input", "ledger", "fit", "throughput", "estimate"))
    speed = (f"{r['images_per_s']:.3g} img/s per replica ({r['basis']}), ETA {_duration(e['wall_s'])} on "
             f"{e['replicas']} replicas, {_num(e['gpu_hours'])} GPU-hours" if e["wall_s"] is not None
             else "throughput not measured: no ETA (jobs.plan --calibrate K measures it)")
    return (f"plan: {_count(led['images_left'])} of {_count(i['images'])} images left ({i['basis']}), "
            f"{led['committed_shards']:,}/{i['shards']:,} shards committed; {plan['prompts']['per_image']} prompts "
            f"per image; replica {plan['memory']['total_gb']} GB ({f['status']}); {speed}")


# --- calibration --------------------------------------------------------------------------

def in_flight(cfg: JobConfig) -> int:
    """Images one replica works on at once: its Ray batches in flight."""
    return cfg.model.batch_size * cfg.model.batches_in_flight


def calibration_result(cfg: JobConfig, summary: dict[str, Any], requested: int) -> dict[str, Any]:
    """The rate and start-up of a calibration run's summary (`pipeline.run`), for make_plan.

    Start-up is the time to the first committed shard; the steady rate is the images after it
    over the time after it. Images that were in flight at the first commit count after it, so
    that rate is used only when at least 4x `in_flight` images came after the first commit (it
    may then read high by up to a quarter); otherwise the end-to-end rate, start-up included, is
    used: a lower bound."""
    n, wall, first = summary["images"], summary["wall_s"], summary.get("first_commit_s")
    steady = summary.get("steady_images_per_s")
    after = round(steady * (wall - first)) if steady else 0
    need = 4 * in_flight(cfg)
    head = f"--calibrate {requested}: {n} images through pipeline.run on one replica in {wall:.1f} s"
    if steady and after >= need:
        rate, startup = steady, first
        how = (f"{head}; start-up = time to the first committed shard ({first:.1f} s, with that shard's images), "
               f"rate = the {after} images after it / the time after it (may read high by up to "
               f"{in_flight(cfg) / after:.0%}: images in flight at the first commit)")
    else:
        rate, startup = (n / wall if wall else 0.0), 0.0
        how = (f"{head}; too few images after the first commit ({after}, need {need} = 4 x model.batch_size x "
               f"model.batches_in_flight) to separate the start-up: the rate includes it and is a lower bound; "
               f"calibrate with more images, about {need + 2 * in_flight(cfg)}")
    rows, ok = summary.get("rows", 0), summary.get("status_counts", {}).get("ok", 0)
    if rows and ok < 0.9 * rows:
        how += f"; WARNING: only {ok} of {rows} rows were ok, and failed rows are cheaper than real ones"
    return {"images": n, "wall_s": wall, "first_commit_s": first, "steady": bool(steady and after >= need),
            "images_per_s": round(rate, 4), "startup_s": round(startup or 0.0, 3), "replicas": 1,
            "status_counts": summary.get("status_counts", {}), "source": how}


def calibration_config(cfg: JobConfig, images: int, workdir: str) -> JobConfig:
    """A copy of `cfg` whose input is the first `images` images of its input, rewritten as small
    shards under `workdir` (of at most the images a replica holds in flight, so that the run has a
    first commit and a steady part after it), whose output is `workdir/output`, with one replica
    and no error guard (it would hold the commits)."""
    inp = plan_input(cfg.input, cfg.s3)
    out_dir = os.path.join(workdir, "input")
    os.makedirs(out_dir, exist_ok=True)
    per_part = max(1, min(in_flight(cfg), math.ceil(images / 4)), math.ceil(images / 64))
    if cfg.input.format == "webdataset":
        _copy_tar_samples(cfg, inp.shards, images, per_part, out_dir)
    elif cfg.input.format == "parquet":
        _copy_parquet_rows(cfg, inp.shards, images, per_part, out_dir)
    else:
        _copy_folder_images(cfg, inp.shards, images, out_dir)
    new_input = dataclasses.replace(cfg.input, path=out_dir, images_per_shard=per_part,
                                    allowed_uri_prefixes=list(cfg.input.allowed_uri_prefixes) + [inp.root])
    return dataclasses.replace(
        cfg, input=new_input, output=dataclasses.replace(cfg.output, path=os.path.join(workdir, "output")),
        model=dataclasses.replace(cfg.model, min_replicas=1, max_replicas=1),
        errors=dataclasses.replace(cfg.errors, guard_images=0), run_id="calibration", mode="batch")


def _copy_tar_samples(cfg: JobConfig, shards: list[Shard], images: int, per_part: int, out_dir: str) -> None:
    import io

    samples: dict[str, list[tuple[tarfile.TarInfo, bytes]]] = {}
    with_image: list[str] = []
    for shard in shards:
        fs, path = filesystem(shard.uri, cfg.s3)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for m in tar:
                base = posixpath.basename(m.name)
                if not m.isfile() or "." not in base or base.startswith("."):
                    continue
                key = f"{shard.shard_id}/{posixpath.join(posixpath.dirname(m.name), base.split('.', 1)[0])}"
                if key not in samples and len(with_image) >= images:
                    break  # samples are consecutive in a WebDataset tar: the first `images` are whole
                data = tar.extractfile(m)
                samples.setdefault(key, []).append((m, data.read() if data is not None else b""))
                if base.split(".", 1)[1].lower().rsplit(".", 1)[-1] in IMAGE_EXTENSIONS and key not in with_image:
                    with_image.append(key)
        if len(with_image) >= images:
            break
    keys = [k for k in samples if k in set(with_image[:images])]
    for part in range(0, len(keys), per_part):
        with tarfile.open(os.path.join(out_dir, f"{part // per_part:05d}.tar"), "w") as out:
            for i, key in enumerate(keys[part:part + per_part]):
                for m, data in samples[key]:
                    info = tarfile.TarInfo(f"{part + i:09d}.{posixpath.basename(m.name).split('.', 1)[1]}")
                    info.size = len(data)
                    out.addfile(info, io.BytesIO(data))


def _copy_parquet_rows(cfg: JobConfig, shards: list[Shard], images: int, per_part: int, out_dir: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    batches, got = [], 0
    for shard in shards:
        fs, path = filesystem(shard.uri, cfg.s3)
        with fs.open(path, "rb") as f:
            for b in pq.ParquetFile(f).iter_batches(batch_size=max(1, min(1024, images))):
                batches.append(b.slice(0, images - got))
                got += batches[-1].num_rows
                if got >= images:
                    break
        if got >= images:
            break
    table = pa.Table.from_batches(batches) if batches else None
    for part in range(0, got, per_part):
        pq.write_table(table.slice(part, per_part), os.path.join(out_dir, f"{part // per_part:05d}.parquet"))


def _copy_folder_images(cfg: JobConfig, shards: list[Shard], images: int, out_dir: str) -> None:
    uris = [u for s in shards for u in s.files][:images]
    for i, uri in enumerate(uris):
        fs, path = filesystem(uri, cfg.s3)
        fs.get_file(path, os.path.join(out_dir, f"{i:09d}-{posixpath.basename(path)}"))

