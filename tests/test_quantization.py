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
    "fp8": (0.40, 0.35, 0.12),  # measured 0.262 / 51.6% (reference path: weights and activations in e4m3)
}


def test_logits_drift_against_fp32_is_bounded(small_ckpt):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from precision import drift, drift_batch, logits

    cfg = load_model(small_ckpt, dtype=torch.float32)
    batch, real = drift_batch(cfg.config, 4)
    ref = logits(cfg, batch, real)
    seen = {}
    for name, q in (("bf16", None), ("int8", "int8"), ("int4", "int4"), ("fp8", "fp8")):
        model = load_model(small_ckpt, dtype=torch.bfloat16, quantization=q, fp8_reference=q == "fp8")
        mx, mean, agree = drift(ref, logits(model, batch, real))
        seen[name] = (mx, mean, agree)
        top, low_agree, floor = DRIFT[name]
        assert floor <= mean <= top and agree >= low_agree, (name, seen)
    assert seen["bf16"][1] < seen["int8"][1] < seen["fp8"][1] < seen["int4"][1], seen


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
    for value, want in (("INT8", "int8"), ("fp8", "fp8"), ("FP8", "fp8"), (None, None), ("none", None)):
        assert load_config(data=dict(data, model={"source": "/m", "kv_cache_dtype": value})).model.kv_cache_dtype == want
    with pytest.raises(ConfigError, match="model.kv_cache_dtype must be int8, fp8 or null"):
        load_config(data=dict(data, model={"source": "/m", "kv_cache_dtype": "int4"}))


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


# --- fp8: float8 GEMMs for the vision tower and the visual expert ------------------------------

def _fp8_round(t: torch.Tensor) -> torch.Tensor:
    """What fp8 makes of each row of `t`, written out: scale the row's largest magnitude to 448,
    round to e4m3, scale back (float32)."""
    scale = t.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448.0
    return (t.float() / scale).to(torch.float8_e4m3fn).float() * scale


def test_fp8_linear_applies_the_rounding_it_says():
    from cogvlm.quantization import Fp8Linear

    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=g) * torch.logspace(-2, 1, 48)[:, None])  # rows of varied scale
        linear.bias.copy_(torch.randn(48, generator=g))
    x = torch.randn(2, 5, 64, generator=g) * 3
    x[0, 1] = 0  # an all-zero token stays zero
    layer = Fp8Linear.from_linear(linear, reference=True)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    want = _fp8_round(x.reshape(10, 64)) @ _fp8_round(linear.weight).t() + linear.bias
    got = layer(x)
    assert got.shape == (2, 5, 48) and torch.isfinite(got).all()
    torch.testing.assert_close(got.reshape(10, 48), want, rtol=1e-4, atol=1e-4)  # fp32 sums, other order
    torch.testing.assert_close(layer.dequantized_weight(), _fp8_round(linear.weight), rtol=0, atol=0)
    exact = linear(x).detach()
    err = (got - exact).abs().max() / exact.abs().max()
    assert 1e-4 < err < 0.1, err  # rounded (e4m3 keeps 3 mantissa bits), not broken
    # bf16 in, bf16 out; the kernel path (torch._scaled_mm: this torch has a CPU kernel) computes
    # exactly what the reference path computes
    lb = torch.nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        lb.weight.copy_(linear.weight)
        lb.bias.copy_(linear.bias)
    xb = x.to(torch.bfloat16)
    ref = Fp8Linear.from_linear(lb, reference=True)(xb)
    assert ref.dtype == torch.bfloat16
    try:
        kernel = Fp8Linear.from_linear(lb, reference=False)(xb)
    except (RuntimeError, NotImplementedError) as e:  # a torch without a CPU kernel
        pytest.skip(f"torch._scaled_mm on CPU: {e}")
    assert torch.equal(kernel, ref)
    with pytest.raises(ValueError, match="multiples of 16"):
        Fp8Linear.from_linear(torch.nn.Linear(64, 40), reference=True)
    with pytest.raises(ValueError, match="bf16"):
        Fp8Linear.from_linear(linear, reference=False)


def _fp8_names(model) -> set[str]:
    """The checkpoint-true names fp8 must take: every linear layer of the vision tower and its
    adapter, and the visual expert's QKV, dense and MLP in each decoder layer."""
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.vision.")}
    for i in range(model.config.num_hidden_layers):
        names |= {f"model.layers.{i}.self_attn.vision_expert_query_key_value", f"model.layers.{i}.self_attn.vision_expert_dense"}
        names |= {f"model.layers.{i}.mlp.vision_mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    return names


@pytest.mark.parametrize("version", [1, 2])
def test_fp8_converts_the_vision_tower_and_visual_expert_only(ckpts, version):
    from cogvlm.generate import generate
    from cogvlm.processor import Sample, collate
    from cogvlm.quantization import Fp8Linear

    plain = load_model(ckpts / f"v{version}", dtype=torch.bfloat16)
    expected = _fp8_names(plain)
    assert len(expected) == 4 * 2 + 4 + 5 * 2  # tower: 2 layers x 4; adapter: 4; 2 decoder layers x 5
    for vision in (True, False):
        model = load_model(ckpts / f"v{version}", dtype=torch.bfloat16, quantization="fp8", quantize_vision=vision,
                           fp8_reference=True)
        want = expected if vision else {n for n in expected if not n.startswith("model.vision.")}
        fp8 = {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
        assert fp8 == want and sorted(want) == sorted(model.quantization.quantized) and not model.quantization.skipped
        plain_modules = dict(plain.named_modules())
        for n, m in model.named_modules():
            if isinstance(m, Fp8Linear):  # the checkpoint's weight, rounded row by row; its bias as loaded
                torch.testing.assert_close(m.dequantized_weight(), _fp8_round(plain_modules[n].weight), rtol=0, atol=0)
                if m.bias is not None:
                    assert torch.equal(m.bias, plain_modules[n].bias)
            elif isinstance(m, torch.nn.Linear):  # the language expert, lm_head, the rest: untouched
                assert m.weight.dtype == torch.bfloat16 and torch.equal(m.weight, plain_modules[n].weight), n
        # the fit check's count: one byte per fp8 weight and a float32 scale per row
        with torch.device("meta"):
            meta = CogVLMForCausalLM(model.config)
        assert weight_bytes(meta, torch.bfloat16, "fp8", "cpu", vision) == module_bytes(model)
        assert "fp8 GEMMs" in model.quantization.describe()
    # only rows with an image see fp8: a text-only row's logits are bf16's exactly; image rows
    # differ by the rounding, and generation runs
    cfg = model.config
    n = cfg.num_vision_tokens
    img = torch.randn(3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(version))
    batch = collate([Sample([cfg.bos_token_id] + [cfg.pad_token_id] * n + [5, 6, 7], [0] + [1] * n + [0] * 3, img),
                     Sample([cfg.bos_token_id, 8, 9, 10, 11], [0] * 5, None)], cfg.pad_token_id)
    model = load_model(ckpts / f"v{version}", dtype=torch.bfloat16, quantization="fp8", fp8_reference=True)
    with torch.no_grad():
        a, b = plain(**batch.as_kwargs()), model(**batch.as_kwargs())
    assert torch.equal(a[1, -5:], b[1, -5:]) and not torch.equal(a[0, -3:], b[0, -3:])
    out = generate(model, batch.input_ids, batch.token_type_ids, batch.attention_mask, batch.images,
                   max_new_tokens=6, ignore_eos=True)
    assert [len(t) for t in out.tokens] == [6, 6]


def test_fp8_engine_generates_what_each_prompt_generates_alone(ckpts):
    """Activations are scaled per token, so a token's fp8 rounding does not depend on what else
    is in the batch: the engine (images batched through the vision tower, prompts sharing a
    prefix) gives each prompt's tokens alone, as in bf16 / fp32."""
    model = load_model(ckpts / "v2", dtype=torch.float32, quantization="fp8", fp8_reference=True)
    reqs, images = _workload(model, 4, seed=7)
    out = Engine(model, max_prompt_tokens=24, max_new_tokens=12).generate(reqs, images)
    for i, r in enumerate(reqs):
        assert out.tokens[i] == _alone(model, r, images, model.config.eos_token_ids).tokens[0], i


def test_fp8_is_refused_without_fp8_gemms_in_one_line(ckpts, tmp_path, capsys):
    from jobs.caption import main
    from pipeline import ConfigError
    from pipeline.fit import check_fit, fp8_error

    with pytest.raises(ValueError, match="compute capability 8.9") as e:  # before reading any weight
        load_model(ckpts / "v1", dtype=torch.bfloat16, quantization="fp8")
    assert "this device is cpu" in str(e.value)
    data = {"input": {"path": "/in"}, "output": {"path": "/out"}, "model": {"source": "/m", "quantization": "fp8"}}
    assert load_config(data=data).model.quantization == "fp8"  # a GPU job: accepted
    for model, match in (({"gpus_per_replica": 0}, "compute capability 8.9 or newer"), ({"dtype": "fp32"}, "model.dtype bf16")):
        with pytest.raises(ConfigError, match=match) as e:
            load_config(data=dict(data, model=dict(data["model"], **model)))
        assert "\n" not in str(e.value)
    # GPUs whose type says they have no fp8 GEMMs are refused on the driver before any actor starts
    for gpu in ("L4", "H100", "H200", "Foo"):  # fp8 GEMMs, or a type the driver does not know (replicas check)
        assert fp8_error(load_config(data=dict(data, model=dict(data["model"], accelerator_type=gpu)))) is None, gpu
    for gpu, cc in (("A10G", "8.6"), ("A100", "8.0"), ("T4", "7.5")):
        cfg = load_config(data=dict(data, model=dict(data["model"], accelerator_type=gpu)))
        with pytest.raises(JobError, match=rf"accelerator_type is {gpu} \(compute capability {cc}\)") as e:
            check_fit(cfg, preset("v1"))
        assert "\n" not in str(e.value)
    # the CLI: exit 2 with one line, nothing written
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(json.dumps(dict(data, output={"path": str(tmp_path / "out")},
                                        model=dict(data["model"], gpus_per_replica=0))))
    assert main(["--config", str(cfg_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.quantization fp8 needs a CUDA GPU" in err[0], err
    assert not (tmp_path / "out").exists()


def test_fp8_rows_record_their_format(ckpt_v1, tokenizer_v1, tmp_path, monkeypatch):
    """The Generate stage's rows say `bf16+fp8`. CPUs have no fp8 GEMMs, so the job is refused
    there; here the stage runs the reference path to show what a GPU replica records."""
    import functools

    import pipeline.stages as stages
    from cogvlm.quantization import Fp8Linear
    from cogvlm.weights import read_config
    from pipeline.listing import Shard
    from pipeline.readers import read_shard

    webdataset_shards(tmp_path / "in", n_shards=1, per_shard=2)
    cfg = load_config(data=job(ckpt_v1, tokenizer_v1, tmp_path / "in", tmp_path / "o", model={"dtype": "bf16"}))
    cfg.model.quantization = "fp8"  # past the config's CPU check
    monkeypatch.setattr(stages, "load_model", functools.partial(load_model, fp8_reference=True))
    rows = pd.DataFrame(read_shard(Shard("00000", str(tmp_path / "in" / "00000.tar")), cfg.input, cfg.s3))
    pre = stages.Preprocess.__call__(stages.Preprocess(cfg, read_config(ckpt_v1)), rows)
    gen = stages.Generate(cfg, read_config(ckpt_v1))
    assert any(isinstance(m, Fp8Linear) for m in gen.model.modules())
    out = gen.run(pre)
    assert len(out) == 2 and (out.status == "ok").all()
    assert {json.loads(s)["weights"] for s in out.generation_settings} == {"bf16+fp8"}


def test_fp8_weight_bytes_of_the_full_shapes():
    """fp8 stores the vision tower's and the visual expert's weights in one byte each (+ a float32
    scale per row); everything else stays bf16."""
    for v in ("v1", "v2"):
        cfg = preset(v)
        with torch.device("meta"):
            meta = CogVLMForCausalLM(cfg)
        targets = [m for n, m in meta.named_modules() if n in _fp8_names(meta)]
        values = sum(m.weight.numel() for m in targets)
        rows = sum(m.out_features for m in targets)
        bf16 = weight_bytes(meta, torch.bfloat16, None, "cuda")
        fp8 = weight_bytes(meta, torch.bfloat16, "fp8", "cuda")
        assert fp8 == bf16 - values + 4 * rows
        assert 10.5e9 < values < 11.5e9 or v == "v2", values  # v1: 4.28B tower + 0.14B adapter + 6.48B expert
        est = estimate_replica(cfg, torch.bfloat16, "fp8")
        assert est.weights_bytes == fp8 and "with fp8 vision tower and visual expert" in est.describe()
