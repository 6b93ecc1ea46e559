"""A job's plan before it runs: how much work is left, what a replica needs, what it will cost.

    make_plan(prepared) -> dict  counts, ledger, prompts and tokens, memory and fit, throughput, estimate
    render(plan) -> str          the same as text, each number with its basis
    one_line(plan) -> str        one line for the job's start-up log

Counting never decodes an image: a WebDataset shard is counted from its img2dataset
`<shard>_stats.json` sidecar ("successes") or else from its tar headers, a Parquet file from its
footer (img2dataset's Parquet, whose failed downloads are skipped: from its sidecar), a folder
from its listing (`pipeline.listing.count_images`). Inputs with more shards than `count_shards`
are counted on an evenly spaced sample of shards and extrapolated by file size, and say so.

Throughput comes from a calibration run (`jobs.plan --calibrate K`) or from MEASURED, the table of
rates measured in docs/performance.md; where neither applies the GPU-hours, wall time and cost are
None with the reason, never a guess.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import fit
from .config import JobConfig
from .calibration import in_flight
from .errors import describe as describe_error
from .listing import COUNT_SHARDS, count_images
from .preflight import Prepared
from .progress import duration
from .tasks import expand

if TYPE_CHECKING:
    from cogvlm.config import CogVLMConfig

log = logging.getLogger("pipeline")

CHARS_PER_TOKEN = 4  # the prompt-length estimate when the tokenizer is not at hand (Llama-style BPE, English)

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
    tasks = list(cfg.tasks.enabled())
    return {("caption",): "caption", ("caption", "vqa", "grounding"): "multi"}.get(tuple(tasks), "custom")


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


def memory_plan(cfg: JobConfig, mcfg: "CogVLMConfig") -> tuple[dict[str, Any], dict[str, Any]]:
    """(a replica's memory from the checkpoint's shapes, the fit check)."""
    from cogvlm.memory import GB, estimate_replica
    from cogvlm.weights import DTYPES

    m = cfg.model
    on_gpu = m.gpus_per_replica > 0
    _, share, where = fit.replica_gpu_budget(cfg) if on_gpu else (None, None, "")
    kw = fit.replica_kwargs(cfg, mcfg, device_type="cuda" if on_gpu else "cpu")  # as the fit check
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
    job = (cfg.model.dtype, cfg.model.quantization, caption.max_new_tokens if caption else None)
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


def make_plan(prepared: Prepared, replicas: int | None = None, gpu_hour_price: float | None = None,
              calibration: dict | None = None, *, count_shards: int = COUNT_SHARDS) -> dict:
    """The plan of a prepared run (`preflight.prepare(cfg, writable=False)`, or the job's own) as a
    JSON-ready dict (see the module docstring)."""
    cfg, mcfg, inp, done = prepared.cfg, prepared.mcfg, prepared.listing, prepared.done
    ledger_error = prepared.ledger_error
    counts = count_images(cfg, inp.shards, count_shards)
    per = counts.pop("per_shard")
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


def render(plan: dict) -> str:
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
                     f"wall {duration(e['wall_s'])} on {e['replicas']} replicas (start-up included, "
                     f"replicas assumed to scale linearly); {cost} [{r['basis']} throughput, "
                     f"{led['images_left_basis']} counts]")
    cal = plan.get("calibration")
    if cal:
        lines.append(f"calibration {cal['images']} images in {cal['wall_s']:.1f} s, first shard committed after "
                     f"{cal['first_commit_s']} s; statuses {cal['status_counts']}")
    return "\n".join(lines)


def one_line(plan: dict) -> str:
    i, led, f, r, e = (plan[k] for k in ("input", "ledger", "fit", "throughput", "estimate"))
    speed = (f"{r['images_per_s']:.3g} img/s per replica ({r['basis']}), ETA {duration(e['wall_s'])} on "
             f"{e['replicas']} replicas, {_num(e['gpu_hours'])} GPU-hours" if e["wall_s"] is not None
             else "throughput not measured: no ETA (jobs.plan --calibrate K measures it)")
    return (f"plan: {_count(led['images_left'])} of {_count(i['images'])} images left ({i['basis']}), "
            f"{led['committed_shards']:,}/{i['shards']:,} shards committed; {plan['prompts']['per_image']} prompts "
            f"per image; replica {plan['memory']['total_gb']} GB ({f['status']}); {speed}")


PLAN_LINE_S = 30.0  # the start-up plan line waits this long at most for its counts


def log_one_line(prepared: Prepared) -> None:
    """Log the same one-line estimate as `jobs.plan`, from the listing and ledger the run already
    has and 2 shards counted; advice only: skipped (said so) after PLAN_LINE_S or on any error."""
    result: list[str] = []

    def make() -> None:
        try:
            result.append(one_line(make_plan(prepared, count_shards=2)))
        except Exception as e:  # noqa: BLE001 - the plan is advice; the run does not depend on it
            result.append(f"no plan line: {describe_error(e)}")

    t = threading.Thread(target=make, name="plan-line", daemon=True)
    t.start()
    t.join(PLAN_LINE_S)
    log.info("%s", result[0] if result else f"no plan line: counting took over {PLAN_LINE_S:g} s")
