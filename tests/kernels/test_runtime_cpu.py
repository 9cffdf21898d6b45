"""kernels/runtime.py's Decoder over the weights of a real (tiny, randomly initialised) HF LlamaForCausalLM and
Qwen2ForCausalLM (q|k|v biases): prefill, decode after prefill, the fused kernel step and greedy generation against
HF. CPU, fp32, with the Triton kernels under TRITON_INTERPRET=1 (tests/kernels/conftest.py); the RoPE + cache
kernel's bias rounding also in fp16."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
transformers = pytest.importorskip("transformers")

from allocator.kernels import gemv as sg  # noqa: E402
from allocator.kernels.decode_ops import rope_and_cache  # noqa: E402
from allocator.kernels.pipelined import SiteBuffers, plan_site, rope_and_cache_from_acc  # noqa: E402
from allocator.kernels.runtime import SITES, Decoder, DecoderShape, DecoderWeights, LayerWeights  # noqa: E402
from allocator.evaluators.testing import tiny_hf as random_hf  # noqa: E402

interpreted = pytest.mark.skipif(
    not sg._interpreting() or "Interpreted" not in type(sg._sparse_gemv_kernel).__name__,
    reason="CPU kernel tests need TRITON_INTERPRET=1 set before allocator.kernels is first imported",
)
TOL = dict(rtol=1e-4, atol=1e-4)


def tiny_hf(tied: bool = False, seed: int = 0, family: str = "llama"):
    """hidden 64, intermediate 128, 4 heads, 2 kv heads, head_dim 16, 2 layers, vocab 97; norm weights randomised.
    family "qwen2": Qwen2ForCausalLM, whose q, k, v projections have biases (randomised: HF may init them to 0)."""
    return random_hf(family, head_dim=None if family == "qwen2" else 16, tied=tied, seed=seed)


def to_decoder_weights(model) -> tuple[DecoderShape, DecoderWeights]:
    """What evaluators/runtime.py does for a Llama: fuse q|k|v and gate|up, store every projection transposed."""
    cfg, m = model.config, model.model

    def t(*linears):
        return torch.cat([lin.weight for lin in linears], dim=0).T.contiguous().detach()

    def bias(*linears):  # q|k|v bias (Qwen2), None without
        return torch.cat([lin.bias for lin in linears]).detach() if linears[0].bias is not None else None

    layers = [LayerWeights(attn_norm=blk.input_layernorm.weight.detach(),
                           mlp_norm=blk.post_attention_layernorm.weight.detach(),
                           qkv=t(blk.self_attn.q_proj, blk.self_attn.k_proj, blk.self_attn.v_proj),
                           o=t(blk.self_attn.o_proj), gate_up=t(blk.mlp.gate_proj, blk.mlp.up_proj),
                           down=t(blk.mlp.down_proj),
                           qkv_bias=bias(blk.self_attn.q_proj, blk.self_attn.k_proj, blk.self_attn.v_proj))
              for blk in m.layers]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = DecoderShape(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                         cfg.num_hidden_layers, cfg.vocab_size, norm_eps=cfg.rms_norm_eps, head_dim=head_dim)
    weights = DecoderWeights(embed=m.embed_tokens.weight.detach(), lm_head=model.lm_head.weight.detach(),
                             final_norm=m.norm.weight.detach(), layers=layers,
                             inv_freq=m.rotary_emb.inv_freq.detach().clone(),
                             attention_scaling=float(m.rotary_emb.attention_scaling))
    return shape, weights


FAMILIES = ("llama", "qwen2")  # qwen2: q|k|v projection biases


@pytest.fixture(scope="module")
def hf():
    return tiny_hf()


@pytest.fixture(scope="module", params=FAMILIES)
def any_hf(request):
    """The tiny model of each family (Qwen2's biases checked non-zero)."""
    model = tiny_hf(family=request.param)
    assert all(float(blk.self_attn.q_proj.bias.detach().abs().min()) > 0 for blk in model.model.layers
               if request.param == "qwen2")
    return model


def decoder(model, **kw) -> Decoder:
    shape, weights = to_decoder_weights(model)
    return Decoder(shape, weights, max_len=32, **kw)


def _ids(B, T, seed=1):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_prefill_logits_equal_hf(tied, family):
    model = tiny_hf(tied=tied, family=family)
    shape, weights = to_decoder_weights(model)
    assert all((lw.qkv_bias is not None) == (family == "qwen2") for lw in weights.layers)
    dec = Decoder(shape, weights, max_len=32, max_batch=2)
    assert tied == (dec.lm_head.data_ptr() == dec.embed.data_ptr())
    ids = _ids(2, 9)
    with torch.no_grad():
        ref = model(ids).logits.float()
    torch.testing.assert_close(dec.prefill(ids), ref, **TOL)
    if family == "qwen2":  # the bias matters
        no_bias = [LayerWeights(**{**vars(lw), "qkv_bias": None}) for lw in weights.layers]
        dropped = Decoder(shape, DecoderWeights(**{**vars(weights), "layers": no_bias}), max_len=32, max_batch=2)
        assert float((dropped.prefill(ids) - ref).abs().max()) > 1e-2


@pytest.mark.parametrize("B", [1, 2])
def test_reference_decode_after_prefill_equals_hf(any_hf, B):
    dec = decoder(any_hf, max_batch=2)
    ids = _ids(B, 10, seed=B)
    dec.prefill(ids[:, :7])
    with torch.no_grad():
        full = any_hf(ids).logits.float()
    for t in range(7, 10):  # three steps: each sees the cache the previous one wrote
        got = dec.decode_step(ids[:, t], torch.tensor([t]), mode="reference")
        torch.testing.assert_close(got, full[:, t], **TOL)
    assert float(dec.kv[:, :, :B, :, 10:].abs().max()) == 0.0  # nothing written past the last position


def _thresholds(dec: Decoder, ids: torch.Tensor, sparsity: float) -> list[dict[str, float]]:
    """Per layer and site, the `sparsity` quantile of |input| over a dense prefill (as a calibration would)."""
    dec.record = [{} for _ in dec.layers]
    dec.prefill(ids)
    record, dec.record = dec.record, None
    return [{site: float(rec[site].abs().float().quantile(sparsity)) for site in SITES} for rec in record]


@interpreted
def test_fused_step_equals_reference_with_thresholds(any_hf):
    """The producer-compacted, atomically accumulated step (Triton, interpreted) and the batch-1 "sparse" step
    == the PyTorch reference step with the same non-zero thresholds, over three steps after a prefill; masks
    really drop channels. Qwen2: the bias is added in the RoPE + cache kernel, to the fp32 accumulator
    ("fused") or to the rounded GEMV output ("sparse")."""
    ids = _ids(1, 9, seed=5)
    dec = decoder(any_hf)
    dec.thresholds = _thresholds(dec, ids, 0.4)
    assert all(t > 0 for row in dec.thresholds for t in row.values())
    out, kv = {}, {}
    for mode in ("fused", "sparse", "reference", "dense"):
        dec.reset()
        dec.prefill(ids[:, :6])
        out[mode] = [dec.decode_step(ids[:, t], torch.tensor([t]), mode) for t in range(6, 9)]
        kv[mode] = dec.kv.clone()
    assert all(float(s.acc.abs().max()) == 0.0 for s in dec.fused_sites().values())  # zero at rest
    for mode in ("fused", "sparse"):
        for a, b in zip(out[mode], out["reference"]):
            torch.testing.assert_close(a, b, **TOL)
        torch.testing.assert_close(kv[mode], kv["reference"], **TOL)
    assert max(float((a - d).abs().max()) for a, d in zip(out["reference"], out["dense"])) > 1e-3  # sparsity bites


@interpreted
def test_generate_equals_hf_greedy(any_hf):
    """Greedy generation, zero thresholds: fused_pdl and dense (batch 1; PDL is off in the interpreter), sparse
    and reference (batch 2) == HF's generate(do_sample=False), token for token."""
    dec = decoder(any_hf, max_batch=2)
    prompt = _ids(2, 5, seed=7)
    with torch.no_grad():
        want = any_hf.generate(prompt, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(dec.generate(prompt, 6, mode="reference"), want, rtol=0, atol=0)
    torch.testing.assert_close(dec.generate(prompt, 6, mode="sparse"), want, rtol=0, atol=0)
    torch.testing.assert_close(dec.generate(prompt[:1], 4, mode="dense"), want[:1, :9], rtol=0, atol=0)
    torch.testing.assert_close(dec.generate(prompt[:1], 4, mode="fused_pdl"), want[:1, :9], rtol=0, atol=0)
    with pytest.raises(ValueError, match="batch 1 only"):
        dec.generate(prompt, 2, mode="fused")


def test_errors_name_the_problem(hf):
    shape, weights = to_decoder_weights(hf)
    wrong = LayerWeights(**{**vars(weights.layers[0]), "qkv": weights.layers[0].qkv.T})  # [N, K]: not transposed
    bad = DecoderWeights(weights.embed, weights.lm_head, weights.final_norm, [wrong, *weights.layers[1:]])
    with pytest.raises(ValueError, match=r"layers\[0\]\.qkv has shape"):
        Decoder(shape, bad)
    dec = Decoder(shape, weights, max_len=32)
    with pytest.raises(ValueError, match="unknown mode"):
        dec.decode_step(torch.tensor([1]), torch.tensor([0]), mode="fast")
    with pytest.raises(ValueError, match="max_batch"):
        dec.decode_step(torch.tensor([1, 2]), torch.tensor([0]), mode="reference")
    with pytest.raises(ValueError, match="exceed max_len"):
        dec.generate(_ids(1, 30), 3)


@interpreted
def test_rope_cache_bias_rounding_fp16():
    """fp16: from the accumulator the bias joins the fp32 sum before the one rounding (addmm); from a rounded
    q|k|v the fp32 sum is rounded again (two roundings); no bias is the kernel as before."""
    nh, nkv, hd, max_len, p = 4, 2, 16, 8, 3
    n = (nh + 2 * nkv) * hd
    g = torch.Generator().manual_seed(0)
    acc = torch.randn(n, generator=g) * 3
    bias = (torch.randn(n, generator=g) * 3).half()
    angles = torch.arange(max_len).float()[:, None] * (1.0 / 100 ** (torch.arange(0, hd, 2).float() / hd))[None]
    cos, sin, pos = angles.cos(), angles.sin(), torch.tensor([p])

    def expect(qkv16):  # RoPE + cache write in PyTorch on an fp16 q|k|v
        x = qkv16.float().view(nh + 2 * nkv, hd)
        x1, x2 = x[:, : hd // 2], x[:, hd // 2:]
        c, s = cos[p], sin[p]
        rot = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).half()
        return rot[:nh], rot[nh: nh + nkv], x[nh + nkv:].half()

    def run(from_acc, b):
        kc = torch.zeros(nkv, max_len, hd, dtype=torch.float16)
        vc = torch.zeros_like(kc)
        if from_acc:
            site = SiteBuffers(plan_site(64, n, torch.device("cpu")), torch.device("cpu"))
            site.acc.copy_(acc)
            q = rope_and_cache_from_acc(site, cos, sin, pos, kc, vc, nh, nkv, bias=b)
            assert float(site.acc.abs().max()) == 0.0
        else:
            q = rope_and_cache(acc.half(), cos, sin, pos, kc, vc, nh, nkv, bias=b)
        return q, kc[:, p], vc[:, p]

    once = (acc + bias.float()).half()
    twice = (acc.half().float() + bias.float()).half()
    assert not torch.equal(once, twice)  # the two rules differ on these numbers
    for from_acc, b, qkv16 in ((True, bias, once), (False, bias, twice), (True, None, acc.half()),
                               (False, None, acc.half())):
        for got, want in zip(run(from_acc, b), expect(qkv16)):
            assert torch.equal(got, want), (from_acc, b is None)
