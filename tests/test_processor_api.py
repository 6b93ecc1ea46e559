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
