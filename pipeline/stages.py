"""The two model-side stages as Ray Data UDF classes (callable on a plain DataFrame in tests).

`Preprocess` (CPU actors): raw bytes -> decoded, guarded, normalized pixels + token ids per prompt.
`Generate` (GPU actors): one model replica per actor, one vision pass per image, batched generation.
Each input image leaves `Generate` as exactly one row per prompt, with a status.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections import defaultdict
from dataclasses import dataclass
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

from . import errors as st
from .config import JobConfig
from .crashes import maybe_inject_fault, process_isolating
from .errors import TransientError, describe, is_transient, retry
from .storage import FileTooLarge, UriPolicy, UriRefused, filesystem, read_capped, s3_options
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
    # never run code shipped with a checkpoint (and never ask about it on stdin: workers have none)
    return AutoTokenizer.from_pretrained(str(local), trust_remote_code=False)


class Preprocess:
    """Decode (EXIF-rotated RGB), guard sizes, resize/normalize, tokenize every prompt of the image."""

    def __init__(self, job: JobConfig, model_config: CogVLMConfig, crash_ledger: Any = None,
                 input_root: str | None = None) -> None:
        """`input_root`: the input's location as planned (default: `input.path`, as a folder)."""
        self.job = job
        self.config = model_config
        self.processor = CogVLMProcessor(load_tokenizer(job), model_config)
        self.crash_ledger = crash_ledger
        self.uris = UriPolicy(input_root or job.input.path, job.input.allowed_uri_prefixes)
        self._fs: dict[str, Any] = {}

    def _fetch(self, uri: str, source_uri: str) -> bytes:
        """The bytes behind a data-borne URI: confined, regular files only, size-capped while
        reading, transient failures retried."""
        scheme, path = self.uris.resolve(uri, base=posixpath.dirname(source_uri))
        if scheme not in self._fs:
            self._fs[scheme] = filesystem("s3://" if scheme == "s3" else "/", self.job.s3)[0]
        fs = self._fs[scheme]
        return retry(lambda: read_capped(fs, path, self.job.input.max_image_bytes), f"fetching {uri}",
                     self.job.retry.deadline_s, self.job.retry.backoff_s)

    def _pixels(self, data: bytes) -> tuple[np.ndarray, int, int]:
        image = open_image(data, max_pixels=self.job.input.max_image_pixels)
        w, h = image.size
        return resize_image(image, self.config.image_size), w, h  # uint8 (S, S, 3)

    def prompts(self, questions: str | None) -> list[Prompt]:
        return expand(self.job.tasks, self.config.template_version, questions)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = process_isolating(self.crash_ledger, "preprocess", batch.to_dict("records"), self._process,
                                self._died, self.job.errors.max_crashes_per_image)
        return pd.DataFrame(out, columns=PREPROCESSED_COLUMNS)

    def _process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [self._one(row) for row in rows]

    def _record(self, row: dict[str, Any]) -> dict[str, Any]:
        prompts = self.prompts(row.get("questions"))
        no_prompt = not prompts  # vqa from a column that is empty for this row
        if no_prompt:
            prompts = [Prompt("vqa", "", self.config.template_version, self.job.tasks.vqa)]
        ids = [self.processor.tokenizer.encode(build_prompt(p.query, (), p.template),
                                               add_special_tokens=False) for p in prompts]
        rec = {k: row[k] for k in ("shard_id", "source_uri", "shard_total", "image_index", "key")}
        rec.update(status=st.OK, error_message=None, width=None, height=None, pixels=None,
                   prompts=to_json(prompts), prompt_ids=json.dumps(ids))
        if no_prompt:
            rec.update(status=st.NO_QUESTIONS, error_message="no questions for this image")
        return rec

    def _died(self, row: dict[str, Any], deaths: int) -> list[dict[str, Any]]:
        rec = self._record(row)
        rec.update(status=st.WORKER_DIED, error_message=f"the Preprocess worker process died {deaths} times "
                                                        f"while processing this image; skipped")
        return [rec]

    def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        rec = self._record(row)
        if row.get("read_error"):  # first: a transient read must never pass as no_questions
            rec.update(status=row.get("read_status") or st.READ_ERROR, error_message=row["read_error"])
            return rec
        if rec["status"] != st.OK:
            return rec
        maybe_inject_fault("preprocess", str(row["key"]))
        data = row.get("image")
        if data is None:
            uri = row["image_uri"]
            try:
                data = self._fetch(uri, row["source_uri"])
            except UriRefused as e:
                rec.update(status=st.READ_ERROR, error_message=str(e))
            except FileTooLarge as e:
                rec.update(status=st.IMAGE_TOO_LARGE, error_message=str(e))
            except TransientError as e:
                rec.update(status=st.TRANSIENT, error_message=str(e))
            except FileNotFoundError:
                rec.update(status=st.READ_ERROR, error_message=f"not found: {uri}")
            except PermissionError:
                rec.update(status=st.READ_ERROR, error_message=f"access denied: {uri}")
            except IsADirectoryError:
                rec.update(status=st.READ_ERROR, error_message=f"is a directory: {uri}")
            except Exception as e:  # noqa: BLE001
                rec.update(status=st.READ_ERROR, error_message=f"{uri}: {describe(e)}")
            if rec["status"] != st.OK:
                return rec
        try:
            if len(data) == 0:
                raise ValueError("empty image file (0 bytes)")
            pixels, w, h = self._pixels(bytes(data))
            rec.update(pixels=pixels.tobytes(), width=w, height=h)
        except Image.DecompressionBombError as e:
            rec.update(status=st.IMAGE_TOO_LARGE, error_message=describe(e))
        except MemoryError as e:
            rec.update(status=st.TRANSIENT, error_message=describe(e))
        except ValueError as e:
            kind = st.IMAGE_TOO_LARGE if "pixels" in str(e) else st.DECODE_ERROR
            rec.update(status=kind, error_message=describe(e))
        except Exception as e:  # noqa: BLE001 - any decoder failure is this row's error
            rec.update(status=st.DECODE_ERROR, error_message=describe(e))
        return rec


@dataclass
class PendingPrompt:
    """One prompt of one image waiting for generation."""

    row: dict[str, Any]  # the image's preprocessed row
    index: int  # the prompt's index among the image's prompts
    count: int  # how many prompts the image has
    prompt: Prompt
    text_ids: list[int]


class Generate:
    """One model replica per actor (loaded once), driving the prefix-sharing `Engine`: one vision
    pass and one image prefix per image, all prompts of the batch's images decoded together."""

    def __init__(self, job: JobConfig, model_config: CogVLMConfig, crash_ledger: Any = None) -> None:
        self.job = job
        self.crash_ledger = crash_ledger
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
        out = process_isolating(self.crash_ledger, "generate", batch.to_dict("records"), self._process,
                                self._died, self.job.errors.max_crashes_per_image)
        return pd.DataFrame(out, columns=OUTPUT_COLUMNS)

    def _died(self, r: dict[str, Any], deaths: int) -> list[dict[str, Any]]:
        prompts = self._prompts(r["prompts"])
        msg = f"the Generate worker process died {deaths} times while processing this image; skipped"
        return [self._row(r, j, len(prompts), p, status=st.WORKER_DIED, error=msg) for j, p in enumerate(prompts)]

    @staticmethod
    def _failure(e: BaseException, where: str) -> tuple[str, str]:
        """(status, message) for an exception: out of memory and the like may pass (TRANSIENT,
        left for the rerun); anything else is this input's GENERATION_ERROR."""
        return (st.TRANSIENT if is_transient(e) else st.GENERATION_ERROR), f"{where}{describe(e)}"

    def _encode(self, rows: list[dict[str, Any]]) -> torch.Tensor | None:
        """Image features for `rows`; on failure each image alone, failing ones marked on the row."""
        if not rows:
            return None
        try:
            return self.engine.encode_images(self._pixels(rows))
        except Exception:  # noqa: BLE001 - find the image(s) that fail alone
            if len(rows) == 1:
                raise
        feats = []
        for r in rows:
            try:
                feats.append(self.engine.encode_images(self._pixels([r])))
            except Exception as e:  # noqa: BLE001
                r["status"], r["error_message"] = self._failure(e, "vision: ")
                feats.append(None)
        shape = next((f for f in feats if f is not None), None)
        if shape is None:
            return None
        return torch.cat([f if f is not None else torch.zeros_like(shape) for f in feats])

    def _process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows = [dict(r) for r in rows]
        out: list[dict[str, Any]] = []
        ok_rows = [r for r in rows if r["status"] == st.OK]
        for r in ok_rows:
            maybe_inject_fault("generate", str(r["key"]))
        try:
            feats = self._encode(ok_rows)
        except Exception as e:  # noqa: BLE001 - a single image whose vision pass fails
            feats = None
            ok_rows[0]["status"], ok_rows[0]["error_message"] = self._failure(e, "vision: ")
        image_of = {id(r): i for i, r in enumerate(ok_rows)}
        work: list[PendingPrompt] = []
        for r in rows:
            prompts = self._prompts(r["prompts"])
            ids = json.loads(r["prompt_ids"])
            for j, (p, t) in enumerate(zip(prompts, ids)):
                if r["status"] != st.OK:
                    out.append(self._row(r, j, len(ids), p, status=r["status"], error=r["error_message"]))
                elif (msg := self._too_long(len(t), p.settings.max_new_tokens)) is not None:
                    out.append(self._row(r, j, len(ids), p, status=st.PROMPT_TOO_LONG, error=msg))
                else:
                    work.append(PendingPrompt(r, j, len(ids), p, t))
        groups: dict[tuple, list[PendingPrompt]] = defaultdict(list)  # prompts that may share a batch
        for item in work:
            s = item.prompt.settings
            groups[(s.temperature, s.top_p, s.top_k, s.seed)].append(item)
        for items in groups.values():
            out.extend(self._generate(items, feats, image_of))
        return out

    def _generate(self, items: list[PendingPrompt], feats: torch.Tensor | None,
                  image_of: dict[int, int]) -> list[dict[str, Any]]:
        s = items[0].prompt.settings
        reqs = [Request(it.text_ids, image_of[id(it.row)], it.prompt.settings.max_new_tokens) for it in items]
        try:
            t0 = time.perf_counter()
            res = self.engine.generate(reqs, image_features=feats, temperature=s.temperature,
                                       top_p=s.top_p, top_k=s.top_k, seed=s.seed)
            dt = (time.perf_counter() - t0) / len(items)
        except Exception as e:  # noqa: BLE001 - isolate the failing prompt(s)
            if len(items) > 1:
                return [row for it in items for row in self._generate([it], feats, image_of)]
            it = items[0]
            status, msg = self._failure(e, "")
            return [self._row(it.row, it.index, it.count, it.prompt, status=status, error=msg)]
        rows = []
        for it, toks, k, why, pt in zip(items, res.tokens, res.num_tokens, res.finish_reasons, res.prompt_tokens):
            text = self.processor.decode(toks)
            boxes = None
            if it.prompt.task == "grounding":
                g = parse_boxes(text, (it.row["width"], it.row["height"]))
                boxes = json.dumps(g.to_dict())
            rows.append(self._row(it.row, it.index, it.count, it.prompt, response=text, boxes=boxes,
                                  prompt_tokens=pt, output_tokens=k, finish_reason=why, generation_s=dt))
        return rows

    def _row(self, r: dict[str, Any], j: int, n: int, p: Prompt, *, status: str = st.OK,
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
