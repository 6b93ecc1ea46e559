"""Loading release checkpoints: local dir, `s3://` prefix or hub id -> model on the chosen device.

The model is built on `meta`; each tensor is read memory-mapped from safetensors, converted to the
target dtype/device one at a time and assigned, so a checkpoint is never held twice in memory.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from torch import nn

from .config import CogVLMConfig
from .decoder import CogVLMForCausalLM
from .quantization import (QuantizationReport, check_quantization, fp8_gemm_error, module_bytes, quantize_module_,
                           target_modules)

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: names the offending keys."""


# --- sources ----------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    return Path(os.environ.get("COGVLM_CACHE", Path.home() / ".cache" / "cogvlm"))


def resolve_source(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                   storage_options: dict[str, Any] | None = None,
                   patterns: list[str] | None = None) -> Path:
    """A local directory for `source`: itself, an `s3://` prefix downloaded once, or a hub snapshot.

    `patterns` (fnmatch on file names) limits a download, e.g. to the tokenizer files.
    """
    src = str(source)
    if src.startswith("s3://"):
        return _download_s3(src, Path(cache_dir) if cache_dir else default_cache_dir(),
                            storage_options or {}, patterns)
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"checkpoint source {src!r} is a file; give its directory")
    if src.startswith((".", "/", "~")) or src.count("/") != 1:
        raise CheckpointError(f"checkpoint directory {src!r} does not exist")
    return _download_hub(src, cache_dir, patterns)


# --- s3:// download: once per node, files and byte ranges in parallel -------------------------

DOWNLOAD_WORKERS = 8  # concurrent range requests, across all files of a checkpoint
PART_BYTES = 64 << 20  # files larger than this are fetched as concurrent byte ranges
LOCK_TIMEOUT_S = 2 * 3600.0  # how long to wait for another process's download (35 GB)
LOCK_TIMEOUT_ENV = "COGVLM_DOWNLOAD_LOCK_TIMEOUT_S"
LOCK_FILE = ".download.lock"


def _download_s3(uri: str, cache_dir: Path, storage_options: dict[str, Any],
                 patterns: list[str] | None = None) -> Path:
    """Download `uri` into `cache_dir/s3/<prefix>` once per cache directory.

    Processes sharing the cache directory (replicas on one node) take a file lock on it: the
    first downloads, the others wait and then reuse its files. The lock is an OS lock, so a
    process that dies while downloading releases it; the next one removes its `.part` files.
    """
    prefix = uri[len("s3://"):].rstrip("/")
    local = cache_dir / "s3" / prefix
    done = local / (".complete" if patterns is None else ".complete-" + hashlib.sha1(
        json.dumps(sorted(patterns)).encode()).hexdigest()[:12])
    if done.exists() or (local / ".complete").exists():
        return local
    local.mkdir(parents=True, exist_ok=True)
    with _download_lock(local, uri):
        if done.exists() or (local / ".complete").exists():
            log.info("reusing %s: downloaded into %s by another process", uri, local)
            return local
        fs = _s3_filesystem(storage_options)
        sizes = _list_checkpoint(fs, uri, prefix, patterns)
        for stale in local.rglob("*.part-*"):  # left by a process that died holding the lock
            log.info("removing %s, left by an interrupted download", stale)
            stale.unlink()
        _fetch_files(fs, uri, {name: (local / name[len(prefix):].lstrip("/"), size)
                          for name, size in sizes.items()})
        done.write_text(json.dumps(sorted(sizes)))
    return local


def _s3_filesystem(storage_options: dict[str, Any]) -> Any:
    import s3fs  # only needed for s3:// sources

    # without an endpoint_url here, botocore reads AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL itself
    return s3fs.S3FileSystem(**storage_options)


@contextlib.contextmanager
def _download_lock(local: Path, uri: str) -> Iterator[None]:
    """Hold the download lock of `local`; wait (logged) while another process holds it."""
    from filelock import FileLock, Timeout

    raw = os.environ.get(LOCK_TIMEOUT_ENV)
    try:
        timeout = float(raw) if raw else LOCK_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{LOCK_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    lock = FileLock(local / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting up to %.0f s for another process downloading %s into %s (lock %s)",
                 timeout, uri, local, lock.lock_file)
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise TimeoutError(f"another process has been downloading {uri} into {local} for over "
                               f"{timeout:.0f} s (lock {lock.lock_file}); raise {LOCK_TIMEOUT_ENV} "
                               f"or check that process") from None
    try:
        yield
    finally:
        lock.release()


def _list_checkpoint(fs: Any, uri: str, prefix: str, patterns: list[str] | None) -> dict[str, int]:
    """Object name -> size for the files to download; `CheckpointError` when there are none."""
    try:
        entries = [e for e in fs.find(prefix, detail=True).values() if e["type"] == "file"]
    except Exception as e:  # noqa: BLE001 - any backend error becomes a clear message
        raise CheckpointError(f"cannot list checkpoint {uri}: {e}") from e
    sizes = {e["name"]: int(e["size"]) for e in entries if not e["name"].endswith("/")}
    if patterns is not None:
        sizes = {f: n for f, n in sizes.items()
                 if any(fnmatch.fnmatch(f.rsplit("/", 1)[-1], p) for p in patterns)}
        if not sizes:
            raise CheckpointError(f"no files matching {patterns} under {uri}")
    elif not any(f.endswith((".safetensors", INDEX_FILE)) for f in sizes):
        raise CheckpointError(f"no safetensors files under {uri}")
    return sizes


def _fetch_files(fs: Any, uri: str, files: dict[str, tuple[Path, int]]) -> None:
    """Fetch every object (name -> (destination, size)) as byte ranges on one thread pool.

    Each file is written into a preallocated `<name>.part-<pid>`; once its last range is in, it is
    checked against its listed size and renamed into place. A destination that already has its
    listed size is kept: only a complete file is ever renamed there (by an interrupted earlier run).
    """
    todo = {name: (dest, size) for name, (dest, size) in sorted(files.items())
            if not (dest.is_file() and dest.stat().st_size == size)}
    for name in sorted(set(files) - set(todo)):
        log.info("keeping %s, downloaded by an earlier run", files[name][0])
    if not todo:
        return
    log.info("downloading %d files (%.2f GB) of %s with %d workers", len(todo),
             sum(size for _, size in todo.values()) / 1e9, uri, DOWNLOAD_WORKERS)
    opened: list[_PartFile] = []
    try:
        parts: list[_Part] = []
        for name, (dest, size) in todo.items():
            dest.parent.mkdir(parents=True, exist_ok=True)
            f = _PartFile(name, dest, size)
            opened.append(f)
            ranges = [_Part(f, start, min(start + PART_BYTES, size)) for start in range(0, size, PART_BYTES)]
            f.parts_left = len(ranges)
            parts += ranges
            if not ranges:  # an empty file
                f.finish()
        with ThreadPoolExecutor(DOWNLOAD_WORKERS, thread_name_prefix="s3-download") as pool:
            futures = {pool.submit(_fetch_part, fs, p): p for p in parts}
            try:
                for fut in as_completed(futures):
                    fut.result()
                    f = futures[fut].file
                    f.parts_left -= 1
                    if f.parts_left == 0:
                        f.finish()
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    finally:
        for f in opened:
            f.discard()


class _PartFile:
    """A destination being written: `<dest>.part-<pid>`, preallocated to the object's size."""

    def __init__(self, name: str, dest: Path, size: int) -> None:
        self.name, self.dest, self.size = name, dest, size
        self.tmp = dest.with_name(f"{dest.name}.part-{os.getpid()}")
        self.fd: int | None = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, size)
        self.written = 0
        self.parts_left = 0
        self._lock = threading.Lock()

    def write(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n
        with self._lock:
            self.written += len(data)

    def finish(self) -> None:
        """Check the size against the listing and rename into place."""
        os.close(self.fd)
        self.fd = None
        on_disk = self.tmp.stat().st_size
        if self.written != self.size or on_disk != self.size:
            raise OSError(f"download of s3://{self.name} is incomplete: {self.written} bytes received, "
                          f"{on_disk} on disk, {self.size} listed")
        self.tmp.replace(self.dest)
        log.info("downloaded s3://%s (%d bytes)", self.name, self.size)

    def discard(self) -> None:
        """After a failure: close and remove the `.part` file (a no-op once renamed)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class _Part:
    file: _PartFile
    start: int
    end: int  # exclusive


def _fetch_part(fs: Any, part: _Part) -> None:
    data = fs.cat_file(part.file.name, start=part.start, end=part.end)
    if len(data) != part.end - part.start:
        raise OSError(f"s3://{part.file.name} bytes {part.start}-{part.end}: got {len(data)} bytes, "
                      f"expected {part.end - part.start}")
    part.file.write(data, part.start)


def _download_hub(repo_id: str, cache_dir: str | os.PathLike | None,
                  patterns: list[str] | None = None) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, cache_dir=cache_dir,
                                 allow_patterns=patterns or ["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"{repo_id!r} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {e}). Download it where the network allows and pass the directory, "
            f"or an s3:// prefix.") from e
    return Path(path)


# --- reading ----------------------------------------------------------------------------------

def read_header(path: Path) -> dict[str, Any]:
    """A safetensors file's header (tensor name -> dtype, shape, data_offsets), checked against the
    file's size, so that a truncated or corrupt file fails here with its name, not in a worker."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= size - 8:
                raise CheckpointError(f"{path.name} is not a whole safetensors file: {size} bytes, header length "
                                      f"{n if n >= 0 else 'missing'} (truncated or corrupt; download it again)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path.name} is missing from {path.parent}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path.name} is not a safetensors file: its header is not JSON (corrupt?)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name} is not a safetensors file: its header is not a mapping")
    header.pop("__metadata__", None)
    try:
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise CheckpointError(f"{path.name} is not a safetensors file: malformed tensor entries") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{path.name} is truncated: its tensors need {8 + n + end} bytes, the file has "
                              f"{size} (download it again)")
    return header


def check_weight_files(files: dict[str, Path]) -> None:
    """Every weight file of a checkpoint is there and whole (headers only: no tensor is read)."""
    for path in sorted(set(files.values())):
        read_header(path)


def weight_files(ckpt_dir: Path) -> dict[str, Path]:
    """Map every checkpoint key to its safetensors file (sharded via the index, or single file)."""
    index = ckpt_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{INDEX_FILE} in {ckpt_dir} is not a weight index (corrupt?)") from None
        return {k: ckpt_dir / f for k, f in weight_map.items()}
    single = ckpt_dir / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"{ckpt_dir} has neither {INDEX_FILE} nor {SINGLE_FILE}")
    return {k: single for k in read_header(single)}


def _shapes(files: dict[str, Path], keys: set[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes from the safetensors headers, reading each file's header once."""
    keys = set(files) if keys is None else keys
    by_file: dict[Path, list[str]] = {}
    for k in keys:
        by_file.setdefault(files[k], []).append(k)
    out = {}
    for path, ks in by_file.items():
        header = read_header(path)
        for k in ks:
            if k not in header:
                raise CheckpointError(f"{path.name} has no tensor {k} (the weight index names it there)")
            out[k] = tuple(header[k]["shape"])
    return out


def read_config(ckpt_dir: Path, files: dict[str, Path] | None = None) -> CogVLMConfig:
    """`config.json` as published; v1/v2 and the KV-head count are read off the weights' structure."""
    path = ckpt_dir / "config.json"
    if not path.exists():
        raise CheckpointError(f"{ckpt_dir} has no config.json")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"config.json in {ckpt_dir} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"config.json in {ckpt_dir} is not a mapping")
    archs = raw.get("architectures") or []
    if not isinstance(raw.get("vision_config"), dict) or (archs and not any("cogvlm" in str(a).lower() for a in archs)):
        what = ", ".join(map(str, archs)) or raw.get("model_type") or "no vision_config"
        raise CheckpointError(f"config.json in {ckpt_dir} is not a CogVLM model's ({what}); model.source must be a "
                              f"CogVLM release checkpoint (e.g. THUDM/cogvlm-chat-hf)")
    files = files if files is not None else weight_files(ckpt_dir)
    version = 2 if any(k.startswith("model.vision.conv.") for k in files) else 1
    kv_heads = None
    qkv_key = "model.layers.0.self_attn.language_expert_query_key_value.weight"
    try:
        if raw.get("num_multi_query_heads") is None and qkv_key in files and files[qkv_key].exists():
            rows = _shapes(files, {qkv_key})[qkv_key][0]
            hidden = raw["hidden_size"]
            head_dim = hidden // raw["num_attention_heads"]
            kv_heads = (rows - hidden) // (2 * head_dim)
        return CogVLMConfig.from_hf_dict(raw, version=version, num_kv_heads=kv_heads)
    except (KeyError, TypeError, ZeroDivisionError) as e:
        raise CheckpointError(f"config.json in {ckpt_dir} does not describe a CogVLM model: "
                              f"{type(e).__name__} {e}") from None


def weights_fingerprint(ckpt_dir: str | os.PathLike) -> str:
    """Short sha256 over the weight index (or the single file's safetensors header)."""
    ckpt_dir = Path(ckpt_dir)
    h = hashlib.sha256()
    index = ckpt_dir / INDEX_FILE
    if index.exists():
        h.update(index.read_bytes())
    else:
        with open(ckpt_dir / SINGLE_FILE, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(n))
    cfg = ckpt_dir / "config.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    return h.hexdigest()[:16]


def _iter_tensors(files: dict[str, Path], keys: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    by_file: dict[Path, list[str]] = {}
    for k in sorted(keys):
        by_file.setdefault(files[k], []).append(k)
    for path, ks in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as f:  # memory-mapped
            for k in ks:
                yield k, f.get_tensor(k)


def check_keys(model: CogVLMForCausalLM, files: dict[str, Path]) -> set[str]:
    """Every checkpoint key (bar `inv_freq`) must match a model tensor in name and shape."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    present = {k for k in files if not k.endswith(IGNORED_SUFFIXES)}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:10])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}")
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(parts))
    shapes = _shapes(files, present)
    for k in sorted(present):
        shape = shapes[k]
        if shape != expected[k]:
            raise CheckpointError(f"shape mismatch for {k}: checkpoint {list(shape)}, "
                                  f"model {list(expected[k])}")
    return present


def check_checkpoint(ckpt_dir: str | os.PathLike) -> CogVLMConfig:
    """Validate a local checkpoint's keys and shapes from the headers alone; return its config."""
    ckpt_dir = Path(ckpt_dir)
    files = weight_files(ckpt_dir)
    check_weight_files(files)
    config = read_config(ckpt_dir, files)
    with torch.device("meta"):
        model = CogVLMForCausalLM(config)
    check_keys(model, files)
    return config


def load_state_dict_into(model: CogVLMForCausalLM, files: dict[str, Path], dtype: torch.dtype,
                         device: torch.device, quantization: str | None = None,
                         quantize_vision: bool = True, fp8_reference: bool = False) -> QuantizationReport:
    """Check every key and shape, then assign converted tensors one by one.

    With `quantization`, each target linear weight is quantized as soon as it is on the device,
    so the device never holds more than one layer's weight in `dtype` beside the quantized ones.
    """
    present = check_keys(model, files)
    quantization = check_quantization(quantization)
    report = QuantizationReport(quantization, quantize_vision, fp8_reference=fp8_reference)
    targets = {f"{name}.weight": module for name, module in target_modules(model, quantize_vision, quantization)} \
        if quantization else {}
    state: dict[str, torch.Tensor] = {}
    for k, t in _iter_tensors(files, present):
        if k in targets:
            linear = targets[k]
            linear.weight = nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)
            name = k[: -len(".weight")]
            done = quantize_module_(model, name, linear, quantization, fp8_reference)
            (report.quantized if done else report.skipped).append(name)
        else:
            state[k] = t.to(device=device, dtype=dtype)
        del t
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) != set(targets):
        raise CheckpointError(f"loading left keys unassigned: {sorted(set(missing) - set(targets))[:10]}, "
                              f"unexpected: {sorted(unexpected)[:10]}")
    if report.skipped:
        log.info("%s", report.describe())
    return report


def load_model(source: str | os.PathLike, dtype: torch.dtype | str = torch.bfloat16,
               device: torch.device | str = "cpu", *, quantization: str | None = None,
               quantize_vision: bool = True, cache_dir: str | os.PathLike | None = None,
               storage_options: dict[str, Any] | None = None, fp8_reference: bool = False) -> CogVLMForCausalLM:
    """Load a release checkpoint (local dir, `s3://bucket/prefix`, or hub id) in eval mode.

    `quantization` ("int8" / "int4", see `cogvlm.quantization`) quantizes the linear layers of the
    decoder, and of the vision tower unless `quantize_vision=False`, while loading. "fp8" runs the
    visual expert's linear layers, and the vision tower's unless `quantize_vision=False`, as float8
    GEMMs; it needs a CUDA GPU of compute capability >= 8.9 (ValueError before anything is read
    otherwise), unless `fp8_reference=True`: the same rounding by a float32 matmul on any device,
    for tests and drift measurements only. The model's `quantization` attribute holds what was
    done (a `QuantizationReport`).
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    quantization = check_quantization(quantization)
    device = torch.device(device)
    if quantization == "fp8" and not fp8_reference and (err := fp8_gemm_error(device)):
        raise ValueError(err)
    ckpt_dir = resolve_source(source, cache_dir, storage_options)
    files = weight_files(ckpt_dir)
    check_weight_files(files)
    config = read_config(ckpt_dir, files)
    with torch.device("meta"):
        model = CogVLMForCausalLM(config)
    report = load_state_dict_into(model, files, dtype, device, quantization, quantize_vision, fp8_reference)
    model.reset_buffers()
    model.source = str(source)  # type: ignore[attr-defined]
    model.checkpoint_dir = ckpt_dir  # type: ignore[attr-defined]
    model.quantization = report  # type: ignore[attr-defined]
    if quantization:
        log.info("loaded %s: %s, %.2f GB of weights", source, report.describe(), module_bytes(model) / 1e9)
    return model.eval()
