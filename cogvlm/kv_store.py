"""The engine's KV store: one pool of fixed-size blocks per layer, holding each image's prefix once
and each row's own suffix (prompt text + generated tokens) in blocks of its own.

Every image row is `[bos, boi, patches..., eoi]` (the prefix, P columns, identical for every
prompt about the image) followed by the row's own suffix; a text-only row is all suffix. So:

- a prefix *entry* e is the run of blocks `[e * nP, (e + 1) * nP)` at the bottom of the pool
  (nP = ceil(P / block)), laid out head-major over the whole run, so that entries `0..E-1` are
  one view `(E, KV, P, d)` with no copy; an entry has `lanes` query lanes, one per prompt of its image
  decoding at once, and is freed when its last row leaves and no prompt of its image waits;
- a row's suffix takes ceil(columns / block) blocks, reserved at admission for exactly what the row
  can hold (its prompt text and its `max_new_tokens`), taken from the top of the pool so that low
  runs stay free for prefix entries; its block table maps suffix column c to block
  `table[c // block]`;
- one extra block at the end is the trash: rows that are not live, padding and pad tokens write
  there, and unused table cells point there.

`BlockAllocator` is the host-side accounting of blocks and entries (no torch); its `reserve`,
`hold_for_waiting` and `give_back` book them for the engine's prompts (a row, its suffix blocks,
its image's entry and lane). `KVPool` holds the per-layer buffers.
"""

from __future__ import annotations

import heapq
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from .scheduler import Room

if TYPE_CHECKING:
    from .sequences import Group, RowBook, Seq


def pool_rows(index: torch.Tensor, KV: int, block: int) -> torch.Tensor:
    """Flat suffix slots `index` (B, L) (block * block_size + offset) -> rows (B, KV, L) of a
    pool seen as (blocks * KV * block, d). Computed once per forward, used by every layer."""
    heads = torch.arange(KV, device=index.device)
    return ((index // block)[:, None, :] * KV + heads[None, :, None]) * block + (index % block)[:, None, :]


def block_runs(blocks: torch.Tensor, KV: int) -> torch.Tensor:
    """Rows' blocks (B, nb) -> the (block, d) runs to gather, head-major, (B * KV * nb,): with a
    pool seen as (blocks * KV, block, d), run `b * KV + h` is head h of block b."""
    heads = torch.arange(KV, device=blocks.device)
    return (blocks[:, None, :] * KV + heads[None, :, None]).reshape(-1)


# quantized KV formats: storage dtype -> (largest code, round to integers first). The scale is
# amax / largest code; int8 rounds to integers, float8 e4m3 rounds as the cast does (3 mantissa bits).
KV_CODES: dict[torch.dtype, tuple[float, bool]] = {torch.int8: (127.0, True), torch.float8_e4m3fn: (448.0, False)}
# `kv_cache_dtype` names (Engine, the job config's model.kv_cache_dtype) -> storage dtype
KV_CACHE_DTYPES: dict[str, torch.dtype] = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def quantize_kv(x: torch.Tensor, dtype: torch.dtype = torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., d) -> `dtype` codes (..., d) (a key of `KV_CODES`) and fp32 scales (..., 1): one scale
    per token and head, symmetric, amax / the format's largest code (int8 127, e4m3 448)."""
    top, integer = KV_CODES[dtype]
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / top
    y = x.float() / scale
    if integer:
        y = y.round_()
    return y.clamp_(-top, top).to(dtype), scale


def _bytes(x: torch.Tensor) -> torch.Tensor:
    """float8 codes as uint8 (the same memory; int8 as it is): the pool copies float8 codes as
    bytes, as `index_copy_` has no float8 kernel on the CPU (torch 2.13)."""
    return x.view(torch.uint8) if x.dtype.is_floating_point else x


class KVPool(nn.Module):
    """One layer's blocks: k and v `(blocks + 1, KV, block, d)`, the last block the trash.

    A prefix entry's run of nP blocks is read and written as one head-major tensor
    `(KV, nP * block, d)` (the same bytes, viewed differently): entries 0..E-1 are then one view
    `(E, KV, P, d)` whose rows are contiguous, which matmul reads without a copy. Suffix blocks
    are used block by block.

    `kv_dtype` int8 or float8_e4m3fn (`KV_CODES`): values stored as 1-byte codes with one fp32
    scale per token and head (`quantize_kv`; `k_scale`, `v_scale`, `(blocks + 1, KV, block, 1)`,
    laid out like the values, so every view and index of the values applies to them); reads give
    the model's dtype back (a dequantized copy: on the CPU this simulates the rounding, it does not
    save bandwidth)."""

    def __init__(self, blocks: int, block: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None, kv_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        shape = (blocks + 1, num_kv_heads, block, head_dim)
        self.dtype = dtype
        if kv_dtype is not None and kv_dtype not in KV_CODES:
            raise ValueError(f"kv_dtype {kv_dtype}: one of {list(KV_CODES)} or None (the model's dtype)")
        self.quantized = kv_dtype is not None
        store = kv_dtype or dtype
        self.register_buffer("k_pool", torch.zeros(shape, dtype=store, device=device), persistent=False)
        self.register_buffer("v_pool", torch.zeros(shape, dtype=store, device=device), persistent=False)
        if self.quantized:
            scales = (blocks + 1, num_kv_heads, block, 1)
            self.register_buffer("k_scale", torch.zeros(scales, dtype=torch.float32, device=device), persistent=False)
            self.register_buffer("v_scale", torch.zeros(scales, dtype=torch.float32, device=device), persistent=False)

    def _parts(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return [(self.k_pool, getattr(self, "k_scale", None)), (self.v_pool, getattr(self, "v_scale", None))]

    def _read(self, x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        return x if scale is None else (x.float() * scale).to(self.dtype)

    def write(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (B, KV, L, d) at the pool rows `rows` (B, KV, L) (`pool_rows`). One `index_put_`
        on the whole buffer (torch.compile makes it an in-place scatter)."""
        flat = rows.reshape(-1)
        for (buf, scale), x in zip(self._parts(), (k, v)):
            d = buf.shape[-1]
            if scale is None:
                buf.view(-1, d).index_put_((flat,), x.reshape(-1, d))  # (B*KV*L, d)
            else:
                q, sc = quantize_kv(x, buf.dtype)
                _bytes(buf).view(-1, d).index_put_((flat,), _bytes(q).reshape(-1, d))  # (B*KV*L, d)
                scale.view(-1, 1).index_put_((flat,), sc.reshape(-1, 1))

    def _entries(self, buf: torch.Tensor, entries: int, nP: int) -> torch.Tensor:
        _, KV, block, d = buf.shape
        return buf[:entries * nP].view(entries, KV, nP * block, d)  # (E, KV, nP * block, d)

    def write_prefix(self, entries: torch.Tensor, nP: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (U, KV, P, d) as the prefixes of entries `entries` (U,)."""
        E = int(self.k_pool.shape[0] - 1) // nP
        P = k.shape[2]
        for (buf, scale), x in zip(self._parts(), (k, v)):
            if scale is None:
                self._entries(buf, E, nP)[:, :, :P].index_copy_(0, entries, x)
            else:
                q, sc = quantize_kv(x, buf.dtype)
                self._entries(_bytes(buf), E, nP)[:, :, :P].index_copy_(0, entries, _bytes(q))
                self._entries(scale, E, nP)[:, :, :P].index_copy_(0, entries, sc)

    def prefixes(self, entries: int, nP: int, P: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries 0..entries-1 as views (E, KV, P, d) (no copy; int8 / fp8: dequantized copies); P None:
        the whole runs (E, KV, nP * block, d), contiguous (CPU matmul is far slower on the sliced view)."""
        k, v = (self._read(self._entries(buf, entries, nP), None if sc is None else self._entries(sc, entries, nP))
                for buf, sc in self._parts())
        return (k, v) if P is None else (k[:, :, :P], v[:, :, :P])

    def gather(self, runs: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The runs of `block_runs` (B * KV * nb,) -> the rows' columns (B, KV, nb * block, d): one copy of those
        blocks only, already head-major (no transpose)."""
        _, KV, block, d = self.k_pool.shape
        k, v = (self._read(buf.view(-1, block, d).index_select(0, runs).view(B, KV, -1, d),
                           None if sc is None else sc.view(-1, block, 1).index_select(0, runs).view(B, KV, -1, 1))
                for buf, sc in self._parts())
        return k, v


class BlockAllocator:
    """Which blocks hold what: prefix entries (with lanes and holders) and row suffixes.

    `blocks` usable blocks (the trash block is `blocks`), `P` prefix columns, `lanes` rows per
    entry decoding at once. Free suffix blocks come off a max-heap (the top of the pool first);
    entries off a min-heap of runs with no block in use (lazy: stale heap items are skipped)."""

    def __init__(self, blocks: int, block: int, P: int, lanes: int) -> None:
        self.blocks, self.block, self.P, self.lanes = blocks, block, P, lanes
        self.nP = math.ceil(P / block)
        self.trash = blocks
        self.max_entries = blocks // self.nP
        self.owner = bytearray(blocks)  # 0 free, 1 prefix, 2 suffix
        self.run_used = [0] * self.max_entries  # blocks in use in each entry's run
        self.n_free = blocks
        self._free_heap = [-b for b in range(blocks)]  # max-heap of free blocks
        heapq.heapify(self._free_heap)
        self._run_heap = list(range(self.max_entries))  # min-heap of runs that may be wholly free
        self.entry_lanes: dict[int, list[bool]] = {}  # entry -> lane taken
        self.entry_holds: dict[int, int] = {}  # entry -> holders (its rows + its waiting prompts)
        self.row_blocks: dict[int, list[int]] = {}

    # accounting --------------------------------------------------------------------------------
    @property
    def used(self) -> int:
        return self.blocks - self.n_free

    def blocks_for(self, columns: int) -> int:
        return -(-columns // self.block)

    @property
    def entries_in_use(self) -> int:
        return len(self.entry_holds)

    @property
    def entry_bound(self) -> int:
        """1 + the highest entry in use (0 if none): decode reads entries below it."""
        return max(self.entry_holds) + 1 if self.entry_holds else 0

    def _take_block(self, b: int, kind: int) -> None:
        self.owner[b] = kind
        self.n_free -= 1
        e = b // self.nP
        if e < self.max_entries:
            self.run_used[e] += 1

    def _give_block(self, b: int) -> None:
        self.owner[b] = 0
        self.n_free += 1
        heapq.heappush(self._free_heap, -b)
        e = b // self.nP
        if e < self.max_entries:
            self.run_used[e] -= 1
            if not self.run_used[e]:
                heapq.heappush(self._run_heap, e)

    # prefix entries ----------------------------------------------------------------------------
    def alloc_entry(self) -> int | None:
        """The lowest entry whose blocks are all free, or None."""
        while self._run_heap:
            e = heapq.heappop(self._run_heap)
            if self.run_used[e] == 0 and e not in self.entry_holds:
                for b in range(e * self.nP, (e + 1) * self.nP):
                    self._take_block(b, 1)
                self.entry_lanes[e] = [False] * self.lanes
                self.entry_holds[e] = 0
                return e
        return None

    def hold(self, entry: int) -> None:
        self.entry_holds[entry] += 1

    def release(self, entry: int) -> None:
        """One holder fewer; the entry's blocks are freed with its last holder."""
        self.entry_holds[entry] -= 1
        if self.entry_holds[entry] <= 0:
            del self.entry_holds[entry], self.entry_lanes[entry]
            for b in range(entry * self.nP, (entry + 1) * self.nP):
                self._give_block(b)

    def take_lane(self, entry: int) -> int | None:
        lanes = self.entry_lanes[entry]
        if all(lanes):
            return None
        lane = lanes.index(False)
        lanes[lane] = True
        return lane

    def free_lane(self, entry: int, lane: int) -> None:
        self.entry_lanes[entry][lane] = False

    def has_lane(self, entry: int) -> bool:
        return not all(self.entry_lanes[entry])

    # row suffixes ------------------------------------------------------------------------------
    def can_alloc(self, n: int, entries: int = 0) -> bool:
        """Whether n suffix blocks and `entries` new prefix entries fit in the free count (an
        entry also needs a wholly free run: `alloc_entry` says)."""
        return n + entries * self.nP <= self.n_free

    def alloc_row(self, row: int, n: int) -> list[int]:
        """n suffix blocks for `row`, from the top of the pool."""
        if n > self.n_free:
            raise MemoryError(f"{n} KV blocks asked, {self.n_free} free")
        got: list[int] = []
        while len(got) < n:
            b = -heapq.heappop(self._free_heap)
            if self.owner[b] == 0:
                self._take_block(b, 2)
                got.append(b)
        self.row_blocks[row] = got
        return got

    def free_row(self, row: int) -> None:
        for b in self.row_blocks.pop(row, []):
            self._give_block(b)

    def move_row(self, src: int, dst: int) -> None:
        if src in self.row_blocks:
            self.row_blocks[dst] = self.row_blocks.pop(src)

    # prompts (the engine's view) ---------------------------------------------------------------
    def reserve(self, s: Seq, rows: RowBook) -> Room:
        """Book a row of `rows`, the suffix blocks `s` can fill, and for an image a prefix entry
        (a fresh one if its image has none: `g.fresh`) and a lane."""
        if not rows.free:
            return Room.FULL
        g = s.group
        n = self.blocks_for(s.suffix_columns)
        fresh = g.has_image and g.entry < 0
        if g.has_image and not fresh and not self.has_lane(g.entry):
            return Room.NO_LANE
        if not self.can_alloc(n, 1 if fresh else 0):
            return Room.FULL
        if fresh:
            entry = self.alloc_entry()
            if entry is None:
                return Room.FULL
            g.entry, g.fresh = entry, True
        rows.place(s)
        self.alloc_row(s.row, n)
        if g.has_image:
            s.lane = self.take_lane(g.entry)
            self.hold(g.entry)
        return Room.OK

    def hold_for_waiting(self, g: Group) -> None:
        """An image's entry is held for its waiting prompts while it has any (`g.queued`)."""
        want = bool(g.waiting) and g.entry >= 0
        if want and not g.queued:
            self.hold(g.entry)
        elif g.queued and not want:
            self.release(g.entry)
        g.queued = want

    def drop_waiting_hold(self, g: Group) -> None:
        """Let go of the entry held for `g`'s waiting prompts (it is made again on admission)."""
        if g.queued:
            self.release(g.entry)
            g.entry, g.queued = -1, False

    def give_back(self, s: Seq) -> None:
        """`s` leaves its row: its suffix blocks, its lane and its hold on its image's entry (the
        entry goes with its last holder)."""
        self.free_row(s.row)
        g = s.group
        if g.has_image and s.lane >= 0:
            self.free_lane(g.entry, s.lane)
            s.lane = -1
            self.release(g.entry)
            if g.entry not in self.entry_holds:
                g.entry, g.queued = -1, False
