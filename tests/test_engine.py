"""The throughput engine: prefix sharing computes what each prompt computes alone."""

from __future__ import annotations

import pytest
import torch

from cogvlm import collate, generate
from cogvlm.engine import Engine, Request
from cogvlm.processor import Sample


def _alone(model, req: Request, images: torch.Tensor, **kw):
    cfg = model.config
    n = cfg.num_vision_tokens if req.image is not None else 0
    s = Sample([cfg.bos_token_id] + [cfg.pad_token_id] * n + req.text_ids,
               [0] + [1] * n + [0] * len(req.text_ids), images[req.image] if req.image is not None else None)
    b = collate([s], cfg.pad_token_id)
    return generate(model, **b.as_kwargs(), max_new_tokens=req.max_new_tokens, **kw)


def _requests(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size

    def text(n):
        return torch.randint(5, V, (n,), generator=g).tolist()

    images = torch.randn(3, 3, model.config.image_size, model.config.image_size, generator=g)
    reqs = [Request(text(9), 0, 6), Request(text(3), 0, 4), Request(text(5), 1, 6), Request(text(12), 0, 2),
            Request(text(4), None, 5), Request(text(7), 2, 6), Request(text(6), 1, 3), Request(text(2), None, 6),
            Request([], 2, 3)]  # an empty prompt: generation starts right after eoi
    return reqs, images


@pytest.mark.parametrize("version", [1, 2])
def test_prefix_sharing_equals_each_prompt_alone(version, request):
    model = request.getfixturevalue(f"model_v{version}")
    reqs, images = _requests(model, seed=version)
    t: dict[str, float] = {}
    out = Engine(model, max_batch_size=5, vision_batch_size=2).generate(reqs, images, ignore_eos=True, timings=t)
    assert set(t) == {"vision_s", "prefill_s", "decode_s"}
    for i, r in enumerate(reqs):
        alone = _alone(model, r, images, ignore_eos=True)
        assert out.tokens[i] == alone.tokens[0], i
        assert out.num_tokens[i] == r.max_new_tokens and out.finish_reasons[i] == "length"


def test_shared_prefix_logits_match_full_recomputation(model_v1):
    """The first generated token's logits from the shared path equal a full forward's."""
    from cogvlm.engine import Engine

    reqs, images = _requests(model_v1, seed=4)
    eng = Engine(model_v1)
    captured = []

    def spy(model, tok, positions, slot, key_valid):
        captured.append(tok.clone())
        from cogvlm.generate import decode_one_token
        return decode_one_token(model, tok, positions, slot, key_valid)

    eng.step_fn = spy
    image_reqs = [r for r in reqs if r.image is not None and r.text_ids]
    out = eng.generate(image_reqs, images, ignore_eos=True)
    for r, toks in zip(image_reqs, out.tokens):
        cfg = model_v1.config
        n = cfg.num_vision_tokens
        s = Sample([cfg.bos_token_id] + [cfg.pad_token_id] * n + r.text_ids, [0] + [1] * n + [0] * len(r.text_ids),
                   images[r.image])
        b = collate([s], cfg.pad_token_id)
        with torch.no_grad():
            full = model_v1(**b.as_kwargs())[0, -1]
        assert int(full.argmax()) == toks[0]
    assert captured  # the decode step really ran through the engine's step function


def test_stops_at_eos_per_row_and_compacts(model_v1):
    reqs, images = _requests(model_v1, seed=5)
    free = Engine(model_v1).generate(reqs, images, ignore_eos=True)
    # row 0 stops at its 2nd token when that is made the eos id
    stop = free.tokens[0][1]
    out = Engine(model_v1).generate(reqs, images, eos_token_id=stop)
    for i, (f, o) in enumerate(zip(free.tokens, out.tokens)):
        cut = f.index(stop) + 1 if stop in f else len(f)
        assert o == f[:cut], i
        assert out.finish_reasons[i] == ("stop" if stop in f else "length")


def test_kv_budget_sets_batch_size(model_v1):
    eng = Engine(model_v1, kv_cache_gb=1e-9 * 3 * 100 * Engine(model_v1).kv_bytes_per_token())
    assert eng.batch_size_for(100) == 3 and eng.batch_size_for(1000) == 1
    reqs, images = _requests(model_v1)
    batches = eng._batches(reqs)
    assert sorted(i for b in batches for i in b) == list(range(len(reqs)))
    for b in batches:  # an image's prompts stay together; text-only rows are separate batches
        kinds = {reqs[i].image is None for i in b}
        assert len(kinds) == 1


def test_compiled_decode_step_gives_the_same_tokens(model_v1):
    """`compile=True` (torch.compile of the static-shape step; CUDA graphs on a GPU) changes no token."""
    reqs, images = _requests(model_v1, seed=6)
    reqs = [r for r in reqs if r.image is not None][:4]
    plain = Engine(model_v1).generate(reqs, images, ignore_eos=True)
    compiled = Engine(model_v1, compile=True).generate(reqs, images, ignore_eos=True)
    assert compiled.tokens == plain.tokens
