"""Batched generation: one prefill for the batch, then one token per step on a static KV cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .decoder import CogVLMForCausalLM, ExpertRouting
from .positions import attention_mask_4d, build_position_ids
from .sampling import sample


@dataclass
class GenerationOutput:
    """Per row: new token ids (eos included when it stopped there), their count, and why it stopped."""

    tokens: list[list[int]]
    num_tokens: list[int]
    finish_reasons: list[str]  # "stop" (an eos id) or "length" (max_new_tokens)
    prompt_tokens: list[int] = field(default_factory=list)


def prefill(model: CogVLMForCausalLM, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
            attention_mask: torch.Tensor, images: Sequence[torch.Tensor | None] | None,
            key_valid: torch.Tensor, image_features: torch.Tensor | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill cache slots [0, L); return the last column's logits (B, V) and position ids (B, L)."""
    L = input_ids.shape[1]
    position_ids = build_position_ids(token_type_ids, attention_mask)
    slots = torch.arange(L, device=input_ids.device)
    mask = attention_mask_4d(key_valid[:, :L], slots)
    embeds = model.embed(input_ids, token_type_ids, images, image_features)
    logits = model.forward_embeds(embeds, token_type_ids, position_ids, mask,
                                  cache_slots=slots, logits_to_keep=1)
    return logits[:, -1], position_ids


def decode_one_token(model: CogVLMForCausalLM, tokens: torch.Tensor, positions: torch.Tensor,
                     slot: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """One language token per row at cache `slot` (shape (1,)); static shapes. -> (B, V) logits."""
    embeds = model.model.embed_tokens(tokens[:, None])  # (B, 1, D)
    token_types = torch.zeros_like(tokens)[:, None]
    mask = key_valid[:, None, None, :]  # (B, 1, 1, max_len)
    logits = model.forward_embeds(embeds, token_types, positions[:, None], mask,
                                  cache_slots=slot, routing=ExpertRouting())
    return logits[:, -1]


class _Clock:
    """Wall-clock laps, synchronizing the device first; a no-op without a `timings` dict."""

    def __init__(self, device: torch.device, timings: dict[str, float] | None) -> None:
        self.device, self.timings = device, timings
        self.t = self._now() if timings is not None else 0.0

    def _now(self) -> float:
        import time

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, name: str, include: str | None = None) -> None:
        if self.timings is None:
            return
        now = self._now()
        self.timings[name] = now - self.t + (self.timings.get(include, 0.0) if include else 0.0)
        self.t = now


@dataclass
class Sampling:
    """How to pick tokens and when to stop (shared by every row of a batch)."""

    temperature: float = 0.0  # <= 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | Sequence[int] | None = None  # one for every row, or one per row (`sampling.py`)
    eos_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


def decode_loop(model: CogVLMForCausalLM, logits: torch.Tensor, positions: torch.Tensor,
                key_valid: torch.Tensor, start_slot: int, max_new: torch.Tensor, sampling: Sampling,
                step_fn=decode_one_token, compact: bool = True,
                ) -> tuple[list[list[int]], list[int], list[bool]]:
    """Sample from `logits` (B, V), then decode one token per step from cache slot `start_slot`.

    Row b stops at an eos id (unless `ignore_eos`) or after `max_new[b]` tokens. When at least
    half the rows of the batch have stopped, the batch is compacted (caches and state keep only
    the live rows), so finished rows cost no more compute. Returns tokens, counts, eos-stopped.
    """
    device = logits.device
    B = logits.shape[0]
    pad = model.config.pad_token_id
    eos = torch.tensor(list(sampling.eos_token_ids) or [-1], device=device)
    seed = 0 if sampling.seed is None else sampling.seed
    seeds = torch.tensor([seed] * B if isinstance(seed, int) else list(seed), device=device)
    temperature = torch.full((B,), float(sampling.temperature), device=device)
    top_k = torch.full((B,), int(sampling.top_k), device=device)
    top_p = torch.full((B,), float(sampling.top_p), device=device)
    sampled = sampling.temperature > 0
    filtered = sampling.top_k > 0 or sampling.top_p < 1
    steps = int(max_new.max())
    out = torch.full((B, steps), pad, dtype=torch.long, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device)  # original row of each live batch slot
    max_new = max_new.to(device)
    active = torch.ones(B, dtype=torch.bool, device=device)  # per live batch slot
    for step in range(steps):
        tok = sample(logits, temperature[rows] if sampled else None, top_k[rows], top_p[rows], seeds[rows],
                     lengths[rows], filtered)
        tok = torch.where(active, tok, pad)
        out[rows, step] = tok
        lengths[rows] += active.long()
        if not sampling.ignore_eos:
            hit = torch.isin(tok, eos) & active
            stopped[rows] |= hit
            active &= ~hit
        active &= lengths[rows] < max_new[rows]
        n_live = int(active.sum())
        if n_live == 0 or step == steps - 1:
            break
        if compact and n_live <= rows.numel() // 2:
            keep = active.nonzero().squeeze(1)
            for layer in model.model.layers:
                cache = layer.self_attn.kv_cache
                cache.k_cache = cache.k_cache.index_select(0, keep)
                cache.v_cache = cache.v_cache.index_select(0, keep)
            rows, tok, positions = rows[keep], tok[keep], positions[keep]
            key_valid, active = key_valid[keep], active[keep]
        slot = start_slot + step
        key_valid[:, slot] = True
        logits = step_fn(model, tok, positions, torch.tensor([slot], device=device), key_valid)
        positions = positions + 1
    n = lengths.tolist()
    return [r[:k] for r, k in zip(out.tolist(), n)], n, stopped.tolist()


def _max_new(max_new_tokens: int | Sequence[int], B: int) -> torch.Tensor:
    t = torch.tensor([max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens))
    if t.numel() != B or bool((t < 1).any()):
        raise ValueError("max_new_tokens must be >= 1 (one value, or one per row)")
    return t


def context_error(last_position: int, max_new: int, limit: int) -> str | None:
    """Why a prompt ending at `last_position` cannot take `max_new` tokens, or None."""
    if last_position + max_new > limit:
        return (f"prompt ends at position {last_position}; with max_new_tokens={max_new} it passes "
                f"max_position_embeddings={limit}")
    return None


def check_context(model: CogVLMForCausalLM, last_positions: torch.Tensor, max_new: torch.Tensor) -> None:
    limit = model.config.max_position_embeddings
    for b, (last, new) in enumerate(zip(last_positions.tolist(), max_new.tolist())):
        if (why := context_error(last, new, limit)) is not None:
            raise ValueError(f"row {b}: {why}")


@torch.inference_mode()
def generate(model: CogVLMForCausalLM, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
             attention_mask: torch.Tensor | None = None,
             images: Sequence[torch.Tensor | None] | None = None, *,
             max_new_tokens: int | Sequence[int] = 32, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, seed: int | Sequence[int] | None = None, eos_token_id: int | Sequence[int] | None = None,
             ignore_eos: bool = False, timings: dict[str, float] | None = None,
             image_features: torch.Tensor | None = None) -> GenerationOutput:
    """Greedy (temperature 0) or sampled generation for a left-padded batch.

    Stops a row at any eos id (the config's unless `eos_token_id` is given) unless `ignore_eos`,
    or after `max_new_tokens` (one value or one per row). A sampled row draws from its own random
    stream, `seed` (one for all rows or one per row; see `sampling.py`), so it is batch-invariant.
    Raises ValueError when a row's positions would pass `max_position_embeddings`.
    `timings`, when given, receives `vision_s`, `prefill_s` (vision included) and `decode_s`.
    `image_features` (N, T, D), one per non-None image in row order, skips the vision tower.
    """
    device = model.device
    input_ids = input_ids.to(device)
    token_type_ids = token_type_ids.to(device)
    B, L = input_ids.shape
    max_new = _max_new(max_new_tokens, B)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_ids
    eos = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    sampling = Sampling(temperature, top_p, top_k, seed, eos, ignore_eos)

    max_len = L + int(max_new.max())
    key_valid = torch.zeros(B, max_len, dtype=torch.bool, device=device)
    key_valid[:, :L] = attention_mask.bool()
    clock = _Clock(device, timings)
    model.setup_caches(B, max_len)
    try:
        features = image_features
        if features is None and images is not None and any(im is not None for im in images):
            features = model.encode_images(torch.stack([im for im in images if im is not None]))
        clock.lap("vision_s")
        logits, position_ids = prefill(model, input_ids, token_type_ids, attention_mask, images,
                                       key_valid, features)
        check_context(model, position_ids[:, -1], max_new)
        clock.lap("prefill_s", include="vision_s")
        tokens, n, stopped = decode_loop(model, logits, position_ids[:, -1] + 1, key_valid, L, max_new,
                                         sampling)
        clock.lap("decode_s")
    finally:
        model.clear_caches()
    return GenerationOutput(tokens=tokens, num_tokens=n,
                            finish_reasons=["stop" if s else "length" for s in stopped],
                            prompt_tokens=attention_mask.sum(1).tolist())
