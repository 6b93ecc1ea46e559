"""The two model-side stages as Ray Data UDF classes (callable on a plain DataFrame in tests),
and `model_stages`, which wires them onto a dataset: the block both the CLI job and the library
API (`pipeline.processor`) run.

`Preprocess` (CPU actors): raw bytes -> decoded, guarded, normalized pixels + token ids per prompt.
`Generate` (GPU actors): one model replica per actor, one continuous-batching engine fed by every
batch in flight on the actor.
Each input image leaves `Generate` as exactly one row per prompt, with a status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, AsyncIterator, Awaitable

import pandas as pd
import torch
from PIL import Image

from cogvlm import CogVLMProcessor, build_prompt, load_model, parse_boxes
from cogvlm.config import CogVLMConfig
from cogvlm.engine import Completion, Engine, Request
from cogvlm.memory import CUDA_CONTEXT_BYTES
from cogvlm.processor import normalize
from cogvlm.sampling import derive_seed
from cogvlm.weights import weights_fingerprint

from . import errors as st
from .config import JobConfig
from .crashes import Gate, isolating, process_isolating
from .engine_loop import EngineBroken, EngineLoop
from .errors import TransientError, describe, is_transient
from .faults import maybe_inject_fault, pause_s, worker_env
from .fit import (PREPROCESS_CPUS, PREPROCESS_MIN_ACTORS, DoesNotFit, engine_settings, gpu_bytes_per_replica,
                  replica_fit_error)
from .preflight import Prepared, load_tokenizer
from .rows import OUTPUT_COLUMNS, PASSTHROUGH, PREPROCESSED_COLUMNS, RECORD_COLUMNS
from .sink import PartSink
from .storage import ConfinedFetcher, FileTooLarge, UriRefused, s3_options
from .tasks import Prompt, expand, to_json
from .transport import UndecodableImage, pack, unpack

log = logging.getLogger(__name__)

# Images fetched at once per Preprocess worker (URI inputs: a HEAD and a GET each, bound by latency,
# not CPU). A constant, not a config key: it also caps the undecoded images a worker holds.
FETCH_CONCURRENCY = 16


class Preprocess:
    """Decode (EXIF-rotated RGB), guard sizes, resize/normalize, tokenize every prompt of the image."""

    def __init__(self, job: JobConfig, model_config: CogVLMConfig, crash_ledger: Any = None,
                 input_root: str | None = None) -> None:
        """`input_root`: the input's location as planned (default: `input.path`, as a folder)."""
        self.job = job
        self.config = model_config
        self.processor = CogVLMProcessor(load_tokenizer(job), model_config)
        self.crash_ledger = crash_ledger
        self.fetcher = ConfinedFetcher(input_root or job.input.path, job.input.allowed_uri_prefixes, job.s3,
                                       job.input.max_image_bytes, job.retry.deadline_s, job.retry.backoff_s)

    def _pixels(self, data: bytes) -> tuple[dict[str, Any], int, int]:
        """The image decoded in full -> its transport columns (pipeline.transport), width, height."""
        return pack(data, self.config.image_size, max_pixels=self.job.input.max_image_pixels)

    def prompts(self, questions: str | None) -> list[Prompt]:
        return expand(self.job.tasks, self.config.template_version, questions)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = process_isolating(self.crash_ledger, "preprocess", batch.to_dict("records"), self._process,
                                self._died, self.job.errors.max_crashes_per_image)
        return pd.DataFrame(out, columns=PREPROCESSED_COLUMNS)

    def _process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows' records, in order. Images behind URIs are fetched on threads, up to
        FETCH_CONCURRENCY rows ahead of the decoding, which stays serial."""
        out: list[dict[str, Any]] = []
        ahead: deque[tuple[dict[str, Any], dict[str, Any], Future | None]] = deque()
        with ThreadPoolExecutor(FETCH_CONCURRENCY, thread_name_prefix="preprocess-fetch") as pool:
            for row in rows:
                rec = self._start(row)
                fetch = None
                if rec["status"] == st.OK and row.get("image") is None:
                    fetch = pool.submit(self.fetcher.fetch, row["image_uri"], row["source_uri"])
                ahead.append((row, rec, fetch))
                if len(ahead) >= FETCH_CONCURRENCY:
                    out.append(self._finish(*ahead.popleft()))
            out.extend(self._finish(row, rec, fetch) for row, rec, fetch in ahead)
        return out

    def _record(self, row: dict[str, Any]) -> dict[str, Any]:
        prompts = self.prompts(row.get("questions"))
        no_prompt = not prompts  # vqa from a column that is empty for this row
        if no_prompt:
            prompts = [Prompt("vqa", "", self.config.template_version, self.job.tasks.vqa)]
        ids = [self.processor.tokenizer.encode(build_prompt(p.query, (), p.template),
                                               add_special_tokens=False) for p in prompts]
        rec = {k: row[k] for k in ("shard_id", "source_uri", "shard_total", "image_index", "key")}
        rec.update(status=st.OK, error_message=None, width=None, height=None, pixels=None, pixels_format=None,
                   prompts=to_json(prompts), prompt_ids=json.dumps(ids),
                   passthrough=row.get(PASSTHROUGH))  # a processor's user columns (pipeline.processor)
        if no_prompt:
            rec.update(status=st.NO_QUESTIONS, error_message="no questions for this image")
        return rec

    def _died(self, row: dict[str, Any], deaths: int) -> list[dict[str, Any]]:
        rec = self._record(row)
        rec.update(status=st.WORKER_DIED, error_message=f"the Preprocess worker process died {deaths} times "
                                                        f"while processing this image; skipped")
        return [rec]

    def _start(self, row: dict[str, Any]) -> dict[str, Any]:
        """The row's record, final unless its status is OK (its image is still to be read); the
        fault hook fires here, before any work on the image."""
        rec = self._record(row)
        if row.get("read_error"):  # first: a transient read must never pass as no_questions
            rec.update(status=row.get("read_status") or st.READ_ERROR, error_message=row["read_error"])
            return rec
        if rec["status"] == st.OK:
            maybe_inject_fault("preprocess", str(row["key"]))
        return rec

    def _finish(self, row: dict[str, Any], rec: dict[str, Any], fetch: Future | None) -> dict[str, Any]:
        """`rec` completed with the image: `row`'s bytes, or what `fetch` (`fetcher.fetch`) gave."""
        if rec["status"] != st.OK:
            return rec
        data = row.get("image")
        if fetch is not None:
            uri = row["image_uri"]
            try:
                data = fetch.result()
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
            columns, w, h = self._pixels(bytes(data))
            rec.update(columns, width=w, height=h)
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


@dataclasses.dataclass
class PendingImage:
    """An image on its way through the engine: its preprocessed row, how many prompts it has in
    all, and the ones the engine works on (task index, prompt, request); the others already have
    their error rows (prompt_too_long)."""

    row: dict[str, Any]
    prompts: int
    work: list[tuple[int, Prompt, Request]]

    @property
    def requests(self) -> list[Request]:
        return [req for _, _, req in self.work]


class Generate:
    """One model replica per actor, loaded once, running one continuous-batching `Engine`.

    `__call__` is an async generator: Ray Data runs several batches at once on the actor
    (`model.batches_in_flight`), all feeding the same engine, and an image's rows leave as soon
    as all its prompts are done. `run(batch)` is the same for a plain call (tests, benchmarks).
    """

    def __init__(self, job: JobConfig, model_config: CogVLMConfig, crash_ledger: Any = None,
                 whole_batches: bool = False, sink: PartSink | None = None) -> None:
        """`sink`: write each batch's rows to Parquet parts here and emit only their records
        (the CLI job); without it, the rows themselves leave (`whole_batches`: a batch's together)."""
        self.job = job
        self.whole_batches = whole_batches  # see model_stages
        self.sink = sink
        self.crash_ledger = crash_ledger
        m = job.model
        device = "cuda" if m.gpus_per_replica > 0 else "cpu"
        if device == "cpu":  # use the CPUs this replica reserved
            torch.set_num_threads(max(1, int(m.cpus_per_replica)))
        if device == "cuda":  # before loading: a GPU too small fails with what would fit
            free, total = torch.cuda.mem_get_info()
            # this replica's part, and no more than is free (others may hold some); the estimate
            # counts this process's CUDA context, already part of what is not free
            have = min(gpu_bytes_per_replica(job, total), free + CUDA_CONTEXT_BYTES)
            err = replica_fit_error(job, model_config, have,
                                    f"this replica's GPU ({torch.cuda.get_device_name()}, {total / 1e9:.1f} GB, "
                                    f"{free / 1e9:.1f} GB free) leaves it")
            if err:
                raise DoesNotFit(err)
        self.model = load_model(m.source, dtype=m.dtype, device=device, quantization=m.quantization,
                                quantize_vision=m.quantize_vision, cache_dir=m.cache_dir,
                                storage_options=s3_options(job.s3))
        self.config = self.model.config
        self.engine = Engine(self.model, device_share=min(1.0, m.gpus_per_replica) if device == "cuda" else 1.0,
                             **engine_settings(job, self.config))
        self.loop = EngineLoop(self.engine)
        self.gate = Gate()
        self.processor = CogVLMProcessor(load_tokenizer(job), self.config)
        self.fingerprint = weights_fingerprint(self.model.checkpoint_dir)
        self.weights = m.dtype + (f"+{m.quantization}" if m.quantization else "")  # provenance of each row
        self.worker = f"{os.uname().nodename}/{os.getpid()}"
        # `_pixels` (decode, resize, normalize) on this replica's CPUs, off the event loop
        self.decoder = ThreadPoolExecutor(max(1, int(m.cpus_per_replica)), thread_name_prefix="generate-decode")

    def _prompts(self, prompts_json: str) -> list[Prompt]:
        return [Prompt(p["task"], p["query"], p["template"], getattr(self.job.tasks, p["task"]))
                for p in json.loads(prompts_json)]

    def _pixels(self, row: dict[str, Any]) -> torch.Tensor:
        """(3, S, S) float32, on the CPU until admitted; forwarded image files are decoded here."""
        return normalize(unpack(row, self.config.image_size))

    async def _outputs(self, rows: list[dict[str, Any]]) -> AsyncIterator[list[dict[str, Any]]]:
        """The batch's output rows, a group at a time as images finish."""
        failed: list[PendingImage] = []
        async for out in isolating(self.crash_ledger, "generate", rows, lambda rs: self._process(rs, failed),
                                   self._died, self.job.errors.max_crashes_per_image, self.gate):
            yield out
        for image in failed:  # an engine round failed with these images in it: each alone now
            yield await self._alone(image)

    async def __call__(self, batch: pd.DataFrame) -> AsyncIterator[pd.DataFrame]:
        rows = batch.to_dict("records")
        if pause := pause_s("generate"):  # a test's slow replica
            await asyncio.sleep(pause)
        try:
            if self.sink is not None:
                out = [r async for group in self._outputs(rows) for r in group]
                records = await asyncio.to_thread(self.sink.write, out)
                yield pd.DataFrame(records, columns=RECORD_COLUMNS)
            elif self.whole_batches:
                yield pd.DataFrame([r async for out in self._outputs(rows) for r in out], columns=OUTPUT_COLUMNS)
            else:
                async for out in self._outputs(rows):
                    yield pd.DataFrame(out, columns=OUTPUT_COLUMNS)
        except EngineBroken as e:
            if self.crash_ledger is None:
                raise
            # this process can no longer generate: end it, so that Ray restarts the replica and
            # retries its batches (the crash ledger bounds how often one image may do this)
            log.error("%s; exiting so that the replica is restarted", e)
            os._exit(1)
        if self.crash_ledger is not None:
            self.crash_ledger.record_engine.remote(self.worker, self.loop.stats())

    def run(self, batch: pd.DataFrame) -> pd.DataFrame:
        """`__call__` as one plain call: every output row of `batch`."""

        async def collect() -> list[pd.DataFrame]:
            return [df async for df in self(batch)]

        frames = asyncio.run(collect())
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=OUTPUT_COLUMNS)

    def _died(self, r: dict[str, Any], deaths: int) -> list[dict[str, Any]]:
        prompts = self._prompts(r["prompts"])
        msg = f"the Generate worker process died {deaths} times while processing this image; skipped"
        return [self._row(r, j, len(prompts), p, status=st.WORKER_DIED, error=msg) for j, p in enumerate(prompts)]

    @staticmethod
    def _failure(e: BaseException, where: str) -> tuple[str, str]:
        """(status, message) for an exception: out of memory and the like may pass (TRANSIENT,
        left for the rerun); anything else is this input's GENERATION_ERROR."""
        if isinstance(e, UndecodableImage):  # its forwarded file did not decode here
            return st.DECODE_ERROR, f"{where}{describe(e)}"
        return (st.TRANSIENT if is_transient(e) else st.GENERATION_ERROR), f"{where}{describe(e)}"

    async def _process(self, rows: list[dict[str, Any]], failed: list[PendingImage],
                       ) -> AsyncIterator[list[dict[str, Any]]]:
        """Error rows at once; then each image's rows when its last prompt is done. Images in
        flight when the engine failed go to `failed`, for the caller to retry alone."""
        ready: list[dict[str, Any]] = []
        images: list[PendingImage] = []
        for r in rows:
            r = dict(r)
            prompts = self._prompts(r["prompts"])
            n = len(prompts)
            if r["status"] != st.OK:
                ready += [self._row(r, j, n, p, status=r["status"], error=r["error_message"])
                          for j, p in enumerate(prompts)]
                continue
            maybe_inject_fault("generate", str(r["key"]))
            work = []
            for j, (p, ids) in enumerate(zip(prompts, json.loads(r["prompt_ids"]))):
                s = p.settings
                req = Request(ids, 0, s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                              seed=derive_seed(s.seed, r["key"], j))  # the row's stream: (seed, key, task)
                if (why := self.engine.check(req, has_image=True)) is not None:
                    ready.append(self._row(r, j, n, p, status=st.PROMPT_TOO_LONG, error=why))
                else:
                    work.append((j, p, req))
            if work:
                images.append(PendingImage(r, n, work))
        if ready:
            yield ready
        # the batch's images enter the engine together (one admission round when it is free)
        submit: list[tuple[PendingImage, torch.Tensor]] = []
        loop = asyncio.get_running_loop()  # pixels made on the decode threads while the engine runs
        pixels = await asyncio.gather(*(loop.run_in_executor(self.decoder, self._pixels, image.row)
                                        for image in images), return_exceptions=True)
        for image, px in zip(images, pixels):
            if isinstance(px, BaseException):  # retried (and reported) alone, like an engine failure
                failed.append(image)
            else:
                submit.append((image, px))
        futures = self.loop.submit([(image.requests, px) for image, px in submit], id(rows))
        pending = {asyncio.ensure_future(self._image(image, f)): image for (image, _), f in zip(submit, futures)}
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            out: list[dict[str, Any]] = []
            for fut in done:
                item = pending.pop(fut)
                if isinstance(fut.exception(), EngineBroken):
                    raise fut.exception()
                if fut.exception() is not None:
                    failed.append(item)
                else:
                    out += fut.result()
            if out:
                yield out

    async def _alone(self, image: PendingImage) -> list[dict[str, Any]]:
        """An image's prompts with nothing else in the engine: their rows, or their own errors."""
        r, n = image.row, image.prompts
        async with self.gate.exclusive():
            try:
                pixels = self._pixels(r)
                return await self._image(image, self.loop.generate(image.requests, pixels))
            except EngineBroken:
                raise
            except Exception as e:  # noqa: BLE001 - it fails alone: this image's error
                status, msg = self._failure(e, "")
        return [self._row(r, j, n, p, status=status, error=msg) for j, p, _ in image.work]

    async def _image(self, image: PendingImage, future: Awaitable[list[Completion]]) -> list[dict[str, Any]]:
        r, n = image.row, image.prompts
        t0 = time.perf_counter()
        done = await future
        dt = (time.perf_counter() - t0) / len(image.work)
        rows = []
        for (j, p, _), c in zip(image.work, done):
            if c.error is not None:  # out of memory even alone: this prompt's error
                rows.append(self._row(r, j, n, p, status=st.GENERATION_ERROR, error=c.error))
                continue
            text = self.processor.decode(c.tokens)
            boxes = None
            if p.task == "grounding":
                boxes = json.dumps(parse_boxes(text, (r["width"], r["height"])).to_dict())
            rows.append(self._row(r, j, n, p, response=text, boxes=boxes, prompt_tokens=c.prompt_tokens,
                                  output_tokens=len(c.tokens), finish_reason=c.finish_reason, generation_s=dt))
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
            "width": r["width"], "height": r["height"], "generation_settings": p.settings_json(weights=self.weights),
            "model_source": self.job.model.source, "model_fingerprint": self.fingerprint,
            PASSTHROUGH: r.get(PASSTHROUGH),
        }


def model_stages(ds: Any, prepared: Prepared, crash_ledger: Any, whole_batches: bool = False,
                 sink: PartSink | None = None) -> Any:
    """Rows with the reader's columns (`rows.ROW_COLUMNS`[, passthrough]) -> one row per (image,
    prompt): Preprocess (CPU actors) -> Generate (one model replica per actor).

    `whole_batches`: Generate emits a batch's rows together (for consumers that cannot drop the
    rows a retried batch repeats). `sink` (the CLI job's): Generate writes the rows itself and
    emits one small record per written part (`rows.RECORD_COLUMNS`) instead."""
    from ray.data import ActorPoolStrategy

    cfg, m = prepared.cfg, prepared.cfg.model
    hooks = worker_env()  # the tests' fault hooks reach the stage workers through their runtime env
    kwargs = {"job": cfg, "model_config": prepared.mcfg, "crash_ledger": crash_ledger}
    ds = ds.map_batches(Preprocess, fn_constructor_kwargs=dict(kwargs, input_root=prepared.input_root),
                        compute=ActorPoolStrategy(min_size=PREPROCESS_MIN_ACTORS,
                                                  max_size=max(PREPROCESS_MIN_ACTORS, m.preprocess_workers)),
                        num_cpus=PREPROCESS_CPUS, batch_size=16, batch_format="pandas", **hooks)
    # Generate's __call__ is async: a replica takes `batches_in_flight` Ray batches at once and
    # feeds them all to its one engine, so the device never waits for the next batch
    return ds.map_batches(Generate, fn_constructor_kwargs=dict(kwargs, whole_batches=whole_batches, sink=sink),
                          compute=ActorPoolStrategy(min_size=m.min_replicas, max_size=m.max_replicas,
                                                    max_tasks_in_flight_per_actor=m.batches_in_flight,
                                                    max_concurrent_calls_per_actor=m.batches_in_flight),
                          num_gpus=m.gpus_per_replica, num_cpus=m.cpus_per_replica,
                          accelerator_type=m.accelerator_type if m.gpus_per_replica > 0 else None,
                          batch_size=m.batch_size, batch_format="pandas", **hooks)
