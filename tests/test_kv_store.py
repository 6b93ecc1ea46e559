"""The engine's KV store: a prefix stored once per image, memory and decode reads that follow what
the rows hold, every block given back."""

from __future__ import annotations

import random

import pytest
import torch

from cogvlm.engine import Engine, Request
from cogvlm.kv_store import KV_CACHE_DTYPES, BlockAllocator, quantize_kv
from cogvlm.memory import block_bytes

from .test_engine import _alone, _workload

N_REQUESTS = 1000


def _image_prompts(cfg, n: int, seed: int = 0) -> list[Request]:
    g = torch.Generator().manual_seed(seed)
    return [Request(torch.randint(5, cfg.vocab_size, (3 + 4 * i,), generator=g).tolist(), 0, 6 + i,
                    ignore_eos=True) for i in range(n)]


def test_a_prefix_is_stored_once(model_v1):
    """One image with 4 prompts decoding at once: one prefix entry plus each row's own blocks."""
    cfg = model_v1.config
    images = torch.randn(1, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    reqs = _image_prompts(cfg, 4)
    eng = Engine(model_v1, max_prompt_tokens=24, max_new_tokens=12, prompts_per_image=4, block_size=4,
                 sync_every=1)
    eng.add(reqs, images[0], tag="img")
    eng.step()  # admits all four, decodes one step
    store = eng.store
    assert store.entries_in_use == 1
    P, B = 1 + cfg.num_vision_tokens, 4
    suffix = sum(-(-(len(r.text_ids) + r.max_new_tokens - 1) // B) for r in reqs)
    assert store.used == -(-P // B) + suffix  # 5 + 1 + 2 + 3 + 5 blocks, not four prefixes
    done = []
    while eng.has_work:
        done += eng.step()
    assert len(done) == 4 and store.used == 0 and store.entries_in_use == 0
    alone = [_alone(model_v1, Request(r.text_ids, 0, r.max_new_tokens, ignore_eos=True), images, [-1]).tokens[0]
             for r in reqs]
    assert [c.tokens for c in sorted(done, key=lambda c: c.index)] == alone


def test_decode_reads_only_live_columns(model_v1):
    """A longer max_prompt_tokens with the same prompts reads no more key columns per step."""
    reqs, images = _workload(model_v1, n_images=6, seed=5, sampled=False)
    runs = []
    for max_prompt in (24, 400):
        eng = Engine(model_v1, max_prompt_tokens=max_prompt, max_new_tokens=12, max_slots=16,
                     prompts_per_image=2)
        out = eng.generate(reqs, images)
        runs.append((out.tokens, eng.stats["decode_steps"], eng.stats["attn_columns"], eng.MB))
    (t1, s1, c1, mb1), (t2, s2, c2, mb2) = runs
    assert mb2 > 10 * mb1 // 2  # the long setting's rows could hold far more
    assert t1 == t2 and s1 == s2 and c2 <= c1, runs


@pytest.mark.parametrize("version", [1, 2])
def test_small_blocks_and_a_full_pool_equal_each_prompt_alone(version, request):
    """Blocks of 4 columns (tables of many blocks), 2 lanes per image (an image's other prompts
    wait for a lane) and a pool that runs out (prompts wait for blocks): each prompt's tokens are
    what it computes alone, greedy or sampled, eos on."""
    model = request.getfixturevalue(f"model_v{version}")
    reqs, images = _workload(model, n_images=8, seed=20 + version)
    blk = block_bytes(model.config, model.dtype, 4)
    eng = Engine(model, max_prompt_tokens=24, max_new_tokens=12, max_slots=12, admission_images=3,
                 prompts_per_image=2, sync_every=2, block_size=4, kv_cache_gb=40 * blk / 1e9, eos_token_ids=[7])
    assert eng.store.blocks < 60
    out = eng.generate(reqs, images)
    for i, r in enumerate(reqs):
        assert out.tokens[i] == _alone(model, r, images, [7]).tokens[0], (i, r)
    assert eng.store.used == 0 and eng.store.entries_in_use == 0


def test_no_block_leaks_over_a_thousand_requests(model_v1, monkeypatch):
    """1,000 requests with aborts and out-of-memory rounds in between: every block, entry and row
    comes back, and the allocator's books agree with a recount."""
    import cogvlm.runner as runner_mod

    cfg = model_v1.config
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(8, 3, cfg.image_size, cfg.image_size, generator=g)
    eng = Engine(model_v1, max_prompt_tokens=8, max_new_tokens=3, max_slots=16, admission_images=4,
                 prompts_per_image=3, sync_every=2, block_size=4,
                 kv_cache_gb=60 * block_bytes(cfg, model_v1.dtype, 4) / 1e9)
    real = runner_mod.prefill_texts
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] % 7 == 0:
            raise torch.OutOfMemoryError("out of memory (injected)")
        return real(*a, **kw)

    monkeypatch.setattr(runner_mod, "prefill_texts", flaky)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: per-op overhead, which a busy machine's threads only add to
    try:
        finished = _churn(eng, rng, g, pixels)
    finally:
        torch.set_num_threads(threads)
    store = eng.store
    assert eng.stats["oom_admission"] > 5 and finished > N_REQUESTS // 5
    assert store.used == 0 and store.n_free == store.blocks and not store.entry_holds and not store.row_blocks
    assert bytes(store.owner) == bytes(store.blocks) and not any(store.run_used)
    assert sorted(eng.free) == list(range(eng.slots)) and all(s is None for s in eng.seqs)
    assert not bool(eng.rows.live.any()) and bool((eng.rows.table == store.trash).all())
    assert eng.n_sampling == 0 and not eng.origins


def _churn(eng: Engine, rng: random.Random, g: torch.Generator, pixels: torch.Tensor) -> int:
    """N_REQUESTS requests in random bursts, a few steps between, an abort now and then."""
    sent = finished = 0
    while sent < N_REQUESTS:
        for _ in range(rng.randint(1, 6)):
            n = rng.randint(0, 4)
            reqs = [Request(torch.randint(5, 500, (rng.randint(0, 8),), generator=g).tolist(), 0,
                            rng.randint(1, 3)) for _ in range(max(1, n))]
            if n == 0:
                eng.add(reqs, tag=sent)
            else:
                eng.add(reqs, pixels[rng.randrange(8)], tag=sent)
            sent += len(reqs)
        for _ in range(rng.randint(1, 4)):
            if eng.has_work:
                finished += len(eng.step())
        if rng.random() < 0.1:
            eng.abort()
    while eng.has_work:
        finished += len(eng.step())
    return finished


def test_allocator_keeps_prefix_runs_low_and_suffixes_high():
    a = BlockAllocator(blocks=40, block=4, P=10, lanes=2)  # entries of 3 blocks
    rows = [a.alloc_row(r, 2) for r in range(3)]
    assert min(min(r) for r in rows) >= 34  # from the top
    e0, e1 = a.alloc_entry(), a.alloc_entry()
    assert (e0, e1) == (0, 1) and a.used == 12
    a.hold(e0)
    a.release(e0)
    assert a.alloc_entry() == 0  # the lowest free run again
    for r in range(3):
        a.free_row(r)
    assert a.used == 6


def test_gpu_first_bench_runs_on_cpu_and_writes_every_phase(tmp_path):
    """bench/gpu_first.py with the tiny shape on CPU: every phase in the JSON, none failed (the
    compiled phases traced by the eager backend: an inductor compile here would take minutes)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "g.json"
    p = subprocess.run([sys.executable, os.path.join(root, "bench", "gpu_first.py"), "--config", "tiny", "--device",
                        "cpu", "--images", "3", "--new-tokens", "6", "--max-slots", "16", "--skip", "compiled", "--backend", "eager",
                        "--out", str(out)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads(out.read_text())
    assert list(data["phases"]) == data["order"]
    assert all(ph["status"] in ("ok", "skipped") for ph in data["phases"].values()), data
    assert data["phases"]["decode_steps"]["16"]["live_rows"] == 16
    assert data["phases"]["caption_eager"]["images_per_s"] > 0
    assert data["phases"]["sampling"]["sampled"]["compiled_ms"] > 0
    assert data["phases"]["vision_ahead"]["images_per_s"] > 0


# each format's worst rounding of a value x with scale s: int8 half a step (s / 2); e4m3 half a step
# of its 3 mantissa bits (|x| / 16), or of its subnormals (s * 2**-10) below 2**-6 codes
_HALF_STEP = {"int8": lambda x, s: s / 2, "fp8": lambda x, s: torch.maximum(x.abs() / 16, s / 1024)}


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_quantized_kv_is_planned_smaller_and_round_trips_within_half_a_step(model_v2, kv):
    """kv_cache_dtype int8 / fp8: the pool holds 1-byte codes with a scale per token and head, the
    plan counts those bytes, a value read back is within half the format's step, and a mixed
    workload runs to the end with every block returned (drift: bench/kv_precision.py)."""
    cfg, dtype = model_v2.config, KV_CACHE_DTYPES[kv]
    fp, q8 = block_bytes(cfg, model_v2.dtype, 16), block_bytes(cfg, model_v2.dtype, 16, dtype)
    assert q8 == cfg.num_hidden_layers * 2 * cfg.num_kv_heads * (cfg.head_dim + 4) * 16 and q8 < fp
    x = torch.randn(3, cfg.num_kv_heads, 5, cfg.head_dim, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_kv(x, dtype)
    assert q.dtype == dtype and scale.shape == (3, cfg.num_kv_heads, 5, 1)
    assert bool(((q.float() * scale - x).abs() <= _HALF_STEP[kv](x, scale) + 1e-6).all())
    reqs, images = _workload(model_v2, n_images=4, seed=9)
    eng = Engine(model_v2, max_prompt_tokens=24, max_new_tokens=12, max_slots=12, prompts_per_image=2,
                 kv_cache_dtype=kv, eos_token_ids=[7])
    pool = model_v2.model.layers[0].self_attn.kv_pool
    assert pool.k_pool.dtype == dtype and pool.k_scale.dtype == torch.float32
    assert eng.plan.block_bytes == block_bytes(cfg, model_v2.dtype, 16, dtype)
    out = eng.generate(reqs, images)
    assert all(n >= 1 for n in out.num_tokens) and eng.store.used == 0 and eng.store.entries_in_use == 0


def test_other_kv_cache_dtypes_are_refused(model_v2):
    with pytest.raises(ValueError, match="kv_cache_dtype 'int4': choose 'int8' or 'fp8'"):
        Engine(model_v2, kv_cache_dtype="int4")
