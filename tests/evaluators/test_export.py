"""compressed-tensors export of a mixed per-layer bits allocation on a cut real SmolLM2: the config parses back
with compressed-tensors, transformers loads the folder, every module has its format and our exact weights."""
import copy
import json

import pytest
import torch

pytest.importorskip("compressed_tensors")

from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from allocator.evaluators.export import export_compressed_tensors  # noqa: E402
from allocator.evaluators.metrics import logits_of  # noqa: E402
from allocator.evaluators.models import find_projections, load_model  # noqa: E402
from allocator.evaluators.quantize import FakeQuantLinear, quantize_model_, quantized_weights  # noqa: E402
from allocator.evaluators.wrappers import CompressionWrapper  # noqa: E402
from allocator.formats import PER_CHANNEL, get_format  # noqa: E402

# per layer, kind -> format (absent: bf16); g = 128 only where d_in = 1536 (down), since 128 does not divide 576
PLAN = [{"q": "w8a16", "k": "w8a16", "v": "w8a16", "gate": "w8a8-fp8", "up": "w8a8-fp8", "down": "w4a16-g128"},
        {"q": "w8a8-fp8", "k": "w8a8-fp8", "v": "w8a8-fp8", "o": "w8a8-int8", "gate": "w4a16", "up": "w4a16",
         "down": "w3a16-g128"},
        {"down": "w4a4"}]
CT_FORMAT = {"int": "pack-quantized", "int+act": "int-quantized", "fp8": "float-quantized"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    # loaded in bf16 (not .to(bf16), which would also round the rotary inv_freq that transformers keeps in fp32)
    model, _ = load_model("smollm2-135m", dtype="bfloat16", max_layers=len(PLAN))
    formats = {p.name: PLAN[p.layer][p.kind] for row in find_projections(model) for p in row if p.kind in PLAN[p.layer]}
    formats["model.layers.2.self_attn.o_proj"] = "bf16"              # an explicit bf16 entry is left alone
    before = logits_of(model, torch.arange(24).view(1, 24))
    out = export_compressed_tensors(model, formats, tmp_path_factory.mktemp("ct") / "smollm2-mixed")
    assert torch.equal(logits_of(model, torch.arange(24).view(1, 24)), before)   # the model itself is untouched
    return model, formats, out


def _expected(fmt):
    f = get_format(fmt)
    kind = "fp8" if f.weight == "fp8" else ("int+act" if f.quantizes_activations else "int")
    act = None if not f.quantizes_activations else (4 if f.act == "int4" else 8, "float" if f.act == "fp8" else "int")
    return {"num_bits": f.weight_bits, "type": "float" if f.weight == "fp8" else "int",
            "group_size": None if f.group == PER_CHANNEL else f.group,
            "strategy": "channel" if f.group == PER_CHANNEL else "group", "act": act, "format": CT_FORMAT[kind]}


def _actual(scheme):
    w, a = scheme.weights, scheme.input_activations
    act = None if a is None else (a.num_bits, str(a.type))
    if a is not None:
        assert a.strategy == "token" and a.dynamic is True and a.symmetric
    return {"num_bits": w.num_bits, "type": str(w.type), "group_size": w.group_size, "strategy": str(w.strategy),
            "act": act, "format": getattr(scheme.format, "value", scheme.format)}


def test_config_has_one_group_per_format_and_parses_with_compressed_tensors(exported):
    _, formats, out = exported
    raw = json.loads((out / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(raw)
    assert raw["quant_method"] == "compressed-tensors" and config.format == "mixed-precision"
    quantized = {n: f for n, f in formats.items() if f != "bf16"}
    assert set(config.config_groups) == set(quantized.values())
    for fmt, scheme in config.config_groups.items():
        assert sorted(scheme.targets) == sorted(n for n, f in quantized.items() if f == fmt)
        assert _actual(scheme) == _expected(fmt), fmt
    bf16 = {p.name for row in find_projections(exported[0]) for p in row} - set(quantized)
    assert bf16 <= set(config.ignore) and "lm_head" in config.ignore and not set(quantized) & set(config.ignore)


def test_transformers_loads_every_module_in_its_format_with_our_weights(exported):
    model, formats, out = exported
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    quantized = {n: f for n, f in formats.items() if f != "bf16"}
    for name, fmt in quantized.items():                       # the scheme transformers attached from the config
        assert _actual(loaded.get_submodule(name).quantization_scheme) == _expected(fmt), name
    assert not hasattr(loaded.get_submodule("model.layers.2.self_attn.o_proj"), "quantization_scheme")
    ids = torch.arange(24).view(1, 24)
    logits_of(loaded, ids)                                    # the first forward decompresses the weights
    ours = copy.deepcopy(model)
    quantize_model_(ours, quantized)
    for name, q in quantized_weights(ours).items():
        assert torch.equal(loaded.get_submodule(name).weight, q.dequantize(torch.bfloat16)), name
    for module in loaded.modules():                           # weights alone: the same function, exactly
        if hasattr(module, "quantization_scheme"):
            module.quantization_enabled = False
    for module in ours.modules():
        if isinstance(module, FakeQuantLinear):
            module.act = "bf16"
    assert torch.equal(logits_of(loaded, ids), logits_of(ours, ids))


def test_a_group_that_does_not_divide_the_input_width_is_refused(exported, tmp_path):
    q_proj = "model.layers.0.self_attn.q_proj"                # d_in = 576
    with pytest.raises(ValueError, match="does not divide"):
        export_compressed_tensors(exported[0], {q_proj: "w4a16-g128"}, tmp_path / "x")
    assert not (tmp_path / "x").exists()


class _Online(CompressionWrapper):
    """A stand-in for an online rotation (evaluators.rotation.RotatedLinear): a permanent model transform."""

    permanent = True

    def forward(self, x):
        return self.inner(x)


def test_a_model_with_online_rotations_is_refused(exported, tmp_path):
    model = copy.deepcopy(exported[0])
    mlp = model.model.layers[0].mlp
    mlp.down_proj = _Online(mlp.down_proj)
    with pytest.raises(ValueError, match="online rotation"):
        export_compressed_tensors(model, {"model.layers.0.mlp.down_proj": "w8a16"}, tmp_path / "x")
