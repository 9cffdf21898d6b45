"""A bits allocation written as a compressed-tensors checkpoint: the format llm-compressor writes and vLLM serves.

``export_compressed_tensors(model, {module name: format}, out_dir)`` quantizes the named projections with this
package's quantizers (RTN or GPTQ, ``evaluators.quantize``) and hands the result to compressed-tensors, whose own
code writes it: ``apply_quantization_config`` attaches one config group per format (targets: the exact module
names) and ``ModelCompressor`` compresses and records the config. Each module gets our dequantized weight (fp32,
exactly ``codes * scale``) and our bf16 scales, so compressed-tensors' quantizer recovers our codes exactly;
its formats are "pack-quantized" (weight-only INT, int32-packed), "int-quantized" (W8A8-INT8, W4A4: int8 codes),
"float-quantized" (W8A8-FP8: float8_e4m3fn codes), "mixed-precision" overall. Projections kept in bf16 and the
LM head are listed in ``ignore``.

Who reads the folder: compressed-tensors (config parsing, decompression) and transformers
(``AutoModelForCausalLM.from_pretrained`` decompresses on load, on CPU too); vLLM serves the bits, provided the
q / k / v projections of a layer share one format, and gate / up too (it fuses them; a warning says when they do
not), and a group size divides d_in (compressed-tensors refuses otherwise: SmolLM2's 576-wide inputs take no
g = 128 format; that raises here). The activation-sparsity half of a plan is not part of this format.
"""
from __future__ import annotations

import copy
import logging
from collections import defaultdict
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from allocator.formats import PER_CHANNEL, get_format

from .models import find_projections
from .plan import FUSED, restore_
from .quantize import QuantizedWeight, quantize_model_, quantized_weights
from .wrappers import CompressionWrapper

logger = logging.getLogger(__name__)


def _require_compressed_tensors() -> None:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ImportError("exporting a compressed-tensors checkpoint needs compressed-tensors: "
                          "pip install 'layer-allocator[bits]' (or pip install compressed-tensors)") from None


def scheme_for(fmt: str, targets: list[str]):
    """The compressed-tensors ``QuantizationScheme`` of one of our formats: symmetric weights per channel or per
    group, dynamic per-token input activations where the format quantizes them."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    f = get_format(fmt)
    grouped = f.group != PER_CHANNEL
    weights = QuantizationArgs(num_bits=f.weight_bits, type="float" if f.weight == "fp8" else "int", symmetric=True,
                               strategy="group" if grouped else "channel", group_size=f.group if grouped else None)
    inputs = None
    if f.quantizes_activations:
        inputs = QuantizationArgs(num_bits=4 if f.act == "int4" else 8, type="float" if f.act == "fp8" else "int",
                                  symmetric=True, strategy="token", dynamic=True)
    return QuantizationScheme(targets=targets, weights=weights, input_activations=inputs)


def _check(model: nn.Module, groups: dict[str, list[str]]) -> None:
    """Every name is a projection; group sizes divide d_in (compressed-tensors' rule); fused shards (q / k / v,
    gate / up) in different formats are warned of."""
    rows = find_projections(model)
    d_in = {p.name: p.d_in for row in rows for p in row}
    fmt_of = {n: f for f, names in groups.items() for n in names}
    unknown = sorted(set(fmt_of) - set(d_in))
    if unknown:
        raise ValueError(f"not projections of this model: {unknown[:4]}; names look like {min(d_in)}")
    for fmt, names in groups.items():
        g = get_format(fmt).group
        bad = [n for n in names if g != PER_CHANNEL and d_in[n] % g]
        if bad:
            raise ValueError(f"format '{fmt}' groups {g} input channels, which does not divide the input width of "
                             f"{bad[:3]}{' ...' if len(bad) > 3 else ''} (compressed-tensors requires it); give "
                             "these modules a per-channel format (w8a16, w4a16, w8a8-fp8, ...)")
    for row in rows:
        kinds = {p.kind: fmt_of.get(p.name, "bf16") for p in row}
        for fused, shards in FUSED.items():
            used = {kinds[k] for k in shards if k in kinds}
            if len(used) > 1:
                logger.warning("layer %d: %s in formats %s; vLLM fuses them into %s and needs one format",
                               row[0].layer, "/".join(shards), sorted(used), fused)


def _load_quantized(model: nn.Module, qweights: dict[str, QuantizedWeight]) -> None:
    """Put our weights (exactly codes * scale) and scales into the parameters compressed-tensors attached."""
    for name, q in qweights.items():
        module = model.get_submodule(name)
        if module.weight_scale.shape != q.scales.shape:
            raise ValueError(f"{name}: compressed-tensors expects scales {tuple(module.weight_scale.shape)}, the "
                             f"quantizer made {tuple(q.scales.shape)}")
        module.weight = nn.Parameter(q.dequantize(torch.float32).to(module.weight.device), requires_grad=False)
        module.weight_scale.data.copy_(q.scales)


@torch.no_grad()
def export_compressed_tensors(model: nn.Module, formats: Mapping[str, str], out_dir, method: str = "rtn",
                              calibration_windows: torch.Tensor | None = None, tokenizer=None,
                              **gptq_options) -> Path:
    """Write ``model`` with each named projection in its format (``{module name: format}``; absent or "bf16":
    unquantized) as a compressed-tensors checkpoint in ``out_dir``; returns the folder. The model is copied
    (any compression wrappers dropped from the copy), so it is left as it was. ``method="gptq"`` needs
    ``calibration_windows``."""
    _require_compressed_tensors()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    groups: dict[str, list[str]] = defaultdict(list)
    for name, fmt in sorted(formats.items()):
        if get_format(fmt).quantizes_weights:
            groups[get_format(fmt).name].append(name)
    model = restore_(copy.deepcopy(model))
    online = [n for n, m in model.named_modules() if isinstance(m, CompressionWrapper) and m.permanent]
    if online:
        raise ValueError(f"{', '.join(online[:2])}{' ...' if len(online) > 2 else ''} apply an online rotation, "
                         "which a compressed-tensors checkpoint written here cannot carry; export a model without "
                         "online rotations (RotationConfig(online=False) folds everything into the weights)")
    if not groups:
        raise ValueError("no module of `formats` has a quantized format: nothing to export as compressed-tensors "
                         "(save_pretrained writes a bf16 model)")
    _check(model, groups)
    quantize_model_(model, {n: f for f, names in groups.items() for n in names}, method, calibration_windows,
                    **gptq_options)
    qweights = quantized_weights(model)
    restore_(model)
    config = QuantizationConfig(config_groups={f: scheme_for(f, names) for f, names in groups.items()})
    apply_quantization_config(model, config)
    _load_quantized(model, qweights)
    compressor = ModelCompressor.from_pretrained_model(model)      # infers each group's format, the ignore list
    fmt_of = {tuple(names): f for f, names in groups.items()}
    found = compressor.quantization_config.config_groups
    compressor.quantization_config.config_groups = {fmt_of[tuple(s.targets)]: s for s in found.values()}
    compressor.compress_model(model)
    out = Path(out_dir)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    logger.info("wrote a compressed-tensors checkpoint (%s) to %s", ", ".join(f"{f}: {len(n)}" for f, n in
                                                                              groups.items()), out)
    return out
