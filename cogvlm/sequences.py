"""What the engine works on: requests (one prompt each), the groups they arrive in (an image and
its prompts), the rows that decode them, and what comes out (completions). No torch work here."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch


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

    @property
    def sampled(self) -> bool:
        return self.temperature > 0

    @property
    def filtered(self) -> bool:
        return self.temperature > 0 and (self.top_k > 0 or self.top_p < 1)


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
class Group:
    """An image (or one text-only prompt) with prompts still waiting for a row."""

    tag: Any
    pixels: torch.Tensor | None  # (3, S, S), kept (to redo the vision pass after an out-of-memory)
    features: torch.Tensor | None  # (T, D), kept until every prompt is admitted
    has_image: bool
    waiting: deque = field(default_factory=deque)  # of Seq
    entry: int = -1  # the KV store's prefix entry holding this image's prefix, or -1
    queued: bool = False  # holds its entry for prompts still waiting
    fresh: bool = False  # its entry was taken in the round being admitted (the prefix is made there)
    prefix_logits: torch.Tensor | None = None  # (V,): an empty prompt's first logits
    origin: Any = None
    ready: Any = None  # a CUDA event: its features are being made on the vision stream until it fires


@dataclass(eq=False)
class Seq:
    """One request on its way through the engine: waiting, then decoding in row `row`."""

    group: Group
    index: int
    req: Request
    row: int = -1
    lane: int = -1  # its query lane in the group's prefix entry
    end_step: int = 0  # the engine step at which it reaches max_new_tokens
    start_step: int = 0
    first_col: int = 0  # suffix column of its first generated token
    started: bool = False  # its row's decode state is set up

    @property
    def suffix_columns(self) -> int:
        """Suffix columns this prompt can fill: [bos] (text-only) + text + generated tokens fed back."""
        return (0 if self.group.has_image else 1) + len(self.req.text_ids) + self.req.max_new_tokens - 1


class RowBook:
    """Which prompt decodes in each of the engine's `slots` rows, and what the running prompts
    need of the decode step (sampling, top-k/p filtering, how many sources share it)."""

    def __init__(self, slots: int) -> None:
        self.seqs: list[Seq | None] = [None] * slots
        self.free = list(range(slots))  # sorted: a new prompt takes the lowest free row
        self.n_sampling = self.n_filtered = 0  # running prompts that sample / filter
        self.origins: dict[Any, int] = {}  # running prompts per origin

    @property
    def running(self) -> int:
        return len(self.seqs) - len(self.free)

    def occupied(self) -> list[Seq]:
        return [s for s in self.seqs if s is not None]

    def place(self, s: Seq) -> None:
        s.row = self.free.pop(0)
        self.seqs[s.row] = s

    def start(self, s: Seq, step: int, first_col: int) -> None:
        """`s` decodes from engine step `step`, its first generated token at suffix column `first_col`."""
        s.started = True
        s.start_step = step
        s.first_col = first_col
        s.end_step = step + s.req.max_new_tokens - 1
        self.n_sampling += s.req.sampled
        self.n_filtered += s.req.filtered
        self.origins[s.group.origin] = self.origins.get(s.group.origin, 0) + 1

    def remove(self, row: int) -> Seq:
        s = self.seqs[row]
        assert s is not None
        self.seqs[row] = None
        self.free.append(row)
        self.free.sort()
        s.row = -1
        if s.started:
            s.started = False
            self.n_sampling -= s.req.sampled
            self.n_filtered -= s.req.filtered
            self.origins[s.group.origin] -= 1
            if not self.origins[s.group.origin]:
                del self.origins[s.group.origin]
        return s

    def compaction(self, buckets: list[int]) -> tuple[list[int], list[int]]:
        """Rows to move (the highest) and where (free low rows), when that lets decoding use a
        smaller bucket of `buckets`; ([], []) otherwise."""
        occupied = [i for i, s in enumerate(self.seqs) if s is not None]
        if not occupied:
            return [], []
        target = next(b for b in buckets if b >= len(occupied))
        if target >= next(b for b in buckets if b >= occupied[-1] + 1):
            return [], []
        movers = [i for i in occupied if i >= target]
        holes = [i for i in range(target) if self.seqs[i] is None][:len(movers)]
        return movers, holes

    def move(self, src: int, dst: int) -> None:
        s = self.seqs[src]
        assert s is not None and self.seqs[dst] is None
        self.seqs[src], self.seqs[dst] = None, s
        s.row = dst
        self.free.remove(dst)
        self.free.append(src)
        self.free.sort()
