"""Llama-style decoder with the visual expert, and the top-level `CogVLMForCausalLM`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import VISION_TOKEN_TYPE, CogVLMConfig
from .kv_cache import KVCache
from .kv_store import KVPool
from .positions import attention_mask_4d, build_position_ids, vision_expert_mask
from .vision import EVA2CLIPModel

if TYPE_CHECKING:
    from .cascade import StoreBatch


# --- expert routing ---------------------------------------------------------------------------

@dataclass
class ExpertRouting:
    """Which positions each expert handles: `None` indices = all language (the fast path); flat
    (B*L) indices (gather/scatter, any layout); or `span` (s, e), the vision expert on columns
    s..e-1 of every row and the language expert on the rest (contiguous slices, no index kernels
    and no host sync: the engine's prefix passes, where every row is [bos, patches, eoi, text])."""

    vision_index: torch.Tensor | None = None
    language_index: torch.Tensor | None = None
    span: tuple[int, int] | None = None

    @classmethod
    def from_token_types(cls, token_type_ids: torch.Tensor) -> "ExpertRouting":
        mask = vision_expert_mask(token_type_ids).flatten()  # (B*L,)
        if not bool(mask.any()):
            return cls()
        return cls(mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1))

    @classmethod
    def image_prefix(cls, num_vision_tokens: int) -> "ExpertRouting":
        """Rows that start with an image prefix [bos, boi, patches..., eoi] (then language): the
        spec's mask gives the vision expert boi and the patches, columns 1..num_vision_tokens-1
        (eoi is followed by language, so it is not)."""
        return cls(span=(1, num_vision_tokens))

    def apply(self, x: torch.Tensor, language: Callable[[torch.Tensor], torch.Tensor],
              vision: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Run each expert only on its own tokens and put the results back in place."""
        if self.span is not None:
            s, e = self.span
            lang = language(torch.cat([x[:, :s], x[:, e:]], dim=1))  # (B, L - (e - s), D')
            return torch.cat([lang[:, :s], vision(x[:, s:e]), lang[:, s:]], dim=1)  # (B, L, D')
        if self.vision_index is None:
            return language(x)
        B, L, _ = x.shape
        flat = x.reshape(B * L, -1)  # (B*L, D)
        lang_out = language(flat.index_select(0, self.language_index))
        vis_out = vision(flat.index_select(0, self.vision_index))
        out = lang_out.new_empty(B * L, lang_out.shape[-1])
        out.index_copy_(0, self.language_index, lang_out)
        out.index_copy_(0, self.vision_index, vis_out)
        return out.view(B, L, -1)


# --- building blocks --------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight.float() * h).to(x.dtype)  # weight multiply in fp32, then cast


def rope_inv_freq(head_dim: int, base: float, device: torch.device | str | None = None) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (B, 1, L, d) tables gathered by position id (NeoX half-split layout)."""
    freqs = position_ids[..., None].float() * inv_freq  # (B, L, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, L, d)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class VisionExpertAttention(nn.Module):
    def __init__(self, config: CogVLMConfig) -> None:
        super().__init__()
        D = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.vision_expert_query_key_value = nn.Linear(D, config.qkv_size, bias=config.version == 2)
        self.vision_expert_dense = nn.Linear(D, D, bias=False)
        self.language_expert_query_key_value = nn.Linear(D, config.qkv_size, bias=False)
        self.language_expert_dense = nn.Linear(D, D, bias=False)
        self.kv_cache: KVCache | None = None  # `generate`'s static cache
        self.kv_pool: KVPool | None = None  # the engine's block pool

    def forward(self, x: torch.Tensor, routing: ExpertRouting, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache_slots: torch.Tensor | None = None,
                cache_rows: torch.Tensor | None = None, store: "StoreBatch | None" = None) -> torch.Tensor:
        """`mask` (B, 1, Lq, Lk) bool, or None for plain causal attention over this step's own
        tokens from slot 0 (lets SDPA use its flash kernel; padding may only follow real tokens).
        `cache_slots`: the cache columns of this step's tokens ((Lq,) or (B, Lq)); `cache_rows`:
        the cache rows of the batch's rows (None: rows 0..B-1)."""
        B, L, D = x.shape
        H, KV, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = routing.apply(x, self.language_expert_query_key_value, self.vision_expert_query_key_value)
        q, k, v = qkv.split([H * d, KV * d, KV * d], dim=-1)
        q = q.view(B, L, H, d).transpose(1, 2)  # (B, H, L, d)
        k = k.view(B, L, KV, d).transpose(1, 2)  # (B, KV, L, d)
        v = v.view(B, L, KV, d).transpose(1, 2)  # (B, KV, L, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if store is not None:  # the engine's KV store (`cascade.py`)
            assert self.kv_pool is not None, "store given but no KV pool installed"
            out = store.attend(self.kv_pool, q, k, v).transpose(1, 2).reshape(B, L, D)  # (B, L, H*d)
            return routing.apply(out, self.language_expert_dense, self.vision_expert_dense)
        if cache_slots is not None:  # write this step's keys/values, attend over the cache
            assert self.kv_cache is not None, "cache_slots given but no KV cache installed"
            if mask is None:  # a fresh sequence from column 0: its own keys are the whole context
                self.kv_cache.write(cache_slots, k, v, cache_rows)
            else:
                k, v = self.kv_cache.update(cache_slots, k, v, mask.shape[-1], cache_rows)  # (B, KV, Lk, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and L > 1,
                                             enable_gqa=KV != H)
        out = out.transpose(1, 2).reshape(B, L, D)  # (B, L, H*d)
        return routing.apply(out, self.language_expert_dense, self.vision_expert_dense)


class MLP(nn.Module):
    def __init__(self, config: CogVLMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionExpertMLP(nn.Module):
    def __init__(self, config: CogVLMConfig) -> None:
        super().__init__()
        self.language_mlp = MLP(config)
        self.vision_mlp = MLP(config)

    def forward(self, x: torch.Tensor, routing: ExpertRouting) -> torch.Tensor:
        return routing.apply(x, self.language_mlp, self.vision_mlp)


class CogVLMDecoderLayer(nn.Module):
    def __init__(self, config: CogVLMConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = VisionExpertAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = VisionExpertMLP(config)

    def forward(self, x: torch.Tensor, routing: ExpertRouting, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache_slots: torch.Tensor | None = None,
                cache_rows: torch.Tensor | None = None, store: "StoreBatch | None" = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), routing, cos, sin, mask, cache_slots, cache_rows, store)
        return x + self.mlp(self.post_attention_layernorm(x), routing)


class CogVLMModel(nn.Module):
    def __init__(self, config: CogVLMConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(CogVLMDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.vision = EVA2CLIPModel(config)
        # recomputed, never loaded (the release's `rotary_emb.inv_freq` keys are ignored)
        self.register_buffer("inv_freq", rope_inv_freq(config.head_dim, config.rope_theta),
                             persistent=False)


# --- the model --------------------------------------------------------------------------------

class CogVLMForCausalLM(nn.Module):
    """CogVLM v1/v2. `model(input_ids, token_type_ids, attention_mask, images)` -> fp32 logits."""

    def __init__(self, config: CogVLMConfig) -> None:
        super().__init__()
        self.config = config
        self.model = CogVLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (after building on `meta` and loading weights)."""
        self.model.inv_freq = rope_inv_freq(self.config.head_dim, self.config.rope_theta, self.device)

    # caches ------------------------------------------------------------------------------------
    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
        c = self.config
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(max_batch_size, c.num_kv_heads, max_seq_length,
                                               c.head_dim, dtype=self.dtype, device=self.device)

    def clear_caches(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    def setup_pool(self, blocks: int, block_size: int, kv_dtype: torch.dtype | None = None) -> None:
        """The engine's KV store: `blocks` blocks of `block_size` columns per layer (+ a trash block);
        `kv_dtype` torch.int8 / torch.float8_e4m3fn stores the keys and values in that dtype with
        per-token-head scales (`cogvlm.kv_store.KV_CODES`)."""
        c = self.config
        for layer in self.model.layers:
            layer.self_attn.kv_pool = None
        for layer in self.model.layers:
            layer.self_attn.kv_pool = KVPool(blocks, block_size, c.num_kv_heads, c.head_dim, dtype=self.dtype,
                                             device=self.device, kv_dtype=kv_dtype)

    def clear_pool(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.kv_pool = None

    # pieces ------------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, num_vision_tokens, D)."""
        return self.model.vision(images.to(device=self.device, dtype=self.dtype))

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
              images: Sequence[torch.Tensor | None] | None = None,
              image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with each image row's vision positions replaced, in order, by its features."""
        embeds = self.model.embed_tokens(input_ids)  # (B, L, D)
        is_vision = token_type_ids == VISION_TOKEN_TYPE
        per_row = is_vision.sum(1).tolist()
        if images is None:
            images = [None] * input_ids.shape[0]
        if len(images) != input_ids.shape[0]:
            raise ValueError(f"images has {len(images)} entries for a batch of {input_ids.shape[0]} rows")
        rows = [i for i, im in enumerate(images) if im is not None]
        n_vis = self.config.num_vision_tokens
        for i, (im, count) in enumerate(zip(images, per_row)):
            want = n_vis if im is not None else 0
            if count != want:
                raise ValueError(f"row {i} has {count} vision tokens, expected {want} "
                                 f"({'one image' if im is not None else 'no image'})")
        if rows:
            if image_features is None:
                image_features = self.encode_images(torch.stack([images[i] for i in rows]))
            feats = image_features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)  # (N*T, D)
            embeds = embeds.index_put((is_vision,), feats)
        return embeds

    def forward_embeds(self, embeds: torch.Tensor, token_type_ids: torch.Tensor,
                       position_ids: torch.Tensor, mask: torch.Tensor | None,
                       cache_slots: torch.Tensor | None = None,
                       routing: ExpertRouting | None = None,
                       logits_to_keep: int | None = None, cache_rows: torch.Tensor | None = None,
                       logits_at: torch.Tensor | None = None, store: "StoreBatch | None" = None) -> torch.Tensor:
        """Decoder over prepared embeddings; `mask` is the boolean (B, 1, Lq, Lk) SDPA mask, or
        None for causal attention from slot 0. Logits of the last `logits_to_keep` positions, or
        of position `logits_at[b]` of each row b ((B, 1, V)), or of all. `store`: keys and values
        live in the engine's KV pool instead (`cascade.StoreBatch`)."""
        if routing is None:
            routing = ExpertRouting.from_token_types(token_type_ids)
        cos, sin = rope_cos_sin(position_ids, self.model.inv_freq)
        h = embeds
        for layer in self.model.layers:
            h = layer(h, routing, cos, sin, mask, cache_slots, cache_rows, store)
        if logits_at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_at][:, None]  # (B, 1, D)
        elif logits_to_keep is not None:
            h = h[:, -logits_to_keep:]
        h = self.model.norm(h)
        return self.lm_head(h).float()

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                images: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """Full recomputation (no cache): fp32 logits (B, L, vocab). Rows are left-padded."""
        B, L = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = build_position_ids(token_type_ids, attention_mask)
        mask = attention_mask_4d(attention_mask, torch.arange(L, device=input_ids.device))
        embeds = self.embed(input_ids, token_type_ids, images)
        return self.forward_embeds(embeds, token_type_ids, position_ids, mask)
