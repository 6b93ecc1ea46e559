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


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hide: torch.Tensor,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the log-sum-exp of the scores.

    q (N, KV, M, d), k/v (N, KV, L, d), `hide` (N or 1, 1, 1, L) bool: keys not attended to; every
    query attends to at least one key (decode: a row's own fed token; a prefix's P columns) ->
    out (N, KV, M, d) fp32, lse (N, KV, M, 1) fp32 (finite). Few ops: on CPU each costs more
    than its arithmetic at decode sizes."""
    s = (q @ k.transpose(-1, -2)).float().mul_(scale).masked_fill_(hide, float("-inf"))  # (N, KV, M, L)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)  # (N, KV, M, 1)
    p = s.sub_(lse).exp_()  # the softmax, in place of the scores
    return (p.to(v.dtype) @ v).float(), lse


def merge(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """Two attention results over disjoint key sets -> the result over their union: the weight of
    the first is exp(l1) / (exp(l1) + exp(l2)) = sigmoid(l1 - l2). `l1` is finite; `l2` = -inf
    (no keys there) gives exactly o1 (lerp returns its end at weight 1)."""
    return torch.lerp(o2, o1, torch.sigmoid(l1 - l2))


@dataclass
class StoreBatch:
    """Where a forward's tokens live in the KV store, and what they attend to. Built once per
    forward (`fresh`, `text`, `decode`); every layer reuses its index tensors.

    `mode`: "fresh" (causal over the forward's own tokens), "text" (the row's prefix entry, then
    causal over its own tokens) or "decode" (one token per row: prefix lanes + suffix blocks)."""

    mode: str
    write: torch.Tensor | None  # (B, KV, L) pool rows of this forward's tokens (`kv_store.pool_rows`)
    P: int  # prefix columns
    nP: int  # blocks per prefix entry
    lanes: int = 1
    entry: torch.Tensor | None = None  # text: (B,) each row's prefix entry
    entries: int = 0  # text, decode: prefix entries 0..entries-1 are read
    prefix: torch.Tensor | None = None  # fresh: (U,) the entries these rows' first P keys are the prefixes of
    # decode only
    runs: torch.Tensor | None = None  # (B * KV * nb,) the rows' suffix blocks, head-major runs (`block_runs`)
    hide: torch.Tensor | None = None  # (B, 1, 1, nb * block) gathered suffix columns past each row's own
    past_prefix: torch.Tensor | None = None  # (1, 1, 1, nP * block) columns of a prefix run past P
    slot: torch.Tensor | None = None  # (B,) the row's lane among E * lanes, or the spare lane E * lanes
    lane_of: torch.Tensor | None = None  # (B,) the lane whose prefix result a row takes (any, if none)
    no_prefix: torch.Tensor | None = None  # (B, 1, 1, 1) rows without an image

    @classmethod
    def fresh(cls, write: torch.Tensor | None, P: int, nP: int,
              prefix: torch.Tensor | None = None) -> "StoreBatch":
        return cls("fresh", write, P, nP, prefix=prefix)

    @classmethod
    def text(cls, write: torch.Tensor, P: int, nP: int, entry: torch.Tensor, entries: int) -> "StoreBatch":
        return cls("text", write, P, nP, entry=entry, entries=entries)

    @classmethod
    def decode(cls, write: torch.Tensor, P: int, nP: int, lanes: int, runs: torch.Tensor, length: torch.Tensor,
               width: int, lane: torch.Tensor, entries: int, block: int) -> "StoreBatch":
        """One token per row: `runs` its suffix blocks (`block_runs`), `length` (B,) suffix
        columns to read (this token's included), `width` columns gathered per row, `lane` (B,)
        entry * lanes + lane or -1 (no prefix); prefix entries 0..entries-1 are read."""
        dev = length.device
        hide = (torch.arange(width, device=dev)[None, :] >= length[:, None])[:, None, None, :]
        past_prefix = (torch.arange(nP * block, device=dev) >= P)[None, None, None, :]
        slot = torch.where(lane >= 0, lane, entries * lanes)
        return cls("decode", write, P, nP, lanes, entries=entries, runs=runs, hide=hide, past_prefix=past_prefix,
                   slot=slot, lane_of=slot.clamp_max(entries * lanes - 1), no_prefix=(lane < 0)[:, None, None, None])

    def attend(self, pool: KVPool, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, H, L, d), k/v (B, KV, L, d) of this forward -> (B, H, L, d)."""
        if self.prefix is not None:  # an image's prefix (the first P columns), maybe a prompt's text after it
            pool.write_prefix(self.prefix, self.nP, k[:, :, :self.P], v[:, :, :self.P])
            if self.write is not None:
                pool.write(self.write, k[:, :, self.P:], v[:, :, self.P:])
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
        return self._decode(pool, q)

    def _decode(self, pool: KVPool, q: torch.Tensor) -> torch.Tensor:
        B, H, _, d = q.shape
        KV = pool.k_pool.shape[1]
        G = H // KV
        scale = d ** -0.5
        qg = q.view(B, KV, G, d)  # head h uses KV head h // G
        # the rows' own suffixes, up to the widest live one
        ks, vs = pool.gather(self.runs, B)  # (B, KV, W, d)
        o_s, l_s = attend_lse(qg, ks, vs, self.hide, scale)  # (B, KV, G, d), (B, KV, G, 1)
        # the prefixes, each read once for the rows in its lanes (whole runs, the tail past P masked)
        E, R = self.entries, self.lanes
        kp, vp = pool.prefixes(E, self.nP)  # (E, KV, nP * block, d)
        qp = q.new_zeros(E * R + 1, KV, G, d)  # + the spare lane of rows without a prefix
        qp.index_put_((self.slot,), qg)
        qp = qp[:E * R].view(E, R, KV, G, d).transpose(1, 2).reshape(E, KV, R * G, d)  # a view if R == 1
        o_p, l_p = attend_lse(qp, kp, vp, self.past_prefix, scale)  # (E, KV, R*G, d), (E, KV, R*G, 1)
        # back to the rows: output and lse side by side, one gather
        ol = torch.cat([o_p, l_p], dim=-1).view(E, KV, R, G, d + 1).transpose(1, 2).reshape(E * R, KV, G, d + 1)
        ol = ol.index_select(0, self.lane_of)  # (B, KV, G, d + 1)
        o_p, l_p = ol[..., :d], ol[..., d:].masked_fill(self.no_prefix, float("-inf"))
        return merge(o_s, l_s, o_p, l_p).to(q.dtype).view(B, H, 1, d)
