"""Loading: release layout, every key accounted for, sources (local, s3://, hub)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cogvlm import CheckpointError, load_model, weights_fingerprint
from cogvlm.weights import read_config


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _single_file_copy(src: Path, dst: Path, state: dict[str, torch.Tensor]) -> Path:
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_release_layout(ckpt_v1, ckpt_v2):
    cfg1 = json.loads((ckpt_v1 / "config.json").read_text())
    assert isinstance(cfg1["vision_config"], dict) and cfg1["architectures"] == ["CogVLMForCausalLM"]
    index = json.loads((ckpt_v1 / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in index["weight_map"]
    cfg2 = json.loads((ckpt_v2 / "config.json").read_text())
    assert "num_multi_query_heads" not in cfg2
    keys2 = _tensors(ckpt_v2)
    assert "model.vision.conv.weight" in keys2
    assert "model.layers.0.self_attn.vision_expert_query_key_value.bias" in keys2
    assert "model.layers.0.self_attn.language_expert_query_key_value.bias" not in keys2


def test_v2_structure_is_read_off_the_weights(ckpt_v2):
    cfg = read_config(ckpt_v2)
    assert cfg.version == 2 and cfg.rope_theta == 500000.0
    assert cfg.num_kv_heads == 2 and cfg.num_attention_heads == 4  # from the fused QKV shape
    assert cfg.num_vision_tokens == (56 // 28) ** 2 + 2


def test_sharded_and_single_file_give_identical_models(ckpt_v1, model_v1, tmp_path):
    state = _tensors(ckpt_v1)
    single = _single_file_copy(ckpt_v1, tmp_path / "single", state)
    m = load_model(single, dtype=torch.float32)
    a, b = model_v1.state_dict(), m.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert weights_fingerprint(single) != weights_fingerprint(ckpt_v1)


def test_inv_freq_keys_are_optional(ckpt_v1, model_v1, tmp_path):
    state = {k: v for k, v in _tensors(ckpt_v1).items() if not k.endswith("inv_freq")}
    m = load_model(_single_file_copy(ckpt_v1, tmp_path / "noinv", state), dtype=torch.float32)
    torch.testing.assert_close(m.model.inv_freq, model_v1.model.inv_freq)


def test_missing_key_is_named(ckpt_v1, tmp_path):
    state = _tensors(ckpt_v1)
    del state["model.layers.1.mlp.vision_mlp.up_proj.weight"]
    d = _single_file_copy(ckpt_v1, tmp_path / "missing", state)
    with pytest.raises(CheckpointError, match=r"missing keys.*model\.layers\.1\.mlp\.vision_mlp\.up_proj\.weight"):
        load_model(d, dtype=torch.float32)


def test_unexpected_key_is_named(ckpt_v1, tmp_path):
    state = _tensors(ckpt_v1)
    state["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    d = _single_file_copy(ckpt_v1, tmp_path / "unexpected", state)
    with pytest.raises(CheckpointError, match=r"unexpected keys.*model\.layers\.0\.mlp\.extra\.weight"):
        load_model(d, dtype=torch.float32)


def test_shape_mismatch_is_named(ckpt_v1, tmp_path):
    state = _tensors(ckpt_v1)
    state["model.vision.boi"] = torch.zeros(1, 1, 3, dtype=torch.bfloat16)
    d = _single_file_copy(ckpt_v1, tmp_path / "shape", state)
    with pytest.raises(CheckpointError, match=r"shape mismatch for model\.vision\.boi"):
        load_model(d, dtype=torch.float32)


def test_missing_directory_and_offline_hub_id_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="Hugging Face hub"):
        load_model("THUDM/cogvlm-chat-hf", cache_dir=tmp_path / "hub")


def test_load_from_s3_prefix_downloads_once(ckpt_v1, model_v1, s3_bucket, tmp_path):
    import boto3

    bucket, endpoint = s3_bucket
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    for f in ckpt_v1.iterdir():
        client.upload_file(str(f), bucket, f"models/tiny/{f.name}")
    uri = f"s3://{bucket}/models/tiny"
    opts = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    m = load_model(uri, dtype=torch.float32, cache_dir=tmp_path / "cache", storage_options=opts)
    for k, v in model_v1.state_dict().items():
        assert torch.equal(v, m.state_dict()[k]), k
    # second load reads the local cache: works even with the objects gone
    for f in ckpt_v1.iterdir():
        client.delete_object(Bucket=bucket, Key=f"models/tiny/{f.name}")
    load_model(uri, dtype=torch.float32, cache_dir=tmp_path / "cache", storage_options=opts)
    with pytest.raises(CheckpointError, match="no safetensors"):
        load_model(f"s3://{bucket}/models/none", cache_dir=tmp_path / "cache", storage_options=opts)


def test_checkpoint_maker_cli(tmp_path):
    from cogvlm.tiny import main

    main([str(tmp_path / "c"), "--version", "2", "--shards", "3"])
    index = json.loads((tmp_path / "c" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert (tmp_path / "c" / "tokenizer.json").exists()
    assert load_model(tmp_path / "c").dtype == torch.bfloat16
