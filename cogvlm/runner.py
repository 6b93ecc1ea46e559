"""The engine's device work: the rows' decode state, the vision pass, prefills into the KV store,
the decode step and its sampling (the functions `compiled.py` hands to `torch.compile`)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .cascade import StoreBatch
from .config import LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE
from .decoder import CogVLMForCausalLM, ExpertRouting
from .kv_store import block_runs, pool_rows
from .positions import build_position_ids
from .sampling import sample
from .sequences import Group, Seq

# positions of an image prefix: bos 0, boi 1, patches 2, eoi 3 (the spec); text starts at 4
PREFIX_LAST_POSITION = 3


def decode_step(model: CogVLMForCausalLM, tokens: torch.Tensor, positions: torch.Tensor, cols: torch.Tensor,
                table: torch.Tensor, read: torch.Tensor, lane: torch.Tensor, entries: torch.Tensor,
                block: int, lanes: int) -> torch.Tensor:
    """One language token for each of rows 0..B-1 -> (B, V) logits.

    tokens/positions/cols/lane (B,): the fed token, its position, its suffix column, its prefix
    lane (or -1); `table` (B, MB + 1) the rows' suffix blocks (trash past their own), `read`
    (B, nb) the blocks attention reads (the widest live row's); `entries` (E,): prefix entries
    0..E-1 are read. Shapes depend on B, nb and E only, never on `max_len`."""
    cfg = model.config
    P, KV = 1 + cfg.num_vision_tokens, cfg.num_kv_heads
    nP = -(-P // block)
    blk = table.gather(1, (cols // block)[:, None])  # (B, 1)
    write = pool_rows(blk * block + (cols % block)[:, None], KV, block)  # (B, KV, 1) pool rows of the fed token
    store = StoreBatch.decode(write, P, nP, lanes, block_runs(read, KV), cols + 1, read.shape[1] * block, lane,
                              entries.shape[0], block)
    embeds = model.model.embed_tokens(tokens[:, None])  # (B, 1, D)
    logits = model.forward_embeds(embeds, torch.zeros_like(tokens)[:, None], positions[:, None], None,
                                  routing=ExpertRouting(), store=store)
    return logits[:, -1]


def default_buckets(slots: int, smallest: int = 8) -> list[int]:
    """Decode batch sizes: slots, then halves rounded up to multiples of 8, down to `smallest`."""
    out = {slots}
    b = slots
    while len(out) < 7 and b > smallest:
        b = max(smallest, -(-(b // 2) // 8) * 8 if b // 2 > 8 else b // 2)
        out.add(min(b, slots))
    return sorted(out)


def size_bucket(n: int, cap: int) -> int:
    """n rounded up to one of 1..8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ... (four per octave:
    at most 25% more than asked, few distinct sizes for CUDA graphs), at most `cap`."""
    if n > 8:
        step = 1 << (n - 1).bit_length() - 3
        n = -(-n // step) * step
    return max(1, min(n, cap))


class Rows:
    """Per-row decode state on the device, `slots` rows; `MB` table columns (+ one trash column)."""

    def __init__(self, slots: int, max_new_cap: int, MB: int, trash: int, device: torch.device) -> None:
        z = lambda dtype=torch.long: torch.zeros(slots, dtype=dtype, device=device)  # noqa: E731
        self.tokens, self.positions, self.cols, self.lengths, self.max_new = z(), z(), z(), z(), z()
        self.seeds, self.top_k = z(), z()
        self.temperature, self.top_p = z(torch.float32), z(torch.float32)
        self.live, self.stopped, self.ignore_eos = z(torch.bool), z(torch.bool), z(torch.bool)
        self.lane = torch.full((slots,), -1, dtype=torch.long, device=device)
        self.table = torch.full((slots, MB + 1), trash, dtype=torch.long, device=device)
        self.out = torch.zeros(slots, max_new_cap + 1, dtype=torch.long, device=device)  # last: trash
        self.trash = trash

    def tensors(self) -> list[torch.Tensor]:
        return [self.tokens, self.positions, self.cols, self.lengths, self.max_new, self.seeds, self.top_k,
                self.temperature, self.top_p, self.live, self.stopped, self.ignore_eos, self.lane, self.table,
                self.out]

    def move(self, src: Sequence[int], dst: Sequence[int]) -> None:
        dev = self.tokens.device
        s, d = torch.tensor(list(src), device=dev), torch.tensor(list(dst), device=dev)
        for t in self.tensors():
            t[d] = t[s]
        self.clear(src)

    def finished(self, rows: Sequence[int]) -> list[tuple[int, bool, list[int]]]:
        """Of `rows`, those no longer live, as (row, stopped at eos, generated tokens): the live
        flags in one transfer, then the finished rows' outputs in one more."""
        state = torch.stack([self.live, self.stopped]).cpu()
        done = [i for i in rows if not state[0, i]]
        if not done:
            return []
        idx = torch.tensor(done, device=self.tokens.device)
        lengths = self.lengths[idx].tolist()
        outs = self.out[idx].tolist()
        return [(row, bool(state[1, row]), toks[:n]) for row, n, toks in zip(done, lengths, outs)]

    def clear(self, rows: Sequence[int]) -> None:
        if not rows:
            return
        idx = torch.tensor(list(rows), device=self.tokens.device)
        self.live[idx] = False
        self.lane[idx] = -1
        self.table[idx] = self.trash


def advance(logits: torch.Tensor, r: "Rows", b: int, eos: torch.Tensor, pad_token_id: int, sampled: bool,
            filtered: bool) -> None:
    """After a decode step of rows 0..b-1 ((b, V) logits): each live row's token is sampled,
    stored and fed back; rows stop at eos (unless ignored) or at their max_new_tokens. No host
    sync. `torch.compile` makes this a few fused kernels (`compiled.compiled_advance`)."""
    live, lengths = r.live[:b], r.lengths[:b]
    cap = r.out.shape[1] - 1
    tok = sample(logits.float(), r.temperature[:b] if sampled else None, r.top_k[:b], r.top_p[:b], r.seeds[:b],
                 lengths, filtered)
    tok = torch.where(live, tok, pad_token_id)
    r.out[:b].scatter_(1, torch.where(live, lengths, cap)[:, None], tok[:, None])
    lengths += live
    hit = torch.isin(tok, eos) & live & ~r.ignore_eos[:b]
    r.stopped[:b] |= hit
    live &= ~hit & (lengths < r.max_new[:b])
    r.tokens[:b] = tok
    r.positions[:b] += live
    r.cols[:b] += live


def decode_steps(step_fn: Callable[..., torch.Tensor], args: tuple, rows: Rows, b: int, steps: int,
                 sampled: bool, filtered: bool, eos: torch.Tensor, pad_token_id: int,
                 advance_fn: Callable[..., None] = advance) -> None:
    """`steps` decode steps of rows 0..b-1 (`step_fn(*args)` -> logits, then `advance_fn`)."""
    for _ in range(steps):
        advance_fn(step_fn(*args), rows, b, eos, pad_token_id, sampled, filtered)


def sample_first(rows: Rows, seqs: list[Seq], logits: torch.Tensor, eos: torch.Tensor, lanes: int,
                 first_cols: list[int], first_pos: list[int], tables: list[list[int]]) -> None:
    """Sample each admitted prompt's first token and set up its row's decode state."""
    dev = logits.device
    idx = torch.tensor([s.row for s in seqs], device=dev)
    reqs = [s.req for s in seqs]
    temp = torch.tensor([r.temperature for r in reqs], dtype=torch.float32, device=dev)
    top_k = torch.tensor([r.top_k for r in reqs], device=dev)
    top_p = torch.tensor([r.top_p for r in reqs], dtype=torch.float32, device=dev)
    seeds = torch.tensor([r.seed for r in reqs], device=dev)
    max_new = torch.tensor([r.max_new_tokens for r in reqs], device=dev)
    ignore = torch.tensor([r.ignore_eos for r in reqs], device=dev)
    tok = sample(logits.float(), temp if any(r.sampled for r in reqs) else None, top_k, top_p, seeds,
                 torch.zeros_like(seeds), any(r.filtered for r in reqs))
    hit = torch.isin(tok, eos) & ~ignore
    rows.tokens[idx] = tok
    rows.positions[idx] = torch.tensor(first_pos, device=dev)
    rows.cols[idx] = torch.tensor(first_cols, device=dev)
    rows.lengths[idx] = 1
    rows.out[idx, 0] = tok
    rows.max_new[idx] = max_new
    rows.temperature[idx], rows.top_k[idx], rows.top_p[idx], rows.seeds[idx] = temp, top_k, top_p, seeds
    rows.ignore_eos[idx] = ignore
    rows.stopped[idx] = hit
    rows.live[idx] = ~hit & (max_new > 1)
    rows.lane[idx] = torch.tensor([s.group.entry * lanes + s.lane if s.group.has_image else -1 for s in seqs],
                                  device=dev)
    width = rows.table.shape[1]
    table = torch.full((len(seqs), width), rows.trash, dtype=torch.long)
    for i, t in enumerate(tables):
        table[i, :len(t)] = torch.tensor(t, dtype=torch.long)
    rows.table[idx] = table.to(dev)


def encode_new(encode: Callable[[torch.Tensor], torch.Tensor], groups: Sequence[Group],
               device: torch.device) -> int:
    """One vision pass for the groups whose features are not known yet -> how many images it
    encoded. Features made ahead on the vision stream are waited for (on the device, not the host)."""
    for g in groups:
        if g.ready is not None:
            torch.cuda.current_stream(device).wait_event(g.ready)
            g.ready = None
    need = [g for g in groups if g.features is None]
    if need:
        for g, f in zip(need, encode(upload([g.pixels for g in need], device))):  # (U, T, D)
            g.features = f
    return len(need)


def upload(pixels: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """(3, S, S) images -> (U, 3, S, S) on `device`. Each image goes up on its own, from the pinned
    memory `Engine.add` put it in, so the copies are asynchronous; stacking on the host first
    would make a pageable tensor, whose copy waits."""
    return torch.stack([p.to(device, non_blocking=True) for p in pixels])


class VisionAhead:
    """The next round's vision pass, started before a run of decode steps. On a GPU it runs on a
    second CUDA stream, beside the decode steps (vision is compute-bound, decode bound by memory
    traffic); the admission that uses its features waits for it on the device. Elsewhere it runs
    in place (the same work, earlier)."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> None:
        self.encode, self.device = encode, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(self, groups: Sequence[Group]) -> int:
        """Encode the groups with pixels and no features yet -> how many."""
        need = [g for g in groups if g.features is None and g.pixels is not None]
        if self.stream is None or not need:
            return encode_new(self.encode, need, self.device)
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)  # the weights and the pool are ready; pixels come pinned
        with torch.cuda.stream(self.stream):
            feats = self.encode(upload([g.pixels for g in need], self.device))  # (U, T, D)
            done = torch.cuda.Event()
            done.record(self.stream)
        feats.record_stream(main)  # read on the main stream: not reused before it is done there
        for g, f in zip(need, feats):
            g.features, g.ready = f, done
        return len(need)


def prefill_round(model: CogVLMForCausalLM, seqs: list[Seq], fresh: list[Group], tables: list[list[int]],
                  block: int, trash: int, entries: int) -> torch.Tensor:
    """An admission round's prefills: each new image's prefix once into its entry (`fresh`; with
    its first prompt's text in the same pass where no prompt of the image is empty), then every
    other prompt's own text into its suffix blocks (`tables`, in `seqs` order) -> (R, V) each
    prompt's first-token logits, in `seqs` order."""
    first: dict[int, torch.Tensor] = {}
    # an image whose prompts all have text: its prefix and its first prompt's text in one pass
    # (no prefix logits are needed then: only an empty prompt starts from them)
    together: dict[Group, int] = {}
    for i, s in enumerate(seqs):
        g = s.group
        if g.fresh and g not in together and all(x.req.text_ids for x in seqs if x.group is g) \
                and all(x.req.text_ids for x in g.waiting):
            together[g] = i
    if together:
        idx = list(together.values())
        lg = prefill_prefix_texts(model, [seqs[i] for i in idx], [tables[i] for i in idx], block, trash)
        first.update(zip(idx, lg))
    alone = [g for g in fresh if g not in together]
    if alone:
        logits = prefill_prefixes(model, [g.features for g in alone], [g.entry for g in alone], block)
        for g, lg in zip(alone, logits):
            g.prefix_logits = lg
    for i, s in enumerate(seqs):
        if s.group.has_image and not s.req.text_ids:  # an empty prompt ends at eoi
            first[i] = s.group.prefix_logits
    with_text = [i for i, s in enumerate(seqs) if s.group.has_image and s.req.text_ids and i not in first]
    if with_text:
        lg = prefill_texts(model, [seqs[i] for i in with_text], [tables[i] for i in with_text], block, trash, entries)
        first.update(zip(with_text, lg))
    text_only = [i for i, s in enumerate(seqs) if not s.group.has_image]
    if text_only:
        lg = prefill_fresh_texts(model, [seqs[i] for i in text_only], [tables[i] for i in text_only], block, trash)
        first.update(zip(text_only, lg))
    return torch.stack([first[i] for i in range(len(seqs))])


def padded_texts(texts: list[list[int]], tables: list[list[int]], T: int, block: int, trash: int,
                 pad: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Token ids right-padded to (R, T) on the host, and each row's T suffix slots (from column 0)."""
    ids = torch.full((len(texts), T), pad, dtype=torch.long)
    write = []
    for b, (text, t) in enumerate(zip(texts, tables)):
        ids[b, :len(text)] = torch.tensor(text)
        write.append(suffix_slots(t, 0, len(text), T, block, trash))
    return ids, write


def suffix_slots(blocks: list[int], start: int, n: int, T: int, block: int, trash: int) -> list[int]:
    """Flat pool slots of suffix columns start..start+T-1 of a row: its own for the first n, the
    trash block's for padding."""
    out = []
    for j in range(T):
        c = start + j
        out.append(blocks[c // block] * block + c % block if j < n else trash * block + c % block)
    return out


def prefill_prefixes(model: CogVLMForCausalLM, features: Sequence[torch.Tensor], entries: list[int],
                     block: int) -> torch.Tensor:
    """Each image's prefix [bos, boi, patches, eoi] once, into its prefix entry -> (U, V) last logits."""
    cfg, dev = model.config, model.device
    U, P = len(entries), 1 + cfg.num_vision_tokens
    nP = -(-P // block)
    types_ = torch.tensor([[LANGUAGE_TOKEN_TYPE] + [VISION_TOKEN_TYPE] * cfg.num_vision_tokens],
                          device=dev).expand(U, P)
    pos = build_position_ids(types_)  # (U, P): 0, 1, 2, ..., 2, 3
    bos = model.model.embed_tokens(torch.full((U, 1), cfg.bos_token_id, device=dev))
    embeds = torch.cat([bos, torch.stack(list(features)).to(dev, bos.dtype)], dim=1)  # (U, P, D)
    store = StoreBatch.fresh(None, P, nP, prefix=torch.tensor(entries, device=dev))
    return model.forward_embeds(embeds, types_, pos, None, logits_to_keep=1, store=store,
                                routing=ExpertRouting.image_prefix(cfg.num_vision_tokens))[:, -1]


def prefill_prefix_texts(model: CogVLMForCausalLM, seqs: list[Seq], tables: list[list[int]], block: int,
                         trash: int) -> torch.Tensor:
    """Each new image's prefix [bos, boi, patches, eoi] and one prompt's text after it, in one
    causal pass (right-padded): the prefix into the image's entry, the text into the prompt's
    suffix blocks -> (U, V) the prompts' last logits."""
    cfg, dev = model.config, model.device
    U, P = len(seqs), 1 + cfg.num_vision_tokens
    nP = -(-P // block)
    T = max(len(s.req.text_ids) for s in seqs)
    ids, write = padded_texts([s.req.text_ids for s in seqs], tables, T, block, trash, cfg.pad_token_id)
    prefix_types = torch.tensor([[LANGUAGE_TOKEN_TYPE] + [VISION_TOKEN_TYPE] * cfg.num_vision_tokens], device=dev)
    types_ = torch.cat([prefix_types, torch.full((1, T), LANGUAGE_TOKEN_TYPE, device=dev)], dim=1).expand(U, P + T)
    pos = torch.cat([build_position_ids(prefix_types)[0], PREFIX_LAST_POSITION + 1 + torch.arange(T, device=dev)])
    bos = model.model.embed_tokens(torch.full((U, 1), cfg.bos_token_id, device=dev))
    feats = torch.stack([s.group.features for s in seqs]).to(dev, bos.dtype)
    embeds = torch.cat([bos, feats, model.model.embed_tokens(ids.to(dev))], dim=1)  # (U, P + T, D)
    store = StoreBatch.fresh(pool_rows(torch.tensor(write, device=dev), cfg.num_kv_heads, block), P, nP,
                             prefix=torch.tensor([s.group.entry for s in seqs], device=dev))
    last = torch.tensor([P + len(s.req.text_ids) - 1 for s in seqs], device=dev)
    return model.forward_embeds(embeds, types_, pos.expand(U, P + T), None, logits_at=last, store=store,
                                routing=ExpertRouting.image_prefix(cfg.num_vision_tokens))[:, -1]


def prefill_texts(model: CogVLMForCausalLM, seqs: list[Seq], tables: list[list[int]], block: int, trash: int,
                  entries: int) -> torch.Tensor:
    """Prompt texts after their images' stored prefixes, right-padded -> (R, V) last logits."""
    cfg, dev = model.config, model.device
    P = 1 + cfg.num_vision_tokens
    R, T = len(seqs), max(len(s.req.text_ids) for s in seqs)
    ids, write = padded_texts([s.req.text_ids for s in seqs], tables, T, block, trash, cfg.pad_token_id)
    ids = ids.to(dev)
    pos = (PREFIX_LAST_POSITION + 1 + torch.arange(T, device=dev)).expand(R, T)
    store = StoreBatch.text(pool_rows(torch.tensor(write, device=dev), cfg.num_kv_heads, block), P, -(-P // block),
                            torch.tensor([s.group.entry for s in seqs], device=dev), entries)
    last = torch.tensor([len(s.req.text_ids) - 1 for s in seqs], device=dev)
    return model.forward_embeds(model.model.embed_tokens(ids), torch.zeros_like(ids), pos, None,
                                routing=ExpertRouting(), logits_at=last, store=store)[:, -1]


def prefill_fresh_texts(model: CogVLMForCausalLM, seqs: list[Seq], tables: list[list[int]], block: int,
                        trash: int) -> torch.Tensor:
    """Text-only prompts [bos, text] from suffix column 0, right-padded -> (R, V) last logits."""
    cfg, dev = model.config, model.device
    P = 1 + cfg.num_vision_tokens
    R, T = len(seqs), 1 + max(len(s.req.text_ids) for s in seqs)
    ids, write = padded_texts([[cfg.bos_token_id] + s.req.text_ids for s in seqs], tables, T, block, trash,
                              cfg.pad_token_id)
    ids = ids.to(dev)
    pos = torch.arange(T, device=dev).expand(R, T)
    store = StoreBatch.fresh(pool_rows(torch.tensor(write, device=dev), cfg.num_kv_heads, block), P, -(-P // block))
    last = torch.tensor([len(s.req.text_ids) for s in seqs], device=dev)
    return model.forward_embeds(model.model.embed_tokens(ids), torch.zeros_like(ids), pos, None,
                                routing=ExpertRouting(), logits_at=last, store=store)[:, -1]
