"""Will a replica fit its GPU? Checked on the driver before any actor starts (`check_fit`), and
again by each Generate actor against its real device before it loads the weights.

The engine's settings come from one function, `engine_settings`: the Generate stage builds its
`Engine` with them and the memory estimate (the fit check, the cost plan) assumes the same.

The driver takes the GPU's memory from `model.gpu_memory_gb`, or else from the Ray nodes'
accelerator type (`accelerator_type:<name>`, as Ray detects it) where this table knows the name.
Types with several memory sizes under one name (A100, V100) are not guessed.
"""

from __future__ import annotations

import logging
from typing import Any

from cogvlm.config import CogVLMConfig
from cogvlm.memory import fit_error
from cogvlm.quantization import FP8_MIN_CAPABILITY
from cogvlm.weights import DTYPES

from .config import JobConfig
from .errors import JobError
from .tasks import expand

log = logging.getLogger("pipeline")

# MiB each GPU of a Ray accelerator type reports as its total (nvidia-smi; the smallest model
# sold under that name). Other names: set model.gpu_memory_gb.
GPU_MEMORY_MIB = {"T4": 15360, "A10G": 23028, "A10": 23028, "L4": 23034, "L40S": 46068, "L40": 46068,
                  "A40": 46068, "RTX-A5000": 24564, "RTX-A6000": 49140, "GeForce-RTX-3090": 24576,
                  "GeForce-RTX-4090": 24564, "H100": 81559, "H200": 143771}

# compute capability of each accelerator type's GPUs: fp8 GEMMs need 8.9 or newer
# (`cogvlm.quantization.FP8_MIN_CAPABILITY`). Types not listed are checked by each replica.
GPU_CAPABILITY = {"T4": (7, 5), "V100": (7, 0), "A100": (8, 0), "A100-40G": (8, 0), "A100-80G": (8, 0),
                  "A10G": (8, 6), "A10": (8, 6), "A40": (8, 6), "RTX-A5000": (8, 6), "RTX-A6000": (8, 6),
                  "GeForce-RTX-3090": (8, 6), "L4": (8, 9), "L40S": (8, 9), "L40": (8, 9),
                  "GeForce-RTX-4090": (8, 9), "H100": (9, 0), "H200": (9, 0)}

# the engine settings the memory estimate depends on (`cogvlm.memory.estimate_replica`)
_ESTIMATED = ("max_prompt_tokens", "max_new_tokens", "admission_images", "prompts_per_image", "max_slots")


# The model stages' actor pools (`stages.model_stages`): Preprocess has at least this many actors
# of this many CPUs each; Generate has model.min_replicas of model.cpus_per_replica CPUs and
# model.gpus_per_replica GPUs each.
PREPROCESS_MIN_ACTORS = 1
PREPROCESS_CPUS = 1


def pools_minimum(cfg: JobConfig) -> tuple[float, float]:
    """(CPUs, GPUs) the model stages' smallest actor pools hold at once: less than this, and Ray
    Data waits for resources that never come."""
    m = cfg.model
    return (PREPROCESS_MIN_ACTORS * PREPROCESS_CPUS + m.min_replicas * m.cpus_per_replica,
            m.min_replicas * m.gpus_per_replica)


class DoesNotFit(RuntimeError):
    """A replica cannot fit its GPU: not transient (retrying or restarting the actor cannot help)."""


def prompts_per_image(cfg: JobConfig, template: str) -> int:
    """Prompts each image gets (a row's own questions counted as 2: a guess for sizing only)."""
    column = cfg.tasks.vqa is not None and cfg.tasks.vqa.use_column and bool(cfg.input.questions_column)
    return len(expand(cfg.tasks, template, None)) + 2 * column


def engine_settings(cfg: JobConfig, mcfg: CogVLMConfig) -> dict[str, Any]:
    """The job's engine settings, as `cogvlm.engine.Engine` takes them (less the device share)."""
    m = cfg.model
    return dict(max_prompt_tokens=m.max_prompt_tokens,
                max_new_tokens=max(t.max_new_tokens for t in cfg.tasks.enabled().values()),
                max_slots=m.max_slots, kv_cache_gb=m.kv_cache_gb, margin_gb=m.memory_margin_gb,
                admission_images=m.admission_images,
                prompts_per_image=prompts_per_image(cfg, mcfg.template_version), sync_every=m.sync_every,
                compile=m.compile, compile_vision=m.compile_vision, kv_cache_dtype=m.kv_cache_dtype,
                vision_ahead=m.vision_ahead)


def replica_kwargs(cfg: JobConfig, mcfg: CogVLMConfig, device_type: str = "cuda") -> dict[str, Any]:
    """`engine_settings` as `cogvlm.memory.estimate_replica` / `fit_error` take them."""
    settings = engine_settings(cfg, mcfg)
    return dict({k: settings[k] for k in _ESTIMATED}, device_type=device_type,
                quantize_vision=cfg.model.quantize_vision)


def replica_fit_error(cfg: JobConfig, mcfg: CogVLMConfig, device_bytes: int, where: str) -> str | None:
    """None if one replica of this job fits `device_bytes` of GPU memory, else what would."""
    m = cfg.model
    return fit_error(mcfg, DTYPES[m.dtype], m.quantization, device_bytes, where, **replica_kwargs(cfg, mcfg))


def cluster_gpu_types() -> set[str]:
    """The accelerator types of the connected cluster's live GPU nodes ("unknown" where a node has none)."""
    import ray

    types = set()
    for node in ray.nodes():
        res = node.get("Resources", {})
        if node.get("Alive") and res.get("GPU", 0) > 0:
            names = [k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")]
            types.add(names[0] if names else "unknown")
    return types


def cluster_gpu_bytes() -> tuple[int | None, str]:
    """The smallest GPU memory among the cluster's GPU nodes by accelerator type, and a description;
    None when there are no GPU nodes yet or a type is not in the table."""
    types = cluster_gpu_types()
    if not types:
        return None, "no GPU nodes are up yet"
    unknown = sorted(t for t in types if t not in GPU_MEMORY_MIB)
    if unknown:
        return None, f"the GPU type {', '.join(unknown)} is not in the table of known sizes"
    smallest = min(types, key=GPU_MEMORY_MIB.__getitem__)
    return GPU_MEMORY_MIB[smallest] * 2**20, f"the cluster's {smallest} GPUs have"


def gpu_bytes_per_replica(cfg: JobConfig, gpu_bytes: int) -> int:
    """A replica's part of a GPU (replicas may share one with gpus_per_replica < 1)."""
    return int(gpu_bytes * min(1.0, cfg.model.gpus_per_replica))


def replica_gpu_budget(cfg: JobConfig) -> tuple[int | None, int | None, str]:
    """(the GPU's bytes, a replica's share of them, where that number comes from): from
    `model.gpu_memory_gb`, else `model.accelerator_type`, else the connected cluster's accelerator
    type; (None, None, why) when none tells (no Ray connection, no GPU node yet, an unknown type)."""
    if cfg.model.gpu_memory_gb is not None:
        gpu, where = int(cfg.model.gpu_memory_gb * 1e9), "model.gpu_memory_gb is"
    elif cfg.model.accelerator_type in GPU_MEMORY_MIB:
        gpu = GPU_MEMORY_MIB[cfg.model.accelerator_type] * 2**20
        where = f"model.accelerator_type's {cfg.model.accelerator_type} GPUs have"
    else:
        import ray

        if not ray.is_initialized():
            return None, None, "Ray is not connected and model.gpu_memory_gb is not set"
        gpu, where = cluster_gpu_bytes()
        if gpu is None:
            return None, None, where
    share = gpu_bytes_per_replica(cfg, gpu)
    if share < gpu:
        where = f"{where} {gpu / 1e9:.0f} GB, of which a replica gets (model.gpus_per_replica)"
    return gpu, share, where


def fp8_error(cfg: JobConfig) -> str | None:
    """Why `model.quantization: fp8` cannot run on the job's GPUs, as far as their accelerator type
    (`model.accelerator_type`, else the connected cluster's) tells; None when it can or nothing
    tells (then each replica's `load_model` checks its own GPU). CPUs are refused by the config."""
    if cfg.model.quantization != "fp8":
        return None
    if cfg.model.accelerator_type is not None:
        types, where = {cfg.model.accelerator_type}, "model.accelerator_type is"
    else:
        import ray

        if not ray.is_initialized():
            return None
        types, where = cluster_gpu_types(), "the cluster's GPUs are"
    old = sorted(t for t in types if GPU_CAPABILITY.get(t, FP8_MIN_CAPABILITY) < FP8_MIN_CAPABILITY)
    if not old:
        return None
    named = ", ".join(f"{t} (compute capability {GPU_CAPABILITY[t][0]}.{GPU_CAPABILITY[t][1]})" for t in old)
    return (f"model.quantization fp8 needs GPUs of compute capability 8.9 or newer (L4, L40S, RTX 40xx, H100, "
            f"H200) for its float8 GEMMs; {where} {named}: use int8, int4 or null")


def check_fit(cfg: JobConfig, mcfg: CogVLMConfig) -> None:
    """Refuse (JobError), before any actor starts, GPUs that cannot run `model.quantization` (fp8)
    or hold one replica; CPU replicas, and GPUs whose size is not known yet, pass (each replica
    checks its own device)."""
    if cfg.model.gpus_per_replica <= 0:
        return
    err = fp8_error(cfg)
    if err:
        raise JobError(err)
    _, share, where = replica_gpu_budget(cfg)
    if share is None:
        log.info("GPU memory not checked before the start (%s; set model.gpu_memory_gb to check it); "
                 "each replica checks its GPU when it starts", where)
        return
    err = replica_fit_error(cfg, mcfg, share, where)
    if err:
        raise JobError(err)
    log.info("a replica fits its GPU (%s %.0f GB)", where, share / 1e9)
