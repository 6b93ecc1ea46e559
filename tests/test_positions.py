"""Position ids and expert routing: the spec's worked example and a left-padded row."""

from __future__ import annotations

import torch

from cogvlm.positions import attention_mask_4d, build_position_ids, vision_expert_mask

from . import reference


def test_worked_example():
    # [bos, boi, p1, p2, p3, eoi, t1, t2]
    types = torch.tensor([[0, 1, 1, 1, 1, 1, 0, 0]])
    assert build_position_ids(types).tolist() == [[0, 1, 2, 2, 2, 3, 4, 5]]
    # boi and every patch -> vision expert; eoi, bos and text -> language
    assert vision_expert_mask(types).tolist() == [[False, True, True, True, True, False, False, False]]


def test_left_padded_row():
    types = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    # the first real token gets position 1, not 0 (as in the release code); pads do not advance
    assert build_position_ids(types, mask).tolist() == [[0, 0, 1, 2, 3, 3, 4, 5]]
    assert vision_expert_mask(types).tolist() == [[False, False, False, True, True, True, False, False]]


def test_text_only_and_trailing_image():
    assert build_position_ids(torch.tensor([[0, 0, 0]])).tolist() == [[0, 1, 2]]
    # an image at the very end: its last token (eoi) is language-like and not vision-expert
    types = torch.tensor([[0, 1, 1, 1]])
    assert build_position_ids(types).tolist() == [[0, 1, 2, 3]]
    assert vision_expert_mask(types).tolist() == [[False, True, True, False]]


def test_matches_literal_rule_on_random_rows():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n_pad, n_vis, n_text = (int(x) for x in torch.randint(0, 5, (3,), generator=g))
        types = [0] * n_pad + [0] + [1] * (n_vis + 2 if n_vis else 0) + [0] * n_text
        valid = [0] * n_pad + [1] * (len(types) - n_pad)
        pos, vis = reference.positions_and_routing(types, valid)
        t = torch.tensor([types])
        assert build_position_ids(t, torch.tensor([valid])).tolist() == [pos]
        assert vision_expert_mask(t).tolist() == [vis]


def test_attention_mask_is_causal_hides_padding_and_never_empty():
    m = attention_mask_4d(torch.tensor([[0, 1, 1]]), torch.arange(3))[0, 0]
    assert m.tolist() == [[True, False, False], [False, True, False], [False, True, True]]


def test_image_prefix_routing_equals_the_spec_mask():
    """The engine's prefix passes route by contiguous slices (`ExpertRouting.image_prefix`): the
    same experts on the same positions as the spec's mask, with and without text after the image."""
    from cogvlm.config import LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE
    from cogvlm.decoder import ExpertRouting

    g = torch.Generator().manual_seed(0)
    lang, vis = torch.nn.Linear(6, 5), torch.nn.Linear(6, 5)
    n = 7  # boi, 5 patches, eoi
    for text in (0, 4):
        types = torch.tensor([[LANGUAGE_TOKEN_TYPE] + [VISION_TOKEN_TYPE] * n + [LANGUAGE_TOKEN_TYPE] * text] * 3)
        x = torch.randn(3, types.shape[1], 6, generator=g)
        want = ExpertRouting.from_token_types(types).apply(x, lang, vis)
        got = ExpertRouting.image_prefix(n).apply(x, lang, vis)
        torch.testing.assert_close(got, want)
        on_vision = vision_expert_mask(types)[0].nonzero().squeeze(1).tolist()
        assert on_vision == list(range(*ExpertRouting.image_prefix(n).span)), on_vision
