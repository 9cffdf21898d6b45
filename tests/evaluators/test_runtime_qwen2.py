"""The HF converter (evaluators/runtime.py) on a tiny randomly initialised Qwen2ForCausalLM (q|k|v biases, made
non-zero here): decoder_from_hf's prefill, reference decode and greedy generation equal HF; the fused kernel step
(Triton interpreter) equals the reference with non-zero thresholds; biases elsewhere and sliding-window layers
are refused by name. CPU, fp32."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
transformers = pytest.importorskip("transformers")
pytest.importorskip("allocator.kernels.runtime")

from allocator.evaluators.runtime import RuntimeUnsupported, decoder_from_hf, decoder_weights  # noqa: E402
from allocator.kernels import gemv as sg  # noqa: E402
from allocator.kernels.runtime import SITES  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)
interpreted = pytest.mark.skipif(not sg._interpreting(), reason="the fused step on a CPU needs TRITON_INTERPRET=1")


def tiny_qwen2(seed: int = 0, **overrides):
    """hidden 64, intermediate 128, 4 heads, 2 kv heads, head_dim 16, 2 layers, vocab 97; norms and biases random."""
    cfg = transformers.Qwen2Config(**{**dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                             num_key_value_heads=2, num_hidden_layers=2, vocab_size=97,
                                             max_position_embeddings=32, rms_norm_eps=1e-5, initializer_range=0.1,
                                             tie_word_embeddings=False), **overrides})
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):  # HF may initialise them to zero
                p.uniform_(-0.5, 0.5)
    model.generation_config.eos_token_id = None  # token-for-token comparison: never stop early
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def qwen2():
    return tiny_qwen2()


def _ids(B, T, seed=1):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


def test_converter_copies_the_qkv_biases(qwen2):
    weights = decoder_weights(qwen2)
    for lw, blk in zip(weights.layers, qwen2.model.layers):
        a = blk.self_attn
        assert torch.equal(lw.qkv_bias, torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        assert float(lw.qkv_bias.abs().min()) > 0


def test_prefill_and_reference_decode_equal_hf(qwen2):
    dec = decoder_from_hf(qwen2, None, max_len=32, max_batch=2)
    ids = _ids(2, 10)
    with torch.no_grad():
        full = qwen2(ids).logits.float()
    torch.testing.assert_close(dec.prefill(ids[:, :7]), full[:, :7], **TOL)
    for t in range(7, 10):  # three steps, each on the cache the previous one wrote
        torch.testing.assert_close(dec.decode_step(ids[:, t], torch.tensor([t]), mode="reference"), full[:, t], **TOL)


@interpreted
def test_fused_step_equals_reference_with_thresholds(qwen2):
    dec = decoder_from_hf(qwen2, None, max_len=32)
    ids = _ids(1, 9, seed=5)
    dec.record = [{} for _ in dec.layers]
    dec.prefill(ids)
    record, dec.record = dec.record, None
    dec.thresholds = [{site: float(rec[site].abs().quantile(0.4)) for site in SITES} for rec in record]
    out, kv = {}, {}
    for mode in ("fused", "reference", "dense"):
        dec.reset()
        dec.prefill(ids[:, :6])
        out[mode] = [dec.decode_step(ids[:, t], torch.tensor([t]), mode) for t in range(6, 9)]
        kv[mode] = dec.kv.clone()
    for a, b in zip(out["fused"], out["reference"]):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(kv["fused"], kv["reference"], **TOL)
    assert max(float((a - d).abs().max()) for a, d in zip(out["reference"], out["dense"])) > 1e-3  # masks bite


@interpreted
def test_greedy_generate_equals_hf(qwen2):
    dec = decoder_from_hf(qwen2, None, max_len=32, max_batch=2)
    prompt = _ids(2, 5, seed=7)
    with torch.no_grad():
        want = qwen2.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(dec.generate(prompt, 6, mode="reference", cuda_graph=False), want)
    assert torch.equal(dec.generate(prompt[:1], 6, mode="fused", cuda_graph=False), want[:1])


def test_biases_outside_qkv_and_sliding_windows_are_refused():
    model = tiny_qwen2()
    blk = model.model.layers[1]
    blk.self_attn.o_proj.bias = torch.nn.Parameter(torch.ones(64))
    with pytest.raises(RuntimeUnsupported, match=r"q, k, v projections only.*layer 1.*self_attn\.o_proj"):
        decoder_weights(model)
    model = tiny_qwen2()
    model.model.layers[0].mlp.down_proj.bias = torch.nn.Parameter(torch.ones(64))
    with pytest.raises(RuntimeUnsupported, match=r"layer 0 has biases in \['mlp\.down_proj'\]"):
        decoder_weights(model)
    with pytest.raises(RuntimeUnsupported, match="sliding-window"):
        decoder_weights(tiny_qwen2(use_sliding_window=True, sliding_window=8, max_window_layers=1))
    assert decoder_weights(tiny_qwen2(use_sliding_window=True, sliding_window=8, max_window_layers=2))  # all full
