"""CPU correctness of the FP8 (W8A8) prefill pieces (kernels/fp8_prefill.py) under TRITON_INTERPRET=1.

* `quantize_rows_fp8` (the Triton kernel, interpreted; fp16 and fp32 inputs, bf16 loads too): codes and scales
  bit-equal to the eager reference (the accuracy path's rule) on ragged shapes, both loop forms (one pass, two
  passes), zero rows, strided rows, e4m3 ties / binade carries / subnormals / -0. The interpreter's own
  fp32 -> e4m3 cast is not round-to-nearest-even (it rounds ties away and drops the carry into the next binade:
  126.1 -> 64), so under the interpreter the kernel rounds onto the e4m3 grid in fp32 first (`_to_e4m3`,
  SOFT_ROUND) and only casts representable values; the hardware cast (the GPU path) is checked bit-equal in
  test_fp8_prefill_gpu.py.
* weights: `pack_fp8_weight` == `evaluators.quantize.quantize_weight_rtn(w, "w8a8-fp8")` bit for bit;
  `fp8_weight_from_codes` takes its codes and scales.
* `fp8_linear` off CUDA (the interpreted quantization + the reference GEMM) == `fp8_linear_reference`.
* the runtime: a tiny HF Llama / Qwen2 (q|k|v biases), fp32, with some projections (mixed inside the fused sites)
  or all of them in w8a8-fp8 through the accuracy path (`quantize_model_`, FakeQuantLinear), converted as
  evaluators/runtime.py would with `prefill_fp8` from the accuracy path's codes and scales: prefill logits equal
  HF's within 1e-4; decode is untouched.
* studies/prefill_bench.py: pure parts, the CPU smoke run, and a clean failure without CUDA.

Fresh random inputs each run; outputs poisoned with NaN before each kernel run.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
if not torch.cuda.is_available():  # conftest.py sets it too; it must precede the first import of the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

from allocator.kernels import gemv as sg  # noqa: E402
from allocator.kernels import fp8_prefill as fp  # noqa: E402
from allocator.kernels.fp8_prefill import (  # noqa: E402
    Fp8Weight,
    fp8_linear,
    fp8_linear_reference,
    fp8_weight_from_codes,
    pack_fp8_weight,
    quantize_rows_fp8,
    quantize_rows_fp8_reference,
)
from allocator.kernels.runtime import Decoder, DecoderShape, random_weights, rtn_fp8_prefill  # noqa: E402
from allocator.kernels.testing import poison_empty  # noqa: E402
from allocator.evaluators.testing import tiny_hf  # noqa: E402

interpreted = pytest.mark.skipif(
    not sg._interpreting() or "Interpreted" not in type(fp._quantize_rows_kernel).__name__,
    reason="CPU kernel tests need TRITON_INTERPRET=1 set before allocator.kernels is first imported",
)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def poisoned(monkeypatch):
    poison_empty(monkeypatch)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool((a.view(torch.uint8) == b.view(torch.uint8)).all())


def _check_rows(x: torch.Tensor, **kw) -> None:
    q, s = quantize_rows_fp8(x, **kw)
    qr, sr = quantize_rows_fp8_reference(x)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert q.shape == x.shape and s.shape == (*x.shape[:-1], 1)
    assert torch.equal(s, sr), "scales differ"
    bad = (q.view(torch.uint8) != qr.view(torch.uint8)).sum().item()
    assert bad == 0, f"{bad} codes differ from the reference"


@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,block", [((1, 16), None), ((7, 100), None), ((5, 33), None), ((3, 1000), None),
                                         ((4, 100), 32), ((2, 33), 16), ((6, 7, 48), None)])
def test_quantize_rows_matches_reference(poisoned, dtype, shape, block):
    x = torch.randn(*shape) * torch.rand(*shape[:-1], 1) * 20
    x = x.to(dtype)
    if x.numel() > shape[-1]:
        x.view(-1, shape[-1])[1] = 0  # an all-zero row: scale 1, codes 0
    _check_rows(x, block=block)


@interpreted
def test_quantize_rows_rounding_corners(poisoned):
    """Row amax 448 -> scale 1, so every value below is its own quotient: ties to even, carries into the next binade
    (the interpreter's cast gets these wrong), subnormals (step 2^-9), -0, values below the smallest subnormal."""
    special = [448.0, 1.0625, 1.1875, -1.0625, 0.0, -0.0, 2**-10, 1.5 * 2**-9, 2.5 * 2**-9, -(2**-12), 15.5, 15.9,
               31.9, -126.1, 239.9, 240.0, 247.99, 248.0, 447.0, 1e-30, 3e-40, -7.9, 0.0156, 0.01562, 0.017]
    x = torch.tensor([special])
    _check_rows(x)
    _check_rows(x.repeat(3, 4), block=32)  # the two-pass loop
    _check_rows(-x)


@interpreted
def test_quantize_rows_strided_input(poisoned):
    wide = torch.randn(9, 80, dtype=torch.float16)
    x = wide[:, 5:69]  # rows 80 apart, 64 channels
    _check_rows(x)
    q, _ = quantize_rows_fp8(x)
    assert q.is_contiguous()


def test_quantize_rows_rejects_other_dtypes():
    with pytest.raises(ValueError, match="fp16 / bf16 / fp32"):
        quantize_rows_fp8(torch.zeros(2, 16, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- weights
def test_pack_equals_the_accuracy_paths_rtn():
    quantize = pytest.importorskip("allocator.evaluators.quantize")
    w = torch.randn(70, 48) * torch.rand(70, 1)
    w[3] = 0
    packed = pack_fp8_weight(w)
    qw = quantize.quantize_weight_rtn(w, "w8a8-fp8")
    assert _same_bits(packed.codes, qw.codes)
    assert torch.equal(packed.scale, qw.scales.float().T)
    assert torch.equal(packed.dequantize(), qw.dequantize(torch.float32))
    from_codes = fp8_weight_from_codes(qw.codes, qw.scales)
    assert _same_bits(from_codes.codes, packed.codes) and torch.equal(from_codes.scale, packed.scale)
    assert pack_fp8_weight(w.to(torch.bfloat16)).codes.shape == (70, 48)


def test_weight_checks_and_cat():
    w = pack_fp8_weight(torch.randn(32, 16))
    with pytest.raises(ValueError, match="one scale per output channel"):
        fp8_weight_from_codes(w.codes, torch.ones(32, 2))
    with pytest.raises(ValueError, match="scale must be fp32"):
        Fp8Weight(w.codes, torch.ones(32, 1))
    with pytest.raises(ValueError, match="codes must be"):
        Fp8Weight(w.codes.float(), w.scale)
    both = Fp8Weight.cat([w, pack_fp8_weight(torch.randn(16, 16))])
    assert (both.n, both.k) == (48, 16) and torch.equal(both.dequantize()[:32], w.dequantize())


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_off_cuda_matches_reference(poisoned, dtype, bias):
    w = pack_fp8_weight(torch.randn(40, 64) * 64**-0.5)
    x = torch.randn(3, 5, 64).to(dtype)
    b = torch.randn(40).to(dtype) if bias else None
    y = fp8_linear(x, w, b)
    ref = fp8_linear_reference(x, w, b)
    assert y.shape == (3, 5, 40) and y.dtype == dtype
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:  # the accuracy path's function: fake-quantized x times the fake-quantized weight
        quantize = pytest.importorskip("allocator.evaluators.quantize")
        fake = torch.nn.functional.linear(quantize.quantize_activation(x, "fp8"), w.dequantize(), b)
        torch.testing.assert_close(y, fake, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- runtime
MIXED = [{"q", "v", "gate", "down"}, {"k", "o", "up"}]  # per layer: FP8 projections (the rest bf16)


def _tiny_hf(family: str):
    pytest.importorskip("transformers")
    return tiny_hf(family, head_dim=None if family == "qwen2" else 16)


def fp8_from_accuracy_path(model) -> list[dict[str, Fp8Weight]]:
    """The converter's FP8 prefill weights (evaluators/runtime.py): each FakeQuantLinear in w8a8-fp8 -> its codes
    and scales."""
    from allocator.evaluators.runtime import model_quantized_projections
    return model_quantized_projections(model)[1]


@interpreted
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("which", ["mixed", "all"])
def test_runtime_fp8_prefill_equals_the_accuracy_path(family, which):
    pytest.importorskip("transformers")
    from allocator.evaluators.models import find_projections
    from allocator.evaluators.quantize import quantize_model_
    from allocator.evaluators.runtime import decoder_weights

    model = _tiny_hf(family)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense_ref = model(ids).logits.float()
    rows = find_projections(model)
    chosen = {p.name: "w8a8-fp8" for i, row in enumerate(rows) for p in row
              if which == "all" or p.kind in MIXED[i]}
    quantize_model_(model, chosen)
    with torch.no_grad():
        ref = model(ids).logits.float()
    assert float((ref - dense_ref).abs().max()) > 1e-3  # FP8 changes the logits: the check below means something
    weights = decoder_weights(model)  # the bf16 (here fp32) weights under the wrappers
    shape = DecoderShape.from_config(model.config.to_dict())
    fp8 = fp8_from_accuracy_path(model)
    assert [set(layer) for layer in fp8] == ([set("q k v o gate up down".split())] * 2 if which == "all" else MIXED)
    dec = Decoder(shape, weights, max_len=32, max_batch=2, prefill_fp8=fp8)
    assert [set(dec.prefill_fp8_kinds(i)) for i in range(2)] == [set(layer) for layer in fp8]
    if which == "all":
        assert all(len(runs) == 1 for layer in dec._prefill_runs for runs in layer.values())  # one GEMM per site
    torch.testing.assert_close(dec.prefill(ids), ref, rtol=1e-4, atol=1e-4)
    dense = Decoder(shape, weights, max_len=32, max_batch=2)
    torch.testing.assert_close(dense.prefill(ids), dense_ref, rtol=1e-4, atol=1e-4)
    # decode never reads the FP8 weights: the step after the FP8 prefill equals the dense decoder's on that cache
    dense.kv.copy_(dec.kv)
    tok, pos = ids[:, -1].contiguous(), torch.tensor([9])
    torch.testing.assert_close(dec.decode_step(tok, pos, "reference"), dense.decode_step(tok, pos, "reference"))


def test_runtime_rejects_bad_fp8_weights():
    shape = DecoderShape(32, 64, 4, 2, 2, 50, head_dim=8)
    weights = random_weights(shape, torch.float32, "cpu", torch.Generator().manual_seed(0))
    fp8 = rtn_fp8_prefill(shape, weights, kinds={"q", "up"}, layers={1})
    assert fp8[0] == {} and set(fp8[1]) == {"q", "up"} and (fp8[1]["q"].n, fp8[1]["q"].k) == (32, 32)
    assert Decoder(shape, weights, max_len=8, prefill_fp8=fp8).prefill_fp8_kinds(1) == ["q", "up"]
    with pytest.raises(ValueError, match="projection kinds"):
        Decoder(shape, weights, max_len=8, prefill_fp8=[{}, {"qkv": fp8[1]["q"]}])
    with pytest.raises(ValueError, match=r"Fp8Weight \[16, 32\]"):
        Decoder(shape, weights, max_len=8, prefill_fp8=[{}, {"k": fp8[1]["q"]}])
    with pytest.raises(ValueError, match="for 1 layers"):
        Decoder(shape, weights, max_len=8, prefill_fp8=[{}])


# ---------------------------------------------------------------------------------------------- the bench
def _bench():
    spec = importlib.util.spec_from_file_location("prefill_bench", ROOT / "studies" / "prefill_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_pure_parts_and_clean_failure_without_cuda(tmp_path):
    pd = pytest.importorskip("pandas")
    bench = _bench()
    rows = [dict(table="gemm", gpu="NoGPU", site=site, n=n, k=k, tokens=t, variant=v, us=us)
            for site, (n, k) in bench.SHAPES.items() for t in (512, 2048)
            for v, us in (("bf16", 10.0), ("fp8_gemm", 6.0), ("fp8_gemm_fast", 5.5), ("fp8_triton", 7.0),
                          ("fp8_eager", 12.0), ("quant_triton", 1.0), ("quant_eager", 6.0))]
    df = bench.with_speedups(pd.DataFrame(rows))
    layer = bench.per_layer(df)
    assert set(layer.tokens) == {512, 2048}
    row = layer[(layer.tokens == 512) & (layer.variant == "fp8_triton")].iloc[0]
    assert row.us == 28.0 and abs(row.speedup - 40 / 28) < 1e-9
    md = bench.markdown(df, layer, pd.DataFrame(), {"gpu": "NoGPU", "torch": "x", "triton": "y", "command": "c"})
    assert "NoGPU" in md and "| 512 |" in md and "our Triton quant" in md and "28.0 (1.43x)" in md
    cmd = [sys.executable, str(ROOT / "studies" / "prefill_bench.py"), "--out", str(tmp_path / "x"), "--quick"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "x").exists()


@interpreted
def test_bench_smoke_on_cpu(tmp_path):
    """--smoke: tiny shapes through every variant and the whole-model rows, wall-clock timed, on the CPU."""
    pytest.importorskip("pandas")
    cmd = [sys.executable, str(ROOT / "studies" / "prefill_bench.py"), "--out", str(tmp_path / "s"), "--smoke"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("prefill_bench.csv", "prefill_bench.md"):
        assert (tmp_path / "s" / name).exists()
    text = (tmp_path / "s" / "prefill_bench.md").read_text()
    assert "Whole-model prefill" in text and "per layer" in text
