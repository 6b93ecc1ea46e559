"""Throughput engine: one vision pass and one image prefix per image, batches sized by KV memory.

An image's prefix `[bos, boi, patches..., eoi]` is identical for every prompt about it. The engine
runs the vision tower once per image (in batches of `vision_batch_size`), prefills each distinct
prefix once, copies its KV into the cache rows of that image's prompts, and prefills only the
prompts' own text. A row's layout in the cache is

    [prefix (P slots)] [left pad to the batch's longest text] [text] [generated...]

Pads are masked keys and do not advance positions, so each prompt computes what it computes alone
(RoPE depends on relative positions only). Decoding then uses the static-shape step of
`generate.py`, compacting the batch as rows finish; `compile=True` wraps that step in
`torch.compile(mode="reduce-overhead")` (CUDA graphs on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .config import LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE
from .decoder import CogVLMForCausalLM, ExpertRouting
from .generate import (GenerationOutput, Sampling, _check_context, _Clock, decode_loop, decode_one_token,
                       generate)
from .positions import attention_mask_4d, build_position_ids
from .processor import Sample, collate


@dataclass
class Request:
    """One prompt: its text token ids (what follows bos and the image) and the image it is about."""

    text_ids: list[int]
    image: int | None = None  # index into the images given to `Engine.generate`, or None
    max_new_tokens: int = 32


class Engine:
    """Batched generation over many (image, prompt) requests for one model on one device.

    `kv_cache_gb` bounds the KV cache of a decode batch (default: 90% of free GPU memory, or 4 GB
    on CPU); the batch size follows from it and the longest request, capped by `max_batch_size`.
    """

    def __init__(self, model: CogVLMForCausalLM, *, kv_cache_gb: float | None = None,
                 max_batch_size: int = 256, vision_batch_size: int = 16, compile: bool = False) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.vision_batch_size = vision_batch_size
        if kv_cache_gb is None:
            if model.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(model.device)
                kv_cache_gb = 0.9 * free / 1e9
            else:
                kv_cache_gb = 4.0
        self.kv_cache_bytes = kv_cache_gb * 1e9
        self.step_fn = decode_one_token
        if compile:
            self.step_fn = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=False)

    # sizing ------------------------------------------------------------------------------------
    def kv_bytes_per_token(self) -> int:
        c = self.model.config
        return c.num_hidden_layers * 2 * c.num_kv_heads * c.head_dim * self.model.lm_head.weight.element_size()

    def batch_size_for(self, seq_len: int) -> int:
        """Rows whose KV cache of `seq_len` slots fits the budget (at least 1)."""
        return max(1, min(self.max_batch_size, int(self.kv_cache_bytes // (seq_len * self.kv_bytes_per_token()))))

    # vision ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """(N, 3, S, S) -> (N, T, D), in batches of `vision_batch_size`."""
        feats = [self.model.encode_images(torch.stack(list(images[i:i + self.vision_batch_size])))
                 for i in range(0, len(images), self.vision_batch_size)]
        return torch.cat(feats) if feats else torch.empty(0)

    # generation --------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, requests: Sequence[Request], images: torch.Tensor | Sequence[torch.Tensor] = (),
                 *, image_features: torch.Tensor | None = None, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 eos_token_id: int | Sequence[int] | None = None, ignore_eos: bool = False,
                 timings: dict[str, float] | None = None) -> GenerationOutput:
        """Outputs in request order. `images` (or precomputed `image_features`) are indexed by
        `Request.image`. `timings` receives vision_s, prefill_s (vision included), decode_s."""
        cfg = self.model.config
        if eos_token_id is None:
            eos_token_id = cfg.eos_token_ids
        eos = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
        sampling = Sampling(temperature, top_p, top_k, seed, eos, ignore_eos)
        t = {"vision_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0}
        clock = _Clock(self.model.device, t)
        feats = image_features
        if feats is None and any(r.image is not None for r in requests):
            feats = self.encode_images(images)
        clock.lap("vision_s")
        t["prefill_s"] = t["vision_s"]

        results: dict[int, tuple[list[int], int, str]] = {}
        for batch in self._batches(requests):
            sub: dict[str, float] = {}
            if requests[batch[0]].image is None:
                out = self._text_only([requests[i] for i in batch], sampling, sub)
            else:
                out = self._shared_prefix([requests[i] for i in batch], feats, sampling, sub)
            t["prefill_s"] += sub["prefill_s"]
            t["decode_s"] += sub["decode_s"]
            for i, toks, n, why in zip(batch, out.tokens, out.num_tokens, out.finish_reasons):
                results[i] = (toks, n, why)
        if timings is not None:
            timings.update(t)
        order = range(len(requests))
        prompt_tokens = [1 + len(r.text_ids) + (cfg.num_vision_tokens if r.image is not None else 0)
                         for r in requests]
        return GenerationOutput([results[i][0] for i in order], [results[i][1] for i in order],
                                [results[i][2] for i in order], prompt_tokens)

    def _batches(self, requests: Sequence[Request]) -> list[list[int]]:
        """Image requests grouped by image (an image's prompts share one batch), text-only apart;
        each batch as large as the KV budget allows for its longest member."""
        n_vis = self.model.config.num_vision_tokens
        by_image: dict[int, list[int]] = {}
        text_only: list[int] = []
        for i, r in enumerate(requests):
            (text_only if r.image is None else by_image.setdefault(r.image, [])).append(i)
        batches: list[list[int]] = []

        def fill(groups: list[list[int]], prefix: int) -> None:
            cur: list[int] = []
            longest = 0
            for g in groups:
                need = max(len(requests[i].text_ids) + requests[i].max_new_tokens for i in g)
                cap = self.batch_size_for(1 + prefix + max(longest, need))
                if cur and len(cur) + len(g) > cap:
                    batches.append(cur)
                    cur, longest = [], 0
                cur += g
                longest = max(longest, need)
            if cur:
                batches.append(cur)

        # similar text lengths together: images by their prompts' total length, text rows by length
        fill(sorted(by_image.values(), key=lambda g: sum(len(requests[i].text_ids) for i in g)), n_vis)
        fill([[i] for i in sorted(text_only, key=lambda i: len(requests[i].text_ids))], 0)
        return batches

    def _text_only(self, reqs: list[Request], sampling: Sampling, timings: dict[str, float]) -> GenerationOutput:
        cfg = self.model.config
        b = collate([Sample([cfg.bos_token_id] + r.text_ids, [LANGUAGE_TOKEN_TYPE] * (1 + len(r.text_ids)), None)
                     for r in reqs], cfg.pad_token_id)
        return generate(self.model, b.input_ids, b.token_type_ids, b.attention_mask, None,
                        max_new_tokens=[r.max_new_tokens for r in reqs], temperature=sampling.temperature,
                        top_p=sampling.top_p, top_k=sampling.top_k, seed=sampling.seed,
                        eos_token_id=sampling.eos_token_ids, ignore_eos=sampling.ignore_eos, timings=timings)

    def _shared_prefix(self, reqs: list[Request], feats: torch.Tensor, sampling: Sampling,
                       timings: dict[str, float]) -> GenerationOutput:
        model, cfg = self.model, self.model.config
        dev = model.device
        clock = _Clock(dev, timings)
        images = sorted({r.image for r in reqs})
        u_of_row = torch.tensor([images.index(r.image) for r in reqs], device=dev)
        B, U = len(reqs), len(images)
        P = 1 + cfg.num_vision_tokens
        T = max(len(r.text_ids) for r in reqs)
        max_new = torch.tensor([r.max_new_tokens for r in reqs])
        max_len = P + T + int(max_new.max())

        # 1. each distinct prefix once: [bos, boi, patches, eoi] for U images, plain causal
        prefix_types = torch.tensor([[LANGUAGE_TOKEN_TYPE] + [VISION_TOKEN_TYPE] * cfg.num_vision_tokens],
                                    device=dev).expand(U, P)
        prefix_pos = build_position_ids(prefix_types)  # (U, P): 0, 1, 2, ..., 2, 3
        bos = model.model.embed_tokens(torch.full((U, 1), cfg.bos_token_id, device=dev))
        embeds = torch.cat([bos, feats[images].to(dev, bos.dtype)], dim=1)  # (U, P, D)
        model.setup_caches(U, P)
        try:
            prefix_logits = model.forward_embeds(embeds, prefix_types, prefix_pos, None,
                                                 cache_slots=torch.arange(P, device=dev),
                                                 logits_to_keep=1)[:, -1]  # (U, V)
            prefix_kv = [(layer.self_attn.kv_cache.k_cache, layer.self_attn.kv_cache.v_cache)
                         for layer in model.model.layers]
        finally:
            model.clear_caches()

        # 2. copy each row's prefix KV into its cache rows, then prefill only the text
        model.setup_caches(B, max_len)
        try:
            for layer, (k, v) in zip(model.model.layers, prefix_kv):
                layer.self_attn.kv_cache.k_cache[:, :, :P] = k.index_select(0, u_of_row)
                layer.self_attn.kv_cache.v_cache[:, :, :P] = v.index_select(0, u_of_row)
            del prefix_kv
            last_prefix_pos = int(prefix_pos[0, -1])
            ids = torch.full((B, T), cfg.pad_token_id, dtype=torch.long)
            pos = torch.full((B, T), last_prefix_pos, dtype=torch.long)
            key_valid = torch.zeros(B, max_len, dtype=torch.bool)
            key_valid[:, :P] = True
            lengths = torch.tensor([len(r.text_ids) for r in reqs])
            for b, r in enumerate(reqs):
                n = len(r.text_ids)
                if n:
                    ids[b, T - n:] = torch.tensor(r.text_ids)
                    pos[b, T - n:] = last_prefix_pos + 1 + torch.arange(n)
                    key_valid[b, P + T - n:P + T] = True
            ids, pos, key_valid = ids.to(dev), pos.to(dev), key_valid.to(dev)
            slots = torch.arange(P, P + T, device=dev)
            logits = model.forward_embeds(model.model.embed_tokens(ids), torch.zeros_like(ids), pos,
                                          attention_mask_4d(key_valid[:, :P + T], slots),
                                          cache_slots=slots, routing=ExpertRouting(),
                                          logits_to_keep=1)[:, -1]
            no_text = (lengths == 0).to(dev)
            if bool(no_text.any()):  # an empty prompt ends at eoi: its logits come from the prefix
                logits = torch.where(no_text[:, None], prefix_logits.index_select(0, u_of_row), logits)
            last = torch.where(lengths > 0, last_prefix_pos + lengths, last_prefix_pos)
            _check_context(model, last, max_new)
            clock.lap("prefill_s")
            tokens, n, stopped = decode_loop(model, logits, last.to(dev) + 1, key_valid, P + T, max_new,
                                             sampling, step_fn=self.step_fn)
            clock.lap("decode_s")
        finally:
            model.clear_caches()
        return GenerationOutput(tokens, n, ["stop" if s else "length" for s in stopped])
