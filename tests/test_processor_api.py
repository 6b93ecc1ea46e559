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
