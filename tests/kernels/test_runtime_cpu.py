"""kernels/runtime.py's Decoder over the weights of a real (tiny, randomly initialised) HF LlamaForCausalLM:
prefill, decode after prefill, the fused kernel step and greedy generation against HF. CPU, fp32, with the
Triton kernels under TRITON_INTERPRET=1 (tests/kernels/conftest.py)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
transformers = pytest.importorskip("transformers")

from allocator.kernels import gemv as sg  # noqa: E402
from allocator.kernels.runtime import SITES, Decoder, DecoderShape, DecoderWeights, LayerWeights  # noqa: E402

interpreted = pytest.mark.skipif(
    not sg._interpreting() or "Interpreted" not in type(sg._sparse_gemv_kernel).__name__,
    reason="CPU kernel tests need TRITON_INTERPRET=1 set before allocator.kernels is first imported",
)
TOL = dict(rtol=1e-4, atol=1e-4)


def tiny_hf(tied: bool = False, seed: int = 0):
    """hidden 64, intermediate 128, 4 heads, 2 kv heads, head_dim 16, 2 layers, vocab 97; norm weights randomised."""
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, num_hidden_layers=2, vocab_size=97,
                                   max_position_embeddings=32, rms_norm_eps=1e-5, initializer_range=0.1,
                                   tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.generation_config.eos_token_id = None  # token-for-token comparison: never stop early
    model.generation_config.pad_token_id = 0
    return model


def to_decoder_weights(model) -> tuple[DecoderShape, DecoderWeights]:
    """What evaluators/runtime.py does for a Llama: fuse q|k|v and gate|up, store every projection transposed."""
    cfg, m = model.config, model.model

    def t(*linears):
        return torch.cat([lin.weight for lin in linears], dim=0).T.contiguous().detach()

    layers = [LayerWeights(attn_norm=blk.input_layernorm.weight.detach(),
                           mlp_norm=blk.post_attention_layernorm.weight.detach(),
                           qkv=t(blk.self_attn.q_proj, blk.self_attn.k_proj, blk.self_attn.v_proj),
                           o=t(blk.self_attn.o_proj), gate_up=t(blk.mlp.gate_proj, blk.mlp.up_proj),
                           down=t(blk.mlp.down_proj)) for blk in m.layers]
    shape = DecoderShape(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                         cfg.num_hidden_layers, cfg.vocab_size, norm_eps=cfg.rms_norm_eps, head_dim=cfg.head_dim)
    weights = DecoderWeights(embed=m.embed_tokens.weight.detach(), lm_head=model.lm_head.weight.detach(),
                             final_norm=m.norm.weight.detach(), layers=layers,
                             inv_freq=m.rotary_emb.inv_freq.detach().clone(),
                             attention_scaling=float(m.rotary_emb.attention_scaling))
    return shape, weights


@pytest.fixture(scope="module")
def hf():
    return tiny_hf()


def decoder(model, **kw) -> Decoder:
    shape, weights = to_decoder_weights(model)
    return Decoder(shape, weights, max_len=32, **kw)


def _ids(B, T, seed=1):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tied", [False, True])
def test_prefill_logits_equal_hf(tied):
    model = tiny_hf(tied=tied)
    shape, weights = to_decoder_weights(model)
    dec = Decoder(shape, weights, max_len=32, max_batch=2)
    assert tied == (dec.lm_head.data_ptr() == dec.embed.data_ptr())
    ids = _ids(2, 9)
    with torch.no_grad():
        ref = model(ids).logits.float()
    torch.testing.assert_close(dec.prefill(ids), ref, **TOL)


@pytest.mark.parametrize("B", [1, 2])
def test_reference_decode_after_prefill_equals_hf(hf, B):
    dec = decoder(hf, max_batch=2)
    ids = _ids(B, 10, seed=B)
    dec.prefill(ids[:, :7])
    with torch.no_grad():
        full = hf(ids).logits.float()
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
def test_fused_step_equals_reference_with_thresholds(hf):
    """The producer-compacted, atomically accumulated step (Triton, interpreted) == the PyTorch reference
    step with the same non-zero thresholds, over three steps after a prefill; masks really drop channels."""
    ids = _ids(1, 9, seed=5)
    dec = decoder(hf)
    dec.thresholds = _thresholds(dec, ids, 0.4)
    assert all(t > 0 for row in dec.thresholds for t in row.values())
    out, kv = {}, {}
    for mode in ("fused", "reference", "dense"):
        dec.reset()
        dec.prefill(ids[:, :6])
        out[mode] = [dec.decode_step(ids[:, t], torch.tensor([t]), mode) for t in range(6, 9)]
        kv[mode] = dec.kv.clone()
    assert all(float(s.acc.abs().max()) == 0.0 for s in dec.fused_sites().values())  # zero at rest
    for a, b in zip(out["fused"], out["reference"]):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(kv["fused"], kv["reference"], **TOL)
    assert max(float((a - d).abs().max()) for a, d in zip(out["reference"], out["dense"])) > 1e-3  # sparsity bites


@interpreted
def test_generate_equals_hf_greedy(hf):
    """Greedy generation, zero thresholds: fused_pdl (batch 1; PDL is off in the interpreter), sparse and
    reference (batch 2) == HF's generate(do_sample=False), token for token."""
    dec = decoder(hf, max_batch=2)
    prompt = _ids(2, 5, seed=7)
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(dec.generate(prompt, 6, mode="reference"), want, rtol=0, atol=0)
    torch.testing.assert_close(dec.generate(prompt, 6, mode="sparse"), want, rtol=0, atol=0)
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
