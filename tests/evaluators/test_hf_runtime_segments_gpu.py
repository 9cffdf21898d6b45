"""On a CUDA GPU, the whole SmolLM2-135M shape (30 layers, random weights from its shipped config) with projection
units: every projection of every layer at its own level (q, k, v and gate, up apart: per-segment thresholds on the
shared |x| statistics), through decoder_from_hf; greedy fused_pdl decode under the CUDA graph equals the accuracy
path with the same plan over 32 steps (top-1 100%). Skipped without CUDA."""
import pytest
import torch

from test_hf_runtime_gpu import smol_shape  # noqa: F401  (the module fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("mode", ["fused_pdl", "sparse"])
def test_projection_units_decode_equal_the_accuracy_path_on_the_whole_model(smol_shape, mode):  # noqa: F811
    import numpy as np

    from allocator import analytic_tables, make_levels
    from allocator.evaluators.methods import get_method
    from allocator.evaluators.metrics import logits_of
    from allocator.evaluators.plan import CompressionPlan, Target, compressed
    from allocator.evaluators.runtime import decoder_from_hf, site_thresholds
    from allocator.levels import Level

    model, steps = smol_shape, 32
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, model.config.vocab_size, (4, 64), generator=gen)
    method = get_method("teal").calibrate(model, calib)
    units = analytic_tables(model.config.to_dict(), make_levels(s=[0.0]), unit="projection").units
    s = np.random.default_rng(1).choice([0.0, 0.3, 0.45, 0.6, 0.75], len(units))
    pairs = [(Target.from_unit(u), Level(float(v))) for u, v in zip(units, s) if v > 0]
    plan = CompressionPlan.build(model, method, pairs)
    assert sum(isinstance(row["qkv"], tuple) for row in site_thresholds(model, plan)) >= 20
    decoder = decoder_from_hf(model, plan, max_len=128)
    prompt = calib[:1, :16].cuda()
    tokens = decoder.generate(prompt, steps, mode=mode, cuda_graph=True)
    accurate = get_method("teal", sparse_fraction=(steps - 0.5) / tokens.shape[1])
    accurate.stats = method.stats
    pairs_accurate = CompressionPlan.build(model, accurate, pairs)
    with compressed(model, pairs_accurate):
        hf = logits_of(model, tokens)[0, prompt.shape[1] - 1:-1]
    ours = tokens[0, prompt.shape[1]:]
    # the fused modes sum split-K partials with fp32 atomics (not bit-deterministic): a channel at its threshold or a
    # near-tie of these random-weight logits may flip a token now and then (seen once in 3 runs on the H200: 30/32)
    gaps = hf.max(-1).values - hf.gather(-1, ours[:, None])[:, 0]       # 0 where the runtime picked HF's top-1
    print(f"{mode}: top-1 agreement {(gaps == 0).float().mean().item():.3f}, gaps where not {gaps[gaps > 0].tolist()}")
    assert torch.equal(hf.argmax(-1), ours) or ((gaps == 0).float().mean() >= 0.9 and gaps.max() < 0.05), \
        "the runtime's tokens differ from the accuracy path's beyond near-ties of the random-weight logits"
