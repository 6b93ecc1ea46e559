"""Continuous-batching engine: rows decode together; waiting prompts join as soon as there is room.

A replica owns one KV store (`kv_store.py`): a pool of blocks sized by a memory plan made at
start-up (`memory.py`) and never reallocated unless the device runs out of memory. An image's
prefix `[bos, boi, patches..., eoi]` is stored once, in a prefix entry, while any of its prompts
decodes; each prompt's text and generated tokens go to blocks of its own, reserved at admission
for exactly what it can hold. So KV memory follows what the rows hold, and `max_prompt_tokens` only
bounds a prompt's length.

Between decode steps, waiting prompts are admitted while there is room (a free row, the blocks of
their suffix, a prefix entry and a query lane for their image; `scheduler.py`), at most
`admission_images` new images and `admission_rows` prompts per round, which bounds how long
decoding rows wait: one vision pass for the round's new images, each image's prefix prefilled once
into its entry, then every prompt's own text after it. The decode step runs one token for every
row of the smallest bucket covering the live rows, reading the prefix entries in use once each and
the rows' suffix blocks up to the widest live row (`cascade.py`); no column a row cannot hold
is read. Rows reaching `max_new_tokens` are known on the host without asking the device; eos
stops are read back every `sync_every` steps.

Each prompt computes what it computes alone: positions follow the spec (patches share one, pads
never take one), attention sees exactly the row's prefix and suffix, and sampling draws from the
prompt's own random stream (`sampling.py`), so a row's tokens do not depend on what else shares
its steps.

Where each part lives: `sequences.py` the requests, their groups (an image and its prompts) and
the row book (which prompt decodes in which row); `scheduler.py` the waiting queue, the rounds and
the out-of-memory backoff (no torch); `kv_store.py` the blocks, prefix entries and lanes, and
their booking for a prompt; `memory.py` the plan that sizes the pool; `runner.py` the work on the
device (vision pass, prefills, the decode step and its loop, the rows' state); `compiled.py` the
decode step and its sampling under torch.compile (warm-up, recompile count); `cascade.py` the
attention over the store. This file coordinates them: admission rounds, decode runs, harvest,
and recovery from out-of-memory.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable, Sequence

import torch

from .compiled import DecodeFunctions, graphs
from .generate import GenerationOutput, context_error
from .kv_store import KV_CACHE_DTYPES, BlockAllocator
from .memory import PeakMemory, budget_for, is_out_of_memory, plan_pool, weights_bytes
from .runner import (PREFIX_LAST_POSITION, Rows, VisionAhead, decode_steps, default_buckets, encode_new, prefill_round,
                     sample_first, size_bucket)
from .scheduler import Scheduler
from .sequences import Completion, Group, Request, RowBook, Seq

__all__ = ["Completion", "Engine", "Request", "is_out_of_memory"]

log = logging.getLogger(__name__)


class Engine:
    """Continuous batching over many (image, prompt) requests for one model on one device.

    Sizes: a row holds at most `max_len` columns (prefix + `max_prompt_tokens` of text +
    `max_new_tokens`); the KV pool (blocks of `block_size` columns) gets `memory_gb` beside the
    weights (default: what is free on the GPU after profiling, or `device_share` of it for
    replicas sharing a GPU; 4 GB on CPU), less the measured activations and `margin_gb`;
    `kv_cache_gb` caps the pool and `max_slots` the rows. Each image in flight has `lanes` rows
    decoding at once (default `prompts_per_image`). `admission_images` images (and
    `prompts_per_image` prompts each) per admission round at most; `compile` is True (inductor;
    CUDA graphs on a GPU) or a torch.compile backend name. `kv_cache_dtype` "int8" or "fp8" stores
    the KV in int8 or float8 e4m3 with a scale per token and head (the plan counts those bytes:
    about half of bf16). `vision_ahead`: the next round's vision pass starts before each run of
    decode steps, on a second CUDA stream on a GPU (`runner.VisionAhead`).
    """

    def __init__(self, model: Any, *, max_len: int | None = None, max_prompt_tokens: int = 256,
                 max_new_tokens: int = 64, max_slots: int = 256, kv_cache_gb: float | None = None,
                 memory_gb: float | None = None, margin_gb: float | None = None, admission_images: int = 8,
                 prompts_per_image: int = 1, sync_every: int = 8, buckets: Sequence[int] | None = None,
                 compile: bool | str = False, compile_vision: bool = False,
                 eos_token_ids: Iterable[int] | None = None, timed: bool = False,
                 device_share: float = 1.0, block_size: int = 16, lanes: int | None = None,
                 kv_cache_dtype: str | None = None, vision_ahead: bool = False) -> None:
        self.model = model
        cfg = model.config
        if kv_cache_dtype not in (None, "auto", *KV_CACHE_DTYPES):
            raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r}: choose 'int8' or 'fp8', or leave it unset "
                             "(the model's dtype)")
        self.kv_dtype = KV_CACHE_DTYPES.get(kv_cache_dtype)
        self.device = model.device
        self.P = 1 + cfg.num_vision_tokens
        self.max_len = max_len or self.P + max_prompt_tokens + max_new_tokens
        self.max_new_cap = max_new_tokens if max_len is None else self.max_len
        self.block = block_size
        self.lanes = max(1, lanes if lanes is not None else prompts_per_image)
        self.nP = -(-self.P // self.block)
        self.MB = -(-self.max_len // self.block)  # suffix blocks a row may hold at most
        self.sync_every = max(1, sync_every)
        self.eos_ids = list(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids) or [-1]
        self.compile = compile
        self.timed = timed
        self.scheduler = Scheduler(admission_images, admission_images * max(1, prompts_per_image))
        self.encode: Callable[[torch.Tensor], torch.Tensor] = model.encode_images
        if compile_vision:  # the vision tower compiled once for any number of images
            self.encode = torch.compile(model.encode_images, dynamic=True)
        self.ahead = VisionAhead(self.encode, self.device) if vision_ahead else None
        # with `timed`: seconds in each phase, and the longest admission round (how long decoding rows waited at most)
        self.timings = {"vision_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0, "max_admission_s": 0.0}
        self.stats: dict[str, int] = dict.fromkeys(
            ("decode_steps", "decode_rows", "decode_slots", "shared_steps", "admissions", "admitted",
             "images", "generated_tokens", "finished", "moved", "oom_admission", "oom_decode", "failed_alone",
             "attn_columns", "kv_blocks_used", "kv_blocks", "prefix_entries", "vision_ahead"), 0)
        self.book = RowBook(0)
        self.step_count = 0
        self._requested_buckets = list(buckets) if buckets else None

        while True:  # the configured admission size, or smaller if even that runs out of memory
            try:
                prefill_bytes, decode_per_row = self._profile()
                break
            except Exception as e:
                if not is_out_of_memory(e) or self.scheduler.admission_rows == 1:
                    raise
                self.scheduler.lower()
                log.warning("out of memory profiling an admission round; admission lowered to %d prompts / "
                            "%d images", self.scheduler.admission_rows, self.scheduler.admission_images)
        weights = weights_bytes(self.model)
        budget, margin = budget_for(self.device, weights, memory_gb, margin_gb, device_share)
        self.plan = plan_pool(cfg, model.dtype, budget=budget, margin=margin, prefill=prefill_bytes,
                              decode_per_row=decode_per_row, weights=weights, block=self.block, lanes=self.lanes,
                              max_len=self.max_len, max_new=self.max_new_cap, max_slots=max_slots,
                              kv_cache_gb=kv_cache_gb, kv_dtype=self.kv_dtype)
        if self.plan.slots < 1 or self.plan.blocks < self.nP + self.MB:
            raise MemoryError(f"not even one KV slot (one prefix and one row of {self.max_len} columns) fits: "
                              f"{self.plan.describe()}; lower max_prompt_tokens / max_new_tokens or "
                              "admission_images, or quantize the weights (quantization int8 or int4)")
        log.info(self.plan.describe())
        self._allocate(self.plan.slots, self.plan.blocks)
        if compile_vision:  # sizes 1 and 2 get their own graphs (dynamo specializes 0/1): make them now
            with torch.inference_mode():
                for n in (1, 2):
                    self.encode(torch.zeros(n, 3, cfg.image_size, cfg.image_size))
        self.fns.graphs0 = graphs()

    # compatibility --------------------------------------------------------------------------------
    @property
    def admission_images(self) -> int:
        return self.scheduler.admission_images

    @property
    def admission_rows(self) -> int:
        return self.scheduler.admission_rows

    @property
    def waiting(self):  # noqa: ANN201 - the scheduler's queue of groups
        return self.scheduler.waiting

    @property
    def seqs(self) -> list[Seq | None]:
        return self.book.seqs

    @property
    def free(self) -> list[int]:
        return self.book.free

    @property
    def n_sampling(self) -> int:
        return self.book.n_sampling

    @property
    def origins(self) -> dict[Any, int]:
        return self.book.origins

    # memory plan ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def _profile(self) -> tuple[int, int]:
        """Measured peaks of one admission at the largest size and of a sampled decode step over
        it, on a temporary pool that holds it (its own bytes not counted). A first, unmeasured
        round makes the one-time allocations (library workspaces, weight layouts)."""
        cfg = self.model.config
        sch = self.scheduler
        n_img, rows = sch.admission_images, sch.admission_rows
        per_image = max(1, rows // n_img)
        text_len = max(0, min(self.max_len - self.P - 1, cfg.max_position_embeddings - 5))
        g = torch.Generator().manual_seed(0)
        lanes = self.lanes
        self.lanes = max(lanes, per_image)
        self._allocate(rows, n_img * self.nP + rows * self.MB)
        try:
            for _ in range(2):
                for row in range(rows):
                    if self.seqs[row] is not None:
                        self._free(row)
                for i in range(n_img):
                    pixels = torch.randn(3, cfg.image_size, cfg.image_size, generator=g)
                    reqs = [Request(torch.randint(3, cfg.vocab_size, (text_len,), generator=g).tolist(), 0, 1,
                                    temperature=1.0, top_k=5, top_p=0.9) for _ in range(per_image)]
                    self.add(reqs, pixels, tag=("profile", i))
                with PeakMemory(self.device) as pre:
                    self._admit()
                with PeakMemory(self.device) as dec:
                    self._decode(1)
        finally:
            self.abort()
            self.lanes = lanes
            self._release()
            self.step_count = 0
            self.stats = dict.fromkeys(self.stats, 0)
        return pre.peak, -(-dec.peak // rows)

    # rows and the pool ----------------------------------------------------------------------------
    def _allocate(self, slots: int, blocks: int) -> None:
        """The KV pool, the block accounting and the rows' state, once (the decode step is compiled by `warm_up`)."""
        self.model.setup_pool(blocks, self.block, self.kv_dtype)
        self.slots = slots
        self.book = RowBook(slots)
        self.store = BlockAllocator(blocks, self.block, self.P, self.lanes)
        self.rows = Rows(slots, self.max_new_cap, self.MB, self.store.trash, self.device)
        self.eos = torch.tensor(self.eos_ids, device=self.device)
        self._entry_ids = torch.arange(max(1, self.store.max_entries), device=self.device)
        self.buckets = sorted({min(b, slots) for b in self._requested_buckets} | {slots}) \
            if self._requested_buckets else default_buckets(slots)
        self.fns = DecodeFunctions(self.compile, self.device)  # compiled by `warm_up`, on the first step's thread

    def _release(self) -> None:
        self.model.clear_pool()
        self.rows = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _step_args(self, b: int, nb: int, E: int) -> tuple:
        r = self.rows
        return (self.model, r.tokens[:b], r.positions[:b], r.cols[:b], r.table[:b], r.table[:b, :nb], r.lane[:b],
                self._entry_ids[:E], self.block, self.lanes)

    @property
    def step_fn(self) -> Callable[..., torch.Tensor]:
        """The decode step as it runs now (compiled after `warm_up`): `step_fn(*self._step_args(b, nb, E))`."""
        return self.fns.step

    def warm_up(self) -> None:
        """Compile the decode step (once; `step()` calls it): one graph with symbolic batch, width
        and entry sizes. Call it from the thread that will step the engine: CUDA graphs belong to
        the thread that made them."""
        self.fns.warm_up(self._step_args, self.buckets, self.MB + 1, max(1, self.store.max_entries))

    def recompiles(self) -> int:
        """Graphs compiled since start-up (zero in a healthy run)."""
        return self.fns.recompiles()

    # requests --------------------------------------------------------------------------------------
    def check(self, req: Request, has_image: bool) -> str | None:
        """Why `req` cannot run here (a one-line message), or None."""
        cfg = self.model.config
        n = len(req.text_ids)
        if req.max_new_tokens < 1:
            return "max_new_tokens must be >= 1"
        last_pos = (PREFIX_LAST_POSITION if has_image else 0) + n
        if (why := context_error(last_pos, req.max_new_tokens, cfg.max_position_embeddings)) is not None:
            return why
        first_col = (self.P if has_image else 1) + n
        if first_col + req.max_new_tokens - 1 > self.max_len or req.max_new_tokens > self.max_new_cap:
            return (f"prompt of {n} tokens with max_new_tokens={req.max_new_tokens} does not fit a KV slot of "
                    f"{self.max_len} columns (raise max_prompt_tokens / max_new_tokens)")
        return None

    def add(self, requests: Sequence[Request], pixels: torch.Tensor | None = None, *, tag: Any = None,
            features: torch.Tensor | None = None, origin: Any = None) -> None:
        """Queue the prompts of one image (`pixels` (3, S, S) or its `features` (T, D)), or
        text-only prompts (neither). Results come out of `step()` as Completions carrying `tag`
        and the prompt's index. `origin` names where the work came from (statistics only)."""
        has_image = pixels is not None or features is not None
        for r in requests:
            if (why := self.check(r, has_image)) is not None:
                raise ValueError(why)
        if has_image:
            if pixels is not None and self.device.type == "cuda":
                pixels = pixels.pin_memory() if not pixels.is_pinned() else pixels
            g = Group(tag, pixels, features, True, origin=origin)
            g.waiting.extend(Seq(g, i, r) for i, r in enumerate(requests))
            self.scheduler.add(g)
            return
        for i, r in enumerate(requests):  # text-only prompts share nothing
            g = Group(tag, None, None, False, origin=origin)
            g.waiting.append(Seq(g, i, r))
            self.scheduler.add(g)

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.waiting) or self.book.running > 0

    def _lap(self, name: str, t0: float) -> float:
        if not self.timed:
            return 0.0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[name] += now - t0
        return now

    # the loop --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Completion]:
        """Admit what fits, decode until some row may have finished, return the finished ones."""
        self.warm_up()
        done: list[Completion] = []
        if self.scheduler.waiting and self.free:
            done += self._admit_safely()
        live = self.book.occupied()
        if live:
            n = min(self.sync_every, min(s.end_step for s in live) - self.step_count)
            if self.scheduler.waiting and len(self.free) >= self.scheduler.admission_rows:
                # room for a whole round and work waiting: admit again sooner (admission keeps up
                # with free capacity; each round is still at most `admission_images` long)
                n = min(n, max(1, self.sync_every // 4))
            if n > 0:
                if self.ahead is not None and self.scheduler.waiting:
                    self._encode_ahead()
                oom = False
                try:
                    self._decode(n)
                except Exception as e:
                    if not is_out_of_memory(e):
                        raise
                    oom = True  # handled below, once the exception (whose frames hold tensors) is gone
                if oom:
                    return done + self._decode_oom()
            done += self._harvest()
        return done

    def _encode_ahead(self) -> None:
        """The vision pass of the next round's new images (at most `admission_images`), started
        before this run of decode steps (`VisionAhead`); an out-of-memory leaves it to admission."""
        nxt = [g for g in self.scheduler.waiting if g.has_image and g.entry < 0][:self.admission_images]
        t0 = time.perf_counter() if self.timed else 0.0
        try:
            n = self.ahead.start(nxt)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            n = 0
        if n and self.timed and self.ahead.stream is None:  # on a GPU it overlaps decode: not timed apart
            self._lap("vision_s", t0)
        self.stats["images"] += n
        self.stats["vision_ahead"] += n

    def abort(self) -> list[tuple[Any, int]]:
        """Drop every queued and running prompt (after an unexpected error): their (tag, index)."""
        lost = [(s.group.tag, s.index) for s in self.seqs if s is not None]
        lost += [(s.group.tag, s.index) for g in self.scheduler.waiting for s in g.waiting]
        for g in self.scheduler.waiting:
            g.waiting.clear()
            self.store.hold_for_waiting(g)
        self.scheduler.waiting.clear()
        for row in range(self.slots):
            if self.seqs[row] is not None:
                self._free(row)
        return lost

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request], images: torch.Tensor | Sequence[torch.Tensor] = (),
                 *, image_features: torch.Tensor | None = None) -> GenerationOutput:
        """Every request to completion; outputs in request order. `images` (or `image_features`)
        are indexed by `Request.image`."""
        by_image: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            if r.image is None:
                self.add([r], tag=[i])
            else:
                by_image.setdefault(r.image, []).append(i)
        for img, idx in by_image.items():
            px = None if image_features is not None else images[img]
            ft = image_features[img] if image_features is not None else None
            self.add([requests[i] for i in idx], px, tag=idx, features=ft)
        results: dict[int, Completion] = {}
        while self.has_work:
            for c in self.step():
                results[c.tag[c.index]] = c
        if any(c.error for c in results.values()):
            raise RuntimeError(next(c.error for c in results.values() if c.error))
        order = range(len(requests))
        return GenerationOutput([results[i].tokens for i in order], [len(results[i].tokens) for i in order],
                                [results[i].finish_reason for i in order], [results[i].prompt_tokens for i in order])

    # admission -------------------------------------------------------------------------------------
    def _take(self) -> list[Seq]:
        seqs = self.scheduler.take(lambda s: self.store.reserve(s, self.book), self.book.running)
        for g in dict.fromkeys(s.group for s in seqs):
            self.store.hold_for_waiting(g)
        return seqs

    def _admit_safely(self) -> list[Completion]:
        running = self.book.running
        seqs = self._take()
        if not seqs and not running and not self.scheduler.alone_next:
            # nothing decodes and nothing fits: prefixes kept for waiting prompts fill the pool.
            # Let them go (they are made again on admission) rather than wait forever.
            for g in self.scheduler.waiting:
                self.store.drop_waiting_hold(g)
            seqs = self._take()
        if not seqs:
            return []
        alone = len(seqs) == 1 and running == 0
        try:
            self._admit(seqs)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
        else:
            self.scheduler.succeeded()
            return []
        # out of memory: give the rows back (and the prefixes made in this round), retry in smaller rounds
        self.stats["oom_admission"] += 1
        groups = list(dict.fromkeys(s.group for s in seqs))
        for s in seqs:
            if s.row >= 0:
                self._free(s.row)
        self.scheduler.requeue(seqs)
        for g in groups:
            if g.fresh:  # its prefix may be half made: the entry goes
                if g.queued:
                    self.store.release(g.entry)
                    g.queued = False
                g.entry, g.fresh = -1, False
            self.store.hold_for_waiting(g)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if not self.scheduler.out_of_memory(len(seqs), alone, running):
            return []
        g = self.scheduler.waiting[0]  # one prompt that fails alone: its own error
        s = g.waiting.popleft()
        self.store.hold_for_waiting(g)
        if not g.waiting:
            self.scheduler.waiting.popleft()
        self.stats["failed_alone"] += 1
        return [Completion(s.group.tag, s.index, [], "error", 0, "out of memory processing this prompt alone")]

    def _admit(self, seqs: list[Seq] | None = None) -> None:
        seqs = self._take() if seqs is None else seqs
        if not seqs:
            return
        t0 = start = time.perf_counter() if self.timed else 0.0
        store = self.store
        groups = list(dict.fromkeys(s.group for s in seqs))
        fresh = [g for g in groups if g.has_image and g.fresh]
        encoded = encode_new(self.encode, fresh, self.device)  # 1. one vision pass for the round's new images
        t0 = self._lap("vision_s", t0) if self.timed else t0
        tables = [store.row_blocks.get(s.row, []) for s in seqs]
        first = prefill_round(self.model, seqs, fresh, tables, self.block, store.trash, store.entry_bound)  # 2., 3.
        self._start(seqs, first, tables)
        for g in groups:
            g.fresh = False
            if not g.waiting:  # every prompt admitted: the prefix lives in the store now
                g.prefix_logits = None
                if g.pixels is not None:
                    g.features = None
        self.stats["admissions"] += 1
        self.stats["admitted"] += len(seqs)
        self.stats["images"] += encoded
        if self.timed:
            end = self._lap("prefill_s", t0)
            self.timings["max_admission_s"] = max(self.timings["max_admission_s"], end - start)

    def _start(self, seqs: list[Seq], logits: torch.Tensor, tables: list[list[int]]) -> None:
        first_cols = [len(s.req.text_ids) + (0 if s.group.has_image else 1) for s in seqs]
        first_pos = [(PREFIX_LAST_POSITION + 1 if s.group.has_image else 1) + len(s.req.text_ids) for s in seqs]
        sample_first(self.rows, seqs, logits, self.eos, self.lanes, first_cols, first_pos, tables)
        for s, c in zip(seqs, first_cols):
            self.book.start(s, self.step_count, c)

    # decoding --------------------------------------------------------------------------------------
    def _shape(self, steps: int) -> tuple[int, int, int]:
        """(rows B, suffix blocks read nb, prefix entries E) for the next `steps` steps."""
        occupied = self.book.occupied()
        top = max(s.row for s in occupied) + 1
        b = next(x for x in self.buckets if x >= top)
        last = self.step_count + steps - 1
        width = max(s.first_col + max(0, min(last - s.start_step, s.req.max_new_tokens - 2)) + 1 for s in occupied)
        # at least 2 of each (dynamo specializes sizes 0 and 1: one graph covers every size >= 2)
        nb = size_bucket(max(2, -(-width // self.block)), self.MB + 1)
        E = size_bucket(max(2, self.store.entry_bound), max(1, self.store.max_entries))
        return b, nb, E

    def _decode(self, steps: int) -> None:
        t0 = time.perf_counter() if self.timed else 0.0
        b, nb, E = self._shape(steps)
        kind = (self.book.n_sampling > 0, self.book.n_filtered > 0)
        pad = self.model.config.pad_token_id
        advance = self.fns.advance_for(kind, self.buckets, self.model.config.vocab_size, self.eos, pad)
        decode_steps(self.fns.step, self._step_args(b, nb, E), self.rows, b, steps, *kind, self.eos, pad, advance)
        self.step_count += steps
        occupied = self.book.running
        self.stats["decode_steps"] += steps
        self.stats["decode_rows"] += steps * occupied
        self.stats["decode_slots"] += steps * b
        self.stats["attn_columns"] += steps * (E * self.P + b * nb * self.block)
        self.stats["kv_blocks_used"] += steps * self.store.used
        self.stats["kv_blocks"] += steps * self.store.blocks
        self.stats["prefix_entries"] += steps * self.store.entries_in_use
        if len(self.origins) > 1:
            self.stats["shared_steps"] += steps
        self._lap("decode_s", t0)

    def _harvest(self) -> list[Completion]:
        """Read which rows finished (one transfer) and free their rows."""
        finished = self.rows.finished([s.row for s in self.book.occupied()])
        if not finished:
            return []
        out = []
        for row, stopped, toks in finished:
            s = self.seqs[row]
            prompt = 1 + len(s.req.text_ids) + (self.model.config.num_vision_tokens if s.group.has_image else 0)
            out.append(Completion(s.group.tag, s.index, toks, "stop" if stopped else "length", prompt))
            self.stats["generated_tokens"] += len(toks)
            self._free(row, clear=False)
        done = [row for row, _, _ in finished]
        self.rows.clear(done)
        self.stats["finished"] += len(out)
        self._compact()
        return out

    def _compact(self) -> None:
        """Move the highest rows into free low ones when that lets decoding use a smaller bucket
        (only their state and block tables move: their KV stays in its blocks)."""
        movers, holes = self.book.compaction(self.buckets)
        if not movers:
            return
        self.rows.move(movers, holes)
        for a, b in zip(movers, holes):
            self.book.move(a, b)
            self.store.move_row(a, b)
        self.stats["moved"] += len(movers)

    def _free(self, row: int, clear: bool = True) -> None:
        """Give back a row: its suffix blocks, its lane, its hold on its image's prefix entry."""
        self.store.give_back(self.seqs[row])
        if clear:
            self.rows.clear([row])
        self.book.remove(row)

    def _decode_oom(self) -> list[Completion]:
        """Out of memory while decoding: every running prompt goes back to the queue and the
        pool is rebuilt with a quarter fewer rows and blocks (or a lone prompt fails)."""
        self.stats["oom_decode"] += 1
        running = self.book.occupied()
        for s in running:
            self._free(s.row)
        for g in list({id(s.group): s.group for s in running}.values()) + list(self.scheduler.waiting):
            g.entry, g.queued = -1, False  # the pool is rebuilt: prefixes are made again
        if self.slots == 1:
            self.stats["failed_alone"] += 1
            s = running[0]
            return [Completion(s.group.tag, s.index, [], "error", 0, "out of memory decoding this prompt alone")]
        self.scheduler.requeue(running)
        slots = max(1, self.slots * 3 // 4)
        blocks = max(self.nP + self.MB, self.store.blocks * 3 // 4)
        log.warning("out of memory while decoding with %d slots; retrying with %d", self.slots, slots)
        self._release()
        self._allocate(slots, blocks)  # new shapes: compiled afresh (a new code object) on the next step
        self.plan.slots, self.plan.blocks = slots, blocks
        return []
