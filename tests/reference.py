"""An independent, deliberately plain re-statement of the spec, used as the numerical reference.

It shares no code with `cogvlm/`: it reads the release state dict directly, computes BOTH experts
on every token and selects per position, builds masks with loops, and does attention by hand with
an additive `finfo.min` mask and an fp32 softmax, as the release code does for padded batches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def positions_and_routing(types: list[int], valid: list[int]) -> tuple[list[int], list[bool]]:
    """Spec section 4, literally, for one row. Padded positions carry type -1."""
    t = [ty if v else -1 for ty, v in zip(types, valid)]
    n = len(t)
    like = list(t)
    for i in range(n):
        if t[i] != 1:
            continue
        first = i == 0 or t[i - 1] == 0
        last = i == n - 1 or t[i + 1] == 0
        if first or last:
            like[i] = 0
    pos = [0] * n
    for i in range(1, n):
        step = like[i] == 0 or (like[i] == 1 and like[i - 1] == 0)
        pos[i] = pos[i - 1] + int(step)
    vision = [types[i] == 1 and i + 1 < n and types[i + 1] == 1 for i in range(n)]
    return pos, vision


def _ln(x, sd, p, eps):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def _lin(x, sd, p):
    y = x @ sd[p + ".weight"].T
    b = sd.get(p + ".bias")
    return y if b is None else y + b


def vision_tower(sd, cfg: dict, images: torch.Tensor) -> torch.Tensor:
    vc = cfg["vision_config"]
    pre = "model.vision."
    x = F.conv2d(images, sd[pre + "patch_embedding.proj.weight"], sd[pre + "patch_embedding.proj.bias"],
                 stride=vc["patch_size"])
    x = x.flatten(2).transpose(1, 2)
    cls = sd[pre + "patch_embedding.cls_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + sd[pre + "patch_embedding.position_embedding.weight"][None]
    H = vc["num_heads"]
    for m in range(vc["num_hidden_layers"]):
        p = f"{pre}transformer.layers.{m}."
        B, L, C = x.shape
        qkv = _lin(x, sd, p + "attention.query_key_value").reshape(B, L, 3, H, C // H)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        att = (q @ k.transpose(-1, -2)) * (C // H) ** -0.5
        o = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, L, C)
        o = _lin(o, sd, p + "attention.dense")
        x = x + _ln(o, sd, p + "input_layernorm", vc["layer_norm_eps"])
        h = _lin(F.gelu(_lin(x, sd, p + "mlp.fc1")), sd, p + "mlp.fc2")
        x = x + _ln(h, sd, p + "post_attention_layernorm", vc["layer_norm_eps"])
    x = x[:, 1:]
    if pre + "conv.weight" in sd:
        B, P, C = x.shape
        g = int(math.isqrt(P))
        x = x.reshape(B, g, g, C).permute(0, 3, 1, 2)
        x = F.conv2d(x, sd[pre + "conv.weight"], sd[pre + "conv.bias"], stride=2).flatten(2).transpose(1, 2)
    x = x @ sd[pre + "linear_proj.linear_proj.weight"].T
    x = F.gelu(F.layer_norm(x, x.shape[-1:], sd[pre + "linear_proj.norm1.weight"],
                            sd[pre + "linear_proj.norm1.bias"], 1e-5))
    x = (F.silu(x @ sd[pre + "linear_proj.gate_proj.weight"].T)
         * (x @ sd[pre + "linear_proj.dense_h_to_4h.weight"].T)) @ sd[pre + "linear_proj.dense_4h_to_h.weight"].T
    B = x.shape[0]
    return torch.cat([sd[pre + "boi"].expand(B, 1, -1), x, sd[pre + "eoi"].expand(B, 1, -1)], 1)


def _rms(x, w, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (w.float() * h).to(x.dtype)


def _rot_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat([-x2, x1], -1)


def forward(sd, cfg: dict, input_ids, token_type_ids, attention_mask, images) -> torch.Tensor:
    """fp32 logits (B, L, V) by the spec; `sd` holds fp32 tensors under release names."""
    B, L = input_ids.shape
    D = cfg["hidden_size"]
    H = cfg["num_attention_heads"]
    d = D // H
    qkv_rows = sd["model.layers.0.self_attn.language_expert_query_key_value.weight"].shape[0]
    KV = (qkv_rows - D) // (2 * d)
    base = 500000.0 if "model.vision.conv.weight" in sd else 10000.0
    eps = cfg["rms_norm_eps"]

    x = sd["model.embed_tokens.weight"][input_ids]
    rows = [i for i, im in enumerate(images) if im is not None]
    if rows:
        feats = vision_tower(sd, cfg, torch.stack([images[i] for i in rows]))
        x = x.clone()
        x[token_type_ids == 1] = feats.reshape(-1, D)

    pos = torch.zeros(B, L, dtype=torch.long)
    vis = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        p, v = positions_and_routing(token_type_ids[b].tolist(), attention_mask[b].tolist())
        pos[b] = torch.tensor(p)
        vis[b] = torch.tensor(v)
    vis3 = vis[..., None]

    mask = torch.zeros(B, 1, L, L)
    neg = torch.finfo(torch.float32).min
    for b in range(B):
        for i in range(L):
            for j in range(L):
                if j > i or not attention_mask[b, j]:
                    mask[b, 0, i, j] = neg

    inv = 1.0 / (base ** (torch.arange(0, d, 2).float() / d))
    ang = pos[..., None].float() * inv
    emb = torch.cat([ang, ang], -1)[:, None]
    cos, sin = emb.cos(), emb.sin()

    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        h = _rms(x, sd[p + "input_layernorm.weight"], eps)
        qkv = torch.where(vis3, _lin(h, sd, p + "self_attn.vision_expert_query_key_value"),
                          _lin(h, sd, p + "self_attn.language_expert_query_key_value"))
        q = qkv[..., :D].reshape(B, L, H, d).transpose(1, 2)
        k = qkv[..., D:D + KV * d].reshape(B, L, KV, d).transpose(1, 2)
        v = qkv[..., D + KV * d:].reshape(B, L, KV, d).transpose(1, 2)
        q = q * cos + _rot_half(q) * sin
        k = k * cos + _rot_half(k) * sin
        k = k.repeat_interleave(H // KV, 1)
        v = v.repeat_interleave(H // KV, 1)
        s = (q / math.sqrt(d)) @ k.transpose(-1, -2) + mask
        o = (s.softmax(-1, dtype=torch.float32) @ v).transpose(1, 2).reshape(B, L, D)
        o = torch.where(vis3, _lin(o, sd, p + "self_attn.vision_expert_dense"),
                        _lin(o, sd, p + "self_attn.language_expert_dense"))
        x = x + o
        h = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)

        def mlp(kind, h=h, p=p):
            m = f"{p}mlp.{kind}_mlp."
            return _lin(F.silu(_lin(h, sd, m + "gate_proj")) * _lin(h, sd, m + "up_proj"), sd, m + "down_proj")

        x = x + torch.where(vis3, mlp("vision"), mlp("language"))
    x = _rms(x, sd["model.norm.weight"], eps)
    return (x @ sd["lm_head.weight"].T).float()
