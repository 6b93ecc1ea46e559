"""Random-weight checkpoints in the release format, and a tiny tokenizer, for tests, demo and benches.

    python -m cogvlm.tiny OUT_DIR [--version 1|2] [--preset tiny|small] [--shards N]

The weights are RANDOM: outputs are meaningless text. Only the structure is the release's.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .config import CogVLMConfig, preset
from .decoder import CogVLMForCausalLM, RMSNorm

_WORDS = (
    "a an the this that of in on at with and or near under over behind front left right top bottom "
    "image picture photo photograph describe description detail details what where who how many "
    "is are was there here it its dog cat person man woman child car bus tree house road sky water "
    "red green blue white black yellow small large big old new two three four standing sitting "
    "walking running holding looking wearing shirt hat table chair window door grass street city "
    "answer question short please provide coordinates for each mentioned object box boxes "
    "x0 y0 x1 y1 can you include color colour shown scene background foreground"
).split()


def _corpus(n: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = [
        "Question: Describe this image. Answer:",
        "Question: What is in the picture? Short answer:",
        "Can you provide a description of the image and include the coordinates [[x0,y0,x1,y1]] "
        "for each mentioned object?",
        "Where is the dog? Answer in [[x0,y0,x1,y1]] format.",
        "a dog [[086,540,400,760;512,100,630,300]] and a cat [[001,002,998,999]]",
        "0123456789 0 1 2 3 4 5 6 7 8 9 , . ; : ? ! [ ] ( ) ' \" - _ / \\ \n",
    ]
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            words.append(f"[[{rng.randint(0, 999):03d},{rng.randint(0, 999):03d},"
                         f"{rng.randint(0, 999):03d},{rng.randint(0, 999):03d}]]")
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    return lines


def special_tokens(version: int) -> dict[str, str]:
    if version == 1:  # Vicuna / Llama-2 SentencePiece layout: unk 0, bos 1, eos 2
        return {"unk": "<unk>", "bos": "<s>", "eos": "</s>"}
    return {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "eot": "<|eot_id|>",
            "pad": "<|reserved_special_token_0|>"}


def build_tokenizer(version: int = 1, vocab_size: int = 1024) -> Any:
    """A BPE tokenizer trained here on a generated corpus, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = special_tokens(version)
    tok = Tokenizer(models.BPE(unk_token=specials.get("unk"), byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = sorted(set("".join(_corpus())) | set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials.values()),
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    kwargs = {"bos_token": specials["bos"], "eos_token": specials["eos"]}
    if "unk" in specials:
        kwargs["unk_token"] = specials["unk"]
    if "pad" in specials:
        kwargs["pad_token"] = specials["pad"]
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


@torch.no_grad()
def init_random_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Randomize every parameter at scales that keep activations alive (N(0,1)/sqrt(fan_in) etc.).

    Random numbers are drawn on each parameter's own device (a GPU fills a full-size model fast).
    """
    gens: dict[torch.device, torch.Generator] = {}

    def normal_(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        if t.device not in gens:
            gens[t.device] = torch.Generator(device=t.device).manual_seed(seed)
        r = torch.randn(t.shape, generator=gens[t.device], device=t.device, dtype=torch.float32)
        t.copy_((r * std + mean).to(t.dtype))

    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fan_in = module.weight[0].numel()
            normal_(module.weight, 1.0 / math.sqrt(fan_in))
            if module.bias is not None:
                normal_(module.bias, 0.02)
        elif isinstance(module, nn.LayerNorm):
            normal_(module.weight, 0.1, 1.0)
            normal_(module.bias, 0.1)
        elif isinstance(module, RMSNorm):
            normal_(module.weight, 0.1, 1.0)
        elif isinstance(module, nn.Embedding):
            normal_(module.weight, 1.0)
    vision = model.model.vision  # type: ignore[union-attr]
    for p in (vision.patch_embedding.cls_embedding, vision.boi, vision.eoi):
        normal_(p, 1.0)
    return model


def release_state_dict(model: CogVLMForCausalLM, dtype: torch.dtype = torch.bfloat16,
                       include_inv_freq: bool = True) -> dict[str, torch.Tensor]:
    """The model's tensors under release key names, plus the release's per-layer `inv_freq` buffers."""
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if include_inv_freq:
        inv = model.model.inv_freq.to(torch.bfloat16)
        for i in range(model.config.num_hidden_layers):
            state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv.clone()
    return state


def save_release_checkpoint(state: dict[str, torch.Tensor], config: CogVLMConfig, out_dir: Path,
                            shards: int = 1) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    keys = list(state)
    if shards <= 1:
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    per = math.ceil(len(keys) / shards)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s * per:(s + 1) * per]}
        save_file(part, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_checkpoint(out_dir: str | Path, version: int = 1, preset_name: str = "tiny", *,
                     shards: int = 1, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                     include_inv_freq: bool = True, tokenizer_dir: str | Path | None = None,
                     **overrides: Any) -> CogVLMConfig:
    """Write a random checkpoint (and its tokenizer) in the release layout; returns its config.

    v2 ships its tokenizer inside the checkpoint; v1 (like the release) does not, so its tokenizer
    goes to `tokenizer_dir` (default `<out_dir>/../<name>-tokenizer`).
    """
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(version)
    ids = {name: tokenizer.convert_tokens_to_ids(t) for name, t in special_tokens(version).items()}
    if version == 1:
        overrides.setdefault("bos_token_id", ids["bos"])
        overrides.setdefault("eos_token_id", ids["eos"])
        overrides.setdefault("pad_token_id", ids["unk"])
    else:
        overrides.setdefault("bos_token_id", ids["bos"])
        overrides.setdefault("eos_token_id", [ids["eos"], ids["eot"]])
        overrides.setdefault("pad_token_id", ids["pad"])
    overrides.setdefault("vocab_size", len(tokenizer))
    config = preset(preset_name, version=version, **overrides)
    model = init_random_(CogVLMForCausalLM(config), seed)
    save_release_checkpoint(release_state_dict(model, dtype, include_inv_freq), config, out_dir, shards)
    if version == 2:
        tokenizer.save_pretrained(str(out_dir))
    else:
        tok_dir = Path(tokenizer_dir) if tokenizer_dir else out_dir.parent / f"{out_dir.name}-tokenizer"
        tokenizer.save_pretrained(str(tok_dir))
    return config


def write_shapes_checkpoint(out_dir: str | Path, config: CogVLMConfig, shard_bytes: int = 5 * 10**9) -> Path:
    """A checkpoint of the full release shapes with no weights: `config.json`, an index and
    safetensors shards (of at most `shard_bytes`, like the release's) whose headers are real and
    whose data is a hole (sparse files, which take no disk space). For what reads headers only:
    `check_checkpoint`, the fit check."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    with torch.device("meta"):
        model = CogVLMForCausalLM(config)
    shards: list[dict[str, Any]] = [{}]
    offset = total = 0
    for k, t in model.state_dict().items():
        n = t.numel() * 2
        if offset and offset + n > shard_bytes:
            shards.append({})
            offset = 0
        shards[-1][k] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
        total += n
    weight_map = {}
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        raw = json.dumps({"__metadata__": {"format": "pt"}, **tensors}).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        with open(out_dir / name, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + max(v["data_offsets"][1] for v in tensors.values()))
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out_dir


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--version", type=int, choices=(1, 2), default=1)
    p.add_argument("--preset", default="tiny", choices=("tiny", "small"))
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--template", default="chat", choices=("base", "chat", "vqa"))
    p.add_argument("--tokenizer-dir", default=None)
    a = p.parse_args(argv)
    cfg = write_checkpoint(a.out_dir, a.version, a.preset, shards=a.shards, seed=a.seed,
                           tokenizer_dir=a.tokenizer_dir, template_version=a.template)
    print(f"wrote a RANDOM-weight CogVLM v{cfg.version} '{a.preset}' checkpoint to {a.out_dir}")


if __name__ == "__main__":
    main()
