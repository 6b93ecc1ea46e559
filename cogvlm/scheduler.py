"""Admission policy: the waiting queue, which prompts enter the next round, and the backoff after
an out-of-memory (no torch here).

A round takes waiting prompts in arrival order while the engine has room for them (a free row,
the blocks their suffix can fill, a prefix entry for a new image and a query lane in it), up to
`admission_rows` prompts and `admission_images` new images: that bound is what decoding rows wait
at most while a round runs. A group whose image has no free lane is passed over (its other prompts
are decoding); the first prompt with no room ends the round, so no prompt waits forever behind
smaller ones.
"""

from __future__ import annotations

import logging
from collections import deque
from enum import Enum
from typing import Callable

from .sequences import Group, Seq

log = logging.getLogger(__name__)


class Room(Enum):
    OK = "ok"
    NO_LANE = "no_lane"  # this image's prompts decoding at once: the lanes of its entry are taken
    FULL = "full"  # no row, blocks or entry for it now


class Scheduler:
    def __init__(self, admission_images: int, admission_rows: int) -> None:
        self.waiting: deque[Group] = deque()
        self.configured = (max(1, admission_images), max(1, admission_rows))
        self.admission_images, self.admission_rows = self.configured
        self.alone_next = False  # a prompt ran out of memory in a round of its own: it waits for an empty engine
        self.ok_rounds = 0

    def add(self, group: Group) -> None:
        self.waiting.append(group)

    def take(self, reserve: Callable[[Seq], Room], running: int) -> list[Seq]:
        """The next round's prompts; `reserve(seq)` books the room for one or says why not."""
        if self.alone_next and running:
            return []
        taken: list[Seq] = []
        images = 0
        for g in self.waiting:
            if len(taken) >= self.admission_rows:
                break
            new_image = g.has_image and g.entry < 0
            if new_image and images >= self.admission_images:
                break
            full = False
            while g.waiting and len(taken) < self.admission_rows:
                room = reserve(g.waiting[0])
                if room is Room.FULL:
                    full = True
                    break
                if room is Room.NO_LANE:
                    break
                taken.append(g.waiting.popleft())
            if any(s.group is g for s in taken) and new_image:
                images += 1
            if full:
                break
        while self.waiting and not self.waiting[0].waiting:
            self.waiting.popleft()
        return taken

    def requeue(self, seqs: list[Seq]) -> None:
        """Put prompts back at the head of the queue, in their order."""
        groups: list[Group] = []
        for s in seqs:
            s.row = -1
            if s.group not in groups:
                groups.append(s.group)
        for g in groups:
            g.waiting.extendleft(reversed([s for s in seqs if s.group is g]))
            if g in self.waiting:
                self.waiting.remove(g)
        self.waiting.extendleft(reversed(groups))

    def drop_empty(self) -> None:
        self.waiting = deque(g for g in self.waiting if g.waiting)

    # after a round ------------------------------------------------------------------------------
    def succeeded(self) -> None:
        self.alone_next = False
        self.ok_rounds += 1
        if self.ok_rounds >= 64 and self.admission_rows < self.configured[1]:  # recover slowly
            self.admission_rows = min(self.configured[1], 2 * self.admission_rows)
            self.admission_images = min(self.configured[0], 2 * self.admission_images)
            self.ok_rounds = 0

    def out_of_memory(self, n: int, alone: bool, running: int) -> bool:
        """After a round of n prompts ran out of memory (and was requeued): lower the round size.
        True when one prompt failed alone: the caller fails the queue's first prompt."""
        self.ok_rounds = 0
        if n > 1:
            self.admission_rows = max(1, min(self.admission_rows, n) // 2)
            self.admission_images = max(1, min(self.admission_images, self.admission_rows))
            log.warning("out of memory admitting %d prompts; admission lowered to %d prompts / %d images "
                        "and retried", n, self.admission_rows, self.admission_images)
            return False
        if not alone:  # others were decoding: retry once they are done
            self.alone_next = True
            log.warning("out of memory admitting one prompt beside %d running; retrying it alone", running)
            return False
        self.alone_next = False
        log.warning("out of memory admitting one prompt alone; it fails")
        return True

    def lower(self) -> None:
        """Profiling ran out of memory: halve the round."""
        self.admission_rows = max(1, self.admission_rows // 2)
        self.admission_images = max(1, min(self.admission_images, self.admission_rows))
        self.configured = (self.admission_images, self.admission_rows)
