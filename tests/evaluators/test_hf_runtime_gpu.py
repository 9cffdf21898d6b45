"""On a CUDA GPU, the whole SmolLM2-135M shape (30 layers, random weights from its shipped config: the real
weights do not travel to the lent GPU) through decoder_from_hf: greedy fused_pdl decode under the CUDA graph
equals the accuracy path with the same non-uniform plan over 32 steps (top-1 100%, fp32 logits), and at s = 0
greedy generation equals HF generate. Skipped without CUDA."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def smol_shape():
    from transformers import AutoConfig, AutoModelForCausalLM

    from allocator import load_model_config
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**load_model_config("smollm2-135m")),
                                                 dtype=torch.float32)
    return model.eval().requires_grad_(False)


def test_fused_decode_equals_the_accuracy_path_on_the_whole_model(smol_shape):
    import numpy as np

    from allocator import analytic_tables, make_levels
    from allocator.evaluators.methods import get_method
    from allocator.evaluators.metrics import logits_of
    from allocator.evaluators.plan import CompressionPlan, Target, compressed
    from allocator.evaluators.runtime import decoder_from_hf
    from allocator.levels import Level

    model, steps = smol_shape, 32
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, model.config.vocab_size, (4, 64), generator=gen)
    method = get_method("teal").calibrate(model, calib)
    units = analytic_tables(model.config.to_dict(), make_levels(s=[0.0]), unit="input").units
    s = np.random.default_rng(0).choice([0.3, 0.5, 0.7], len(units))
    pairs = [(Target.from_unit(u), Level(float(v))) for u, v in zip(units, s)]
    decoder = decoder_from_hf(model, CompressionPlan.build(model, method, pairs), max_len=128)
    prompt = calib[:1, :16].cuda()
    tokens = decoder.generate(prompt, steps, mode="fused_pdl", cuda_graph=True)
    accurate = get_method("teal", sparse_fraction=(steps - 0.5) / tokens.shape[1])
    accurate.stats = method.stats
    with compressed(model, CompressionPlan.build(model, accurate, pairs)):
        hf = logits_of(model, tokens)[0, prompt.shape[1] - 1:-1]
    assert torch.equal(hf.argmax(-1), tokens[0, prompt.shape[1]:])          # top-1 agreement: 100%


def test_greedy_generation_at_s0_equals_hf_generate(smol_shape):
    from allocator.evaluators.runtime import decoder_from_hf

    prompt = torch.randint(0, smol_shape.config.vocab_size, (1, 12), device="cuda")
    ours = decoder_from_hf(smol_shape, None, max_len=64).generate(prompt, 24, mode="fused_pdl")
    smol_shape.generation_config.eos_token_id = None
    theirs = smol_shape.generate(prompt, max_new_tokens=24, do_sample=False, min_new_tokens=24)
    assert torch.equal(ours, theirs)


def test_lowbit_decode_equals_the_accuracy_path_on_the_whole_model(smol_shape):
    """A plan mixing formats (INT4 g64 / per channel, INT8, FP8 with e4m3 inputs and FP8 prefill) and sparsities
    per unit: greedy decode in mode "sparse" (the low-bit GEMV) under the CUDA graph against the HF model with the
    plan applied. fp32 atomics in the split-K reduction can flip a near-tie, so 31 of 32 steps must agree."""
    import numpy as np

    from allocator import analytic_tables, make_levels
    from allocator.evaluators.methods import get_method
    from allocator.evaluators.metrics import logits_of
    from allocator.evaluators.plan import CompressionPlan, Target, compressed
    from allocator.evaluators.runtime import decoder_from_hf
    from allocator.levels import Level

    model, steps = smol_shape, 32
    calib = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1))
    method = get_method("teal").calibrate(model, calib)
    units = analytic_tables(model.config.to_dict(), make_levels(s=[0.0]), unit="input").units
    rng = np.random.default_rng(1)
    formats = ["bf16", "w4a16-g64", "w4a16", "w8a16", "w8a8-fp8"]
    pairs = [(Target.from_unit(u), Level(float(rng.choice([0.0, 0.4, 0.6])), fmt=str(rng.choice(formats))))
             for u in units]
    decoder = decoder_from_hf(model, CompressionPlan.build(model, method, pairs), max_len=128)
    assert decoder.has_lowbit
    prompt = calib[:1, :16].cuda()
    tokens = decoder.generate(prompt, steps, mode="sparse", cuda_graph=True)
    accurate = get_method("teal", sparse_fraction=(steps - 0.5) / tokens.shape[1])
    accurate.stats = method.stats
    with compressed(model, CompressionPlan.build(model, accurate, pairs)):
        hf = logits_of(model, tokens)[0, prompt.shape[1] - 1:-1]
    agree = int((hf.argmax(-1) == tokens[0, prompt.shape[1]:]).sum())
    print(f"low-bit decode, whole SmolLM2 shape: top-1 agreement {agree}/{steps}")
    assert agree >= steps - 1
