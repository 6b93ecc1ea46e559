"""Attention over the KV store: a row's keys are its image's prefix (shared) and its own suffix.

Decode (`StoreBatch.decode`): one query per row. The suffix part gathers each row's blocks up to
the widest live row (`W` columns, not `max_len`) and hides columns past the row's length. The
prefix part reads each prefix entry once for all its rows: the rows' queries are placed in their
entry's lanes, `(E, KV, lanes * G, d)`, and attend to the entry's P columns, a strided view of the
pool. The two partial results merge by their log-sum-exp (cascade attention), which gives exactly
softmax attention over the concatenated keys.

Prefill: a fresh sequence (`fresh`: an image prefix, a text-only prompt, or an image prefix with
its first prompt) attends causally to its own keys; a prompt's text after a stored prefix
(`text`) attends to the prefix (gathered once per row) and causally to its own text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kv_store import KVPool


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the log-sum-exp of the scores.

    q (N, KV, M, d), k/v (N, KV, L, d), `valid` (N or 1, 1, 1, L) bool or None -> out (N, KV, M, d)
    fp32, lse (N, KV, M, 1) fp32 (-inf where no key is valid)."""
    s = (q @ k.transpose(-1, -2)).float() * scale  # (N, KV, M, L)
    if valid is not None:
        s = s.masked_fill(~valid, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)  # (N, KV, M, 1)
    out = (p.to(v.dtype) @ v).float() / denom.clamp_min(1e-30)
    return out, m + torch.log(denom)


def merge(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """Two attention results over disjoint key sets -> the result over their union."""
    m = torch.maximum(l1, l2)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    return (o1 * w1 + o2 * w2) / (w1 + w2).clamp_min(1e-30)


@dataclass
class StoreBatch:
    """Where a forward's tokens live in the KV store, and what they attend to.

    `mode`: "fresh" (causal over the forward's own tokens), "text" (the row's prefix entry, then
    causal over its own tokens) or "decode" (one token per row: prefix lanes + suffix blocks)."""

    mode: str
    write: torch.Tensor | None  # (B, L) flat suffix slots of this forward's tokens (block * size + offset)
    P: int  # prefix columns
    nP: int  # blocks per prefix entry
    lanes: int = 1
    entry: torch.Tensor | None = None  # text: (B,) each row's prefix entry
    blocks: torch.Tensor | None = None  # decode: (B, nb) each row's suffix blocks
    length: torch.Tensor | None = None  # decode: (B,) suffix columns to read (this token's included)
    lane: torch.Tensor | None = None  # decode: (B,) entry * lanes + lane, or -1 (no prefix)
    entries: int = 0  # text, decode: prefix entries 0..entries-1 are read
    prefix: torch.Tensor | None = None  # fresh: (U,) the entries these rows' keys are the prefixes of

    def attend(self, pool: KVPool, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, H, L, d), k/v (B, KV, L, d) of this forward -> (B, H, L, d)."""
        if self.prefix is not None:
            pool.write_prefix(self.prefix, self.nP, k, v)
        else:
            pool.write(self.write, k, v)
        gqa = k.shape[1] != q.shape[1]
        if self.mode == "fresh":
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=gqa)
        if self.mode == "text":
            kp, vp = pool.prefixes(self.entries, self.nP, self.P)  # (E, KV, P, d) views
            L = q.shape[2]
            keys = torch.cat([kp[self.entry], k], dim=2)  # (B, KV, P + L, d)
            values = torch.cat([vp[self.entry], v], dim=2)
            cols = torch.arange(self.P + L, device=q.device)
            mask = cols[None, :] <= self.P + torch.arange(L, device=q.device)[:, None]  # (L, P + L)
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
        return self._decode(pool, q, k)

    def _decode(self, pool: KVPool, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        B, H, _, d = q.shape
        KV = k.shape[1]
        G = H // KV
        scale = d ** -0.5
        qg = q.view(B, KV, G, d)  # head h uses KV head h // G
        # the rows' own suffixes, up to the widest live one
        ks, vs = pool.gather(self.blocks)  # (B, KV, W, d)
        W = ks.shape[2]
        valid = (torch.arange(W, device=q.device)[None, :] < self.length[:, None])[:, None, None, :]  # (B, 1, 1, W)
        o_s, l_s = attend_lse(qg, ks, vs, valid, scale)  # (B, KV, G, d), (B, KV, G, 1)
        # the prefixes, each read once for the rows in its lanes
        E, R = self.entries, self.lanes
        kp, vp = pool.prefixes(E, self.nP)  # (E, KV, nP * block, d): whole runs, the tail past P masked
        in_prefix = (torch.arange(kp.shape[2], device=q.device) < self.P)[None, None, None, :]
        slot = torch.where(self.lane >= 0, self.lane, E * R)  # (B,): rows without a prefix to a spare lane
        qp = q.new_zeros(E * R + 1, KV, G, d)
        qp.index_put_((slot,), qg)
        qp = qp[:E * R].view(E, R, KV, G, d).transpose(1, 2).reshape(E, KV, R * G, d)
        o_p, l_p = attend_lse(qp, kp, vp, in_prefix, scale)  # (E, KV, R*G, d), (E, KV, R*G, 1)
        o_p = o_p.view(E, KV, R, G, d).transpose(1, 2).reshape(E * R, KV, G, d)
        l_p = l_p.view(E, KV, R, G, 1).transpose(1, 2).reshape(E * R, KV, G, 1)
        o_p = torch.cat([o_p, o_p.new_zeros(1, KV, G, d)])[slot]  # (B, KV, G, d)
        l_p = torch.cat([l_p, l_p.new_full((1, KV, G, 1), float("-inf"))])[slot]
        return merge(o_s, l_s, o_p, l_p).to(q.dtype).view(B, H, 1, d)
