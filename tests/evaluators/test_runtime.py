"""The speed path equals the accuracy path: the decode runtime converted from the real (cut) SmolLM2 and a
non-uniform plan gives the logits the HF model gives with the same plan applied (dense prompt, sparse decode),
with one level per fused input and with q, k, v (gate, up) at levels of their own."""
import pytest
import torch

from allocator.evaluators.methods import get_method
from allocator.evaluators.metrics import logits_of
from allocator.evaluators.plan import CompressionPlan, Target, compressed
from allocator.levels import Level

pytest.importorskip("allocator.kernels.runtime")
from allocator.evaluators.runtime import RuntimeUnsupported, decoder_from_hf, site_thresholds  # noqa: E402

LEVELS = [(0, ("q", "k", "v"), 0.5), (0, ("o",), 0.3), (0, ("gate", "up"), 0.6), (0, ("down",), 0.4),
          (1, ("q", "k", "v"), 0.7), (1, ("gate", "up"), 0.5), (1, ("down",), 0.6)]    # layer 1's o stays dense


@pytest.fixture(scope="module")
def two_layers(calib_windows):
    from allocator.evaluators.models import load_model
    model, _ = load_model("smollm2-135m", dtype="float32", max_layers=2)
    method = get_method("teal", shared_inputs=True).calibrate(model, calib_windows)
    return model, method


def plan_for(model, method, sparse_fraction=1.0):
    tuned = get_method("teal", sparse_fraction=sparse_fraction, shared_inputs=True)
    tuned.stats = method.stats
    return CompressionPlan.build(model, tuned, [(Target.of(i, k), Level(s)) for i, k, s in LEVELS])


def greedy_runtime(decoder, prompt, steps, mode):
    decoder.reset()
    logits = [decoder.prefill(prompt)[:, -1]]
    tokens = prompt
    for t in range(steps):
        nxt = logits[-1].argmax(-1)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        logits.append(decoder.decode_step(nxt, torch.tensor([prompt.shape[1] + t]), mode))
    return tokens, torch.stack(logits[1:], dim=1)


def test_runtime_decode_equals_the_accuracy_path_with_the_same_plan(two_layers, eval_windows):
    model, method = two_layers
    prompt, steps = eval_windows[:1, :16], 12
    thresholds = site_thresholds(model, plan_for(model, method))
    assert thresholds[1]["o"] == 0.0 and all(t > 0 for t in thresholds[0].values())
    decoder = decoder_from_hf(model, plan_for(model, method), max_len=64)
    tokens, runtime_logits = greedy_runtime(decoder, prompt, steps, "reference")
    # the accuracy path on the same tokens: the prompt dense, every later position sparse
    accuracy_plan = plan_for(model, method, sparse_fraction=(steps - 0.5) / tokens.shape[1])
    with compressed(model, accuracy_plan):
        hf = logits_of(model, tokens)[:, prompt.shape[1]:prompt.shape[1] + steps]
    assert (runtime_logits.argmax(-1) == hf.argmax(-1)).all()                      # top-1 agreement 100%
    torch.testing.assert_close(runtime_logits, hf, rtol=1e-3, atol=2e-3)
    with torch.no_grad():
        dense = logits_of(model, tokens)[:, prompt.shape[1]:prompt.shape[1] + steps]
    assert (runtime_logits - dense).abs().max() > 0.05                              # the masks did something


def test_runtime_greedy_generation_at_s0_equals_hf_generate(two_layers, eval_windows):
    model, _ = two_layers
    prompt = eval_windows[:1, :12]
    decoder = decoder_from_hf(model, None, max_len=64)
    ours = decoder.generate(prompt, 10, mode="reference", cuda_graph=False)
    with torch.no_grad():
        theirs = model.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10)
    assert torch.equal(ours, theirs)


PER_PROJECTION = [(0, ("q",), 0.3), (0, ("k",), 0.6), (0, ("v",), 0.45), (0, ("o",), 0.3), (0, ("gate",), 0.5),
                  (0, ("up",), 0.2), (0, ("down",), 0.4), (1, ("q",), 0.6), (1, ("k",), 0.3),  # layer 1's v dense
                  (1, ("gate",), 0.4), (1, ("up",), 0.6), (1, ("down",), 0.5)]


def per_projection_plan(model, method, sparse_fraction=1.0):
    tuned = get_method("teal", sparse_fraction=sparse_fraction, shared_inputs=True)
    tuned.stats = method.stats
    return CompressionPlan.build(model, tuned, [(Target.of(i, k), Level(s)) for i, k, s in PER_PROJECTION])


def test_per_projection_levels_decode_equal_the_accuracy_path(two_layers, eval_windows):
    """q, k, v (gate, up) at their own levels: one |x| statistic per fused input, so three (two) thresholds on it;
    the runtime applies each to its column segment and its decode logits equal the HF model with the same plan."""
    model, method = two_layers
    prompt, steps = eval_windows[:1, :16], 12
    thresholds = site_thresholds(model, per_projection_plan(model, method))
    assert len(set(thresholds[0]["qkv"])) == 3 and len(set(thresholds[0]["gate_up"])) == 2
    assert thresholds[1]["qkv"][2] == 0.0 and thresholds[1]["o"] == 0.0       # what the plan leaves out: dense
    decoder = decoder_from_hf(model, per_projection_plan(model, method), max_len=64)
    tokens, runtime_logits = greedy_runtime(decoder, prompt, steps, "reference")
    accuracy_plan = per_projection_plan(model, method, sparse_fraction=(steps - 0.5) / tokens.shape[1])
    with compressed(model, accuracy_plan):
        hf = logits_of(model, tokens)[:, prompt.shape[1]:prompt.shape[1] + steps]
    assert (runtime_logits.argmax(-1) == hf.argmax(-1)).all()
    torch.testing.assert_close(runtime_logits, hf, rtol=1e-3, atol=2e-3)
    decoder.thresholds = [{site: t if isinstance(t, float) else t[0] for site, t in row.items()}
                          for row in thresholds]                               # q's threshold on the whole site
    _, one_mask = greedy_runtime(decoder, prompt, 1, "reference")              # the same first step, one mask
    assert (runtime_logits[:, 0] - one_mask[:, 0]).abs().max() > 0.05          # the segments did something


def test_plans_the_runtime_cannot_run_are_named(two_layers):
    model, method = two_layers
    partial = get_method("teal", sparse_fraction=0.5, shared_inputs=True)     # dense prompt tokens: not a runtime rule
    partial.stats = method.stats
    with pytest.raises(RuntimeUnsupported, match="plain thresholds on every token"):
        site_thresholds(model, CompressionPlan.build(model, partial, [(Target.of(0, ("q", "k", "v")), Level(0.5))]))
    per_projection = get_method("teal", shared_inputs=False).calibrate(model, torch.randint(0, 1000, (2, 32)))
    row = site_thresholds(model, CompressionPlan.build(model, per_projection, [(Target.of(0, ("q",)), Level(0.5))]))
    assert row[0]["qkv"][0] > 0 and row[0]["qkv"][1:] == (0.0, 0.0)           # q sparse, k and v dense


FORMATS = [(0, ("q", "k", "v"), 0.5, "w4a16-g64"), (0, ("o",), 0.3, "w8a8-fp8"), (0, ("gate", "up"), 0.0, "w8a16"),
           (0, ("down",), 0.4, "w4a16"), (1, ("q",), 0.6, "w4a16-g64"), (1, ("k",), 0.3, "w4a16-g64"),
           (1, ("gate", "up"), 0.5, "w8a16"), (1, ("down",), 0.0, "w8a8-fp8")]   # layer 1's v and o: bf16, dense


def format_plan(model, method, sparse_fraction=1.0):
    tuned = get_method("teal", sparse_fraction=sparse_fraction, shared_inputs=True)
    tuned.stats = method.stats
    return CompressionPlan.build(model, tuned, [(Target.of(i, k), Level(s, fmt=f)) for i, k, s, f in FORMATS])


def test_a_plan_with_formats_decodes_as_the_accuracy_path(two_layers, eval_windows):
    """Low-bit projections carry the accuracy path's own codes and scales into the runtime (INT4 in groups and per
    channel, INT8, FP8 with e4m3 inputs, FP8 prefill): its decode logits equal the HF model with the plan applied."""
    from allocator.evaluators.runtime import quantized_projections
    model, method = two_layers
    plan = format_plan(model, method)
    decode, prefill = quantized_projections(model, plan)
    assert {k: w.weight.fmt for k, w in decode[0].items()} == {"q": "int4", "k": "int4", "v": "int4", "o": "fp8",
                                                                "gate": "int8", "up": "int8", "down": "int4"}
    assert decode[0]["q"].weight.group == 64 and decode[0]["o"].act == "fp8" and set(prefill[1]) == {"down"}
    prompt, steps = eval_windows[:1, :16], 10
    decoder = decoder_from_hf(model, plan, max_len=64)
    assert decoder.has_lowbit and decoder.prefill_fp8_kinds(0) == ["o"]
    tokens, runtime_logits = greedy_runtime(decoder, prompt, steps, "reference")
    with compressed(model, format_plan(model, method, sparse_fraction=(steps - 0.5) / tokens.shape[1])):
        hf = logits_of(model, tokens)[:, prompt.shape[1]:prompt.shape[1] + steps]
    assert (runtime_logits.argmax(-1) == hf.argmax(-1)).all()
    torch.testing.assert_close(runtime_logits, hf, rtol=1e-3, atol=2e-3)
    with compressed(model, plan_for(model, method, sparse_fraction=(steps - 0.5) / tokens.shape[1])):
        unquantized = logits_of(model, tokens)[:, prompt.shape[1]:prompt.shape[1] + steps]
    assert (runtime_logits - unquantized).abs().max() > 0.05                    # the formats did something


def test_formats_without_a_decode_kernel_are_named(two_layers):
    model, method = two_layers
    for fmt in ("w3a16-g64", "w8a8-int8"):
        plan = CompressionPlan.build(model, method, [(Target.of(0, ("o",)), Level(0.5, fmt=fmt))])
        with pytest.raises(RuntimeUnsupported, match=f"format {fmt} has no decode kernel"):
            decoder_from_hf(model, plan, max_len=16)
