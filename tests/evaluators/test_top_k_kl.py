"""The top-k KL (the dense model's k most likely tokens plus one tail bucket) against the exact full-vocabulary KL:
a lower bound (log-sum inequality), exact when k covers the vocabulary, within 1e-3 on the real SmolLM2 at
k = 1024; chosen by vocabulary size from ProfileConfig; used by profiling and the measured objective."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from allocator.config import ConfigError, ProfileConfig, load_config  # noqa: E402
from allocator.evaluators.metrics import (TopKReference, kl_top_k_for, logits_of, reference_logprobs,  # noqa: E402
                                          token_losses)
from allocator.evaluators.plan import Target, apply_levels, restore_  # noqa: E402


def _pair(vocab=5000, b=2, t=12, seed=0, noise=0.7):
    gen = torch.Generator().manual_seed(seed)
    dense = 3 * torch.randn(b, t, vocab, generator=gen)
    return dense, dense + noise * torch.randn(b, t, vocab, generator=gen), torch.randint(0, vocab, (b, t), generator=gen)


def test_top_k_is_a_lower_bound_that_tightens_with_k_and_is_exact_at_the_vocabulary():
    dense, other, ids = _pair()
    nll, exact, n = token_losses(other, ids, reference_logprobs(dense))
    previous = -1.0
    for k in (1, 16, 256, 2048, 4999):
        nll_k, kl_k, n_k = token_losses(other, ids, reference_logprobs(dense, k))
        assert n_k == n and nll_k == pytest.approx(nll, rel=1e-6)      # the NLL does not depend on k
        assert kl_k <= exact * (1 + 1e-6) and kl_k >= previous - 1e-9   # lower bound, monotone in k
        previous = kl_k
    assert isinstance(reference_logprobs(dense, 5000), torch.Tensor)   # k >= vocabulary: the full reference
    assert previous == pytest.approx(exact, rel=1e-5)                 # k = vocab - 1: the tail is one token


def test_identical_models_have_zero_top_k_kl_and_slicing_matches_score_last():
    dense, other, ids = _pair(seed=1)
    ref = reference_logprobs(dense, 64)
    assert isinstance(ref, TopKReference) and ref.k == 64 and len(ref) == 2
    assert token_losses(dense, ids, ref)[1] == pytest.approx(0.0, abs=1e-9)
    whole = [token_losses(other[r:r + 1], ids[r:r + 1], ref[r:r + 1], 0.5) for r in range(2)]
    both = token_losses(other, ids, ref, 0.5)
    assert both[1] == pytest.approx(sum(w[1] for w in whole), rel=1e-9) and both[2] == 2 * 6


def test_a_tiny_dense_tail_stays_tiny():
    """A dense model that puts all but ~1e-12 of its mass on the kept tokens: the tail term stays ~0 (its mass is
    summed, not taken as 1 - kept, which rounds it to noise whose log would dominate)."""
    dense = torch.full((1, 3, 1000), -40.0)
    dense[..., :8] = torch.linspace(5, 0, 8)
    other = dense.clone()
    other[..., :8] = torch.linspace(4, 0, 8)
    ids = torch.zeros(1, 3, dtype=torch.long)
    exact = token_losses(other, ids, reference_logprobs(dense))[1]
    approx = token_losses(other, ids, reference_logprobs(dense, 8))[1]
    assert approx == pytest.approx(exact, rel=1e-5, abs=1e-9)


def test_the_vocabulary_size_chooses_exact_or_top_k_from_profile_config():
    assert (ProfileConfig.kl_top_k, ProfileConfig.kl_exact_vocab) == (4096, 65536)
    assert kl_top_k_for(49152) is None                          # SmolLM2: exact (the golden numbers hold)
    assert kl_top_k_for(262144) == 4096                         # Gemma-3
    assert kl_top_k_for(262144, 0) is None                      # 0: always exact
    assert kl_top_k_for(49152, 1024, exact_vocab=0) == 1024     # forced on a small vocabulary
    assert kl_top_k_for(1000, 4096, exact_vocab=0) is None      # k >= vocabulary: exact
    assert load_config({"profile": {"kl_top_k": 512}}).profile.kl_top_k == 512
    for bad in (-1, 2.5, "many"):
        with pytest.raises(ConfigError, match="kl_top_k"):
            load_config({"profile": {"kl_top_k": bad}})
    with pytest.raises(ConfigError, match="kl_exact_vocab"):
        load_config({"profile": {"kl_exact_vocab": -5}})


@pytest.mark.slow
def test_top_k_kl_on_the_real_smollm2(small_model, calibrated, eval_windows):
    """The cut SmolLM2 (4 layers) under uniform TEAL: top-1024 KL within 1e-3 of the exact KL (taken in float64),
    and below it (measured: -1.0e-4 at s=0.3, -1.4e-4 at 0.5, -3.0e-4 at 0.7 on 4 x 96 calibration windows)."""
    model, method = small_model[0], calibrated["teal"]
    windows = eval_windows[:4]
    dense = logits_of(model, windows)
    for s in (0.3, 0.7):
        apply_levels(model, method, [(Target.span(0, len(model.model.layers) - 1), {"s": s, "rho": 1.0})])
        try:
            logits = logits_of(model, windows)
        finally:
            restore_(model)
        p, q = dense[:, :-1].double().log_softmax(-1), logits[:, :-1].double().log_softmax(-1)
        exact = (p.exp() * (p - q)).sum().item()
        nll, exact32, n = token_losses(logits, windows, reference_logprobs(dense))
        nll_k, approx, _ = token_losses(logits, windows, reference_logprobs(dense, 1024))
        assert exact32 == pytest.approx(exact, rel=1e-4)
        assert -1e-3 < (approx - exact) / exact <= 1e-6, (s, approx, exact)
        assert abs(nll_k - nll) / n < 1e-5


@pytest.mark.slow
def test_profiling_and_the_measured_objective_use_the_top_k_kl(small_model, calibrated, eval_windows):
    from allocator.evaluators.objective import MeasuredObjective
    from allocator.evaluators.profiling import profile
    from allocator.levels import Level, make_levels
    model, method = small_model[0], calibrated["teal"]
    windows, levels = eval_windows[:2, :48], make_levels(s=[0.0, 0.5])
    units = [Target.of(1, ("gate", "up")), Target.of(3, ("down",))]
    exact = profile(model, method, windows, levels, units, cache=False, progress=False)
    top = profile(model, method, windows, levels, units, cache=False, progress=False, kl_top_k=512,
                  kl_exact_vocab=0)
    assert top.provenance["profile_key"] != exact.provenance["profile_key"]    # cached rows never mix
    ratio = top.kl[:, 1] / exact.kl[:, 1]     # small KLs (~1e-3): float32 rounding of the exact one is ~1e-4
    assert (abs(ratio - 1) < 2e-3).all(), ratio
    assert top.nll == pytest.approx(exact.nll, rel=1e-5)
    pairs = [(units[0], Level(0.5, 1.0, 16))]
    full = MeasuredObjective(model, windows, method)
    assert full.kl_top_k is None
    cut = MeasuredObjective(model, windows, method, kl_top_k=512, kl_exact_vocab=0)
    assert cut.kl_top_k == 512
    assert cut(pairs) == pytest.approx(top.kl[0, 1], rel=1e-5)
    assert full(pairs) == pytest.approx(exact.kl[0, 1], rel=1e-5)
