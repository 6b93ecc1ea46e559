"""Numerics: the model against the plain reference, batching, cached decoding, low precision."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from cogvlm import CogVLMProcessor, collate, generate, load_model
from cogvlm.config import LANGUAGE_TOKEN_TYPE
from cogvlm.processor import Sample

from . import reference


def _state(ckpt) -> dict[str, torch.Tensor]:
    sd = {}
    files = sorted(ckpt.glob("*.safetensors"))
    for f in files:
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                sd[k] = h.get_tensor(k).float()
    return sd


def _samples(model, n_text=(5, 9, 3), images=(True, True, False), seed=0) -> list[Sample]:
    """Rows of different lengths; some with an image, some text-only."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    out = []
    for n, with_image in zip(n_text, images):
        text = torch.randint(5, cfg.vocab_size, (n,), generator=g).tolist()
        ids, types, image = [cfg.bos_token_id], [LANGUAGE_TOKEN_TYPE], None
        if with_image:
            ids += [cfg.pad_token_id] * cfg.num_vision_tokens
            types += [1] * cfg.num_vision_tokens
            image = torch.randn(3, cfg.image_size, cfg.image_size, generator=g)
        out.append(Sample(ids + text, types + [0] * n, image))
    return out


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("case", ["single", "padded_batch", "text_only", "mixed"])
def test_logits_match_reference(version, case, request):
    model = request.getfixturevalue(f"model_v{version}")
    ckpt = request.getfixturevalue(f"ckpt_v{version}")
    cfg = json.loads((ckpt / "config.json").read_text())
    rows = {
        "single": _samples(model, (6,), (True,)),
        "padded_batch": _samples(model, (4, 11), (True, True)),
        "text_only": _samples(model, (7, 3), (False, False)),
        "mixed": _samples(model, (5, 9, 3), (True, False, True)),
    }[case]
    batch = collate(rows, model.config.pad_token_id)
    with torch.no_grad():
        got = model(**batch.as_kwargs())
    want = reference.forward(_state(ckpt), cfg, batch.input_ids, batch.token_type_ids,
                             batch.attention_mask, batch.images)
    real = batch.attention_mask.bool()
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert want[real].abs().max() > 0.1  # the random model is not degenerate
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("version", [1, 2])
def test_batch_equals_rows_one_at_a_time(version, request):
    model = request.getfixturevalue(f"model_v{version}")
    rows = _samples(model, (5, 12, 2, 7), (True, False, True, True), seed=3)
    batch = collate(rows, model.config.pad_token_id)
    with torch.no_grad():
        together = model(**batch.as_kwargs())
        for i, row in enumerate(rows):
            alone = model(**collate([row], model.config.pad_token_id).as_kwargs())[0]
            n = len(row.input_ids)
            torch.testing.assert_close(together[i, -n:], alone, atol=1e-4, rtol=1e-4)
    out_b = generate(model, **batch.as_kwargs(), max_new_tokens=6, ignore_eos=True)
    for i, row in enumerate(rows):
        out_1 = generate(model, **collate([row], model.config.pad_token_id).as_kwargs(),
                         max_new_tokens=6, ignore_eos=True)
        assert out_b.tokens[i] == out_1.tokens[0]


@pytest.mark.parametrize("version", [1, 2])
def test_cached_decoding_equals_full_recomputation(version, request):
    """Each greedy step from the KV cache equals argmax of a full forward over the sequence so far,
    and the cached step's logits equal the recomputed last-position logits."""
    model = request.getfixturevalue(f"model_v{version}")
    rows = _samples(model, (4, 9), (True, False), seed=5)
    batch = collate(rows, model.config.pad_token_id)
    steps = 8
    out = generate(model, **batch.as_kwargs(), max_new_tokens=steps, ignore_eos=True)
    assert out.num_tokens == [steps, steps] and out.finish_reasons == ["length", "length"]

    from cogvlm.generate import decode_one_token, prefill

    ids, types, mask = batch.input_ids, batch.token_type_ids, batch.attention_mask
    B, L = ids.shape
    key_valid = torch.zeros(B, L + steps, dtype=torch.bool)
    key_valid[:, :L] = mask.bool()
    model.setup_caches(B, L + steps)
    try:
        with torch.no_grad():
            logits, pos = prefill(model, ids, types, mask, batch.images, key_valid)
            positions = pos[:, -1] + 1
            for step in range(steps):
                full = model(ids, types, mask, batch.images)[:, -1]
                torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)
                tok = torch.tensor([out.tokens[b][step] for b in range(B)])
                assert torch.equal(full.argmax(-1), tok)
                ids = torch.cat([ids, tok[:, None]], 1)
                types = torch.cat([types, torch.zeros(B, 1, dtype=torch.long)], 1)
                mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], 1)
                key_valid[:, L + step] = True
                logits = decode_one_token(model, tok, positions, torch.tensor([L + step]), key_valid)
                positions = positions + 1
    finally:
        model.clear_caches()


def test_generation_stops_on_eos_and_reports_why(model_v1):
    rows = _samples(model_v1, (4, 6), (True, False), seed=7)
    batch = collate(rows, model_v1.config.pad_token_id)
    free = generate(model_v1, **batch.as_kwargs(), max_new_tokens=5, ignore_eos=True)
    # make row 0's third greedy token the stop token: it must stop there, row 1 must not
    stop_id = free.tokens[0][2]
    if stop_id in free.tokens[1]:
        pytest.skip("random model repeated the stop token in row 1")
    out = generate(model_v1, **batch.as_kwargs(), max_new_tokens=5, eos_token_id=stop_id)
    assert out.tokens[0] == free.tokens[0][:3] and out.num_tokens[0] == 3
    assert out.finish_reasons == ["stop", "length"]
    assert out.tokens[1] == free.tokens[1]


def test_sampling_is_seeded(model_v2):
    rows = _samples(model_v2, (4,), (True,), seed=9)
    batch = collate(rows, model_v2.config.pad_token_id)
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50, ignore_eos=True)
    a = generate(model_v2, **batch.as_kwargs(), seed=1, **kw)
    b = generate(model_v2, **batch.as_kwargs(), seed=1, **kw)
    c = generate(model_v2, **batch.as_kwargs(), seed=2, **kw)
    greedy = generate(model_v2, **batch.as_kwargs(), max_new_tokens=8, ignore_eos=True)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens or a.tokens != greedy.tokens


def test_prompt_past_the_context_is_an_error(model_v1):
    rows = _samples(model_v1, (4,), (True,))
    batch = collate(rows, model_v1.config.pad_token_id)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model_v1, **batch.as_kwargs(), max_new_tokens=model_v1.config.max_position_embeddings)


def test_image_count_mismatch_is_an_error(model_v1):
    rows = _samples(model_v1, (4,), (True,))
    batch = collate(rows, model_v1.config.pad_token_id)
    with pytest.raises(ValueError, match="vision tokens"):
        model_v1(batch.input_ids, batch.token_type_ids, batch.attention_mask, [None])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_and_stays_close(ckpt_v1, model_v1, dtype):
    low = load_model(ckpt_v1, dtype=dtype)
    assert low.lm_head.weight.dtype == dtype
    rows = _samples(model_v1, (5, 8), (True, False), seed=11)
    batch = collate(rows, model_v1.config.pad_token_id)
    with torch.no_grad():
        ref = model_v1(**batch.as_kwargs())
        got = low(**batch.as_kwargs())
    real = batch.attention_mask.bool()
    assert got.dtype == torch.float32 and torch.isfinite(got[real]).all()
    diff = (got[real] - ref[real]).abs().max().item()
    scale = ref[real].abs().max().item()
    assert diff < 0.1 * scale, (diff, scale)
    out = generate(low, **batch.as_kwargs(), max_new_tokens=4, ignore_eos=True)
    assert out.num_tokens == [4, 4]


def test_processor_end_to_end(ckpt_v2, model_v2):
    from PIL import Image

    proc = CogVLMProcessor.from_pretrained(ckpt_v2)
    img = Image.new("RGB", (40, 30), (200, 30, 30))
    batch = proc.collate([proc.build_inputs("Describe this image.", img),
                          proc.build_inputs("What is a dog?")])
    out = generate(model_v2, **batch.as_kwargs(), max_new_tokens=5)
    texts = [proc.decode(t) for t in out.tokens]
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
