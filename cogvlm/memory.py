"""The engine's memory plan, and measuring what a piece of work really allocates.

A replica's memory = weights + KV slots + the activations of whatever runs at once. The plan
measures the activations (a profiled admission at the largest size, and a decode step) and gives
the rest, less a margin, to KV slots of `max_len` columns each. On a GPU the measurement is
`torch.cuda.max_memory_allocated`; on CPU it is the allocator's own events, as recorded by the
PyTorch profiler (`profile_memory=True`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

GB = 1e9


@dataclass
class MemoryPlan:
    budget_bytes: int  # memory the engine may use beside the weights
    weights_bytes: int
    prefill_bytes: int  # measured peak of one admission at the largest size
    slot_bytes: int  # KV cache and state of one slot
    decode_bytes_per_slot: int  # measured decode-step activations, per slot
    margin_bytes: int
    slots: int
    max_len: int

    @property
    def cache_bytes(self) -> int:
        return self.slots * self.slot_bytes

    @property
    def planned_bytes(self) -> int:
        """What the plan expects the engine to hold at its peak, beside the weights."""
        return self.cache_bytes + self.prefill_bytes + self.slots * self.decode_bytes_per_slot

    def describe(self) -> str:
        return (f"memory plan: weights {self.weights_bytes / GB:.2f} GB, budget {self.budget_bytes / GB:.2f} GB "
                f"= cache {self.cache_bytes / GB:.2f} GB ({self.slots} slots x {self.max_len} columns, "
                f"{self.slot_bytes / 1e6:.1f} MB each) + admission activations {self.prefill_bytes / GB:.3f} GB "
                f"+ decode activations {self.slots * self.decode_bytes_per_slot / GB:.3f} GB "
                f"+ margin {self.margin_bytes / GB:.2f} GB")


def slots_for(budget: int, prefill: int, margin: int, per_slot: int, max_slots: int) -> int:
    return max(0, min(max_slots, (budget - prefill - margin) // max(1, per_slot)))


class PeakMemory:
    """`with PeakMemory(device) as m: ...` -> `m.peak`: the most bytes allocated at once inside
    the block beyond what was allocated when it began."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    @contextlib.contextmanager
    def _cuda(self) -> Iterator[None]:
        torch.cuda.synchronize(self.device)
        start = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        yield
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device) - start

    @contextlib.contextmanager
    def _cpu(self) -> Iterator[None]:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
        now = peak = 0
        for e in events:
            if e.device_type() == torch.autograd.DeviceType.CPU:
                now += e.nbytes()
                peak = max(peak, now)
        self.peak = peak

    def __enter__(self) -> "PeakMemory":
        self._cm = self._cuda() if self.device.type == "cuda" else self._cpu()
        self._cm.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)
