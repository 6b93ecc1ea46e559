"""The engine's memory plan, and measuring what a piece of work really allocates.

A replica's memory = weights + KV slots + the activations of whatever runs at once. The plan
measures the activations (a profiled admission at the largest size, and a decode step) and gives
the rest, less a margin, to KV slots of `max_len` columns each. On a GPU the measurement is
`torch.cuda.max_memory_allocated`; on CPU it is the allocator's own events, as recorded by the
PyTorch profiler (`profile_memory=True`).

Before anything is loaded, `estimate_replica` computes the same parts from the checkpoint's
shapes (weights exactly, activations as an upper estimate) so that a job can refuse a GPU that
cannot hold a replica, and say which quantization would fit (`fit_error`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import torch

from .quantization import module_bytes

if TYPE_CHECKING:
    from .config import CogVLMConfig

GB = 1e9


@dataclass
class MemoryPlan:
    budget_bytes: int  # memory the engine may use beside the weights
    weights_bytes: int
    prefill_bytes: int  # measured peak of one admission at the largest size
    block_bytes: int  # KV of one block (all layers)
    block_size: int  # columns per block
    blocks: int  # KV blocks in the pool (prefix entries and row suffixes share them)
    row_bytes: int  # per-row state (tokens, block table, output buffer)
    decode_bytes_per_slot: int  # measured decode-step activations, per row
    margin_bytes: int
    slots: int  # rows that may decode at once
    max_len: int  # columns one row may hold at most
    prefix_len: int = 0  # columns of an image prefix (stored once per image)

    @property
    def cache_bytes(self) -> int:
        return (self.blocks + 1) * self.block_bytes + self.slots * self.row_bytes  # + the trash block

    @property
    def planned_bytes(self) -> int:
        """What the plan expects the engine to hold at its peak, beside the weights."""
        return self.cache_bytes + self.prefill_bytes + self.slots * self.decode_bytes_per_slot

    def describe(self) -> str:
        nP = -(-self.prefix_len // self.block_size) if self.prefix_len else 0
        return (f"memory plan: weights {self.weights_bytes / GB:.2f} GB, budget {self.budget_bytes / GB:.2f} GB "
                f"= KV pool {self.blocks * self.block_bytes / GB:.2f} GB ({self.blocks} blocks of {self.block_size} "
                f"columns, {self.block_bytes / 1e6:.2f} MB each; an image prefix takes {nP}) + {self.slots} rows "
                f"of at most {self.max_len} columns ({self.slots * self.row_bytes / 1e6:.1f} MB of state) "
                f"+ admission activations {self.prefill_bytes / GB:.3f} GB "
                f"+ decode activations {self.slots * self.decode_bytes_per_slot / GB:.3f} GB "
                f"+ margin {self.margin_bytes / GB:.2f} GB")


def budget_for(device: torch.device, weights: int, memory_gb: float | None, margin_gb: float | None,
               share: float = 1.0) -> tuple[int, int]:
    """(budget, margin) in bytes beside the weights: `memory_gb`, or what is free on the GPU (this
    replica's `share` of it), or 4 GB on CPU; the margin: `margin_gb`, or 5% of the budget (at
    most 2 GB) on a GPU, 2% on CPU."""
    if memory_gb is not None:
        budget = int(memory_gb * GB)
    elif device.type == "cuda":  # what is free, or this replica's part of a shared GPU
        free, total = torch.cuda.mem_get_info(device)
        budget = int(min(free, total * share - weights))
    else:
        budget = int(4 * GB)
    if margin_gb is None:  # allocator fragmentation, CUDA graph pools, library workspaces
        margin = int(min(0.05 * budget, 2 * GB)) if device.type == "cuda" else int(0.02 * budget)
    else:
        margin = int(margin_gb * GB)
    return budget, margin


def plan_pool(cfg: "CogVLMConfig", dtype: torch.dtype, *, budget: int, margin: int, prefill: int,
              decode_per_row: int, weights: int, block: int, lanes: int, max_len: int, max_new: int,
              max_slots: int, kv_cache_gb: float | None, kv_dtype: torch.dtype | None = None) -> MemoryPlan:
    """Rows and blocks of the KV store. The least a row can hold is its lane's share of a prefix
    and one suffix block; rows are cheap, so the plan allows as many rows as could hold that
    (at most `max_slots`), and blocks take the rest of the room (at most what every row could
    fill, and `kv_cache_gb` if given)."""
    P = 1 + cfg.num_vision_tokens
    nP, MB = -(-P // block), -(-max_len // block)
    blk = block_bytes(cfg, dtype, block, kv_dtype)
    row = row_state_bytes(max_new, MB) + decode_per_row
    min_row = (-(-nP // lanes) + 1) * blk
    room = max(0, budget - prefill - margin)
    slots = max(0, min(max_slots, room // (min_row + row)))
    blocks = max(0, (room - slots * row) // blk - 1)  # one more is the trash block
    blocks = min(blocks, slots * (nP + MB))  # more than every row could ever fill is waste
    if kv_cache_gb is not None:  # an explicit cap on the pool
        blocks = min(blocks, int(kv_cache_gb * GB) // blk)
        slots = min(slots, blocks * blk // min_row)
    return MemoryPlan(budget, weights, prefill, blk, block, blocks, row - decode_per_row, decode_per_row, margin,
                      slots, max_len, P)


def slots_for(budget: int, prefill: int, margin: int, per_slot: int, max_slots: int) -> int:
    return max(0, min(max_slots, (budget - prefill - margin) // max(1, per_slot)))


class PeakMemory:
    """`with PeakMemory(device) as m: ...` -> `m.peak`: the most bytes allocated at once inside
    the block beyond what was allocated when it began."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    @contextlib.contextmanager
    def _cuda(self) -> Iterator[None]:
        torch.cuda.synchronize(self.device)
        start = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        yield
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device) - start

    @contextlib.contextmanager
    def _cpu(self) -> Iterator[None]:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
        now = peak = 0
        for e in events:
            if e.device_type() == torch.autograd.DeviceType.CPU:
                now += e.nbytes()
                peak = max(peak, now)
        self.peak = peak

    def __enter__(self) -> "PeakMemory":
        self._cm = self._cuda() if self.device.type == "cuda" else self._cpu()
        self._cm.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)


# --- before any work: will a replica fit? ------------------------------------------------------

CUDA_CONTEXT_BYTES = int(0.5 * GB)
MIN_SLOTS = 4  # the CUDA context and kernels, outside PyTorch's allocator


@dataclass
class ReplicaEstimate:
    """A replica's memory, computed from the checkpoint's shapes alone (nothing loaded)."""

    label: str  # e.g. "CogVLM v1 (17.6B parameters) in bf16 + int8"
    weights_bytes: int
    activation_bytes: int  # the largest admission round (vision, prefix and prompt prefill)
    slot_bytes: int  # KV cache and state of one slot, plus its decode activations
    min_slots: int
    margin_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes + self.min_slots * self.slot_bytes + self.margin_bytes

    def describe(self) -> str:
        return (f"{self.label} needs about {self.total_bytes / GB:.1f} GB per replica: weights "
                f"{self.weights_bytes / GB:.1f} GB + activations {self.activation_bytes / GB:.1f} GB + KV for "
                f"{self.min_slots} slots {self.min_slots * self.slot_bytes / GB:.1f} GB + margin "
                f"{self.margin_bytes / GB:.1f} GB")


def activation_bytes(cfg: "CogVLMConfig", dtype: torch.dtype, device_type: str, admission_images: int,
                     rows: int, prompt_tokens: int) -> int:
    """An upper estimate of the activations of one admission round: `admission_images` images
    through the vision tower and the prefix prefill, then `rows` prompts of `prompt_tokens` text
    tokens. Per phase, the live tensors of one layer (residual, qkv, attention output, the MLP's
    intermediate tensors); attention scores count only on CPU (CUDA's SDPA kernels do not
    materialize them); fp32 logits of the rows."""
    b = dtype.itemsize
    vc = cfg.vision_config
    n, T = admission_images, vc.grid_size ** 2 + 1
    vision = n * T * (5 * vc.hidden_size + 2 * vc.intermediate_size) * b
    P = 1 + cfg.num_vision_tokens
    per_token = (6 * cfg.hidden_size + 3 * cfg.intermediate_size) * b
    prefix = n * P * per_token
    text = rows * prompt_tokens * per_token
    if device_type == "cpu":
        vision += n * vc.num_heads * T * T * 4
        prefix += n * cfg.num_attention_heads * P * P * 4
        text += rows * cfg.num_attention_heads * prompt_tokens * (P + prompt_tokens) * 4
    logits = rows * cfg.vocab_size * 4 * 2
    return max(vision, prefix, text) + logits


def block_bytes(cfg: "CogVLMConfig", dtype: torch.dtype, block_size: int, kv_dtype: torch.dtype | None = None) -> int:
    """KV of one pool block of `block_size` columns, all layers (a quantized `kv_dtype`, int8 or
    float8: its bytes per value and a 4-byte scale per token and head)."""
    per_head = cfg.head_dim * (kv_dtype or dtype).itemsize + (4 if kv_dtype is not None else 0)
    return cfg.num_hidden_layers * 2 * cfg.num_kv_heads * per_head * block_size


def row_state_bytes(max_new_tokens: int, table_blocks: int) -> int:
    """One row's decode state: its output buffer, block table and a dozen scalars."""
    return (max_new_tokens + 1) * 8 + (table_blocks + 1) * 8 + 14 * 8


def kv_slot_bytes(cfg: "CogVLMConfig", dtype: torch.dtype, max_len: int, max_new_tokens: int) -> int:
    """KV cache and per-row state of one slot of `max_len` columns (as the engine allocates it)."""
    kv = cfg.num_hidden_layers * 2 * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize * max_len
    return kv + max_len + (max_new_tokens + 1) * 8 + 12 * 8


def estimate_replica(cfg: "CogVLMConfig", dtype: torch.dtype, quantization: str | None, *, device_type: str = "cuda",
                     quantize_vision: bool = True, max_prompt_tokens: int = 256, max_new_tokens: int = 64,
                     admission_images: int = 8, prompts_per_image: int = 1, min_slots: int | None = None,
                     max_slots: int | None = None, device_bytes: int | None = None) -> ReplicaEstimate:
    """Weights (exact, from the shapes) + one admission round + KV for `min_slots` slots (default:
    every prompt of one image, and at least `MIN_SLOTS`) + margin (as the engine's: 5% of the device, at most 2 GB, and
    the CUDA context)."""
    from .decoder import CogVLMForCausalLM
    from .quantization import check_quantization, weight_bytes

    quantization = check_quantization(quantization)
    with torch.device("meta"):
        model = CogVLMForCausalLM(cfg)
    params = sum(p.numel() for p in model.parameters())
    weights = weight_bytes(model, dtype, quantization, device_type, quantize_vision)
    max_len = 1 + cfg.num_vision_tokens + max_prompt_tokens + max_new_tokens
    rows = admission_images * max(1, prompts_per_image)
    acts = activation_bytes(cfg, dtype, device_type, admission_images, rows, max_prompt_tokens)
    decode = (cfg.vocab_size * 4 * 2 + 6 * cfg.hidden_size * dtype.itemsize)  # per slot and step
    slot = kv_slot_bytes(cfg, dtype, max_len, max_new_tokens) + decode
    margin = 0
    if device_type == "cuda":
        margin = CUDA_CONTEXT_BYTES + (int(min(0.05 * device_bytes, 2 * GB)) if device_bytes else int(2 * GB))
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
    label = f"CogVLM v{cfg.version} ({params / 1e9:.1f}B parameters) in {name}"
    if quantization == "fp8":
        label += " with fp8 " + ("vision tower and visual expert" if quantize_vision else "visual expert")
    elif quantization:
        label += f" with {quantization} weights" + ("" if quantize_vision else " (decoder only)")
    if min_slots is None:  # the least a replica may start with: one image's prompts at once, and 4
        min_slots = max(MIN_SLOTS, prompts_per_image)
        if max_slots is not None:  # the engine never plans more
            min_slots = min(min_slots, max_slots)
    return ReplicaEstimate(label, weights, acts, slot, min_slots, margin)


def fit_error(cfg: "CogVLMConfig", dtype: torch.dtype, quantization: str | None, device_bytes: int,
              where: str, **kw: Any) -> str | None:
    """None if a replica fits `device_bytes`; else a one-line message naming what would fit."""
    est = estimate_replica(cfg, dtype, quantization, device_bytes=device_bytes, **kw)
    if est.total_bytes <= device_bytes:
        return None
    options = []
    vision_kw = {k: v for k, v in kw.items() if k != "quantize_vision"}
    for q in ("int8", "int4"):
        if q == quantization and kw.get("quantize_vision", True) or (quantization == "int4" and q == "int8"):
            continue
        for vision in dict.fromkeys((kw.get("quantize_vision", True), True)):  # as asked, then with the vision tower
            alt = estimate_replica(cfg, dtype, q, device_bytes=device_bytes, quantize_vision=vision, **vision_kw)
            if alt.total_bytes <= device_bytes:
                extra = "" if vision == kw.get("quantize_vision", True) else " with model.quantize_vision=true"
                options.append(f"model.quantization={q}{extra} (about {alt.total_bytes / GB:.0f} GB)")
                break
    advice = ("set " + " or ".join(options)) if options else \
        "no weight quantization fits: use a larger GPU, or lower model.admission_images, max_prompt_tokens or the tasks' max_new_tokens"
    return f"{est.describe()}; {where} {device_bytes / GB:.1f} GB: {advice}"


def is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                            or "not enough memory" in text)


def weights_bytes(model: Any) -> int:
    """Parameters and buffers as stored (quantized ones at their real size), KV stores excluded."""
    caches = [m for layer in model.model.layers for m in (layer.self_attn.kv_cache, layer.self_attn.kv_pool)]
    return module_bytes(model) - sum(module_bytes(c) for c in caches if c is not None)
