"""kernels/runtime.py with low-bit decode weights (`decode_lowbit`): every site format mix the runtime runs (INT4 in
groups and per channel, INT8, FP8 with e4m3 inputs, bf16 columns beside low-bit ones, per-projection thresholds
splitting a fused site) decodes through the low-bit GEMV ("sparse", "dense") and equals the "reference" mode, whose
rule is checked against an independent computation: a plain 16-bit Decoder over the dequantized weights. CPU, fp32
and fp16, Triton under TRITON_INTERPRET=1 (on a CUDA GPU when there is one)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from allocator.kernels import gemv as sg  # noqa: E402
from allocator.kernels.lowbit_gemv import dequantize, lowbit_from_codes, pack_fp8, pack_int4, pack_int8  # noqa: E402
from allocator.kernels.runtime import (SITES, DecodeWeight, Decoder, DecoderShape,  # noqa: E402
                                       projection_columns, random_weights)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
interpreted = pytest.mark.skipif(
    DEVICE == "cpu" and (not sg._interpreting() or "Interpreted" not in type(sg._sparse_gemv_kernel).__name__),
    reason="CPU kernel tests need TRITON_INTERPRET=1 set before allocator.kernels is first imported",
)
SHAPE = DecoderShape(128, 256, 4, 2, 2, 61, head_dim=32)   # hidden 128: two INT4 groups of 64
THRESHOLDS = [{"qkv": 0.5, "o": 0.3, "gate_up": 0.6, "down": 0.2},
              {"qkv": (0.7, 0.7, 0.2), "o": 0.0, "gate_up": (0.4, 0.8), "down": 0.5}]


def int4_groups(w):  # [N, K] -> group-64 codes and scales through the accuracy path's tensors' route
    return lowbit_from_codes(*_rtn(w, 7.0, 64), bits=4, group=64)


def _rtn(w, top, group):
    N, K = w.shape
    g = w.float().view(N, -1, group)
    scales = (g.abs().amax(-1) / top).to(torch.bfloat16)
    codes = (g / scales.float()[..., None]).round().clamp(-top - 1, top).view(N, K).to(torch.int8)
    return codes, scales


FORMATS = {"int4_g64": lambda w: DecodeWeight(int4_groups(w)),
           "int4_channel": lambda w: DecodeWeight(lowbit_from_codes(*_rtn(w, 7.0, w.shape[1]), bits=4)),
           "int4_pack": lambda w: DecodeWeight(pack_int4(w, group=64)),
           "int8": lambda w: DecodeWeight(pack_int8(w)),
           "fp8_act": lambda w: DecodeWeight(pack_fp8(w), act="fp8")}
# layer 0: one format per site; layer 1: a q|k|v site split by format and threshold, gate|up split by threshold
KIND_FORMATS = [{"q": "int4_g64", "k": "int4_g64", "v": "int4_g64", "o": "fp8_act", "gate": "int8", "up": "int8",
                 "down": "int4_channel"},
                {"q": "int4_pack", "v": "int4_pack", "o": "int8", "gate": "int4_g64", "up": "int4_g64"}]


def lowbit_weights(weights):
    out = []
    for lw, kinds in zip(weights.layers, KIND_FORMATS):
        row = {}
        for site in SITES:
            for kind, a, b in projection_columns(SHAPE, site):
                if kind in kinds:
                    row[kind] = FORMATS[kinds[kind]](getattr(lw, site)[:, a:b].T.float())
        out.append(row)
    return out


def build(dtype, thresholds=THRESHOLDS):
    weights = random_weights(SHAPE, dtype, DEVICE, torch.Generator(DEVICE).manual_seed(0))
    return weights, Decoder(SHAPE, weights, thresholds=thresholds, max_len=24, max_batch=2, dtype=dtype,
                            decode_lowbit=lowbit_weights(weights))


def decode(decoder, prompt, mode, steps=3):
    decoder.reset()
    decoder.prefill(prompt)
    tokens = prompt[:, -1]
    out = []
    for t in range(steps):
        logits = decoder.decode_step(tokens, torch.tensor([prompt.shape[1] + t], device=prompt.device), mode)
        out.append(logits)
        tokens = logits.argmax(-1)
    return torch.stack(out, 1)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lowbit_decode_modes_equal_the_reference(dtype):
    _, decoder = build(dtype)
    assert decoder.has_lowbit
    runs = decoder._lowbit_runs[1]["qkv"]
    assert [r.kinds for r in runs] == [("q",), ("k",), ("v",)]               # format and threshold splits
    prompt = torch.randint(0, SHAPE.vocab, (1, 6), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ref = decode(decoder, prompt, "reference")
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)
    sparse = decode(decoder, prompt, "sparse")
    torch.testing.assert_close(sparse, ref, **tol)
    assert (sparse.argmax(-1) == ref.argmax(-1)).all()
    batch = prompt.repeat(2, 1)    # batch 2 through the batched kernels; equal rows: the union mask is each row's
    torch.testing.assert_close(decode(decoder, batch, "sparse", 2), ref[:, :2].repeat(2, 1, 1), **tol)


@interpreted
def test_reference_is_the_dequantized_model_with_the_fp8_inputs_rounded():
    """Without FP8 activations the reference equals a plain Decoder over the dequantized weights; with layer 0's
    o projection in w8a8-fp8, it differs, and equals it once that input is rounded to e4m3 per token."""
    weights, decoder = build(torch.float32)
    for i, row in enumerate(lowbit_weights(weights)):                        # the dequantized model
        for site in SITES:
            for kind, a, b in projection_columns(SHAPE, site):
                if kind in row:
                    getattr(weights.layers[i], site)[:, a:b] = dequantize(row[kind].weight)
    plain = Decoder(SHAPE, weights, thresholds=THRESHOLDS, max_len=24, dtype=torch.float32, device=DEVICE)
    prompt = torch.randint(0, SHAPE.vocab, (1, 6), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    torch.testing.assert_close(decoder.prefill(prompt), plain.prefill(prompt))   # prefill: dequantized, bf16 GEMMs
    ref, theirs = decode(decoder, prompt, "reference"), decode(plain, prompt, "reference")
    assert (ref - theirs).abs().max() > 1e-4                                  # the e4m3 inputs of layer 0's o
    plain.thresholds[0]["o"] = 0.0        # masked below, before the rounding (a rounded kept value may fall under t)
    original = plain._linear

    def fp8_inputs(x, layer, site, mode, i, bias=None):
        if (i, site) == (0, "o") and mode != "prefill":                       # decode steps only
            from allocator.kernels.runtime import _fake_quant
            t = THRESHOLDS[0]["o"]
            x = _fake_quant(x * (x.abs() > t), "fp8")
        return original(x, layer, site, mode, i, bias)
    plain._linear = fp8_inputs
    torch.testing.assert_close(decode(plain, prompt, "reference"), ref, rtol=1e-5, atol=1e-5)


@interpreted
def test_dense_mode_runs_the_lowbit_gemv_without_masks():
    _, decoder = build(torch.float32)
    _, unmasked = build(torch.float32, thresholds=None)                       # every nonzero channel kept
    prompt = torch.randint(0, SHAPE.vocab, (1, 5), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    dense = decode(decoder, prompt, "dense", 2)
    torch.testing.assert_close(dense, decode(unmasked, prompt, "reference", 2), rtol=1e-4, atol=1e-4)
    assert (dense - decode(decoder, prompt, "reference", 2)).abs().max() > 1e-3   # the thresholds mattered


@interpreted
def test_misfits_are_named():
    weights = random_weights(SHAPE, torch.float32, DEVICE, torch.Generator(DEVICE).manual_seed(0))
    wrong = [{"q": DecodeWeight(pack_int8(torch.randn(10, 128)))}, {}]
    with pytest.raises(ValueError, match=r"decode_lowbit\[0\]\['q'\]"):
        Decoder(SHAPE, weights, max_len=8, decode_lowbit=wrong)
    with pytest.raises(ValueError, match="kinds are"):
        Decoder(SHAPE, weights, max_len=8, decode_lowbit=[{"qkv": None}, {}])
    with pytest.raises(ValueError, match="activation type"):
        DecodeWeight(pack_int8(torch.randn(4, 4)), act="int8")
    with pytest.raises(ValueError, match="no 3-bit decode kernel"):
        lowbit_from_codes(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 1), bits=3)
    decoder = Decoder(SHAPE, weights, max_len=8, decode_lowbit=lowbit_weights(weights))
    with pytest.raises(ValueError, match="low-bit projections decode through mode 'sparse'"):
        decoder.decode_step(torch.zeros(1, dtype=torch.long, device=DEVICE), torch.tensor([0], device=DEVICE), "fused")


def test_the_callers_weights_are_not_overwritten():
    weights = random_weights(SHAPE, torch.float32, "cpu", torch.Generator().manual_seed(0))
    before = weights.layers[0].qkv.clone()
    Decoder(SHAPE, weights, max_len=8, decode_lowbit=lowbit_weights(weights))
    assert torch.equal(weights.layers[0].qkv, before)


@interpreted
def test_int8_sites_run_in_the_fused_step():
    """w8a16 everywhere: the fused step (producer lists, INT8 rows gathered, per-column scales on each split's
    partial sum) equals the reference, per-projection thresholds included; INT4 sites are refused there."""
    weights = random_weights(SHAPE, torch.float32, DEVICE, torch.Generator(DEVICE).manual_seed(5))
    int8 = [{kind: DecodeWeight(pack_int8(getattr(lw, site)[:, a:b].T.float())) for site in SITES
             for kind, a, b in projection_columns(SHAPE, site)} for lw in weights.layers]
    decoder = Decoder(SHAPE, weights, thresholds=THRESHOLDS, max_len=24, dtype=torch.float32, decode_lowbit=int8)
    assert decoder.fused_lowbit
    prompt = torch.randint(0, SHAPE.vocab, (1, 6), generator=torch.Generator().manual_seed(6)).to(DEVICE)
    ref = decode(decoder, prompt, "reference")
    torch.testing.assert_close(decode(decoder, prompt, "fused"), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(decode(decoder, prompt, "sparse"), ref, rtol=1e-4, atol=1e-4)
    _, mixed = build(torch.float32)
    assert not mixed.fused_lowbit
