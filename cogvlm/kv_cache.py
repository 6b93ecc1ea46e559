"""Per-layer KV cache: (rows, KV heads, max_len, head_dim) buffers allocated once, with static shapes."""

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

    def write(self, cols: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              rows: torch.Tensor | None = None) -> None:
        """Store k, v (B, KV, Lq, d) at sequence columns `cols`, (Lq,) for every row or (B, Lq) per
        row, of cache rows `rows` (B,) (None: rows 0..B-1, the static-shape path).

        One `index_put_` on the whole buffer: torch.compile turns it into an in-place scatter (a
        write into a slice view instead becomes a copy of the whole cache at every step)."""
        B, KV, Lq, _ = k.shape
        if rows is None:
            rows = torch.arange(B, device=k.device)
        heads = torch.arange(KV, device=k.device)
        c = cols if cols.dim() == 2 else cols.expand(B, Lq)
        index = (rows[:, None, None], heads[None, :, None], c[:, None, :])  # broadcast to (B, KV, Lq)
        self.k_cache.index_put_(index, k)
        self.v_cache.index_put_(index, v)

    def read(self, kv_len: int, batch: int, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first `kv_len` columns: a view of rows 0..batch-1, or a copy of `rows`."""
        if rows is None:
            return self.k_cache[:batch, :, :kv_len], self.v_cache[:batch, :, :kv_len]
        return self.k_cache[rows, :, :kv_len], self.v_cache[rows, :, :kv_len]

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int,
               rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`write`, then `read` the first `kv_len` columns of the same rows: (B, KV, kv_len, d)."""
        self.write(slots, k, v, rows)
        return self.read(kv_len, k.shape[0], rows)
