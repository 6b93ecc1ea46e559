"""The two model-side stages as Ray Data UDF classes (callable on a plain DataFrame in tests).

`Preprocess` (CPU actors): raw bytes -> decoded, guarded, normalized pixels + token ids per prompt.
`Generate` (GPU actors): one model replica per actor, one vision pass per image, batched generation.
Each input image leaves `Generate` as exactly one row per prompt, with a status.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from cogvlm import CogVLMProcessor, build_prompt, load_model, open_image, parse_boxes
from cogvlm.config import CogVLMConfig
from cogvlm.engine import Engine, Request
from cogvlm.processor import normalize, resize_image
from cogvlm.weights import resolve_source, weights_fingerprint

from .config import JobConfig
from .storage import filesystem, s3_options
from .tasks import Prompt, expand, to_json

TOKENIZER_FILES = ["tokenizer*", "special_tokens_map.json", "*.model", "vocab*", "merges.txt",
                   "added_tokens.json", "config.json"]

PREPROCESSED_COLUMNS = ["shard_id", "source_uri", "shard_total", "image_index", "key", "status",
                        "error_message", "width", "height", "pixels", "prompts", "prompt_ids"]
OUTPUT_COLUMNS = ["key", "source_uri", "shard_id", "shard_total", "image_index", "image_tasks", "task",
                  "task_index", "prompt", "response", "boxes_json", "status", "error_message",
                  "prompt_tokens", "output_tokens", "finish_reason", "generation_s", "width", "height",
                  "generation_settings", "model_source", "model_fingerprint"]


def load_tokenizer(job: JobConfig) -> Any:
    from transformers import AutoTokenizer

    source = job.model.tokenizer or job.model.source
    local = resolve_source(source, job.model.cache_dir, storage_options=s3_options(job.s3),
                           patterns=TOKENIZER_FILES)
    return AutoTokenizer.from_pretrained(str(local))


class Preprocess:
    """Decode (EXIF-rotated RGB), guard sizes, resize/normalize, tokenize every prompt of the image."""

    def __init__(self, job: JobConfig, model_config: CogVLMConfig) -> None:
        self.job = job
        self.config = model_config
        self.processor = CogVLMProcessor(load_tokenizer(job), model_config)
        self._fs: dict[str, Any] = {}

    def _fetch(self, uri: str) -> bytes:
        scheme = "s3" if uri.startswith("s3://") else "file"
        if scheme not in self._fs:
            self._fs[scheme] = filesystem(uri, self.job.s3)[0]
        fs = self._fs[scheme]
        path = uri[len("s3://"):] if scheme == "s3" else uri
        size = fs.size(path)
        if size > self.job.input.max_image_bytes:
            raise ValueError(f"image file is {size} bytes, over max_image_bytes")
        return fs.cat_file(path)

    def _pixels(self, data: bytes) -> tuple[np.ndarray, int, int]:
        image = open_image(data, max_pixels=self.job.input.max_image_pixels)
        w, h = image.size
        return resize_image(image, self.config.image_size), w, h  # uint8 (S, S, 3)

    def prompts(self, questions: str | None) -> list[Prompt]:
        return expand(self.job.tasks, self.config.template_version, questions)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = []
        for row in batch.to_dict("records"):
            prompts = self.prompts(row.get("questions"))
            no_prompt = not prompts  # vqa from a column that is empty for this row
            if no_prompt:
                prompts = [Prompt("vqa", "", self.config.template_version, self.job.tasks.vqa)]
            ids = [self.processor.tokenizer.encode(build_prompt(p.query, (), p.template),
                                                   add_special_tokens=False) for p in prompts]
            rec = {k: row[k] for k in ("shard_id", "source_uri", "shard_total", "image_index", "key")}
            rec.update(status="ok", error_message=None, width=None, height=None, pixels=None,
                       prompts=to_json(prompts), prompt_ids=json.dumps(ids))
            if no_prompt:
                rec.update(status="no_questions", error_message="no questions for this image")
            elif row.get("read_error"):
                rec.update(status="read_error", error_message=row["read_error"])
            else:
                try:
                    data = row["image"] if row.get("image") is not None else self._fetch(row["image_uri"])
                except Exception as e:  # noqa: BLE001
                    rec.update(status="read_error", error_message=f"{type(e).__name__}: {e}")
                    data = None
                if data is not None:
                    try:
                        if len(data) == 0:
                            raise ValueError("empty image file (0 bytes)")
                        pixels, w, h = self._pixels(bytes(data))
                        rec.update(pixels=pixels.tobytes(), width=w, height=h)
                    except Image.DecompressionBombError as e:
                        rec.update(status="image_too_large", error_message=str(e))
                    except ValueError as e:
                        kind = "image_too_large" if "pixels" in str(e) else "decode_error"
                        rec.update(status=kind, error_message=str(e))
                    except Exception as e:  # noqa: BLE001 - any decoder failure is this row's error
                        rec.update(status="decode_error", error_message=f"{type(e).__name__}: {e}")
            out.append(rec)
        return pd.DataFrame(out, columns=PREPROCESSED_COLUMNS)


class Generate:
    """One model replica per actor (loaded once), driving the prefix-sharing `Engine`: one vision
    pass and one image prefix per image, all prompts of the batch's images decoded together."""

    def __init__(self, job: JobConfig, model_config: CogVLMConfig) -> None:
        self.job = job
        device = "cuda" if job.model.gpus_per_replica > 0 else "cpu"
        if device == "cpu":  # use the CPUs this replica reserved
            torch.set_num_threads(max(1, int(job.model.cpus_per_replica)))
        self.model = load_model(job.model.source, dtype=job.model.dtype, device=device,
                                cache_dir=job.model.cache_dir, storage_options=s3_options(job.s3))
        self.config = self.model.config
        self.engine = Engine(self.model, kv_cache_gb=job.model.kv_cache_gb,
                             vision_batch_size=job.model.batch_size, compile=job.model.compile)
        self.processor = CogVLMProcessor(load_tokenizer(job), self.config)
        self.fingerprint = weights_fingerprint(self.model.checkpoint_dir)

    def _prompts(self, prompts_json: str) -> list[Prompt]:
        return [Prompt(p["task"], p["query"], p["template"], getattr(self.job.tasks, p["task"]))
                for p in json.loads(prompts_json)]

    def _pixels(self, rows: list[dict[str, Any]]) -> torch.Tensor:
        S = self.config.image_size
        px = np.stack([np.frombuffer(r["pixels"], dtype=np.uint8).reshape(S, S, 3) for r in rows])
        return normalize(torch.from_numpy(px).to(self.model.device))  # (N, 3, S, S) float32

    def _too_long(self, n_text: int, max_new: int) -> str | None:
        last = 3 + n_text  # bos 0, boi 1, patches 2, eoi 3, text from 4
        limit = self.config.max_position_embeddings
        if last + max_new > limit:
            return (f"prompt ends at position {last}; with max_new_tokens={max_new} it passes "
                    f"max_position_embeddings={limit}")
        return None

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = batch.to_dict("records")
        out: list[dict[str, Any]] = []
        ok_rows = [r for r in rows if r["status"] == "ok"]
        feats = None
        if ok_rows:
            try:
                feats = self.engine.encode_images(self._pixels(ok_rows))
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: every prompt gets the error
                for r in ok_rows:
                    r.update(status="generation_error", error_message=f"vision: {type(e).__name__}: {e}")
        image_of = {id(r): i for i, r in enumerate(ok_rows)}
        work = []  # (row, prompt index, prompts of the image, prompt, text ids)
        for r in rows:
            prompts = self._prompts(r["prompts"])
            ids = json.loads(r["prompt_ids"])
            for j, (p, t) in enumerate(zip(prompts, ids)):
                if r["status"] != "ok":
                    out.append(self._row(r, j, len(ids), p, status=r["status"], error=r["error_message"]))
                elif (msg := self._too_long(len(t), p.settings.max_new_tokens)) is not None:
                    out.append(self._row(r, j, len(ids), p, status="prompt_too_long", error=msg))
                else:
                    work.append((r, j, len(ids), p, t))
        groups: dict[tuple, list] = defaultdict(list)  # prompts that may share a decode batch
        for item in work:
            s = item[3].settings
            groups[(s.temperature, s.top_p, s.top_k, s.seed)].append(item)
        for items in groups.values():
            out.extend(self._generate(items, feats, image_of))
        return pd.DataFrame(out, columns=OUTPUT_COLUMNS)

    def _generate(self, items: list, feats: torch.Tensor | None, image_of: dict[int, int]) -> list[dict[str, Any]]:
        s = items[0][3].settings
        reqs = [Request(t, image_of[id(r)], p.settings.max_new_tokens) for (r, _, _, p, t) in items]
        try:
            t0 = time.perf_counter()
            res = self.engine.generate(reqs, image_features=feats, temperature=s.temperature,
                                       top_p=s.top_p, top_k=s.top_k, seed=s.seed)
            dt = (time.perf_counter() - t0) / len(items)
        except Exception as e:  # noqa: BLE001 - isolate the failing prompt(s)
            if len(items) > 1:
                return [row for it in items for row in self._generate([it], feats, image_of)]
            r, j, n, p, _ = items[0]
            return [self._row(r, j, n, p, status="generation_error", error=f"{type(e).__name__}: {e}")]
        rows = []
        for (r, j, n, p, t), toks, k, why, pt in zip(items, res.tokens, res.num_tokens, res.finish_reasons,
                                                     res.prompt_tokens):
            text = self.processor.decode(toks)
            boxes = None
            if p.task == "grounding":
                g = parse_boxes(text, (r["width"], r["height"]))
                boxes = json.dumps(g.to_dict())
            rows.append(self._row(r, j, n, p, response=text, boxes=boxes, prompt_tokens=pt,
                                  output_tokens=k, finish_reason=why, generation_s=dt))
        return rows

    def _row(self, r: dict[str, Any], j: int, n: int, p: Prompt, *, status: str = "ok",
             error: str | None = None, response: str | None = None, boxes: str | None = None,
             prompt_tokens: int | None = None, output_tokens: int | None = None,
             finish_reason: str | None = None, generation_s: float | None = None) -> dict[str, Any]:
        return {
            "key": r["key"], "source_uri": r["source_uri"], "shard_id": r["shard_id"],
            "shard_total": r["shard_total"], "image_index": r["image_index"], "image_tasks": n,
            "task": p.task, "task_index": j, "prompt": p.query, "response": response, "boxes_json": boxes,
            "status": status, "error_message": error, "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens, "finish_reason": finish_reason, "generation_s": generation_s,
            "width": r["width"], "height": r["height"], "generation_settings": p.settings_json(),
            "model_source": self.job.model.source, "model_fingerprint": self.fingerprint,
        }
