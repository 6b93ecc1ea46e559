"""Weight-only int8 / int4 quantization of the linear layers, with torchao, applied while loading.

Quantized: every `nn.Linear` of the decoder layers (both experts: query_key_value, dense, the MLPs)
and, with `vision=True`, of the vision tower and its GLU adapter. Kept in the load dtype:
embeddings, norms, `lm_head`, the patch and v2 convolutions, boi/eoi.

- int8: torchao `Int8WeightOnlyConfig` (per output channel, symmetric), CPU and CUDA.
- int4: groups of 128 input columns (asymmetric; scales and zeros chosen by HQQ). On CUDA torchao's
  `Int4WeightOnlyConfig` in the `tile_packed_to_4d` format (tinygemm kernel, bf16 only, compute
  capability >= 8.0); on CPU torchao's `Int4OpaqueTensor` (the `_weight_int4pack_mm_for_cpu`
  kernel), with the group size lowered to 64 or 32 where 128 does not divide the input width;
  use it with bf16 activations (with fp32 ones the CPU kernel ran 60x slower than bf16's).
  torchao 0.18's default int4 format needs the `mslk` kernels, which have no release, so the
  formats are named here.

A layer whose shape the int4 kernels cannot take stays in the load dtype and is listed in
`QuantizationReport.skipped`.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)

QUANTIZATIONS = ("int8", "int4")
INT4_GROUP_SIZES = (128, 64, 32)
# int4 scales and zero points by half-quadratic quantization (HQQ): on the small config it cut the
# mean logit drift by 5% and raised top-1 agreement from 18% to 24% over tinygemm's min/max
INT4_ALGORITHM = "hqq"


def check_quantization(quantization: str | None) -> str | None:
    """"int8" / "int4" (any case), or None for none / "" / false."""
    if quantization in (None, False, "") or str(quantization).lower() in ("none", "false"):
        return None
    quantization = str(quantization).lower()
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} or null, got {quantization!r}")
    return quantization


def target_modules(model: nn.Module, vision: bool = True) -> Iterator[tuple[str, nn.Linear]]:
    """(name, module) of every linear layer that quantization replaces."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name.startswith("model.layers.") or (vision and name.startswith("model.vision.")):
            yield name, module


def int4_group_size(out_features: int, in_features: int, device_type: str) -> int | None:
    """The group size int4 uses for a layer of this shape on this device; None: not quantizable
    (the CPU kernel needs rows in multiples of 16; the CUDA layout pads them)."""
    if device_type == "cpu" and out_features % 16:
        return None
    sizes = INT4_GROUP_SIZES if device_type == "cpu" else INT4_GROUP_SIZES[:1]
    return next((g for g in sizes if in_features % g == 0), None)


def _ceil_to(n: int, k: int) -> int:
    return -(-n // k) * k


def quantized_bytes(out_features: int, in_features: int, quantization: str, device_type: str,
                    dtype: torch.dtype) -> int | None:
    """Bytes of a quantized weight of shape (out, in) as torchao stores it; None: left unquantized.

    int8: int8 values + a float32 scale and an int8 zero point per row. int4: two values per
    byte + a (scale, zero) pair per group in the compute dtype; on CUDA the tinygemm layout pads
    the input width to a multiple of 1024 and the rows to a multiple of 8.
    """
    quantization = check_quantization(quantization)
    if quantization is None:
        return None
    if quantization == "int8":
        return out_features * in_features + out_features * 5
    group = int4_group_size(out_features, in_features, device_type)
    if group is None:
        return None
    if device_type == "cuda":
        out_features, in_features = _ceil_to(out_features, 8), _ceil_to(in_features, 1024)
        return out_features * in_features // 2 + (in_features // group) * out_features * 2 * 2
    return out_features * in_features // 2 + (in_features // group) * out_features * 2 * dtype.itemsize


def _torchao_config(quantization: str, device_type: str, out_features: int, in_features: int) -> Any:
    # set_inductor_config=False: torchao would otherwise change global inductor settings for the
    # whole process (the engine's compiled steps included); the defaults compile these fine
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    if quantization == "int8":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    group = int4_group_size(out_features, in_features, device_type)
    if device_type == "cuda":
        return Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d",
                                    int4_choose_qparams_algorithm=INT4_ALGORITHM, set_inductor_config=False)
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

    return PrototypeInt4WeightOnlyConfig(group_size=group, int4_choose_qparams_algorithm=INT4_ALGORITHM,
                                         set_inductor_config=False)


def quantize_linear_(module: nn.Linear, quantization: str) -> bool:
    """Replace `module.weight` (already real, on its device) by its quantized form; False when the
    layer's shape is not supported (it stays as it is)."""
    from torchao.quantization import quantize_

    quantization = check_quantization(quantization)
    if quantization is None:
        return False
    device_type = module.weight.device.type
    if quantization == "int4" and int4_group_size(module.out_features, module.in_features, device_type) is None:
        return False
    if quantization == "int4" and device_type == "cuda" and module.weight.dtype != torch.bfloat16:
        raise ValueError(f"int4 on CUDA needs bf16 weights (torchao's tinygemm kernel), got {module.weight.dtype}")
    with warnings.catch_warnings():  # torchao's deprecation notices about its own configs
        warnings.simplefilter("ignore")
        quantize_(module, _torchao_config(quantization, device_type, module.out_features, module.in_features))
    return is_quantized(module.weight)


def is_quantized(t: torch.Tensor) -> bool:
    return type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__")


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds: for a torchao tensor, the sum of its inner tensors."""
    if is_quantized(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def module_bytes(model: nn.Module) -> int:
    return sum(tensor_bytes(t) for t in list(model.parameters()) + list(model.buffers()))


@dataclass
class QuantizationReport:
    quantization: str | None
    vision: bool
    quantized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # shapes the int4 kernels cannot take

    def describe(self) -> str:
        if self.quantization is None:
            return "no quantization"
        text = (f"{self.quantization} weight-only: {len(self.quantized)} linear layers quantized "
                f"({'decoder and vision tower' if self.vision else 'decoder only'})")
        if self.skipped:
            text += f"; {len(self.skipped)} kept unquantized (shape), e.g. {self.skipped[0]}"
        return text


def weight_bytes(model: nn.Module, dtype: torch.dtype, quantization: str | None, device_type: str,
                 vision: bool = True) -> int:
    """Bytes the weights of `model` (built on `meta`: shapes only) will take once loaded in `dtype`
    with `quantization` on a device of `device_type`; exact for what `load_model` makes."""
    quantization = check_quantization(quantization)
    targets = {id(m.weight): m for _, m in target_modules(model, vision)} if quantization else {}
    total = sum(b.numel() * b.element_size() for b in model.buffers())  # kept as built (rope: fp32)
    for t in model.parameters():
        linear = targets.get(id(t))
        q = quantized_bytes(linear.out_features, linear.in_features, quantization, device_type, dtype) \
            if linear is not None and quantization else None
        total += q if q is not None else t.numel() * dtype.itemsize
    return total

def quantize_model_(model: nn.Module, quantization: str | None, vision: bool = True) -> QuantizationReport:
    """Quantize an already loaded model in place (benchmarks of random full-size models);
    `load_model(quantization=...)` does the same layer by layer while loading."""
    report = QuantizationReport(check_quantization(quantization), vision)
    if report.quantization:
        for name, module in list(target_modules(model, vision)):
            (report.quantized if quantize_linear_(module, report.quantization) else report.skipped).append(name)
    model.quantization = report  # type: ignore[attr-defined]
    return report
