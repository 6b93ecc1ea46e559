"""Decode attention over the engine's KV pool: its cascade vs FlexAttention vs SDPA (CPU).

    OMP_NUM_THREADS=1 python bench/flex_decode.py --config small [--image-size 490]

One layer's `KVPool` (random fp32 keys/values) is filled the way the engine lays it out: prefix
entries (P = 1 + vision tokens columns, head-major runs of 16-column blocks) at the bottom, each
row's suffix blocks (ceil((32 + 32) / 16) reserved, shuffled) from the top, a few free blocks
between, the trash block last. Two batches of 32 decode rows, suffix lengths 20-60 (this step's
token included): 8 images x 4 prompts (lanes 4) and 32 images x 1 prompt (lanes 1). Per call:

(a) cascade: `StoreBatch.decode(...)._decode(pool, q)`, the engine's decode attention (suffix
    gather + `attend_lse`, prefix lanes + `attend_lse`, LSE merge); the KV write is left out.
(b) flex: `torch.compile(flex_attention)`, ONE call over the whole pool seen as one flat key
    sequence `(1, 1, (blocks + 1) * KV * 16, d)`, queries `(1, 1, rows * H, d)`, a `mask_mod`
    that admits, for query (row, head), the columns of the row's entry at its KV head (< P) and
    of its own suffix blocks at its KV head (< length); the block mask (Q block = the H queries
    of one row, KV block = one pool block, KV * 16 columns) skips every other block. Cascade via
    two flex calls and `return_lse` is not possible here: compiled flex on CPU refuses
    `return_lse` (torch 2.13: "torch.compile on CPU only supports inference and `return_lse` is
    not supported yet"). The block mask comes from the rows' block tables (`BlockMask.from_kv_blocks`:
    per row, its entry's nP blocks + its suffix blocks in use; the mask_mod trims within blocks),
    once per step (every layer would reuse it): its build is timed apart as (b'). The
    `create_block_mask` build (evaluating mask_mod everywhere, eager) is printed once, and the
    first flex call's time (the compile; run with a fresh TORCHINDUCTOR_CACHE_DIR for a cold one).
    (b2), lanes > 1 only: the same with one query block per image (its rows share the entry's blocks).
(c) sdpa: gather each row's prefix (by entry) and suffix blocks from the pool, concatenate,
    `scaled_dot_product_attention` with a dense bool mask (columns past the row's length hidden).

Outputs of (b) and (c) are checked against (a) (max abs difference) before timing. Rounds
alternate the kernels (order rotated each round); medians are printed.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cogvlm.cascade import StoreBatch  # noqa: E402
from cogvlm.config import PRESETS, preset  # noqa: E402
from cogvlm.kv_store import KVPool, block_runs  # noqa: E402

BLOCK = 16


def build_case(images: int, per_image: int, P: int, KV: int, H: int, d: int, seed: int):
    """A filled pool and one decode step's rows: (pool, q, StoreBatch, per-row entry, tables, lengths)."""
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    nP = -(-P // BLOCK)
    R = images * per_image
    per_row = -(-(32 + 32) // BLOCK)  # blocks reserved per row: 32 prompt + 32 new tokens
    E = images
    free_gap = 16
    blocks = E * nP + free_gap + R * per_row
    pool = KVPool(blocks, BLOCK, KV, d, torch.float32)
    pool.k_pool.normal_(generator=g)
    pool.v_pool.normal_(generator=g)
    pool.k_pool[-1].zero_()  # trash
    pool.v_pool[-1].zero_()
    suffix_blocks = list(range(E * nP + free_gap, blocks))
    rnd.shuffle(suffix_blocks)
    lengths = torch.tensor([rnd.randint(20, 60) for _ in range(R)])
    nb = -(-int(lengths.max()) // BLOCK)  # blocks gathered per row: up to the widest live row
    table = torch.full((R, nb), blocks, dtype=torch.long)  # unused cells -> trash
    owned = []
    for r in range(R):
        mine = suffix_blocks[r * per_row:(r + 1) * per_row]
        owned.append(mine)
        need = -(-int(lengths[r]) // BLOCK)
        table[r, :need] = torch.tensor(mine[:need])
    entry = torch.arange(R) // per_image
    lane = entry * per_image + torch.arange(R) % per_image
    sb = StoreBatch.decode(None, P, nP, per_image, block_runs(table, KV), lengths, nb * BLOCK, lane, E, BLOCK)
    q = torch.randn(R, H, 1, d, generator=g)
    return pool, q, sb, entry, table, lengths, owned, nP


def flex_parts(pool: KVPool, R: int, H: int, P: int, nP: int, E: int, entry, owned, lengths):
    """mask_mod over the flat pool and the lookup tensors it reads."""
    nblocks, KV, block, d = pool.k_pool.shape
    G = H // KV
    owner = torch.full((nblocks,), -1, dtype=torch.long)  # suffix block -> row
    pos = torch.zeros(nblocks, dtype=torch.long)  # suffix block -> its index in the row's table
    for r, mine in enumerate(owned):
        for i, b in enumerate(mine):
            owner[b] = r
            pos[b] = i
    span = KV * block  # flat columns per pool block
    run = nP * block  # columns per head in a prefix entry's run

    def mask_mod(b, h, qi, kj):
        row = qi // H
        kvh = (qi % H) // G
        blk = kj // span
        within = kj % span
        e = blk // nP
        off = (blk - e * nP) * span + within  # head-major offset inside the entry's run
        prefix_ok = (blk < E * nP) & (e == entry[row]) & (off // run == kvh) & (off % run < P)
        suffix_ok = (owner[blk] == row) & (within // block == kvh) & (pos[blk] * block + within % block < lengths[row])
        return prefix_ok | suffix_ok

    return mask_mod, nblocks * span


def sdpa_dense(pool: KVPool, q, sb: StoreBatch, entry, P: int, nP: int, E: int):
    R, H, _, d = q.shape
    kp, vp = pool.prefixes(E, nP, P)  # (E, KV, P, d) views
    ks, vs = pool.gather(sb.runs, R)  # (R, KV, W, d)
    k = torch.cat([kp.index_select(0, entry), ks], dim=2)
    v = torch.cat([vp.index_select(0, entry), vs], dim=2)
    keep = torch.cat([torch.ones(R, 1, 1, P, dtype=torch.bool), ~sb.hide], dim=-1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=k.shape[1] != H)


def run_case(name: str, images: int, per_image: int, cfg, rounds: int) -> None:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    H, KV, d = cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim
    P = 1 + cfg.num_vision_tokens
    pool, q, sb, entry, table, lengths, owned, nP = build_case(images, per_image, P, KV, H, d, seed=images)
    R, E = images * per_image, images
    a_out = sb._decode(pool, q)
    c_out = sdpa_dense(pool, q, sb, entry, P, nP, E)
    print(f"\n[{name}] rows {R}, images {E}, lanes {per_image}, P {P}, heads {H}, kv heads {KV}, d {d}, "
          f"pool blocks {pool.k_pool.shape[0]}, suffix lengths {int(lengths.min())}-{int(lengths.max())}", flush=True)
    print(f"  (c) sdpa vs (a) cascade: max abs diff {(c_out - a_out).abs().max().item():.2e}")
    kernels = {"(a) cascade": lambda: sb._decode(pool, q), "(c) sdpa dense mask": lambda: sdpa_dense(
        pool, q, sb, entry, P, nP, E)}
    try:
        mask_mod, N = flex_parts(pool, R, H, P, nP, E, entry, owned, lengths)
        kflat = pool.k_pool.view(1, 1, N, d)
        vflat = pool.v_pool.view(1, 1, N, d)
        t0 = time.perf_counter()
        bm = create_block_mask(mask_mod, 1, 1, R * H, N, device="cpu", BLOCK_SIZE=(H, KV * BLOCK))
        t_bm_eager = time.perf_counter() - t0
        print(f"  block mask: {bm.sparsity():.1f}% of (query block, pool block) pairs skipped", flush=True)
        flex = torch.compile(flex_attention)
        qf = q.view(1, 1, R * H, d)
        t0 = time.perf_counter()
        b_out = flex(qf, kflat, vflat, block_mask=bm, scale=d ** -0.5).view(R, H, 1, d)
        t_compile = time.perf_counter() - t0
        t0 = time.perf_counter()
        flex(qf, kflat, vflat, block_mask=bm, scale=d ** -0.5)
        t_second = time.perf_counter() - t0
        need = -(-lengths // BLOCK)  # the row's suffix blocks in use (the table's first cells)
        span_nP = torch.arange(nP)
        pad = torch.zeros(R, N // (KV * BLOCK) - nP - table.shape[1], dtype=torch.long)  # kv_indices spans the pool

        def build() -> BlockMask:  # what a paged engine would do per step: the block table as the block mask
            idx = torch.cat([entry[:, None] * nP + span_nP[None, :], table, pad], dim=1)  # (R, pool blocks)
            return BlockMask.from_kv_blocks((nP + need).to(torch.int32)[None, None], idx.to(torch.int32)[None, None],
                                            BLOCK_SIZE=(H, KV * BLOCK), mask_mod=mask_mod,
                                            seq_lengths=(R * H, N), compute_q_blocks=False)

        def build_image() -> BlockMask:  # one query block per image: its lanes' rows share the entry's blocks
            m = per_image
            tab = table.view(E, m * table.shape[1])  # rows of an image are consecutive; trash cells included
            idx = torch.cat([torch.arange(E)[:, None] * nP + span_nP[None, :], tab,
                             torch.zeros(E, N // (KV * BLOCK) - nP - tab.shape[1], dtype=torch.long)], dim=1)
            return BlockMask.from_kv_blocks(torch.full((1, 1, E), nP + tab.shape[1], dtype=torch.int32),
                                            idx.to(torch.int32)[None, None], BLOCK_SIZE=(H * m, KV * BLOCK),
                                            mask_mod=mask_mod, seq_lengths=(R * H, N), compute_q_blocks=False)

        bm_t = build()
        b2_out = flex(qf, kflat, vflat, block_mask=bm_t, scale=d ** -0.5).view(R, H, 1, d)
        print(f"  (b) flex with the table-built block mask vs (a): max abs diff "
              f"{(b2_out - a_out).abs().max().item():.2e}", flush=True)
        diff = max((b_out - a_out).abs().max().item(), (b2_out - a_out).abs().max().item())
        print(f"  (b) flex vs (a) cascade: max abs diff {diff:.2e} ({'MATCH' if diff < 1e-4 else 'MISMATCH'}); "
              f"flex first call (compile) {t_compile:.1f} s, second call {1000 * t_second:.2f} ms; "
              f"create_block_mask (eager, from mask_mod) {1000 * t_bm_eager:.0f} ms",
              flush=True)
        try:  # the cascade form (prefix call + suffix call merged by LSE) needs return_lse
            flex(qf, kflat, vflat, block_mask=bm, scale=d ** -0.5, return_lse=True)
            print("  flex return_lse=True: runs")
        except Exception as exc:
            line = next((ln for ln in str(exc).splitlines() if "Error" in ln), str(exc).splitlines()[0])
            print(f"  flex return_lse=True: FAILS: {line.strip()[:200]}", flush=True)
        kernels["(b) flex compiled, paged block mask"] = lambda: flex(
            qf, kflat, vflat, block_mask=bm_t, scale=d ** -0.5)
        kernels["(b') block mask from the block table, per step"] = build
        if per_image > 1:
            bm_i = build_image()
            b3_out = flex(qf, kflat, vflat, block_mask=bm_i, scale=d ** -0.5).view(R, H, 1, d)
            print(f"  (b2) flex, one query block per image vs (a): max abs diff "
                  f"{(b3_out - a_out).abs().max().item():.2e}", flush=True)
            kernels["(b2) flex compiled, query block = an image's rows"] = lambda: flex(
                qf, kflat, vflat, block_mask=bm_i, scale=d ** -0.5)
    except Exception as exc:  # the finding is the error itself
        msg = str(exc).strip().splitlines()
        print(f"  (b) flex FAILED: {type(exc).__name__}: {msg[0] if msg else ''}", flush=True)
    times = {k: [] for k in kernels}
    names = list(kernels)
    with torch.inference_mode():
        for i in range(rounds):
            for k in names[i % len(names):] + names[:i % len(names)]:
                t0 = time.perf_counter()
                kernels[k]()
                times[k].append(time.perf_counter() - t0)
    ref = statistics.median(times["(a) cascade"])
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"  {k}: {1000 * med:.3f} ms per call (median of {rounds}, min {1000 * min(ts):.3f}), "
              f"{med / ref:.2f}x cascade")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--cases", default="8x4,32x1", help="images x prompts per image, comma-separated")
    a = p.parse_args()
    cfg = preset(a.config) if a.image_size is None else preset(a.config, vision_config=dict(
        PRESETS[a.config].get("vision_config", {}), image_size=a.image_size))
    torch.manual_seed(0)
    print(f"torch {torch.__version__} threads {torch.get_num_threads()} config {a.config} "
          f"image size {cfg.image_size} (CPU, fp32)", flush=True)
    for case in a.cases.split(","):
        n, m = (int(x) for x in case.split("x"))
        run_case(case, n, m, cfg, a.rounds)


if __name__ == "__main__":
    main()
