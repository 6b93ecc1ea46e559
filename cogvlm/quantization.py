"""Quantization of the linear layers, applied while loading: weight-only int8 / int4 (torchao),
or fp8 GEMMs (float8 weights and activations, torch alone).

int8 / int4 quantize every `nn.Linear` of the decoder layers (both experts: query_key_value,
dense, the MLPs) and, with `vision=True`, of the vision tower and its GLU adapter. fp8 takes only
the layers that see image tokens, the compute-bound part (vision + prefill): the vision tower
with its adapter (`model.vision.*`, unless `vision=False`) and the visual expert of each decoder
layer (`self_attn.vision_expert_query_key_value`, `self_attn.vision_expert_dense`,
`mlp.vision_mlp.*`); the language expert, which decode reads, stays in the load dtype. Kept in
the load dtype by all: embeddings, norms, `lm_head`, the patch and v2 convolutions, boi/eoi.

- int8: torchao `Int8WeightOnlyConfig` (per output channel, symmetric), CPU and CUDA.
- int4: groups of 128 input columns (asymmetric; scales and zeros chosen by HQQ). On CUDA torchao's
  `Int4WeightOnlyConfig` in the `tile_packed_to_4d` format (tinygemm kernel, bf16 only, compute
  capability >= 8.0); on CPU torchao's `Int4OpaqueTensor` (the `_weight_int4pack_mm_for_cpu`
  kernel), with the group size lowered to 64 or 32 where 128 does not divide the input width;
  use it with bf16 activations (with fp32 ones the CPU kernel ran 60x slower than bf16's).
  torchao 0.18's default int4 format needs the `mslk` kernels, which have no release, so the
  formats are named here.

- fp8: `Fp8Linear` (below): float8 e4m3 weights with one float32 scale per output row, activations
  quantized per row (per token) as they come, the GEMM by `torch._scaled_mm` with row-wise scales
  (CUDA compute capability >= 8.9: L4, L40S, RTX 40xx, H100, H200), bf16 out. On other devices
  loading refuses fp8 (`fp8_gemm_error`); tests and benchmarks opt into a reference path that
  applies the same rounding and multiplies in float32 (`reference=True`).

A layer whose shape the int4 or fp8 kernels cannot take stays in the load dtype and is listed in
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

QUANTIZATIONS = ("int8", "int4", "fp8")
INT4_GROUP_SIZES = (128, 64, 32)
# int4 scales and zero points by half-quadratic quantization (HQQ): on the small config it cut the
# mean logit drift by 5% and raised top-1 agreement from 18% to 24% over tinygemm's min/max
INT4_ALGORITHM = "hqq"


def check_quantization(quantization: str | None) -> str | None:
    """"int8" / "int4" / "fp8" (any case), or None for none / "" / false."""
    if quantization in (None, False, "") or str(quantization).lower() in ("none", "false"):
        return None
    quantization = str(quantization).lower()
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} or null, got {quantization!r}")
    return quantization


# the visual expert's linear layers inside a decoder layer (checkpoint names)
VISUAL_EXPERT = (".self_attn.vision_expert_query_key_value", ".self_attn.vision_expert_dense", ".mlp.vision_mlp.")


def target_modules(model: nn.Module, vision: bool = True,
                   quantization: str | None = None) -> Iterator[tuple[str, nn.Linear]]:
    """(name, module) of every linear layer that `quantization` replaces (int8 / int4: all of the
    decoder layers'; fp8: the visual expert's only) and, with `vision`, the vision tower's."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name.startswith("model.layers."):
            if quantization != "fp8" or any(part in name for part in VISUAL_EXPERT):
                yield name, module
        elif vision and name.startswith("model.vision."):
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
    the input width to a multiple of 1024 and the rows to a multiple of 8. fp8: one byte per
    value + a float32 scale per row (a bias stays a parameter in the load dtype).
    """
    quantization = check_quantization(quantization)
    if quantization is None:
        return None
    if quantization == "fp8":
        return out_features * in_features + out_features * 4 if fp8_shape_ok(out_features, in_features) else None
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
    if quantization == "fp8":
        raise ValueError("fp8 replaces the module: use quantize_module_")
    device_type = module.weight.device.type
    if quantization == "int4" and int4_group_size(module.out_features, module.in_features, device_type) is None:
        return False
    if quantization == "int4" and device_type == "cuda" and module.weight.dtype != torch.bfloat16:
        raise ValueError(f"int4 on CUDA needs bf16 weights (torchao's tinygemm kernel), got {module.weight.dtype}")
    with warnings.catch_warnings():  # torchao's deprecation notices about its own configs
        warnings.simplefilter("ignore")
        quantize_(module, _torchao_config(quantization, device_type, module.out_features, module.in_features))
    return is_quantized(module.weight)


# --- fp8 ---------------------------------------------------------------------------------------

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
FP8_MIN_CAPABILITY = (8, 9)  # row-wise scaled `torch._scaled_mm` (Ada, Hopper and newer)
_FP8_TINY = 1e-12  # floor on a row's absolute maximum: an all-zero row gets a tiny scale, zeros stay zeros


def fp8_shape_ok(out_features: int, in_features: int) -> bool:
    """`torch._scaled_mm` needs both sizes of the weight in multiples of 16 (the release shapes are)."""
    return out_features % 16 == 0 and in_features % 16 == 0


def fp8_gemm_error(device: torch.device | str) -> str | None:
    """None when `device` runs float8 GEMMs (`torch._scaled_mm` with row-wise scales), else why not."""
    device = torch.device(device)
    need = ("fp8 quantization needs a CUDA GPU of compute capability 8.9 or newer (L4, L40S, RTX 40xx, "
            "H100, H200) for its float8 GEMMs")
    if device.type != "cuda":
        return f"{need}; this device is {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < FP8_MIN_CAPABILITY:
        return f"{need}; {torch.cuda.get_device_name(device)} has compute capability {major}.{minor}"
    return None


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, C) -> (float8 e4m3 values (R, C), float32 scales (R, 1)) with x ~ values * scales: each
    row scaled so its largest magnitude maps to 448, then rounded to nearest."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=_FP8_TINY) / FP8_MAX  # (R, 1)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Linear(nn.Module):
    """A linear layer whose GEMM runs in float8: weight (out, in) in e4m3 with a float32 scale per
    output row; each input row (token) quantized the same way as it comes; the product accumulated
    in float32, scaled by both scales and rounded to the input's dtype; the bias (kept in that
    dtype) added after.

    `reference=False` (what `load_model` builds on a GPU that has fp8 GEMMs): the product is
    `torch._scaled_mm`, which needs bf16 inputs. `reference=True`: the same float8 values and
    scales multiplied as float32 by `torch.matmul`, on any device and dtype. It exists for tests
    and for measuring fp8's drift on CPUs (`bench/precision.py`); it is slower than the float
    layer it replaces, so `load_model` uses it only when asked (`fp8_reference=True`).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, reference: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        if not fp8_shape_ok(self.out_features, self.in_features):
            raise ValueError(f"fp8 GEMMs need both weight sizes in multiples of 16, got {list(weight.shape)}")
        if not reference and weight.dtype != torch.bfloat16:
            raise ValueError(f"fp8 GEMMs (torch._scaled_mm, row-wise scales) need bf16 weights, got {weight.dtype}")
        values, scale = quantize_fp8_rows(weight)
        self.weight = nn.Parameter(values, requires_grad=False)  # (out, in) e4m3, row-major
        self.register_buffer("weight_scale", scale.view(1, -1), persistent=False)  # (1, out) float32
        self.bias = bias  # a Parameter in the load dtype (loaded later when built on `meta`), or None
        self.reference = reference

    @classmethod
    def from_linear(cls, linear: nn.Linear, reference: bool = False) -> "Fp8Linear":
        return cls(linear.weight.detach(), linear.bias, reference)

    def dequantized_weight(self) -> torch.Tensor:
        """(out, in) float32: the weight as the GEMM sees it."""
        return self.weight.float() * self.weight_scale.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features)  # (M, in)
        if rows.shape[0] == 0:
            return x.new_zeros(*shape[:-1], self.out_features)
        values, scale = quantize_fp8_rows(rows)  # (M, in) e4m3, (M, 1)
        if self.reference:
            out = (values.float() @ self.weight.float().t()) * scale * self.weight_scale  # (M, out) fp32
            out = out.to(x.dtype)
        else:
            # weight.t(): the (in, out) column-major operand the kernel wants, without a copy
            out = torch._scaled_mm(values, self.weight.t(), scale, self.weight_scale, out_dtype=x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"e4m3 per-row scales, {'reference matmul' if self.reference else 'torch._scaled_mm'}")


def quantize_module_(model: nn.Module, name: str, linear: nn.Linear, quantization: str,
                     fp8_reference: bool = False) -> bool:
    """Quantize the target layer `name` of `model` (its weight real, on its device): int8 / int4 in
    place (torchao), fp8 by putting an `Fp8Linear` in its place. False when the layer's shape is
    not supported (it stays as it is)."""
    if quantization != "fp8":
        return quantize_linear_(linear, quantization)
    if not fp8_shape_ok(linear.out_features, linear.in_features):
        return False
    model.set_submodule(name, Fp8Linear.from_linear(linear, reference=fp8_reference))
    return True


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
    skipped: list[str] = field(default_factory=list)  # shapes the int4 / fp8 kernels cannot take
    fp8_reference: bool = False  # fp8 layers multiply by the reference path, not torch._scaled_mm

    def describe(self) -> str:
        if self.quantization is None:
            return "no quantization"
        if self.quantization == "fp8":
            text = (f"fp8 GEMMs: {len(self.quantized)} linear layers "
                    f"({'vision tower and visual expert' if self.vision else 'visual expert only'})"
                    f"{', reference matmul (tests/benchmarks)' if self.fp8_reference else ''}")
        else:
            text = (f"{self.quantization} weight-only: {len(self.quantized)} linear layers quantized "
                    f"({'decoder and vision tower' if self.vision else 'decoder only'})")
        if self.skipped:
            text += f"; {len(self.skipped)} kept unquantized (shape), e.g. {self.skipped[0]}"
        return text


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def weight_bytes(model: nn.Module, dtype: torch.dtype, quantization: str | None, device_type: str,
                 vision: bool = True) -> int:
    """Bytes the weights of `model` (built on `meta`: shapes only) will take once loaded in `dtype`
    with `quantization` on a device of `device_type`; exact for what `load_model` makes."""
    quantization = check_quantization(quantization)
    targets = {id(m.weight): m for _, m in target_modules(model, vision, quantization)} if quantization else {}
    total = sum(b.numel() * b.element_size() for b in model.buffers())  # kept as built (rope: fp32)
    for t in model.parameters():
        linear = targets.get(id(t))
        q = quantized_bytes(linear.out_features, linear.in_features, quantization, device_type, dtype) \
            if linear is not None and quantization else None
        total += q if q is not None else t.numel() * dtype.itemsize
    return total

def quantize_model_(model: nn.Module, quantization: str | None, vision: bool = True,
                    fp8_reference: bool = False) -> QuantizationReport:
    """Quantize an already loaded model in place (benchmarks of random full-size models);
    `load_model(quantization=...)` does the same layer by layer while loading."""
    report = QuantizationReport(check_quantization(quantization), vision, fp8_reference=fp8_reference)
    if report.quantization == "fp8" and not fp8_reference and (err := fp8_gemm_error(model_device(model))):
        raise ValueError(err)
    if report.quantization:
        for name, module in list(target_modules(model, vision, report.quantization)):
            done = quantize_module_(model, name, module, report.quantization, fp8_reference)
            (report.quantized if done else report.skipped).append(name)
    model.quantization = report  # type: ignore[attr-defined]
    return report
