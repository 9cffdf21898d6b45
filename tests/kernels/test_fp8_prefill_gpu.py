"""GPU correctness of the FP8 (W8A8) prefill (kernels/fp8_prefill.py, kernels/runtime.py's prefill).

* `quantize_rows_fp8` with the hardware e4m3 cast: codes and scales bit-equal to the eager reference (fp16, bf16,
  fp32; one-pass and two-pass rows; Llama-3-8B widths; rounding corners; strided rows).
* `fp8_linear` (`torch._scaled_mm`, rowwise scales) against `fp8_linear_reference` (dequantize, fp32 matmul):
  bf16 / fp16 outputs, with and without bias, fast accumulation, shapes `_scaled_mm` cannot take (reference
  GEMM), inside a CUDA graph.
* the runtime: tiny HF Llama / Qwen2 in fp32 quantized through the accuracy path (FakeQuantLinear, some or all
  projections in w8a8-fp8) is the reference; the runtime runs the same codes and scales in bf16 on the GPU: its
  prefill logits are as close to the fp32 accuracy path as that path run in bf16 is, and equal (bf16 rounding
  apart) to the same runtime with the reference GEMM instead of `_scaled_mm`; prefill in a CUDA graph, generate.

Skipped without a CUDA GPU (or when Triton is being interpreted). Fresh random inputs; outputs poisoned with NaN.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from allocator.kernels import gemv as sg  # noqa: E402
from allocator.kernels.fp8_prefill import (  # noqa: E402
    fp8_gemm,
    fp8_linear,
    fp8_linear_reference,
    fp8_weight_from_codes,
    pack_fp8_weight,
    quantize_rows_fp8,
    quantize_rows_fp8_reference,
    scaled_mm_fits,
)
from allocator.kernels.testing import poison_empty, relative_error  # noqa: E402
from allocator.evaluators.testing import tiny_hf  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or sg._interpreting(), reason="needs a CUDA GPU"),
]


@pytest.fixture
def poisoned(monkeypatch):
    poison_empty(monkeypatch)


def _check_rows(x, **kw):
    q, s = quantize_rows_fp8(x, **kw)
    qr, sr = quantize_rows_fp8_reference(x)
    assert torch.equal(s, sr), "scales differ"
    bad = (q.view(torch.uint8) != qr.view(torch.uint8)).sum().item()
    assert bad == 0, f"{bad} of {q.numel()} codes differ from the reference"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,block", [((1, 4096), None), ((512, 4096), None), ((300, 14336), None),
                                         ((64, 20000), None), ((7, 100), None), ((33, 4096), 1024),
                                         ((2, 9, 6144), None)])
def test_quantize_rows_bit_equal(poisoned, dtype, shape, block):
    x = (torch.randn(*shape, device="cuda") * torch.rand(*shape[:-1], 1, device="cuda") * 30).to(dtype)
    if x.numel() > shape[-1]:
        x.view(-1, shape[-1])[1] = 0  # an all-zero row: scale 1, codes 0
    _check_rows(x, block=block)


def test_quantize_rows_corners_and_strides(poisoned):
    special = [448.0, 1.0625, 1.1875, -1.0625, 0.0, -0.0, 2**-10, 1.5 * 2**-9, 2.5 * 2**-9, -(2**-12), 15.5, 15.9,
               31.9, -126.1, 239.9, 240.0, 247.99, 248.0, 447.0, 1e-30, 3e-40, -7.9, 0.0156, 0.01562, 0.017]
    x = torch.tensor([special], device="cuda")
    _check_rows(x)
    _check_rows(x.repeat(5, 40), block=256)
    wide = torch.randn(64, 4200, device="cuda", dtype=torch.bfloat16)
    _check_rows(wide[:, 50:4146])


SHAPES = [(6144, 4096), (4096, 14336), (96, 64), (100, 72)]  # (N, K); the last: K, N not multiples of 16


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("M", [1, 33, 512])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_matches_reference(poisoned, out_dtype, shape, M, bias):
    n, k = shape
    w = pack_fp8_weight(torch.randn(n, k, device="cuda") * k**-0.5)
    x = torch.randn(M, k, device="cuda").to(out_dtype)
    b = torch.randn(n, device="cuda").to(out_dtype) if bias else None
    y = fp8_linear(x, w, b)
    assert y.dtype == out_dtype and y.shape == (M, n)
    assert relative_error(y, fp8_linear_reference(x, w, b, out_dtype=torch.float32)) < 5e-3
    assert scaled_mm_fits(x.device, k, n) == (shape != (100, 72))


def test_fp8_linear_fast_accum_batched_and_graph(poisoned):
    w = pack_fp8_weight(torch.randn(4096, 4096, device="cuda") * 4096**-0.5)
    x = torch.randn(2, 300, 4096, device="cuda", dtype=torch.bfloat16)
    ref = fp8_linear_reference(x, w, out_dtype=torch.float32)
    y = fp8_linear(x, w)
    assert y.shape == (2, 300, 4096) and relative_error(y, ref) < 5e-3
    xq, sx = quantize_rows_fp8(x.view(-1, 4096))
    assert relative_error(fp8_gemm(xq, sx, w, use_fast_accum=True).view_as(y), ref) < 1e-2
    static_x = x.clone()
    fp8_linear(static_x, w)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_linear(static_x, w)
    fresh = torch.randn_like(x)
    static_x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    assert relative_error(out, fp8_linear_reference(fresh, w, out_dtype=torch.float32)) < 5e-3


def test_accuracy_path_codes_run_unchanged():
    quantize = pytest.importorskip("allocator.evaluators.quantize")
    w = torch.randn(512, 256, device="cuda")
    qw = quantize.quantize_weight_rtn(w, "w8a8-fp8")
    packed = fp8_weight_from_codes(qw.codes, qw.scales)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    fake = torch.nn.functional.linear(quantize.quantize_activation(x.float(), "fp8"), qw.dequantize(torch.float32))
    assert relative_error(fp8_linear(x, packed), fake) < 5e-3


# ---------------------------------------------------------------------------------------------- runtime
MIXED = [{"q", "v", "gate", "down"}, {"k", "o", "up"}, set(), {"q", "k", "v", "o", "gate", "up", "down"}]


def _small_hf(family: str):
    pytest.importorskip("transformers")
    return tiny_hf(family, hidden=256, intermediate=512, head_dim=None if family == "qwen2" else 64, layers=4,
                   vocab=512, max_positions=256, init=0.05).cuda()


def _fp8_from_accuracy_path(model) -> list[dict[str, Fp8Weight]]:
    """The converter's FP8 prefill weights (evaluators/runtime.py): each FakeQuantLinear in w8a8-fp8 -> its codes
    and scales."""
    from allocator.evaluators.runtime import model_quantized_projections
    return model_quantized_projections(model)[1]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_runtime_fp8_prefill_matches_the_accuracy_path(family, monkeypatch):
    from allocator.evaluators.models import find_projections
    from allocator.evaluators.quantize import quantize_model_
    from allocator.evaluators.runtime import decoder_weights
    from allocator.kernels import fp8_prefill
    from allocator.kernels.runtime import Decoder, DecoderShape, DecoderWeights, LayerWeights

    model = _small_hf(family)
    ids = torch.randint(0, 512, (2, 100), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        dense_ref = model(ids).logits.float()
    quantize_model_(model, {p.name: "w8a8-fp8" for i, row in enumerate(find_projections(model)) for p in row
                            if p.kind in MIXED[i]})
    with torch.no_grad():
        ref = model(ids).logits.float()
    weights = decoder_weights(model)
    bf16 = lambda t: None if t is None else t.to(torch.bfloat16)  # noqa: E731
    weights = DecoderWeights(**{**vars(weights), "embed": bf16(weights.embed), "lm_head": bf16(weights.lm_head),
                                "final_norm": bf16(weights.final_norm),
                                "layers": [LayerWeights(**{k: bf16(v) for k, v in vars(lw).items()})
                                           for lw in weights.layers]})
    shape = DecoderShape.from_config(model.config.to_dict())
    fp8 = _fp8_from_accuracy_path(model)
    assert [set(layer) for layer in fp8] == MIXED
    dec = Decoder(shape, weights, max_len=128, max_batch=2, prefill_fp8=fp8)
    got = dec.prefill(ids)
    # against the fp32 accuracy path: as close as the accuracy path itself run in bf16 (in bf16 an activation near
    # an e4m3 rounding boundary can land on the other neighbour, on either path), and far from the dense model
    with torch.no_grad():
        ref_bf16 = model.to(torch.bfloat16)(ids).logits.float()
    model.float()
    err, noise, fp8_effect = relative_error(got, ref), relative_error(ref_bf16, ref), relative_error(ref, dense_ref)
    assert err < 1.5 * noise + 1e-3 and err < 0.75 * fp8_effect, (err, noise, fp8_effect)
    # the same runtime with the reference GEMM (dequantize, fp32 matmul) instead of _scaled_mm: layer 0's site inputs
    # after its FP8 q, v equal to bf16 rounding; the logits within the same bf16 yardstick (later layers flip
    # activations at e4m3 rounding boundaries after 1-ulp bf16 differences, and a random model amplifies them)
    dec.record = [{} for _ in range(shape.n_layers)]
    dec.prefill(ids)
    fast_inputs, dec.record = dec.record, None
    with monkeypatch.context() as m:
        m.setattr(fp8_prefill, "scaled_mm_fits", lambda *a: False)
        slow_dec = Decoder(shape, weights, max_len=128, max_batch=2, prefill_fp8=fp8)
        slow_dec.record = [{} for _ in range(shape.n_layers)]
        slow = slow_dec.prefill(ids)
    for site in ("o", "gate_up"):
        assert relative_error(fast_inputs[0][site], slow_dec.record[0][site]) < 5e-3, site
    assert relative_error(got, slow) < 1.5 * noise + 1e-3
    # the FP8 prefill inside generate (its greedy decode steps run from one CUDA graph, dense weights)
    out = dec.generate(ids[:1, :20], 8, mode="dense")
    assert out.shape == (1, 28) and torch.equal(out[:, :20], ids[:1, :20])
    # the prefill captured in a CUDA graph replays the same logits
    static = ids.clone()
    dec.prefill(static)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = dec.prefill(static)
    graph.replay()
    torch.cuda.synchronize()
    assert relative_error(logits, got) < 1e-3
