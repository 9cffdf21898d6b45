"""Number formats of a unit's weights and input activations: the ``fmt`` of a ``Level`` (torch-free).

A format names how a projection is stored and fed at inference: the weight type and width, how weight scales
are grouped (one per output channel, or one per ``group`` consecutive input channels of an output channel),
and the type the input activations are quantized to per token before the GEMM (``bf16``: not quantized).
Algorithms (RTN, GPTQ) are not formats: the same ``w4a16-g128`` tensor can come from either. A group that does
not divide ``d_in`` (128 and SmolLM2's 576) leaves a shorter last group: fake quantization handles it,
compressed-tensors cannot store it (``evaluators.export`` says so; the ``-g64`` formats fit).

What each format costs is stated here, once:

* decode bytes per weight: ``bits / 8`` plus one fp16 scale per group (per output channel: per ``d_in``);
* prefill: the GEMM rate relative to bf16 on an NVIDIA H200, measured at 2048 tokens on Llama-3-8B shapes
  (``../shared/research/h200_prefill_gemm.csv``, summed over a layer's four GEMMs): FP8 rowwise
  ``torch._scaled_mm`` 1.72x, ``torch._int_mm`` 0.18x (INT8 is no prefill lever on Hopper), weight-only formats
  1.0x (dequantized into a bf16 GEMM), INT4 activations 1.0x (Hopper has no INT4 tensor cores; ASAF's RTX 3090
  had). Until the low-bit kernels measure real latency these ratios are the prefill cost model.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

H200_BF16_PREFILL_TFLOPS = 660.0   # measured bf16 GEMM rate at 2048 tokens (28672x4096 gate|up: 728 us)
SCALE_BYTES = 2                    # fp16 scales
PER_CHANNEL = -1                   # group size meaning "one scale per output channel"


class FormatError(ValueError):
    """An unknown format name; the message names the closest and all registered formats."""


@dataclass(frozen=True)
class NumberFormat:
    name: str
    weight: str              # "bf16" | "int" | "fp8"
    weight_bits: int
    group: int | None        # None: no scales; PER_CHANNEL; or group size along the input channel
    act: str                 # "bf16" | "fp8" | "int8" | "int4": per-token activation quantization
    prefill_speedup: float   # GEMM rate over bf16 at 2048 tokens on the H200 (module docstring)

    @property
    def is_dense(self) -> bool:
        return self.weight == "bf16" and self.act == "bf16"

    @property
    def quantizes_weights(self) -> bool:
        return self.weight != "bf16"

    @property
    def quantizes_activations(self) -> bool:
        return self.act != "bf16"

    def bytes_per_weight(self, d_in: int) -> float:
        """Decode bytes read per weight element of a projection with ``d_in`` input channels (scales included)."""
        if self.group is None:
            return self.weight_bits / 8
        per = d_in if self.group == PER_CHANNEL else self.group
        return self.weight_bits / 8 + SCALE_BYTES / per

    def describe(self) -> dict:
        return {"name": self.name, "weight": self.weight, "weight_bits": self.weight_bits, "group": self.group,
                "act": self.act}


FORMATS: dict[str, NumberFormat] = {f.name: f for f in (
    NumberFormat("bf16", "bf16", 16, None, "bf16", 1.0),
    NumberFormat("w8a16", "int", 8, PER_CHANNEL, "bf16", 1.0),
    NumberFormat("w8a8-fp8", "fp8", 8, PER_CHANNEL, "fp8", 1.72),
    NumberFormat("w8a8-int8", "int", 8, PER_CHANNEL, "int8", 0.18),
    NumberFormat("w4a16", "int", 4, PER_CHANNEL, "bf16", 1.0),
    NumberFormat("w4a16-g128", "int", 4, 128, "bf16", 1.0),
    NumberFormat("w4a16-g64", "int", 4, 64, "bf16", 1.0),      # g = 64 divides SmolLM2's 576 (g = 128 does not)
    NumberFormat("w3a16-g128", "int", 3, 128, "bf16", 1.0),
    NumberFormat("w3a16-g64", "int", 3, 64, "bf16", 1.0),
    NumberFormat("w4a4", "int", 4, PER_CHANNEL, "int4", 1.0),
)}
DENSE_FORMAT = "bf16"
# the format a bare weight width means (levels written before formats existed, `method.levels.bits`)
FORMAT_OF_BITS = {16: "bf16", 8: "w8a16", 4: "w4a16-g128", 3: "w3a16-g128"}


def get_format(name: str) -> NumberFormat:
    """The registered format ``name`` (case-insensitive)."""
    key = str(name).lower()
    if key not in FORMATS:
        close = difflib.get_close_matches(key, FORMATS, n=1)
        raise FormatError(f"unknown number format '{name}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                          + f"; registered formats: {sorted(FORMATS)}")
    return FORMATS[key]


def format_for_bits(bits: int) -> str:
    """The default format of a weight width (16 -> bf16, 8 -> w8a16, 4 -> w4a16-g128, 3 -> w3a16-g128)."""
    if bits >= 16:
        return DENSE_FORMAT
    if bits not in FORMAT_OF_BITS:
        raise FormatError(f"no default format has {bits}-bit weights; give a format by name, one of {sorted(FORMATS)}")
    return FORMAT_OF_BITS[bits]


DECODE_KERNELS = ("bf16", "int4", "int8", "fp8")


def decode_kernel(name: str) -> str | None:
    """Which decode GEMV of ``allocator.kernels`` runs format ``name``: "bf16" (the sparse GEMV), "int4" (weight-only
    4-bit, per channel or in power-of-two groups >= 16), "int8" (w8a16) or "fp8" (w8a8-fp8: FP8 weights, the input
    rounded to e4m3 per token); None when no kernel does (INT activations, 3-bit weights)."""
    f = get_format(name)
    if f.is_dense:
        return "bf16"
    if f.act == "fp8":
        return "fp8" if f.weight == "fp8" and f.group == PER_CHANNEL else None
    if f.act != "bf16" or f.weight != "int":
        return None
    if f.weight_bits == 8:
        return "int8" if f.group == PER_CHANNEL else None
    if f.weight_bits == 4 and (f.group == PER_CHANNEL or (f.group >= 16 and not f.group & (f.group - 1))):
        return "int4"
    return None


def prefill_kernel(name: str) -> str | None:
    """Which prefill GEMM the runtime runs for format ``name``: "fp8" (W8A8: FP8 weights and per-token e4m3 inputs,
    ``torch._scaled_mm``), "bf16" (16-bit and weight-only formats: a bf16 GEMM on the dequantized weights), None for
    INT activations (no kernel)."""
    f = get_format(name)
    if f.act == "fp8":
        return "fp8" if f.weight == "fp8" else None
    return "bf16" if f.act == "bf16" else None
