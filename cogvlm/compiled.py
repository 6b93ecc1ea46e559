"""The decode step under `torch.compile`: the model's step (one graph with symbolic sizes; CUDA
graphs on a GPU), the step's sampling and row bookkeeping (one small graph per kind of batch),
their warm-up, and the count of graphs made after it (zero in a healthy run)."""

from __future__ import annotations

import sys
import types
from typing import Any, Callable, Sequence

import torch
import torch.fx.experimental._config  # noqa: F401 - `use_duck_shape`

from .runner import Rows, advance, decode_step

Kind = tuple[bool, bool]  # (sampled, filtered): the kinds of batch sampling tells apart


def graphs() -> int:
    """Graphs torch.compile has made in this process (none if it was never imported: importing
    it takes seconds)."""
    utils = sys.modules.get("torch._dynamo.utils")
    return utils.counters["stats"]["unique_graphs"] if utils is not None else 0


def private_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The same function with its own code object: torch.compile keeps graphs (and counts them
    against its recompile limit) per code object, so each engine's step gets its own."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def compiled_step(compile: bool | str, device: torch.device) -> Callable[..., torch.Tensor]:
    """`decode_step` compiled (its own code object) with symbolic sizes: `compile` True (inductor;
    CUDA graphs on a GPU) or a torch.compile backend name."""
    backend = compile if isinstance(compile, str) else "inductor"
    kw: dict[str, Any] = {"backend": backend, "fullgraph": True, "dynamic": True}
    if backend == "inductor" and device.type == "cuda":
        kw["mode"] = "reduce-overhead"  # CUDA graphs (one per shape met)
    return torch.compile(private_copy(decode_step), **kw)


def compiled_advance(compile: bool | str) -> Callable[..., None]:
    """`advance` compiled (its own code object) with symbolic sizes, without CUDA graphs (it
    writes the rows' state in place): sampling and the rows' bookkeeping in a few kernels
    instead of some thirty. Its graphs are small: one per kind of batch met."""
    backend = compile if isinstance(compile, str) else "inductor"
    return torch.compile(private_copy(advance), backend=backend, fullgraph=True, dynamic=True)


class DecodeFunctions:
    """What a decode step calls: `step(*args)` -> logits, then `advance_for(kind)(logits, ...)`.
    Eager until `warm_up` compiles them (`compile` True: inductor, with CUDA graphs for the step on
    a GPU; or a torch.compile backend name; False: eager for good)."""

    def __init__(self, compile: bool | str, device: torch.device) -> None:
        self.compile, self.device = compile, device
        self.step: Callable[..., torch.Tensor] = decode_step
        self.advance: Callable[..., None] = advance
        self.kinds: set[Kind] = set()  # kinds whose sampling graph exists
        self.warm = not compile
        self.graphs0 = graphs()

    def warm_up(self, step_args: Callable[[int, int, int], tuple], buckets: Sequence[int], nb_max: int,
                E_max: int) -> None:
        """Compile the step once: one graph with symbolic rows, width and entries, called at every
        row bucket with the smallest and the largest width and entry count (`step_args(b, nb, E)`).
        Call it from the thread that will step the engine: CUDA graphs belong to the thread that
        made them."""
        if self.warm:
            return
        self.step = compiled_step(self.compile, self.device)
        self.advance = compiled_advance(self.compile)
        self.kinds = set()
        # no duck sizing: sizes that happen to be equal at the first call must not be tied together
        with torch.inference_mode(), torch.fx.experimental._config.patch(use_duck_shape=False):
            for b in buckets:
                for nb in sorted({min(2, nb_max), nb_max}):
                    for E in sorted({min(2, E_max), E_max}):
                        for _ in range(3 if self.device.type == "cuda" else 1):  # CUDA graph trees record later
                            self.step(*step_args(b, nb, E))
        self.warm = True
        self.graphs0 = graphs()

    def advance_for(self, kind: Kind, buckets: Sequence[int], vocab_size: int, eos: torch.Tensor,
                    pad_token_id: int) -> Callable[..., None]:
        """The step's sampling and bookkeeping for a batch of this kind: compiled (its graph made
        the first time the kind decodes, on stand-in rows, and not counted as a recompilation),
        except greedy batches on CPU, where inductor's argmax is slower than eager's
        (bench/sampling.py)."""
        sampled, filtered = kind
        if self.advance is advance or not sampled and self.device.type != "cuda":
            return advance
        if kind not in self.kinds:
            before = graphs()
            with torch.inference_mode(False):  # made like the real rows (outside inference mode)
                stand_in = Rows(4, 3, 2, 0, self.device)  # sizes >= 2 and b < slots, as in any real call
            with torch.inference_mode(), torch.fx.experimental._config.patch(use_duck_shape=False):
                for b in sorted({3} | ({1} & set(buckets))):  # dynamo specializes a batch of 1
                    logits = torch.zeros(b, vocab_size, device=self.device)
                    self.advance(logits, stand_in, b, eos, pad_token_id, sampled, filtered)
            self.graphs0 += graphs() - before
            self.kinds.add(kind)
        return self.advance

    def recompiles(self) -> int:
        """Graphs compiled since the warm-up (zero in a healthy run)."""
        return graphs() - self.graphs0
