"""Model configuration: the release `config.json` as a typed tree, plus named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1


@dataclass
class VisionConfig:
    hidden_size: int = 1792
    num_hidden_layers: int = 63
    num_heads: int = 16
    intermediate_size: int = 15360
    patch_size: int = 14
    in_channels: int = 3
    layer_norm_eps: float = 1e-6
    dropout_prob: float = 0.0
    hidden_act: str = "gelu"
    image_size: int = 490
    num_positions: int = 1226

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class CogVLMConfig:
    """Fields and defaults of the v1 release `config.json` (`cogvlm-chat-hf`).

    `version` and `rope_theta` are not in the release file: they are told from its structure
    (v2 has the 2x2 vision convolution, grouped KV heads and a vision-expert QKV bias).
    """

    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_multi_query_heads: int | None = None  # KV heads; None = num_attention_heads
    vocab_size: int = 32000
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    bos_token_id: int = 1
    eos_token_id: int | list[int] = 2
    pad_token_id: int = 0
    template_version: str = "chat"
    tie_word_embeddings: bool = False
    torch_dtype: str | None = "bfloat16"
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    version: int = 1
    rope_theta: float | None = None  # None: 10000 (v1) or 500000 (v2)

    def __post_init__(self) -> None:
        if isinstance(self.vision_config, dict):
            self.vision_config = _from_dict(VisionConfig, self.vision_config, "vision_config.")
        if self.num_multi_query_heads is None:
            self.num_multi_query_heads = self.num_attention_heads if self.version == 1 else 8
        if self.rope_theta is None:
            self.rope_theta = 10000.0 if self.version == 1 else 500000.0
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_multi_query_heads:
            raise ValueError("num_attention_heads must be divisible by num_multi_query_heads")
        if self.template_version not in ("base", "chat", "vqa"):
            raise ValueError(f"template_version must be base, chat or vqa, got {self.template_version!r}")

    # derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        assert self.num_multi_query_heads is not None
        return self.num_multi_query_heads

    @property
    def qkv_size(self) -> int:
        return self.hidden_size + 2 * self.num_kv_heads * self.head_dim

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

    @property
    def image_size(self) -> int:
        return self.vision_config.image_size

    @property
    def num_vision_tokens(self) -> int:
        """Language-sequence positions one image occupies: patches (after v2's conv) + boi + eoi."""
        grid = self.vision_config.grid_size
        if self.version == 2:
            grid //= 2
        return grid * grid + 2

    # release config.json -------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, version: int | None = None,
                     num_kv_heads: int | None = None) -> "CogVLMConfig":
        """Build from a release `config.json` dict; keys of the HF wrapper are ignored.

        `version` and `num_kv_heads` come from the checkpoint's structure (see `weights.py`).
        """
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if version is not None:
            kwargs["version"] = version
        if num_kv_heads is not None and kwargs.get("num_multi_query_heads") is None:
            kwargs["num_multi_query_heads"] = num_kv_heads
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """The release `config.json` structure (v2 leaves out `num_multi_query_heads`)."""
        d = dataclasses.asdict(self)
        d.pop("version")
        d.pop("rope_theta")
        if self.version == 2:
            d.pop("num_multi_query_heads")
            d.pop("torch_dtype")
        elif self.num_multi_query_heads == self.num_attention_heads:
            d.pop("num_multi_query_heads")
        out = {
            "architectures": ["CogVLMForCausalLM"],
            "auto_map": {
                "AutoConfig": "configuration_cogvlm.CogVLMConfig",
                "AutoModelForCausalLM": "modeling_cogvlm.CogVLMForCausalLM",
            },
            "model_type": "cogvlm",
            "initializer_range": 0.02,
            "use_cache": True,
            "transformers_version": "4.35.0",
        }
        out.update(d)
        return out


def _from_dict(cls: type, d: dict[str, Any], prefix: str = "") -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in known})


def _vision(**kw: Any) -> VisionConfig:
    v = VisionConfig(**kw)
    grid = v.image_size // v.patch_size
    v.num_positions = grid * grid + 1
    return v


# Named shapes. `v1`/`v2` are the release shapes; `small` and `tiny` keep the structure at a size a
# CPU runs in seconds (tests, demo, benchmarks).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=1024, max_position_embeddings=512,
                 vision_config=dict(hidden_size=32, num_hidden_layers=2, num_heads=2,
                                    intermediate_size=128, image_size=56)),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  vocab_size=1024, max_position_embeddings=2048,
                  vision_config=dict(hidden_size=128, num_hidden_layers=4, num_heads=4,
                                     intermediate_size=512, image_size=224)),
    "v1": dict(),
    "v2": dict(intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192,
               bos_token_id=128000, eos_token_id=[128001, 128009], pad_token_id=128002,
               torch_dtype=None, vision_config=dict(image_size=1344)),
}


def preset(name: str, version: int | None = None, **overrides: Any) -> CogVLMConfig:
    """A named shape (`tiny`, `small`, `v1`, `v2`) as v1 or v2 structure."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    kw = dict(PRESETS[name])
    if version is None:
        version = 2 if name == "v2" else 1
    kw.update(overrides)
    vision = dict(kw.pop("vision_config", {}))
    if version == 2 and name in ("tiny", "small"):
        kw.setdefault("num_multi_query_heads", max(1, kw["num_attention_heads"] // 2))
    return CogVLMConfig(vision_config=_vision(**vision), version=version, **kw)
