"""int8 / int4 weight-only quantization (torchao) applied while loading, its cost in logits drift,
and the fit check that refuses a GPU too small before any work starts."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import torch

from cogvlm import load_model
from cogvlm.config import preset
from cogvlm.decoder import CogVLMForCausalLM
from cogvlm.engine import Engine
from cogvlm.memory import GB, PeakMemory, estimate_replica, fit_error
from cogvlm.quantization import is_quantized, module_bytes, target_modules, weight_bytes
from cogvlm.tiny import write_checkpoint, write_shapes_checkpoint
from pipeline import JobError, load_config, run
from pipeline.fit import replica_fit_error

from .data import webdataset_shards
from .test_engine import _alone, _workload
from .test_pipeline import job


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """v1 and v2 tiny checkpoints whose every linear layer the CPU int4 kernel takes (the default
    tiny shape's MLP width, 172, is not a multiple of 16)."""
    root = tmp_path_factory.mktemp("qckpt")
    for v in (1, 2):
        write_checkpoint(root / f"v{v}", version=v, seed=v, intermediate_size=192)
    return root


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    """The `small` shape (hidden 256, 4 layers, 224 px) in one bf16 file, as bench/precision.py."""
    out = tmp_path_factory.mktemp("small") / "v1"
    write_checkpoint(out, version=1, preset_name="small")
    return out


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_model_loads_and_generates_like_itself_alone(ckpts, version, quantization):
    plain = load_model(ckpts / f"v{version}", dtype=torch.float32)
    model = load_model(ckpts / f"v{version}", dtype=torch.float32, quantization=quantization)
    targets = [name for name, _ in target_modules(model)]
    # every linear layer of the decoder (both experts) and the vision tower is quantized...
    assert model.quantization.quantized == sorted(targets) and not model.quantization.skipped
    assert len(targets) == sum(1 for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)) - 1
    assert all(is_quantized(m.weight) for _, m in target_modules(model))
    # ...the rest is not, and the bytes drop as the format says (a skipped quantization fails here)
    assert not is_quantized(model.lm_head.weight) and not is_quantized(model.model.embed_tokens.weight)
    linear = sum(m.weight.numel() * 4 for _, m in target_modules(plain))
    per_weight = {"int8": 1, "int4": 0.5}[quantization]
    saved = module_bytes(plain) - module_bytes(model)
    assert saved > linear * (1 - per_weight / 4) * 0.9, (saved, linear)
    with torch.device("meta"):
        meta = CogVLMForCausalLM(model.config)
    assert weight_bytes(meta, torch.float32, quantization, "cpu") == module_bytes(model)  # the fit check's count
    # the engine (prefix sharing, continuous batching) computes what each prompt computes alone
    reqs, images = _workload(model, 4, seed=version)
    out = Engine(model, max_prompt_tokens=24, max_new_tokens=12).generate(reqs, images)
    assert all(len(t) > 0 for t in out.tokens)
    for i, r in enumerate(reqs):
        assert out.tokens[i] == _alone(model, r, images, model.config.eos_token_ids).tokens[0], i


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_compiled_quantized_decode_step_equals_eager(ckpts, quantization):
    """torch.compile (inductor) takes torchao's tensors: same tokens, nothing recompiled."""
    model = load_model(ckpts / "v1", dtype=torch.float32, quantization=quantization)
    reqs, images = _workload(model, 5, seed=3, sampled=False)
    kw = dict(max_prompt_tokens=24, max_new_tokens=12, max_slots=8, buckets=[8])
    eng = Engine(model, compile=True, **kw)
    eng.warm_up()
    out = eng.generate(reqs, images)
    assert eng.recompiles() == 0
    assert out.tokens == Engine(model, **kw).generate(reqs, images).tokens


def test_loading_never_holds_the_unquantized_weights(small_ckpt):
    """Each layer is quantized as soon as it is loaded. The allocator's peak while loading, less
    the memory-mapped checkpoint file, stays within the quantized model plus a few layers' worth
    of temporaries; loading everything and then quantizing would need the whole fp32 model."""
    plain = module_bytes(load_model(small_ckpt, dtype=torch.float32))
    mapped = (small_ckpt / "model.safetensors").stat().st_size  # safetensors maps the file: counted, not heap
    for q in ("int8", "int4"):
        with PeakMemory(torch.device("cpu")) as peak:
            model = load_model(small_ckpt, dtype=torch.float32, quantization=q)
        layer = max(m.in_features * m.out_features * 4 for _, m in target_modules(model))
        held = peak.peak - mapped
        assert held < module_bytes(model) + 8 * layer and held < 0.6 * plain, (q, held, plain, layer)


def test_int4_keeps_layers_the_kernel_cannot_take(ckpt_v1):
    model = load_model(ckpt_v1, dtype=torch.bfloat16, quantization="int4")
    report = model.quantization
    odd = {n for n, m in target_modules(model) if 172 in (m.in_features, m.out_features)}
    assert len(odd) == 2 * 2 * 3 + 3  # both experts' MLPs in 2 layers, and the vision adapter's GLU
    assert set(report.skipped) == odd  # rows or inputs of 172: not multiples of 16 / 32
    assert report.quantized and all(is_quantized(m.weight) for n, m in target_modules(model) if n in report.quantized)
    assert "kept unquantized" in report.describe()


# drift against fp32 on the small config, measured in bench/precision.py (docs/performance.md):
# random weights; the bounds sit above what was measured with some room, and below the drift of
# the next coarser format, so a broken quantization (or none where one is asked) fails.
DRIFT = {  # weights: (max mean abs diff, min top-1 agreement, mean must exceed)
    "bf16": (0.05, 0.85, 0.0),
    "int8": (0.12, 0.75, 0.03),  # measured 0.059 / 88.2%
    "int4": (0.75, 0.10, 0.25),  # measured 0.480 / 24.0% (random weights are int4's worst case)
}


def test_logits_drift_against_fp32_is_bounded(small_ckpt):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from precision import drift, drift_batch, logits

    cfg = load_model(small_ckpt, dtype=torch.float32)
    batch, real = drift_batch(cfg.config, 4)
    ref = logits(cfg, batch, real)
    seen = {}
    for name, q in (("bf16", None), ("int8", "int8"), ("int4", "int4")):
        model = load_model(small_ckpt, dtype=torch.bfloat16, quantization=q)
        mx, mean, agree = drift(ref, logits(model, batch, real))
        seen[name] = (mx, mean, agree)
        top, low_agree, floor = DRIFT[name]
        assert floor <= mean <= top and agree >= low_agree, (name, seen)
    assert seen["bf16"][1] < seen["int8"][1] < seen["int4"][1], seen


def test_fit_check_for_full_v1_and_v2_shapes_from_checkpoint_headers(tmp_path):
    """Full-size checkpoints with real headers and no weights (sparse files): the fit check
    reads only what the headers say."""
    for v in ("v1", "v2"):
        ckpt = write_shapes_checkpoint(tmp_path / v, preset(v))
        assert sum(f.stat().st_blocks for f in ckpt.glob("*.safetensors")) * 512 < 10 * 2**20  # no weights
        from cogvlm.weights import check_checkpoint

        cfg = check_checkpoint(ckpt)
        with torch.device("meta"):
            meta = CogVLMForCausalLM(cfg)
        params = sum(p.numel() for p in meta.parameters())
        bf16 = weight_bytes(meta, torch.bfloat16, None, "cuda")
        int8 = weight_bytes(meta, torch.bfloat16, "int8", "cuda")
        int4 = weight_bytes(meta, torch.bfloat16, "int4", "cuda")
        assert bf16 == 2 * params + sum(b.numel() * 4 for b in meta.buffers())  # rope's inv_freq in fp32
        assert 0.48 < int8 / bf16 < 0.54 and 0.26 < int4 / bf16 < 0.33, (v, int8 / bf16, int4 / bf16)
        at_24 = fit_error(cfg, torch.bfloat16, None, int(24 * GB), "the GPUs have")
        assert at_24 and "model.quantization=int4" in at_24 and f"CogVLM v{cfg.version}" in at_24
        assert fit_error(cfg, torch.bfloat16, None, int(80 * GB), "the GPUs have") is None
        assert fit_error(cfg, torch.bfloat16, "int4", int(24 * GB), "the GPUs have") is None
        est = estimate_replica(cfg, torch.bfloat16, "int4", device_bytes=int(24 * GB))
        assert est.weights_bytes == int4 and est.total_bytes < 24 * GB
    # v1: 17.6B parameters, 35.3 GB in bf16
    assert "17.6B parameters" in fit_error(preset("v1"), torch.bfloat16, None, int(24 * GB), "x")


def test_fit_advice_and_config_spellings(tmp_path):
    v2 = preset("v2")
    # decoder-only int8 does not fit 24 GB; int4 with the vision tower does, and the advice says so
    msg = fit_error(v2, torch.bfloat16, "int8", int(24 * GB), "x", quantize_vision=False)
    assert "model.quantization=int4" in msg and "model.quantize_vision=true" in msg, msg
    assert estimate_replica(v2, torch.bfloat16, "int4", max_slots=2).min_slots == 2
    assert estimate_replica(v2, torch.bfloat16, "none").weights_bytes == estimate_replica(v2, torch.bfloat16, None).weights_bytes
    data = {"input": {"path": "/in"}, "output": {"path": "/out"}, "model": {"source": "/m"}}
    for value, want in (("none", None), ("INT8", "int8"), (False, None), (None, None), ("Int4", "int4")):
        cfg = load_config(data=dict(data, model={"source": "/m", "quantization": value}))
        assert cfg.model.quantization == want, value
    from pipeline import ConfigError

    for bad, key in ((8, "model.quantization"), ("int3", "model.quantization")):
        with pytest.raises(ConfigError, match=key):
            load_config(data=dict(data, model={"source": "/m", "quantization": bad}))
    with pytest.raises(ConfigError, match="model.dtype bf16"):
        load_config(data=dict(data, model={"source": "/m", "quantization": "int4", "dtype": "fp32"}))
    for value, want in (("INT8", "int8"), (None, None), ("none", None)):
        assert load_config(data=dict(data, model={"source": "/m", "kv_cache_dtype": value})).model.kv_cache_dtype == want
    with pytest.raises(ConfigError, match="model.kv_cache_dtype"):
        load_config(data=dict(data, model={"source": "/m", "kv_cache_dtype": "fp8"}))


def test_activation_estimate_is_close_to_what_the_engine_measures(ckpts):
    """The fit check's activation estimate against the engine's measured admission peak (CPU)."""
    model = load_model(ckpts / "v1", dtype=torch.float32)
    for images, per_image, tokens in ((8, 1, 64), (4, 3, 128)):
        eng = Engine(model, max_prompt_tokens=tokens, max_new_tokens=16, admission_images=images,
                     prompts_per_image=per_image, max_slots=8)
        est = estimate_replica(model.config, torch.float32, None, device_type="cpu", max_prompt_tokens=tokens,
                               max_new_tokens=16, admission_images=images, prompts_per_image=per_image)
        assert 0.8 <= est.activation_bytes / eng.plan.prefill_bytes <= 2.5, (est.activation_bytes, eng.plan)
        assert est.weights_bytes == eng.plan.weights_bytes


def test_job_refuses_a_gpu_too_small_before_any_work(tmp_path):
    ckpt = write_shapes_checkpoint(tmp_path / "v1", preset("v1"))
    tok = tmp_path / "tok"
    from cogvlm.tiny import build_tokenizer

    build_tokenizer(1).save_pretrained(str(tok))
    webdataset_shards(tmp_path / "in", n_shards=1, per_shard=2)
    data = job(ckpt, tok, tmp_path / "in", tmp_path / "out",
               model={"dtype": "bf16", "gpus_per_replica": 1, "gpu_memory_gb": 24})
    with pytest.raises(JobError) as e:
        run(load_config(data=data))
    msg = str(e.value)
    assert "needs about" in msg and "model.gpu_memory_gb is 24.0 GB" in msg and "model.quantization=int4" in msg
    assert "\n" not in msg
    assert not (tmp_path / "out" / "data").exists() and not list((tmp_path / "out").glob("_claims/*"))
    # the same check, as the replicas run it: with int4 it fits; a shared GPU gets its part only
    cfg = load_config(data=dict(data, model=dict(data["model"], quantization="int4")))
    assert replica_fit_error(cfg, preset("v1"), int(24 * GB), "x") is None
    half = load_config(data=dict(data, model=dict(data["model"], quantization="int4", gpus_per_replica=0.5)))
    with pytest.raises(JobError, match="of which a replica gets"):
        run(half)


def test_pipeline_runs_end_to_end_with_int8(ray_cluster, ckpt_v1, tokenizer_v1, tmp_path):
    expected = webdataset_shards(tmp_path / "in", n_shards=2, per_shard=3, bad=True)
    tasks = {"caption": {"max_new_tokens": 6}, "vqa": {"questions": ["What is it?"], "max_new_tokens": 4}}
    cfg = load_config(data=job(ckpt_v1, tokenizer_v1, tmp_path / "in", tmp_path / "out", tasks=tasks,
                               model={"quantization": "int8"}))
    summary = run(cfg)
    df = pd.read_parquet(tmp_path / "out" / "data")
    assert len(df) == 2 * len(expected) and not df.duplicated(["key", "task_index"]).any()
    got = df.groupby("key").status.agg(lambda s: set(s))
    assert all(got[k] == {s} for k, s in expected.items())
    ok = df[df.status == "ok"]
    assert len(ok) and ok.response.notna().all() and (ok.output_tokens > 0).all()
    assert {json.loads(s)["weights"] for s in df.generation_settings} == {"fp32+int8"}
    assert summary["images"] == len(expected)
