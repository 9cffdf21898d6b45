"""Per-projection thresholds in the fused decode sites on CUDA (q|k|v: three column segments, gate|up: two):
the graph-replayed fused_pdl / fused step against the eager reference (Llama and Qwen2, fp32 and fp16), greedy
generation in every mode against the reference mode's tokens (fp32), the standalone GEMV with segments against
its reference at real widths (SmolLM2: the tuned 128-wide tile gives way to 64 for the 576 / 768 starts;
Llama-3-8B, Llama-2-7B), and the fused
step at Llama-3-8B widths under a CUDA graph. Skipped without a CUDA GPU (or when Triton is being interpreted)."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
pytest.importorskip("transformers")

from allocator.kernels import gemv as sg  # noqa: E402
from allocator.kernels.gemv import sparse_gemv_reference, sparse_gemv_triton  # noqa: E402
from allocator.kernels.testing import poison_empty, relative_error  # noqa: E402

from test_runtime_gpu import _prompt, decoder, small_hf  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or sg._interpreting(), reason="needs a CUDA GPU"),
]
QUANTILES = {"qkv": (0.3, 0.6, 0.45), "o": 0.4, "gate_up": (0.5, 0.2), "down": 0.4}


def _segmented(record) -> list[dict]:
    """Per layer, each site's |input| quantile(s) of a dense prefill: q, k, v and gate, up at their own levels."""
    def q(x, s):
        return tuple(float(x.abs().float().quantile(v)) for v in s) if isinstance(s, tuple) else \
            float(x.abs().float().quantile(s))
    return [{site: q(rec[site], s) for site, s in QUANTILES.items()} for rec in record]


def _calibrated(dec, prompt):
    dec.record = [{} for _ in dec.layers]
    dec.prefill(prompt)
    record, dec.record = dec.record, None
    dec.thresholds = _segmented(record)
    assert all(len(set(row["qkv"])) == 3 and len(set(row["gate_up"])) == 2 for row in dec.thresholds)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["fused_pdl", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_graph_fused_per_projection_matches_reference(dtype, mode, family):
    """Three teacher-forced steps replayed from one CUDA graph == the eager reference (per-segment masks);
    the sites are planned with the segment starts (q|k|v 256 / 320: a 64-wide tile); accumulators end at zero."""
    dec = decoder(small_hf(dtype, family))
    prompt = _prompt(1, 20)
    _calibrated(dec, prompt)
    token, pos = torch.zeros(1, dtype=torch.long, device="cuda"), torch.zeros(1, dtype=torch.long, device="cuda")
    dec.decode_step(token, pos, mode)  # compile (and plan the segmented sites) outside the capture
    sites = dec.fused_sites()
    assert sites["qkv"].plan.segments == (256, 320) and sites["gate_up"].plan.segments == (512,)
    assert all(b % sites[s].plan.cfg.block_n == 0 for s in ("qkv", "gate_up") for b in sites[s].plan.segments)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        logits = dec.decode_step(token, pos, mode)
    got, ref = [], []
    for out, step in ((got, None), (ref, "reference")):
        dec.reset()
        dec.prefill(prompt[:, :17])
        for t in range(17, 20):
            token.fill_(int(prompt[0, t]))
            pos.fill_(t)
            if step is None:
                g.replay()
                out.append(logits.clone())
                assert all(float(s.acc.abs().max()) == 0.0 for s in dec.fused_sites().values())
            else:
                out.append(dec.decode_step(token, pos, step))
    for a, b in zip(got, ref):  # fp16: a channel on its threshold may flip (atomic split-K order; test_runtime_gpu)
        assert relative_error(a, b) < (1e-4 if dtype == torch.float32 else 1.5e-1)


@pytest.mark.parametrize("mode,B", [("fused_pdl", 1), ("fused", 1), ("sparse", 1), ("dense", 1)])
def test_graph_generate_per_projection_equals_reference_tokens(mode, B):
    """fp32 greedy generation under one CUDA graph with per-projection thresholds == the reference mode's tokens
    (dense: HF's own, thresholds ignored); one graph per (mode, thresholds). Batch 1: at batch > 1 "sparse"
    shares the union of the rows' masks and "reference" masks each row (tests/kernels/test_segments_cpu.py)."""
    model = small_hf(torch.float32)
    dec = decoder(model, max_batch=2)
    prompt = _prompt(B, 11)
    _calibrated(dec, prompt[:1])
    got = dec.generate(prompt, 12, mode=mode, cuda_graph=True)
    assert len(dec._graphs) == 1
    if mode == "dense":
        with torch.no_grad():
            want = model.generate(prompt, max_new_tokens=12, do_sample=False)
    else:
        want = dec.generate(prompt, 12, mode="reference", cuda_graph=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K,starts,N", [(576, (576, 768), 960), (576, (1536,), 3072), (4096, (4096, 5120), 6144),
                                        (4096, (14336,), 28672), (4096, (11008,), 22016)])
@pytest.mark.parametrize("batch", [1, 2])
def test_standalone_gemv_segments_at_real_widths(dtype, K, starts, N, batch, monkeypatch):
    """The standalone kernel with the default (tuned or halved) tile and per-segment thresholds == the reference
    (outputs and scratch poisoned)."""
    poison_empty(monkeypatch)
    g = torch.Generator(device="cuda").manual_seed(K + N + batch)
    x = torch.randn(batch, K, device="cuda", generator=g).to(dtype)
    wt = (torch.randn(K, N, device="cuda", generator=g) / K ** 0.5).to(dtype)
    thr = [0.3, 1.1, 0.7][:len(starts) + 1]
    y = sparse_gemv_triton(x, wt, thr, segments=starts)
    tol = 3e-3 if dtype == torch.float16 else 2e-2
    assert relative_error(y, sparse_gemv_reference(x, wt, thr, segments=starts)) < tol


@pytest.mark.parametrize("mode", ["fused", "fused_pdl"])
def test_fused_per_projection_at_llama3_8b_widths_under_cuda_graph(mode):
    """Two layers at Llama-3-8B widths (tuned indexed configs, segment starts 4096 / 5120 and 14336), random weights,
    per-projection thresholds from a dense step's inputs: graph-replayed steps == the reference step."""
    from allocator.kernels.llama_decode import LLAMA3_8B, RandomLlamaDecoder

    torch.manual_seed(0)
    model = RandomLlamaDecoder(dataclasses.replace(LLAMA3_8B, n_layers=2), torch.float32, "cuda", max_len=32, seed=4)
    model.record = [{} for _ in model.layers]
    model.step(torch.tensor([3], device="cuda"), torch.tensor([4], device="cuda"), "dense")
    record, model.record = model.record, None
    model.thresholds = _segmented(record)
    kv0 = model.kv.clone()
    token, pos = torch.zeros(1, dtype=torch.long, device="cuda"), torch.zeros(1, dtype=torch.long, device="cuda")
    model.step(token, pos, mode)
    model.kv.copy_(kv0)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        logits = model.step(token, pos, mode)
    assert model.fused_sites()["qkv"].plan.segments == (4096, 5120)
    got = []
    for t in range(3):
        token.fill_(11 + t)
        pos.fill_(5 + t)
        g.replay()
        got.append(logits.clone())
    model.kv.copy_(kv0)
    for t in range(3):
        ref = model.step(torch.tensor([11 + t], device="cuda"), torch.tensor([5 + t], device="cuda"), "reference")
        assert relative_error(got[t], ref) < 1e-3
