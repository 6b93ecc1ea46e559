"""`pipeline.build_processor`: the stages as a Dataset -> Dataset block on a user's own Ray dataset."""

from __future__ import annotations

from collections import Counter

import pytest

from pipeline import ConfigError, build_processor

from .data import bad_images, good_image


def _model(ckpt, tok) -> dict:
    return {"source": str(ckpt), "tokenizer": str(tok), "dtype": "fp32", "gpus_per_replica": 0,
            "batch_size": 4, "preprocess_workers": 1}


def test_processor_on_a_user_dataset_keeps_user_columns_and_makes_error_rows(ray_cluster, ckpt_v1, tokenizer_v1):
    import ray

    bad = bad_images()
    items = [{"image": good_image(i), "photo_id": 100 + i, "source": f"crawl-{i}",
              "question": "What is in it?" if i % 2 else None} for i in range(5)]
    items += [{"image": data, "photo_id": 200 + j, "source": name, "question": None}
              for j, (name, (_, data, _)) in enumerate(sorted(bad.items()))]
    expected = {100 + i: "ok" for i in range(5)}
    expected.update({200 + j: status for j, (_, (_, _, status)) in enumerate(sorted(bad.items()))})
    ds = ray.data.from_items(items).filter(lambda r: r["photo_id"] != 104)  # a user's own pipeline step
    del expected[104]
    processor = build_processor(model=_model(ckpt_v1, tokenizer_v1), questions_column="question",
                                tasks={"caption": {"max_new_tokens": 5}, "vqa": {"questions": ["Colors?"],
                                                                                "max_new_tokens": 3}})
    df = processor(ds).to_pandas()

    # one row per (input row, prompt): caption + config question (+ the row's own question)
    prompts = {pid: 2 + (pid < 200 and (pid - 100) % 2 == 1) for pid in expected}
    assert Counter(df.photo_id) == Counter(prompts)
    assert not df.duplicated(["photo_id", "task_index"]).any()
    # the user's columns pass through unchanged; the image bytes are not copied into the output
    src = {r["photo_id"]: r["source"] for r in items}
    assert all(src[p] == s for p, s in zip(df.photo_id, df.source)) and "image" not in df.columns
    assert {"key", "task", "prompt", "response", "boxes", "status", "error_message", "prompt_tokens",
            "output_tokens", "generation_settings", "model_fingerprint"} <= set(df.columns)
    # errors are rows, with the reader's statuses
    got: dict = {}
    for pid, status in zip(df.photo_id, df.status):
        got.setdefault(pid, set()).add(status)
    for pid, status in expected.items():
        assert got[pid] == {status}, (pid, got[pid])
    ok = df[df.status == "ok"]
    assert ok.response.notna().all() and (ok.output_tokens > 0).all()
    assert df[df.status != "ok"].error_message.notna().all()
    assert set(df[df.task == "vqa"].prompt) >= {"Colors?", "What is in it?"}


def test_processor_with_uris_refuses_paths_outside_the_allowed_prefixes(ray_cluster, ckpt_v1, tokenizer_v1,
                                                                         tmp_path):
    import ray

    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(good_image(i))
    uris = [str(tmp_path / "imgs" / f"{i}.jpg") for i in range(3)] + ["/etc/hostname", str(tmp_path / "imgs/none.jpg")]
    ds = ray.data.from_items([{"uri": u, "n": i} for i, u in enumerate(uris)])
    processor = build_processor(model=_model(ckpt_v1, tokenizer_v1), image_column=None, uri_column="uri",
                                key_column="n", allowed_uri_prefixes=[str(tmp_path / "imgs")],
                                tasks={"caption": {"max_new_tokens": 4}})
    df = processor(ds).to_pandas().sort_values("n")
    assert list(df.n) == [0, 1, 2, 3, 4] and list(df.key) == ["0", "1", "2", "3", "4"]
    assert list(df.status) == ["ok", "ok", "ok", "read_error", "read_error"]
    assert "refused" in df.error_message.iloc[3] and "not found" in df.error_message.iloc[4]


def test_processor_config_errors_before_any_work(ckpt_v1, tokenizer_v1, tmp_path):
    with pytest.raises(ConfigError, match="model.max_slots"):
        build_processor(model=dict(_model(ckpt_v1, tokenizer_v1), max_slots=0))
    with pytest.raises(ConfigError, match="unknown|nonsense"):
        build_processor(model=dict(_model(ckpt_v1, tokenizer_v1), nonsense=1))
    with pytest.raises(ConfigError, match="allowed_uri_prefixes"):
        build_processor(model=_model(ckpt_v1, tokenizer_v1), image_column=None, uri_column="uri")
    with pytest.raises(ConfigError, match="model.source"):
        build_processor(model=str(tmp_path / "missing"))


def test_processor_repeated_and_missing_images_prefix_and_collisions(ray_cluster, ckpt_v1, tokenizer_v1):
    import ray

    same = good_image(7)
    items = [{"image": same, "n": i, "status": "raw"} for i in range(4)] + [{"image": None, "n": 4, "status": "raw"}]
    ds = ray.data.from_items(items)
    kw = dict(model=_model(ckpt_v1, tokenizer_v1), tasks={"caption": {"max_new_tokens": 3}})
    with pytest.raises(ConfigError, match="status.*prefix"):  # img2dataset-style columns: refused at once
        build_processor(**kw)(ds)
    df = build_processor(**kw, prefix="cogvlm_")(ds).to_pandas().sort_values("n")
    assert list(df.n) == [0, 1, 2, 3, 4] and set(df.status) == {"raw"}  # the user's own status column
    assert list(df.cogvlm_status) == ["ok"] * 4 + ["read_error"]
    assert "not image bytes" in df.cogvlm_error_message.iloc[4]
    assert df.cogvlm_response.iloc[:4].nunique() == 1  # the same image, greedy: the same caption
    assert str(df.cogvlm_prompt_tokens.dtype).startswith("int32")  # typed as the CLI's Parquet schema


def test_processor_rows_exactly_once_when_an_image_kills_its_worker(ray_cluster, ckpt_v1, tokenizer_v1, monkeypatch):
    """The Generate worker is SIGKILLed by one image (for real): Ray restarts the replica and
    retries the batch, which leaves its rows once; the image ends as worker_died rows."""
    import ray

    from pipeline.faults import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "generate:k3")
    items = [{"image": good_image(20 + i), "id": f"k{i}"} for i in range(6)]
    processor = build_processor(model=dict(_model(ckpt_v1, tokenizer_v1), batch_size=6), key_column="id",
                                tasks={"caption": {"max_new_tokens": 3}, "vqa": {"questions": ["Why?"], "max_new_tokens": 2}},
                                errors={"max_crashes_per_image": 1})
    df = processor(ray.data.from_items(items)).to_pandas()
    assert Counter(df.id) == Counter({f"k{i}": 2 for i in range(6)})
    assert not df.duplicated(["id", "task_index"]).any()
    assert set(df[df.id == "k3"].status) == {"worker_died"}
    assert set(df[df.id != "k3"].status) == {"ok"}


def test_processor_marks_a_persistent_network_failure_as_transient_not_as_an_answer(ray_cluster, ckpt_v1,
                                                                                     tokenizer_v1):
    """The store refuses connections (nothing listens on its port) past the retry deadline: the
    rows say transient_error, so that the caller can run them again; no read_error is claimed."""
    import ray

    from .conftest import free_port

    processor = build_processor(model=_model(ckpt_v1, tokenizer_v1), image_column=None, uri_column="u",
                                allowed_uri_prefixes=["s3://b/imgs"], tasks={"caption": {"max_new_tokens": 3}},
                                s3={"endpoint_url": f"http://127.0.0.1:{free_port()}", "max_attempts": 1},
                                retry={"deadline_s": 1, "backoff_s": 0.2})
    df = processor(ray.data.from_items([{"u": "s3://b/imgs/0.jpg"}, {"u": "s3://b/imgs/1.jpg"}])).to_pandas()
    assert list(df.status) == ["transient_error"] * 2
    assert df.error_message.str.contains("fetching s3://b/imgs/").all()


# --- issue 20, item 1: an ordinary Ray dataset, Ray Data LLM's names, the cluster checked ----------

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### On your own Ray dataset"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("```\n\n")]


def _write_images(folder, sizes_modes) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, ((w, h), mode) in enumerate(sizes_modes):
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB").convert(mode)
        img.save(folder / f"{i}.png")


def test_readme_example_runs_on_read_images(ray_cluster, ckpt_v1, tokenizer_v1, tmp_path):
    """The README's example as written (a Ray Data LLM-style config, postprocess, read_images'
    HxWxC arrays, a width filter in the non-deprecated form), with only the hardware and the
    locations swapped for a CPU and local folders. On main: no CogVLMProcessorConfig, the numpy
    images were read_error rows, and the user's width column was refused as a collision."""
    import pandas as pd

    photos, out = tmp_path / "photos", tmp_path / "captions"
    # wide RGB, RGBA and grayscale images pass the filter; a narrow one does not
    _write_images(photos, [((300, 40), "RGB"), ((260, 50), "RGBA"), ((256, 30), "L"), ((100, 80), "RGB")])
    code = _readme_example()
    for old, new in [('"THUDM/cogvlm-chat-hf"', repr(str(ckpt_v1))),
                     ('"lmsys/vicuna-7b-v1.5"', repr(str(tokenizer_v1))),
                     ('concurrency=4, batch_size=8, accelerator_type="A10G"',
                      "concurrency=1, batch_size=4, gpus_per_replica=0"),
                     ('{"quantization": "int4"}', '{"dtype": "fp32", "preprocess_workers": 1}'),
                     ('"max_new_tokens": 64', '"max_new_tokens": 3'),
                     ('"s3://my-bucket/photos/"', repr(str(photos))), ('"s3://my-bucket/captions/"', repr(str(out)))]:
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    exec(compile(code, "README.md", "exec"), {})
    df = pd.read_parquet(out)
    assert sorted(df.columns) == ["path", "status", "task", "text", "width"]
    assert sorted(set(df.path.map(lambda p: p.rsplit("/", 1)[-1]))) == ["0.png", "1.png", "2.png"]
    assert len(df) == 6 and set(df.status) == {"ok"} and df.text.notna().all()  # caption + 1 question each
    assert sorted(set(df.width)) == [256, 260, 300]  # the user's own column, kept


def test_processor_takes_ray_data_llm_names_and_numpy_and_pil_images(ray_cluster, ckpt_v1, tokenizer_v1):
    """A dict config with concurrency/batch_size/accelerator_type, preprocess= and postprocess=;
    images as numpy arrays and PIL images; keyword form with model.concurrency."""
    import numpy as np
    import ray
    from PIL import Image

    from pipeline import CogVLMProcessorConfig

    conf = {"model_source": str(ckpt_v1), "tokenizer": str(tokenizer_v1), "concurrency": [1, 2], "batch_size": 2,
            "gpus_per_replica": 0, "model": {"dtype": "fp32", "preprocess_workers": 1},
            "tasks": {"caption": {"max_new_tokens": 2}}}
    p = build_processor(conf)
    assert (p.config.model.min_replicas, p.config.model.max_replicas, p.config.model.batch_size) == (1, 2, 2)
    kw = build_processor(model={"source": str(ckpt_v1), "tokenizer": str(tokenizer_v1), "concurrency": 3,
                                "gpus_per_replica": 1, "accelerator_type": "L4"})
    m = kw.config.model
    assert (m.min_replicas, m.max_replicas, m.accelerator_type) == (3, 3, "L4")
    with pytest.raises(ConfigError, match="concurrency"):
        build_processor(dict(conf, concurrency=(2, 1)))
    with pytest.raises(ConfigError, match="unknown config key engine_kwargs"):
        build_processor(dict(conf, engine_kwargs={}))
    with pytest.raises(ConfigError, match="accelerator_type needs model.gpus_per_replica"):
        build_processor(dict(conf, accelerator_type="L4"))

    arr = np.asarray(Image.open(__import__("io").BytesIO(good_image(3))).convert("RGB"))
    ds = ray.data.from_items([{"n": 0, "pixels": arr}, {"n": 1, "pixels": arr[:, :, 0]}])
    processor = build_processor(CogVLMProcessorConfig(**dict(conf, image_column="img", key_column="n")),
                                preprocess=lambda row: {"n": row["n"], "img": Image.fromarray(row["pixels"])},
                                postprocess=lambda row: {"n": row["n"], "ok": row["status"] == "ok",
                                                         "size": (row["width"], row["height"])})
    df = processor(ds).to_pandas().sort_values("n")
    assert list(df.n) == [0, 1] and df.ok.all()
    assert [tuple(s) for s in df["size"]] == [(arr.shape[1], arr.shape[0])] * 2


def test_processor_refuses_unreadable_columns_and_a_cluster_too_small_before_any_work(ray_cluster, ckpt_v1,
                                                                                      tokenizer_v1):
    """One ConfigError at processor(ds), not a hang (on main: the stages asked for more CPUs than
    the cluster has and Ray Data waited), nor a read_error per row."""
    import time

    import numpy as np
    import ray

    kw = dict(model=_model(ckpt_v1, tokenizer_v1), tasks={"caption": {"max_new_tokens": 2}})
    t0 = time.monotonic()
    cpus = ray.cluster_resources()["CPU"]
    with pytest.raises(ConfigError, match=rf"need {cpus + 2:g} CPUs at once and the cluster has {cpus:g}.*"
                                          rf"Lower model.cpus_per_replica to {cpus - 2:g} or less"):
        build_processor(model=dict(kw["model"], cpus_per_replica=cpus), tasks=kw["tasks"])(
            ray.data.from_items([{"image": good_image(1)}]))
    with pytest.raises(ConfigError, match="2 GPUs, but the cluster has 0"):
        build_processor(model=dict(kw["model"], gpus_per_replica=1, min_replicas=2, max_replicas=2),
                        tasks=kw["tasks"])(ray.data.from_items([{"image": good_image(1)}]))
    for rows, match in [([{"image": 3}], r"column 'image' \(image_column\) holds int64, not images"),
                        ([{"image": "a.jpg"}], r"holds string, not images: for paths or URIs pass uri_column"),
                        ([{"image": np.zeros((4, 4, 3), np.float32)}], r"arrays of float pixels; give uint8")]:
        with pytest.raises(ConfigError, match=match):
            build_processor(**kw)(ray.data.from_items(rows))
    assert time.monotonic() - t0 < 60
