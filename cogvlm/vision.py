"""EVA2-CLIP vision tower (post-sublayer norms, CLS dropped), v2's 2x2 conv, and the GLU adapter."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CogVLMConfig, VisionConfig


class PatchEmbedding(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(config.in_channels, config.hidden_size,
                              kernel_size=config.patch_size, stride=config.patch_size)
        self.cls_embedding = nn.Parameter(torch.empty(1, config.hidden_size))
        self.position_embedding = nn.Embedding(config.num_positions, config.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images)  # (B, C, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, P, C), row-major patches
        cls = self.cls_embedding.expand(x.shape[0], 1, -1)  # (B, 1, C)
        x = torch.cat((cls, x), dim=1)  # (B, P+1, C)
        return x + self.position_embedding.weight.unsqueeze(0)


class Attention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.query_key_value = nn.Linear(config.hidden_size, config.hidden_size * 3)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        qkv = self.query_key_value(x).view(B, L, 3, self.num_heads, -1)  # (B, L, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, d)
        out = F.scaled_dot_product_attention(q, k, v)  # bidirectional, scale d^-0.5
        return self.dense(out.transpose(1, 2).reshape(B, L, C))


class MLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerLayer(nn.Module):
    """Norms apply to each sub-layer's output: `h = x + ln(attn(x))`, `out = h + ln(mlp(h))`."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.mlp = MLP(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class Transformer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class GLU(nn.Module):
    """Adapter into the language model: sizes are the LANGUAGE model's hidden/intermediate."""

    def __init__(self, config: CogVLMConfig, in_features: int) -> None:
        super().__init__()
        self.linear_proj = nn.Linear(in_features, config.hidden_size, bias=False)
        self.norm1 = nn.LayerNorm(config.hidden_size)  # eps 1e-5
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIPModel(nn.Module):
    """Images (N, 3, S, S) -> language-space features (N, num_vision_tokens, D) with boi/eoi."""

    def __init__(self, config: CogVLMConfig) -> None:
        super().__init__()
        vc = config.vision_config
        self.patch_embedding = PatchEmbedding(vc)
        self.transformer = Transformer(vc)
        if config.version == 2:
            self.conv = nn.Conv2d(vc.hidden_size, vc.hidden_size, kernel_size=2, stride=2)
        self.linear_proj = GLU(config, in_features=vc.hidden_size)
        self.boi = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.eoi = nn.Parameter(torch.empty(1, 1, config.hidden_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(images)  # (N, P+1, C)
        x = self.transformer(x)
        x = x[:, 1:]  # drop CLS: (N, P, C)
        if hasattr(self, "conv"):
            N, P, C = x.shape
            g = int(P**0.5)
            x = x.view(N, g, g, C).permute(0, 3, 1, 2)  # (N, C, g, g)
            x = self.conv(x).flatten(2).transpose(1, 2)  # (N, P/4, C)
        x = self.linear_proj(x)  # (N, P', D)
        boi = self.boi.expand(x.shape[0], 1, -1)
        eoi = self.eoi.expand(x.shape[0], 1, -1)
        return torch.cat((boi, x, eoi), dim=1)  # (N, P'+2, D)
