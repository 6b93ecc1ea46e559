"""Will a replica fit its GPU? Checked on the driver before any actor starts, and again by each
Generate actor against its real device before it loads the weights.

The driver takes the GPU's memory from `model.gpu_memory_gb`, or else from the Ray nodes'
accelerator type (`accelerator_type:<name>`, as Ray detects it) where this table knows the name.
Types with several memory sizes under one name (A100, V100) are not guessed.
"""

from __future__ import annotations

import logging

from cogvlm.config import CogVLMConfig
from cogvlm.memory import fit_error
from cogvlm.weights import DTYPES

from .config import JobConfig
from .tasks import expand

log = logging.getLogger(__name__)

# MiB each GPU of a Ray accelerator type reports as its total (nvidia-smi; the smallest model
# sold under that name). Other names: set model.gpu_memory_gb.
GPU_MEMORY_MIB = {"T4": 15360, "A10G": 23028, "A10": 23028, "L4": 23034, "L40S": 46068, "L40": 46068,
                  "A40": 46068, "RTX-A5000": 24564, "RTX-A6000": 49140, "GeForce-RTX-3090": 24576,
                  "GeForce-RTX-4090": 24564, "H100": 81559, "H200": 143771}


class DoesNotFit(RuntimeError):
    """A replica cannot fit its GPU: not transient (retrying or restarting the actor cannot help)."""


def prompts_per_image(job: JobConfig, template: str) -> int:
    """Prompts each image gets (a row's own questions counted as 2: a guess for sizing only)."""
    column = job.tasks.vqa is not None and job.tasks.vqa.use_column and bool(job.input.questions_column)
    return len(expand(job.tasks, template, None)) + 2 * column


def replica_kwargs(job: JobConfig, config: CogVLMConfig) -> dict:
    """The job's settings as `cogvlm.memory.estimate_replica` / `fit_error` take them (GPU replicas)."""
    m = job.model
    tasks = [t for t in (job.tasks.caption, job.tasks.vqa, job.tasks.grounding) if t is not None]
    return dict(device_type="cuda", quantize_vision=m.quantize_vision, max_prompt_tokens=m.max_prompt_tokens,
                max_new_tokens=max(t.max_new_tokens for t in tasks), admission_images=m.admission_images,
                prompts_per_image=prompts_per_image(job, config.template_version), max_slots=m.max_slots)


def replica_fit_error(job: JobConfig, config: CogVLMConfig, device_bytes: int, where: str) -> str | None:
    """None if one replica of this job fits `device_bytes` of GPU memory, else what would."""
    m = job.model
    return fit_error(config, DTYPES[m.dtype], m.quantization, device_bytes, where, **replica_kwargs(job, config))


def cluster_gpu_bytes() -> tuple[int | None, str]:
    """The smallest GPU memory among the cluster's GPU nodes by accelerator type, and a description;
    None when there are no GPU nodes yet or a type is not in the table."""
    import ray

    types = set()
    for node in ray.nodes():
        res = node.get("Resources", {})
        if node.get("Alive") and res.get("GPU", 0) > 0:
            names = [k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")]
            types.add(names[0] if names else "unknown")
    if not types:
        return None, "no GPU nodes are up yet"
    unknown = sorted(t for t in types if t not in GPU_MEMORY_MIB)
    if unknown:
        return None, f"the GPU type {', '.join(unknown)} is not in the table of known sizes"
    smallest = min(types, key=GPU_MEMORY_MIB.__getitem__)
    return GPU_MEMORY_MIB[smallest] * 2**20, f"the cluster's {smallest} GPUs have"


def gpu_bytes_per_replica(job: JobConfig, gpu_bytes: int) -> int:
    """A replica's part of a GPU (replicas may share one with gpus_per_replica < 1)."""
    return int(gpu_bytes * min(1.0, job.model.gpus_per_replica))
