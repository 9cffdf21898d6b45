"""Custom ops (fake implementations, dense fallback, prefill path), the decoder's kernel path vs its
reference path, and the latency cost matrix. CPU, under TRITON_INTERPRET=1 where kernels run."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
pd = pytest.importorskip("pandas")
np = pytest.importorskip("numpy")

from allocator.kernels import gemv as sg  # noqa: E402
from allocator.kernels import kernel_pays, low_rank_factors, rsparse_gemv_reference, sparse_gemv_reference  # noqa: E402
from allocator.kernels.latency import latency_cost_matrix  # noqa: E402

interpreted = pytest.mark.skipif(
    not sg._interpreting() or "Interpreted" not in type(sg._sparse_gemv_kernel).__name__,
    reason="CPU kernel tests need TRITON_INTERPRET=1 set before allocator.kernels is first imported",
)


def _x(rows, K):
    return torch.randn(rows, K)


@interpreted
@pytest.mark.parametrize("rows", [1, 3, 9])  # 9 rows: the prefill path (reference)
@pytest.mark.parametrize("dense", [False, True])
def test_sparse_gemv_op(rows, dense):
    x, wt = _x(rows, 70), torch.randn(70, 40)
    y = torch.ops.allocator.sparse_gemv(x, wt, [0.8], [], None, wt.T.contiguous() if dense else None)
    torch.testing.assert_close(y, sparse_gemv_reference(x, wt, 0.8), rtol=1e-4, atol=1e-4)


@interpreted
@pytest.mark.parametrize("dense", [False, True])
def test_rsparse_gemv_op(dense):
    w = torch.randn(40, 70)
    at, bt = low_rank_factors(w, 8)
    x = _x(2, 70)
    y = torch.ops.allocator.rsparse_gemv(x, w.T.contiguous(), at, bt, 0.8, None, w if dense else None)
    torch.testing.assert_close(y, rsparse_gemv_reference(x, w.T.contiguous(), at, bt, 0.8), rtol=1e-4, atol=1e-4)


def test_fake_implementations_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, wt = torch.empty(1, 3, 64), torch.empty(64, 48)
        at, bt = torch.empty(64, 4), torch.empty(4, 48)
        assert torch.ops.allocator.sparse_gemv(x, wt, [0.1], [], None, None).shape == (1, 3, 48)
        assert torch.ops.allocator.rsparse_gemv(x, wt, at, bt, 0.1, None, None).shape == (1, 3, 48)


def test_kernel_pays_respects_crossover():
    assert kernel_pays(0.5, 4096, 4096) and not kernel_pays(0.0, 4096, 4096)
    assert not kernel_pays(0.9, 576, 576) and kernel_pays(1.0, 576, 576)


@interpreted
def test_sparse_linear_picks_dense_below_crossover():
    from allocator.kernels import sparse_linear

    x, w = _x(1, 64), torch.randn(48, 64)
    for s in (0.0, 0.5):
        y = sparse_linear(x, w.T.contiguous(), 0.8, sparsity=s, w_dense=w)
        torch.testing.assert_close(y, sparse_gemv_reference(x, w.T.contiguous(), 0.8), rtol=1e-4, atol=1e-4)


@interpreted
def test_tiny_decoder_kernel_path_equals_reference():
    from allocator.kernels.llama_decode import DecoderShape, RandomLlamaDecoder

    model = RandomLlamaDecoder(DecoderShape(64, 96, 4, 2, 2, 50), torch.float32, "cpu", max_len=16)
    model.calibrate(0.5, steps=2)
    assert 0.3 < model.measured_sparsity(steps=1, start_pos=4) < 0.7
    kv0 = model.kv.clone()
    token, pos = torch.tensor([3]), torch.tensor([6])
    a = model.step(token, pos, "sparse")
    model.kv.copy_(kv0)
    b = model.step(token, pos, "reference")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_decode_ops_match_torch_reference(dtype):
    """Dense step with the fused norm / RoPE + cache / SiLU kernels equals the all-PyTorch step."""
    from allocator.kernels.llama_decode import DecoderShape, RandomLlamaDecoder

    model = RandomLlamaDecoder(DecoderShape(64, 96, 4, 2, 2, 50), dtype, "cpu", max_len=16)
    kv0 = model.kv.clone()
    token, pos = torch.tensor([5]), torch.tensor([9])
    fused = model.step(token, pos, "dense")
    kv_fused = model.kv.clone()
    model.kv.copy_(kv0)
    ref = model._step_reference(token, pos, "dense")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(kv_fused.float(), model.kv.float(), rtol=tol, atol=tol)


def test_latency_cost_matrix_sums_projections_at_nearest_level():
    rows = []
    for (d_out, d_in), base in {(8, 4): 10.0, (4, 8): 20.0}.items():
        for s in (0.0, 0.5, 0.9):
            rows.append(["GPU", d_out, d_in, s, 1.0, "float16", 1, base * (1 - s) + 1, base])
        rows.append(["GPU", d_out, d_in, 0.5, 0.9, "float16", 1, base * 0.6 + 1, base])
    df = pd.DataFrame(rows, columns=["gpu", "d_out", "d_in", "s", "rho", "dtype", "batch", "latency_us", "dense_us"])
    units = [[(8, 4)], [(8, 4), (4, 8)]]
    m = latency_cost_matrix(df, units, [0.0, 0.45, 0.85])
    assert m.shape == (2, 3)
    np.testing.assert_allclose(m[0], [10.0, 6.0, 2.0])  # s=0: min(11, 10) = dense (fallback)
    np.testing.assert_allclose(m[1], [30.0, 6.0 + 11.0, 2.0 + 3.0])
    m_rs = latency_cost_matrix(df, units, [(0.5, 0.9)])
    np.testing.assert_allclose(m_rs[:, 0], [7.0, 7.0 + 13.0])
    with pytest.raises(KeyError):
        latency_cost_matrix(df, [[(1, 1)]], [0.5])
    fused = df.assign(path="fused", latency_us=df["latency_us"] - 1)  # one table holding both kernel paths
    both = pd.concat([df.assign(path="standalone"), fused])
    np.testing.assert_allclose(latency_cost_matrix(both, units, [0.45]), m[:, [1]])
    np.testing.assert_allclose(latency_cost_matrix(both, units, [0.45], path="fused"), m[:, [1]] - [[1.0], [2.0]])


@interpreted
@pytest.mark.parametrize("splits", [None, {"qkv": 3, "o": 2, "gate_up": 4, "down": 5}])
def test_fused_step_equals_reference_and_leaves_accumulators_zero(splits):
    """Producer-compacted, atomically accumulated step == the all-PyTorch step, over two steps (the
    accumulators must be back at zero after each), ragged split sizes included."""
    from allocator.kernels.llama_decode import DecoderShape, RandomLlamaDecoder

    model = RandomLlamaDecoder(DecoderShape(64, 96, 4, 2, 2, 50), torch.float32, "cpu", max_len=16)
    model.calibrate(0.5, steps=2)
    sites = model.fused_sites(splits)
    kv0 = model.kv.clone()
    fused = [model.step(torch.tensor([t]), torch.tensor([6 + t]), "fused") for t in (3, 7)]
    assert all(float(site.acc.abs().max()) == 0.0 for site in sites.values())
    kv_fused = model.kv.clone()
    model.kv.copy_(kv0)
    ref = [model.step(torch.tensor([t]), torch.tensor([6 + t]), "reference") for t in (3, 7)]
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kv_fused, model.kv, rtol=1e-5, atol=1e-5)
    counts = sites["down"].cnt
    assert 0 < int(counts.sum()) < 96  # about half of the down-projection inputs kept


@interpreted
@pytest.mark.parametrize("H,splits", [(64, 4), (64, 3), (48, 4)])
def test_norm_producer_writes_the_kept_lists_of_each_split(H, splits):
    """One program per K split (ragged splits too); h_out = h_in + round(delta), h_in and delta left as they were."""
    from allocator.kernels.pipelined import SiteBuffers, add_rms_norm_split, plan_site

    cpu = torch.device("cpu")
    h, w = torch.randn(1, H), torch.rand(H) + 0.5
    delta = SiteBuffers(plan_site(32, H, cpu), cpu)
    delta.acc.copy_(torch.randn(H))
    h_in, acc_in = h.clone(), delta.acc.clone()
    h_out = torch.full_like(h, float("nan"))
    site = SiteBuffers(plan_site(H, 32, cpu, n_splits=splits), cpu)
    site.cnt.fill_(-1)
    site.idx.fill_(-1)
    x = add_rms_norm_split(h, h_out, delta, w, 1e-5, 0.7, site)
    torch.testing.assert_close(h_out, h_in + acc_in)
    assert torch.equal(h, h_in) and torch.equal(delta.acc, acc_in)  # the next GEMV clears delta, not the norm
    torch.testing.assert_close(x, torch.nn.functional.rms_norm(h_out, (H,), eps=1e-5) * w, rtol=1e-5, atol=1e-5)
    ks = site.plan.k_split
    for s in range(site.plan.n_splits):
        want = torch.nonzero(x[0, s * ks:(s + 1) * ks].abs() > 0.7).flatten() + s * ks
        assert int(site.cnt[s]) == want.numel()
        assert torch.equal(site.idx[s * ks:s * ks + want.numel()].long(), want)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("nh,nkv,pos", [(4, 2, 0), (4, 2, 17), (6, 2, 39), (4, 4, 31)])
def test_decode_attention_matches_sdpa(dtype, nh, nkv, pos):
    """Split-KV attention of one token == SDPA with the causal position mask (chunks past pos, a group of 3)."""
    from allocator.kernels.decode_ops import decode_attention

    hd, max_len = 16, 40
    q, k, v = torch.randn(nh, hd, dtype=dtype), torch.randn(nkv, max_len, hd, dtype=dtype), torch.randn(nkv, max_len, hd, dtype=dtype)
    got = decode_attention(q, k, v, torch.tensor([pos]), chunk=16)
    visible = (torch.arange(max_len) <= pos).view(1, 1, 1, -1)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float().view(1, nh, 1, hd), k.float().unsqueeze(0), v.float().unsqueeze(0), attn_mask=visible,
        enable_gqa=nkv != nh).reshape(1, -1)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)


def test_decoder_shapes_come_from_the_core_model_shape():
    from allocator import model_shape
    from allocator.kernels.llama_decode import LLAMA2_7B, LLAMA3_8B, SMOLLM2_135M, DecoderShape

    assert LLAMA3_8B == DecoderShape(4096, 14336, 32, 8, 32, 128256, rope_theta=500000.0)
    assert LLAMA2_7B == DecoderShape(4096, 11008, 32, 32, 32, 32000)
    assert SMOLLM2_135M == DecoderShape(576, 1536, 9, 3, 30, 49152, rope_theta=100000.0)
    gemma = DecoderShape.from_model_shape(model_shape("gemma-7b"))
    assert gemma.head_dim == 256 and gemma.n_heads * gemma.head_dim != gemma.hidden  # head_dim from the config
