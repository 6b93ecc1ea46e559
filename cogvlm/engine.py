"""Continuous-batching engine: KV slots allocated once, requests admitted as soon as slots free up.

A replica owns one KV cache of `slots` rows x `max_len` columns, sized by a memory plan made at
start-up (`memory.py`) and never reallocated unless the device runs out of memory. A slot holds
one prompt:

    image prompt:  [bos, boi, patches..., eoi] [text] [generated ...]   (the prefix: P columns)
    text prompt:   [bos] [text] [generated ...]

Between decode steps, waiting prompts are admitted into free slots (at most `admission_images`
images and `admission_rows` prompts per round, which bounds how long decoding rows wait): one
vision pass for the round's new images, each image's prefix prefilled once straight into the slot
of its first prompt and copied slot-to-slot to its other prompts, then every prompt's own text
prefilled, right-padded (a pad's keys come after the real tokens, so no real query sees them,
and decoding overwrites them). The decode step then runs one token for every slot of the smallest
bucket covering the live slots: fixed shapes, so `compile=True` captures one graph per bucket
before the first step (CUDA graphs on a GPU) and never again. When rows finish, the highest live
slots move down into free ones so that a smaller bucket covers them. Rows reaching
`max_new_tokens` are known on the host without asking the device; eos stops are read back every
`sync_every` steps.

Each prompt computes what it computes alone: positions follow the spec (patches share one, pads
never take one), masks hide every other column, and sampling draws from the prompt's own random
stream (`sampling.py`), so a row's tokens do not depend on what else shares its steps.
"""

from __future__ import annotations

import logging
import sys
import time
import types
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from .config import LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE
from .decoder import CogVLMForCausalLM, ExpertRouting
from .generate import GenerationOutput, context_error
from .memory import GB, MemoryPlan, PeakMemory, kv_slot_bytes, slots_for
from .quantization import module_bytes
from .positions import attention_mask_4d, build_position_ids
from .sampling import sample

log = logging.getLogger(__name__)

# positions of an image prefix: bos 0, boi 1, patches 2, eoi 3 (the spec); text starts at 4
PREFIX_LAST_POSITION = 3


@dataclass
class Request:
    """One prompt: its text token ids (what follows bos and the image), the image it is about
    (an index into the images given to `Engine.generate`, or None) and how to decode it."""

    text_ids: list[int]
    image: int | None = None
    max_new_tokens: int = 32
    temperature: float = 0.0  # <= 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0  # the row's own random stream (`sampling.derive_seed`)
    ignore_eos: bool = False


@dataclass
class Completion:
    """A finished prompt: `tag` and `index` as given to `Engine.add`; `error` set if it failed alone."""

    tag: Any
    index: int
    tokens: list[int]
    finish_reason: str  # "stop" (an eos id), "length" (max_new_tokens) or "error"
    prompt_tokens: int
    error: str | None = None


@dataclass(eq=False)
class _Group:
    """An image (or one text-only prompt) with prompts still waiting for a slot."""

    tag: Any
    pixels: torch.Tensor | None  # (3, S, S), kept (to redo the vision pass after an out-of-memory)
    features: torch.Tensor | None  # (T, D), kept until every prompt is admitted
    has_image: bool
    waiting: deque  # of _Seq
    holder: int = -1  # a live slot holding this image's prefix, or -1
    prefix_logits: torch.Tensor | None = None  # (V,): an empty prompt's first logits
    origin: Any = None


@dataclass(eq=False)
class _Seq:
    group: _Group
    index: int
    req: Request
    slot: int = -1
    end_step: int = 0  # the engine step at which it reaches max_new_tokens
    started: bool = False  # its slot's decode state is set up


def is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                            or "not enough memory" in text)


def decode_step(model: CogVLMForCausalLM, tokens: torch.Tensor, positions: torch.Tensor,
                cols: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """One language token for each of slots 0..B-1, written at column `cols[b]`: -> (B, V) logits.
    Every shape is fixed by B and max_len, so this compiles once per B."""
    embeds = model.model.embed_tokens(tokens[:, None])  # (B, 1, D)
    mask = key_valid[:, None, None, :]  # (B, 1, 1, max_len)
    logits = model.forward_embeds(embeds, torch.zeros_like(tokens)[:, None], positions[:, None], mask,
                                  cache_slots=cols[:, None], routing=ExpertRouting())
    return logits[:, -1]


def _graphs() -> int:
    """Graphs torch.compile has made in this process (none if it was never imported: importing
    it takes seconds)."""
    utils = sys.modules.get("torch._dynamo.utils")
    return utils.counters["stats"]["unique_graphs"] if utils is not None else 0


def default_buckets(slots: int, smallest: int = 8) -> list[int]:
    """Decode batch sizes: slots, then halves rounded up to multiples of 8, down to `smallest`:
    at most 7 sizes, under torch.compile's limit of 8 graphs per function."""
    out = {slots}
    b = slots
    while len(out) < 7 and b > smallest:
        b = max(smallest, -(-(b // 2) // 8) * 8 if b // 2 > 8 else b // 2)
        out.add(min(b, slots))
    return sorted(out)


def _private_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The same function with its own code object: torch.compile keeps graphs (and counts them
    against its recompile limit) per code object, so each engine's buckets get their own."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class Engine:
    """Continuous batching over many (image, prompt) requests for one model on one device.

    Sizes: `max_len` cache columns per slot (prefix + longest prompt text + most new tokens),
    `slots` from the memory plan: `memory_gb` beside the weights (default: what is free on the GPU
    after profiling, or `device_share` of it for replicas sharing a GPU; 4 GB on CPU), less the
    measured activations and `margin_gb`; `kv_cache_gb`
    caps the cache and `max_slots` the count. `admission_images` images (and `prompts_per_image`
    prompts each) per admission round; `compile` is True (inductor; CUDA graphs on a GPU) or a
    torch.compile backend name.
    """

    def __init__(self, model: CogVLMForCausalLM, *, max_len: int | None = None, max_prompt_tokens: int = 256,
                 max_new_tokens: int = 64, max_slots: int = 256, kv_cache_gb: float | None = None,
                 memory_gb: float | None = None, margin_gb: float | None = None, admission_images: int = 8,
                 prompts_per_image: int = 1, sync_every: int = 8, buckets: Sequence[int] | None = None,
                 compile: bool | str = False, compile_vision: bool = False,
                 eos_token_ids: Iterable[int] | None = None, timed: bool = False,
                 device_share: float = 1.0) -> None:
        self.model = model
        cfg = model.config
        self.device = model.device
        self.P = 1 + cfg.num_vision_tokens
        self.max_len = max_len or self.P + max_prompt_tokens + max_new_tokens
        self.max_new_cap = max_new_tokens if max_len is None else self.max_len
        self.admission_images = max(1, admission_images)
        self.admission_rows = max(1, admission_images * max(1, prompts_per_image))
        self.sync_every = max(1, sync_every)
        self.eos_ids = list(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids) or [-1]
        self.compile = compile
        self.timed = timed
        # the vision tower compiled once for any number of images (it is compute-bound: no graphs)
        self.encode: Callable[[torch.Tensor], torch.Tensor] = model.encode_images
        if compile_vision:
            self.encode = torch.compile(model.encode_images, dynamic=True)
        # with `timed`: seconds in each phase, and the longest admission round (how long decoding
        # rows waited at most)
        self.timings = {"vision_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0, "max_admission_s": 0.0}
        self.stats: dict[str, int] = dict.fromkeys(
            ("decode_steps", "decode_rows", "decode_slots", "shared_steps", "admissions", "admitted",
             "images", "generated_tokens", "finished", "moved", "oom_admission", "oom_decode", "failed_alone"), 0)
        self.waiting: deque[_Group] = deque()
        self.seqs: list[_Seq | None] = []
        self._admission = (self.admission_images, self.admission_rows)  # as configured
        self._alone_next = False
        self._ok_rounds = 0
        self.step_count = 0
        self._graphs0 = 0
        self._requested_buckets = list(buckets) if buckets else None

        while True:  # the configured admission size, or smaller if even that runs out of memory
            try:
                prefill_bytes, decode_per_slot = self._profile()
                break
            except Exception as e:
                if not is_out_of_memory(e) or self.admission_rows == 1:
                    raise
                self.admission_rows = max(1, self.admission_rows // 2)
                self.admission_images = max(1, min(self.admission_images, self.admission_rows))
                self._admission = (self.admission_images, self.admission_rows)
                log.warning("out of memory profiling an admission round; admission lowered to %d prompts / "
                            "%d images", self.admission_rows, self.admission_images)
        budget, margin = self._budget(memory_gb, margin_gb, device_share)  # after the profile's one-time allocations
        slot_bytes = self._slot_bytes()
        slots = slots_for(budget, prefill_bytes, margin, slot_bytes + decode_per_slot, max_slots)
        if kv_cache_gb is not None:  # an explicit cap on the cache
            slots = min(slots, int(kv_cache_gb * GB) // slot_bytes)
        self.plan = MemoryPlan(budget, self._weights_bytes(), prefill_bytes, slot_bytes, decode_per_slot, margin,
                               slots, self.max_len)
        if slots < 1:
            raise MemoryError(f"not even one KV slot of {self.max_len} columns fits: {self.plan.describe()}; "
                              "lower max_prompt_tokens / max_new_tokens or admission_images, or quantize the weights "
                              "(quantization int8 or int4)")
        log.info(self.plan.describe())
        self._allocate(slots)
        if compile_vision:  # sizes 1 and 2 get their own graphs (dynamo specializes 0/1): make them now
            with torch.inference_mode():
                for n in (1, 2):
                    self.encode(torch.zeros(n, 3, cfg.image_size, cfg.image_size))
        self._graphs0 = _graphs()

    # memory plan ---------------------------------------------------------------------------------
    def _weights_bytes(self) -> int:
        """Parameters and buffers as stored (quantized ones at their real size), KV caches excluded."""
        caches = [layer.self_attn.kv_cache for layer in self.model.model.layers]
        return module_bytes(self.model) - sum(module_bytes(c) for c in caches if c is not None)

    def _budget(self, memory_gb: float | None, margin_gb: float | None, share: float) -> tuple[int, int]:
        if memory_gb is not None:
            budget = int(memory_gb * GB)
        elif self.device.type == "cuda":  # what is free, or this replica's part of a shared GPU
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(min(free, total * share - self._weights_bytes()))
        else:
            budget = int(4 * GB)
        if margin_gb is None:  # allocator fragmentation, CUDA graph pools, library workspaces
            margin = int(min(0.05 * budget, 2 * GB)) if self.device.type == "cuda" else int(0.02 * budget)
        else:
            margin = int(margin_gb * GB)
        return budget, margin

    def _slot_bytes(self) -> int:
        return kv_slot_bytes(self.model.config, self.model.dtype, self.max_len, self.max_new_cap)

    @torch.inference_mode()
    def _profile(self) -> tuple[int, int]:
        """Measured peaks of one admission at the largest size and of a sampled decode step over
        it, on a temporary cache of that many slots (its own bytes not counted). A first,
        unmeasured round makes the one-time allocations (library workspaces, weight layouts)."""
        cfg = self.model.config
        n_img, rows = self.admission_images, self.admission_rows
        per_image = max(1, rows // n_img)
        text_len = max(0, min(self.max_len - self.P - 1, cfg.max_position_embeddings - 5))
        g = torch.Generator().manual_seed(0)
        self._allocate(rows)
        try:
            for _ in range(2):
                for slot in range(rows):
                    if self.seqs[slot] is not None:
                        self._free(slot)
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
            self.waiting.clear()
            self._release()
            self.step_count = 0
            self.stats = dict.fromkeys(self.stats, 0)
        return pre.peak, -(-dec.peak // rows)

    # slots -----------------------------------------------------------------------------------------
    def _allocate(self, slots: int) -> None:
        """The KV cache and per-slot state, once (the decode step is compiled by `warm_up`)."""
        m, dev, L = self.model, self.device, self.max_len
        m.setup_caches(slots, L)
        self.slots = slots
        self.seqs = [None] * slots
        z = lambda dtype=torch.long: torch.zeros(slots, dtype=dtype, device=dev)  # noqa: E731
        self.tokens, self.positions, self.cols, self.lengths, self.max_new = z(), z(), z(), z(), z()
        self.seeds, self.top_k = z(), z()
        self.temperature, self.top_p = z(torch.float32), z(torch.float32)
        self.live, self.stopped, self.ignore_eos = z(torch.bool), z(torch.bool), z(torch.bool)
        self.key_valid = torch.zeros(slots, L, dtype=torch.bool, device=dev)
        self.out = torch.zeros(slots, self.max_new_cap + 1, dtype=torch.long, device=dev)  # last: trash
        self.eos = torch.tensor(self.eos_ids, device=dev)
        self.free = list(range(slots))
        self.n_sampling = self.n_filtered = 0
        self.origins: dict[Any, int] = {}
        self.buckets = sorted({min(b, slots) for b in self._requested_buckets} | {slots}) \
            if self._requested_buckets else default_buckets(slots)
        self.step_fn: Callable[..., torch.Tensor] = decode_step
        self._warm = not self.compile  # compiled on the first step's thread (CUDA graphs are per thread)

    def _release(self) -> None:
        self.model.clear_caches()
        self.key_valid = self.out = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def warm_up(self) -> None:
        """Compile and capture the decode step for every bucket (once; `step()` calls it). Call it
        from the thread that will step the engine: CUDA graphs belong to the thread that made them."""
        if self._warm:
            return
        backend = self.compile if isinstance(self.compile, str) else "inductor"
        kw: dict[str, Any] = {"backend": backend, "fullgraph": True, "dynamic": False}
        if backend == "inductor" and self.device.type == "cuda":
            kw["mode"] = "reduce-overhead"  # CUDA graphs
        self.step_fn = torch.compile(_private_copy(decode_step), **kw)
        with torch.inference_mode():
            for b in self.buckets:
                for _ in range(3):  # CUDA graph trees record on a later call than the first
                    self.step_fn(self.model, self.tokens[:b], self.positions[:b], self.cols[:b], self.key_valid[:b])
        self._warm = True
        self._graphs0 = _graphs()

    def recompiles(self) -> int:
        """Graphs compiled since start-up (zero in a healthy run)."""
        return _graphs() - self._graphs0

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
            g = _Group(tag, pixels, features, True, deque(), origin=origin)
            g.waiting.extend(_Seq(g, i, r) for i, r in enumerate(requests))
            self.waiting.append(g)
            return
        for i, r in enumerate(requests):  # text-only prompts share nothing
            g = _Group(tag, None, None, False, deque(), origin=origin)
            g.waiting.append(_Seq(g, i, r))
            self.waiting.append(g)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or len(self.free) < self.slots

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
        if self.waiting and self.free:
            done += self._admit_safely()
        live = [s for s in self.seqs if s is not None]
        if live:
            n = min(self.sync_every, min(s.end_step for s in live) - self.step_count)
            if n > 0:
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

    def abort(self) -> list[tuple[Any, int]]:
        """Drop every queued and running prompt (after an unexpected error): their (tag, index)."""
        lost = [(s.group.tag, s.index) for s in self.seqs if s is not None]
        lost += [(s.group.tag, s.index) for g in self.waiting for s in g.waiting]
        self.waiting.clear()
        for slot in range(self.slots):
            if self.seqs[slot] is not None:
                self._free(slot)
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
    def _take(self) -> list[_Seq]:
        """The next round's prompts, in arrival order: up to the free slots, `admission_rows`
        prompts and `admission_images` images needing a vision pass or a prefix. After a prompt
        ran out of memory in a round of its own, it waits for an empty engine to try alone."""
        if self._alone_next and len(self.free) < self.slots:
            return []
        taken: list[_Seq] = []
        images = 0
        for g in self.waiting:
            room = min(len(self.free), self.admission_rows) - len(taken)
            if room <= 0:
                break
            if g.has_image and g.holder < 0:
                if images >= self.admission_images:
                    break
                images += 1
            for _ in range(min(room, len(g.waiting))):
                taken.append(g.waiting.popleft())
        while self.waiting and not self.waiting[0].waiting:
            self.waiting.popleft()
        return taken

    def _admit_safely(self) -> list[Completion]:
        seqs = self._take()
        if not seqs:
            return []
        alone = len(seqs) == 1 and len(self.free) == self.slots - 1
        try:
            self._admit(seqs)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
        else:
            self._alone_next = False
            self._ok_rounds += 1
            if self._ok_rounds >= 64 and self.admission_rows < self._admission[1]:  # recover slowly
                self.admission_rows = min(self._admission[1], 2 * self.admission_rows)
                self.admission_images = min(self._admission[0], 2 * self.admission_images)
                self._ok_rounds = 0
            return []
        # out of memory: give the slots back, retry the same prompts in smaller rounds
        self.stats["oom_admission"] += 1
        self._ok_rounds = 0
        for s in seqs:
            if s.slot >= 0:
                self._free(s.slot)
        self._requeue(seqs)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(seqs) > 1:
            self.admission_rows = max(1, min(self.admission_rows, len(seqs)) // 2)
            self.admission_images = max(1, min(self.admission_images, self.admission_rows))
            log.warning("out of memory admitting %d prompts; admission lowered to %d prompts / %d images "
                        "and retried", len(seqs), self.admission_rows, self.admission_images)
            return []
        if not alone:  # others were decoding: retry once they are done
            self._alone_next = True
            log.warning("out of memory admitting one prompt beside %d running; retrying it alone",
                        self.slots - len(self.free))
            return []
        self._alone_next = False
        g = self.waiting[0]  # one prompt that fails alone: its own error
        s = g.waiting.popleft()
        if not g.waiting:
            self.waiting.popleft()
        self.stats["failed_alone"] += 1
        log.warning("out of memory admitting one prompt alone; it fails")
        return [Completion(s.group.tag, s.index, [], "error", 0, "out of memory processing this prompt alone")]

    def _requeue(self, seqs: list[_Seq]) -> None:
        """Put prompts back at the head of the queue, in their order."""
        groups: list[_Group] = []
        for s in seqs:
            s.slot = -1
            if s.group not in groups:
                groups.append(s.group)
        for g in groups:
            mine = [s for s in seqs if s.group is g]
            g.waiting.extendleft(reversed(mine))
            if g in self.waiting:
                self.waiting.remove(g)
        self.waiting.extendleft(reversed(groups))

    def _admit(self, seqs: list[_Seq] | None = None) -> None:
        seqs = self._take() if seqs is None else seqs
        if not seqs:
            return
        t0 = start = time.perf_counter() if self.timed else 0.0
        model, cfg, dev, P = self.model, self.model.config, self.device, self.P
        for s in seqs:
            s.slot = self.free.pop(0)
            self.seqs[s.slot] = s
        groups = list(dict.fromkeys(s.group for s in seqs))
        image_groups = [g for g in groups if g.has_image]

        # 1. one vision pass for the round's new images
        need = [g for g in image_groups if g.features is None]
        if need:
            feats = self.encode(torch.stack([g.pixels for g in need]))  # (U, T, D)
            for g, f in zip(need, feats):
                g.features = f
        t0 = self._lap("vision_s", t0) if self.timed else t0

        # 2. each image's prefix once, straight into the slot of its first admitted prompt
        fresh = [g for g in image_groups if g.holder < 0]
        if fresh:
            U = len(fresh)
            for g in fresh:
                g.holder = next(s.slot for s in seqs if s.group is g)
            types = torch.tensor([[LANGUAGE_TOKEN_TYPE] + [VISION_TOKEN_TYPE] * cfg.num_vision_tokens],
                                 device=dev).expand(U, P)
            pos = build_position_ids(types)  # (U, P): 0, 1, 2, ..., 2, 3
            bos = model.model.embed_tokens(torch.full((U, 1), cfg.bos_token_id, device=dev))
            embeds = torch.cat([bos, torch.stack([g.features for g in fresh]).to(dev, bos.dtype)], dim=1)  # (U, P, D)
            rows = torch.tensor([g.holder for g in fresh], device=dev)
            logits = model.forward_embeds(embeds, types, pos, None, cache_slots=torch.arange(P, device=dev),
                                          cache_rows=rows, logits_to_keep=1)[:, -1]  # (U, V)
            for g, lg in zip(fresh, logits):
                g.prefix_logits = lg

        # 3. copy each prefix to the image's other slots
        copies = [(s.slot, s.group.holder) for s in seqs if s.group.has_image and s.slot != s.group.holder]
        if copies:
            dst = torch.tensor([d for d, _ in copies], device=dev)
            src = torch.tensor([h for _, h in copies], device=dev)
            for layer in model.model.layers:
                c = layer.self_attn.kv_cache
                for buf in (c.k_cache, c.v_cache):
                    buf[:, :, :P].index_copy_(0, dst, buf[:, :, :P].index_select(0, src))

        # 4. each prompt's own text; the first token of every admitted prompt
        first_logits: dict[int, torch.Tensor] = {}
        with_text = [s for s in seqs if s.group.has_image and s.req.text_ids]
        for s in seqs:
            if s.group.has_image and not s.req.text_ids:  # an empty prompt ends at eoi
                first_logits[s.slot] = s.group.prefix_logits
        if with_text:
            first_logits.update(zip((s.slot for s in with_text), self._prefill_text(with_text)))
        text_only = [s for s in seqs if not s.group.has_image]
        if text_only:
            first_logits.update(zip((s.slot for s in text_only), self._prefill_fresh(text_only)))
        self._start(seqs, torch.stack([first_logits[s.slot] for s in seqs]))
        for g in image_groups:
            if not g.waiting:  # every prompt admitted: the prefix lives in the slots now
                g.prefix_logits = None
                if g.pixels is not None:
                    g.features = None
        self.stats["admissions"] += 1
        self.stats["admitted"] += len(seqs)
        self.stats["images"] += len(need)
        if self.timed:
            end = self._lap("prefill_s", t0)
            self.timings["max_admission_s"] = max(self.timings["max_admission_s"], end - start)

    def _prefill_text(self, seqs: list[_Seq]) -> torch.Tensor:
        """Prompt texts after their prefixes (columns P..), right-padded: -> (R, V) last logits."""
        model, cfg, dev, P = self.model, self.model.config, self.device, self.P
        R, T = len(seqs), max(len(s.req.text_ids) for s in seqs)
        ids = torch.full((R, T), cfg.pad_token_id, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, :len(s.req.text_ids)] = torch.tensor(s.req.text_ids)
        ids = ids.to(dev)
        pos = (PREFIX_LAST_POSITION + 1 + torch.arange(T, device=dev)).expand(R, T)
        cols = torch.arange(P, P + T, device=dev)
        mask = attention_mask_4d(torch.ones(R, P + T, dtype=torch.bool, device=dev), cols)  # causal by column
        rows = torch.tensor([s.slot for s in seqs], device=dev)
        last = torch.tensor([len(s.req.text_ids) - 1 for s in seqs], device=dev)
        return model.forward_embeds(model.model.embed_tokens(ids), torch.zeros_like(ids), pos, mask,
                                    cache_slots=cols, routing=ExpertRouting(), cache_rows=rows,
                                    logits_at=last)[:, -1]

    def _prefill_fresh(self, seqs: list[_Seq]) -> torch.Tensor:
        """Text-only prompts [bos, text] from column 0, right-padded: -> (R, V) last logits."""
        model, cfg, dev = self.model, self.model.config, self.device
        R, T = len(seqs), 1 + max(len(s.req.text_ids) for s in seqs)
        ids = torch.full((R, T), cfg.pad_token_id, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, :1 + len(s.req.text_ids)] = torch.tensor([cfg.bos_token_id] + s.req.text_ids)
        ids = ids.to(dev)
        pos = torch.arange(T, device=dev).expand(R, T)
        rows = torch.tensor([s.slot for s in seqs], device=dev)
        last = torch.tensor([len(s.req.text_ids) for s in seqs], device=dev)
        return model.forward_embeds(model.model.embed_tokens(ids), torch.zeros_like(ids), pos, None,
                                    cache_slots=torch.arange(T, device=dev), routing=ExpertRouting(),
                                    cache_rows=rows, logits_at=last)[:, -1]

    def _start(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Sample each admitted prompt's first token and set up its slot's decode state."""
        dev = self.device
        slots = torch.tensor([s.slot for s in seqs], device=dev)
        reqs = [s.req for s in seqs]
        n = [len(r.text_ids) for r in reqs]
        img = [s.group.has_image for s in seqs]
        first_col = torch.tensor([(self.P if i else 1) + k for i, k in zip(img, n)], device=dev)
        first_pos = torch.tensor([(PREFIX_LAST_POSITION + 1 if i else 1) + k for i, k in zip(img, n)], device=dev)
        temp = torch.tensor([r.temperature for r in reqs], dtype=torch.float32, device=dev)
        top_k = torch.tensor([r.top_k for r in reqs], device=dev)
        top_p = torch.tensor([r.top_p for r in reqs], dtype=torch.float32, device=dev)
        seeds = torch.tensor([r.seed for r in reqs], device=dev)
        max_new = torch.tensor([r.max_new_tokens for r in reqs], device=dev)
        ignore = torch.tensor([r.ignore_eos for r in reqs], device=dev)
        sampled = any(r.temperature > 0 for r in reqs)
        filtered = any(r.temperature > 0 and (r.top_k > 0 or r.top_p < 1) for r in reqs)
        tok = sample(logits.float(), temp if sampled else None, top_k, top_p, seeds,
                     torch.zeros_like(seeds), filtered)
        hit = torch.isin(tok, self.eos) & ~ignore
        self.tokens[slots] = tok
        self.positions[slots] = first_pos
        self.cols[slots] = first_col
        self.lengths[slots] = 1
        self.out[slots, 0] = tok
        self.max_new[slots] = max_new
        self.temperature[slots], self.top_k[slots], self.top_p[slots], self.seeds[slots] = temp, top_k, top_p, seeds
        self.ignore_eos[slots] = ignore
        self.stopped[slots] = hit
        self.live[slots] = ~hit & (max_new > 1)
        self.key_valid[slots] = torch.arange(self.max_len, device=dev)[None, :] < first_col[:, None]
        for s in seqs:
            s.started = True
            s.end_step = self.step_count + s.req.max_new_tokens - 1
            self.n_sampling += s.req.temperature > 0
            self.n_filtered += s.req.temperature > 0 and (s.req.top_k > 0 or s.req.top_p < 1)
            self.origins[s.group.origin] = self.origins.get(s.group.origin, 0) + 1

    # decoding --------------------------------------------------------------------------------------
    def _bucket(self) -> int:
        top = max(i for i, s in enumerate(self.seqs) if s is not None) + 1
        return next(b for b in self.buckets if b >= top)

    def _decode(self, steps: int) -> None:
        t0 = time.perf_counter() if self.timed else 0.0
        b = self._bucket()
        kv, live, lengths = self.key_valid[:b], self.live[:b], self.lengths[:b]
        cap = self.out.shape[1] - 1
        sampled = self.n_sampling > 0
        for _ in range(steps):
            kv.scatter_(1, self.cols[:b, None], True)  # the fed token's own column
            logits = self.step_fn(self.model, self.tokens[:b], self.positions[:b], self.cols[:b], kv)
            tok = sample(logits, self.temperature[:b] if sampled else None, self.top_k[:b], self.top_p[:b],
                         self.seeds[:b], lengths, self.n_filtered > 0)
            tok = torch.where(live, tok, self.model.config.pad_token_id)
            self.out[:b].scatter_(1, torch.where(live, lengths, cap)[:, None], tok[:, None])
            lengths += live
            hit = torch.isin(tok, self.eos) & live & ~self.ignore_eos[:b]
            self.stopped[:b] |= hit
            live &= ~hit & (lengths < self.max_new[:b])
            self.tokens[:b] = tok
            self.positions[:b] += live
            self.cols[:b] += live
            self.step_count += 1
        occupied = self.slots - len(self.free)
        self.stats["decode_steps"] += steps
        self.stats["decode_rows"] += steps * occupied
        self.stats["decode_slots"] += steps * b
        if len(self.origins) > 1:
            self.stats["shared_steps"] += steps
        self._lap("decode_s", t0)

    def _harvest(self) -> list[Completion]:
        """Read which rows finished (one transfer) and free their slots."""
        occupied = [i for i, s in enumerate(self.seqs) if s is not None]
        state = torch.stack([self.live, self.stopped]).cpu()
        done = [i for i in occupied if not state[0, i]]
        if not done:
            return []
        idx = torch.tensor(done, device=self.device)
        lengths = self.lengths[idx].tolist()
        rows = self.out[idx].tolist()
        out = []
        for slot, n, toks in zip(done, lengths, rows):
            s = self.seqs[slot]
            prompt = 1 + len(s.req.text_ids) + (self.model.config.num_vision_tokens if s.group.has_image else 0)
            out.append(Completion(s.group.tag, s.index, toks[:n], "stop" if state[1, slot] else "length", prompt))
            self.stats["generated_tokens"] += n
            self._free(slot)
        self.stats["finished"] += len(out)
        self._compact()
        return out

    def _compact(self, chunk: int = 1) -> None:
        """Move the highest live slots into free low ones when that lets decoding use a smaller
        bucket (their KV rows and state are copied, `chunk` rows per layer at a time)."""
        occupied = [i for i, s in enumerate(self.seqs) if s is not None]
        if not occupied:
            return
        target = next(b for b in self.buckets if b >= len(occupied))
        if target >= self._bucket():
            return
        movers = [i for i in occupied if i >= target]
        holes = [i for i in range(target) if self.seqs[i] is None][:len(movers)]
        for k in range(0, len(movers), chunk):
            src = torch.tensor(movers[k:k + chunk], device=self.device)
            dst = torch.tensor(holes[k:k + chunk], device=self.device)
            for layer in self.model.model.layers:
                c = layer.self_attn.kv_cache
                c.k_cache[dst] = c.k_cache[src]
                c.v_cache[dst] = c.v_cache[src]
            for t in (self.tokens, self.positions, self.cols, self.lengths, self.max_new, self.seeds, self.top_k,
                      self.temperature, self.top_p, self.live, self.stopped, self.ignore_eos, self.key_valid, self.out):
                t[dst] = t[src]
        for a, b in zip(movers, holes):
            seq = self.seqs[a]
            self.seqs[a], self.seqs[b] = None, seq
            seq.slot = b
            self.live[a] = False
            if seq.group.holder == a:
                seq.group.holder = b
            self.free.remove(b)
            self.free.append(a)
        self.free.sort()
        self.stats["moved"] += len(movers)

    def _free(self, slot: int) -> None:
        s = self.seqs[slot]
        self.seqs[slot] = None
        self.live[slot] = False
        self.free.append(slot)
        self.free.sort()
        g = s.group
        if g.holder == slot:
            g.holder = next((i for i, o in enumerate(self.seqs) if o is not None and o.group is g), -1)
        if not s.started:
            return
        s.started = False
        self.n_sampling -= s.req.temperature > 0
        self.n_filtered -= s.req.temperature > 0 and (s.req.top_k > 0 or s.req.top_p < 1)
        self.origins[g.origin] -= 1
        if not self.origins[g.origin]:
            del self.origins[g.origin]

    def _decode_oom(self) -> list[Completion]:
        """Out of memory while decoding: every running prompt goes back to the queue and the
        cache is rebuilt with a quarter fewer slots (or a lone prompt fails)."""
        self.stats["oom_decode"] += 1
        running = [s for s in self.seqs if s is not None]
        for s in running:
            self._free(s.slot)
        for g in {id(s.group): s.group for s in running}.values():  # prefixes must be recomputed
            g.holder = -1
        if self.slots == 1:
            self.stats["failed_alone"] += 1
            s = running[0]
            return [Completion(s.group.tag, s.index, [], "error", 0, "out of memory decoding this prompt alone")]
        self._requeue(running)
        slots = max(1, self.slots * 3 // 4)
        log.warning("out of memory while decoding with %d slots; retrying with %d", self.slots, slots)
        self._release()
        self._allocate(slots)  # new shapes: compiled afresh (a new code object) on the next step
        self.plan.slots = slots
        return []
