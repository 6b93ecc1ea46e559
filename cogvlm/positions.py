"""Position ids, expert routing and attention masks: the spec's rules as tensor functions."""

from __future__ import annotations

import torch

from .config import LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE


def vision_expert_mask(token_type_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: True where this AND the next token are vision (the last position never is)."""
    mask = torch.zeros_like(token_type_ids, dtype=torch.bool)
    mask[:, :-1] = (token_type_ids[:, :-1] == VISION_TOKEN_TYPE) & (
        token_type_ids[:, 1:] == VISION_TOKEN_TYPE)
    return mask


def build_position_ids(token_type_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) long. Image patches share one position; boi/eoi and text advance it; padding doesn't."""
    tmp = token_type_ids.clone()
    if attention_mask is not None:
        tmp[~attention_mask.bool()] = -1
    # boi and eoi (first / last vision token of a run) count as language-like steps
    edge = torch.zeros_like(tmp, dtype=torch.bool)
    edge[:, 1:] |= (tmp[:, 1:] == VISION_TOKEN_TYPE) & (tmp[:, :-1] == LANGUAGE_TOKEN_TYPE)
    edge[:, 0] |= tmp[:, 0] == VISION_TOKEN_TYPE
    edge[:, :-1] |= (tmp[:, :-1] == VISION_TOKEN_TYPE) & (tmp[:, 1:] == LANGUAGE_TOKEN_TYPE)
    edge[:, -1] |= tmp[:, -1] == VISION_TOKEN_TYPE
    tmp[edge] = LANGUAGE_TOKEN_TYPE
    step = torch.zeros_like(tmp, dtype=torch.long)
    step[:, 1:] = ((tmp[:, 1:] == LANGUAGE_TOKEN_TYPE)
                   | ((tmp[:, 1:] == VISION_TOKEN_TYPE) & (tmp[:, :-1] == LANGUAGE_TOKEN_TYPE)))
    return step.cumsum(dim=-1)


def attention_mask_4d(key_valid: torch.Tensor, query_slots: torch.Tensor) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, Lq, Lk): causal by slot, padded keys hidden.

    `key_valid` (B, Lk) marks real keys; `query_slots` (Lq,) gives each query's slot (column) in
    the key sequence. A query may always see its own slot, so a padded query row is never empty
    (an empty row gives NaN in SDPA, which would then leak through 0 * NaN).
    """
    key_slots = torch.arange(key_valid.shape[1], device=key_valid.device)
    causal = key_slots[None, :] <= query_slots[:, None]  # (Lq, Lk)
    own = key_slots[None, :] == query_slots[:, None]
    allowed = (causal[None] & key_valid[:, None, :].bool()) | own[None]  # (B, Lq, Lk)
    return allowed[:, None]  # (B, 1, Lq, Lk)
