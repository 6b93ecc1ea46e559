"""Token choice per row: greedy, or sampled from the row's own counter-based random stream.

A sampled row draws its noise from (row seed, token index) only, never from a generator shared
with the batch: the same prompt with the same seed gives the same tokens alone or in any batch,
and a row's seed can be derived from what identifies it (`derive_seed(job_seed, key, task)`).
Sampling is the Gumbel-max trick, `argmax(logits / T + g)` with g ~ Gumbel(0, 1), which draws
exactly from `softmax(logits / T)`; the uniforms behind g come from an integer hash computed on
the device, so no host sync and no per-row generator objects are needed.
"""

from __future__ import annotations

import hashlib

import torch

_M32 = 0xFFFFFFFF


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from a base seed and what identifies a row (e.g. image key, task index)."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(str(p) for p in parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors holding values < 2**32 (multipliers < 2**31 keep
    every product below 2**63, so nothing overflows)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


_COLUMNS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _column_hashes(vocab_size: int, device: torch.device) -> torch.Tensor:
    key = (vocab_size, device)
    if key not in _COLUMNS:
        _COLUMNS[key] = _mix32(torch.arange(vocab_size, device=device, dtype=torch.int64) ^ 0x5BD1E995)  # (V,)
    return _COLUMNS[key]


def uniforms(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B,) int64 seeds and token indices -> (B, V) float32 uniforms, strictly inside (0, 1)."""
    key = _mix32((seeds & _M32) ^ _mix32(((seeds >> 32) & _M32) ^ 0x3C6EF372))
    key = _mix32(key ^ _mix32((steps & _M32) ^ 0x1B873593))  # (B,)
    col = _column_hashes(vocab_size, seeds.device)
    h = _mix32(_mix32(key[:, None] ^ col[None, :]) ^ key[:, None])  # (B, V)
    # 23 bits + 1/2 is exact in float32: the largest value is 1 - 2**-24, never 1 (whose Gumbel
    # noise would be infinite)
    return ((h >> 9).float() + 0.5) * (1.0 / (1 << 23))


def filter_top_k_top_p(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row: keep the `top_k` largest (0 = all), then the smallest set reaching `top_p`."""
    V = x.shape[-1]
    sorted_x, order = x.sort(dim=-1, descending=True)  # (B, V)
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)
    kth = sorted_x.gather(1, (k - 1)[:, None])  # (B, 1)
    sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))
    probs = sorted_x.softmax(dim=-1)
    p = torch.where(top_p < 1.0, top_p, float("inf"))[:, None]
    sorted_x = sorted_x.masked_fill(probs.cumsum(dim=-1) - probs > p, float("-inf"))
    return torch.full_like(x, float("-inf")).scatter(1, order, sorted_x)


def sample(logits: torch.Tensor, temperature: torch.Tensor | None = None, top_k: torch.Tensor | None = None,
           top_p: torch.Tensor | None = None, seeds: torch.Tensor | None = None,
           steps: torch.Tensor | None = None, filtered: bool = True) -> torch.Tensor:
    """(B, V) fp32 logits -> (B,) token ids. Rows with `temperature <= 0` (or no temperature at
    all) are greedy; others sample with their seed at token index `steps`. `filtered=False`
    skips the top-k/top-p sort when no row uses them."""
    greedy = logits.argmax(dim=-1)
    if temperature is None:
        return greedy
    x = logits / temperature.clamp_min(1e-6)[:, None]
    if filtered:
        x = filter_top_k_top_p(x, top_k, top_p)
    g = -torch.log(-torch.log(uniforms(seeds, steps, logits.shape[-1])))
    return torch.where(temperature > 0, (x + g).argmax(dim=-1), greedy)
