"""Preallocated per-layer KV cache with static shapes (installed before prefill, freed after)."""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(self, max_batch_size: int, num_kv_heads: int, max_seq_length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (max_batch_size, num_kv_heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, KV, Lq, d) at sequence slots (Lq,); return the first `kv_len` slots."""
        B = k.shape[0]
        self.k_cache[:B].index_copy_(2, slots, k)
        self.v_cache[:B].index_copy_(2, slots, v)
        return self.k_cache[:B, :, :kv_len], self.v_cache[:B, :, :kv_len]
