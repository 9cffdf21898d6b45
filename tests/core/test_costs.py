"""Analytic cost model against numbers derived by hand."""
import numpy as np
import pytest

from allocator import analytic_tables, make_levels, model_shape, shipped_model_configs
from allocator.costs import fixed_costs, projection_costs, rsparse_split
from allocator.levels import Level


def test_llama2_7b_prefill_2048_by_hand():
    # Llama-2-7B: d = 4096, d_ff = 11008, 32 layers, 32 heads, MHA (32 KV heads), head_dim 128.
    # One layer's weights: q, k, v, o are 4096 x 4096 = 16,777,216 each -> 67,108,864;
    # gate, up, down are 11008 x 4096 = 45,088,768 each -> 135,266,304; total 202,375,168.
    # Prefill FLOPs of the projections for N = 2048 tokens: 2 * N * params = 2 * 2048 * 202,375,168
    #   = 828,928,688,128 per layer (8.29e11), x 32 layers = 26,525,718,020,096.
    # Fixed (not allocatable): attention scores QK^T + AV = 4 * N^2 * d per layer = 4 * 2048^2 * 4096
    #   = 68,719,476,736, x 32 = 2,199,023,255,552; LM head 2 * N * d * V = 2 * 2048 * 4096 * 32000
    #   = 536,870,912,000.
    tables = analytic_tables("llama-2-7b", make_levels(s=[0.0, 0.5]), unit="layer", tokens=2048)
    prefill = tables.cost("flops_prefill")
    assert prefill.shape == (32, 2)
    assert prefill[0, 0] == 828_928_688_128
    assert prefill[:, 0].sum() == 26_525_718_020_096
    # at 50% activation sparsity exactly half the input channels (2048 of 4096 / 5504 of 11008) are read
    assert prefill[0, 1] == 828_928_688_128 / 2
    fixed = tables.provenance["fixed_costs"]["flops_prefill"]
    assert fixed == 2_199_023_255_552 + 536_870_912_000
    # total ~ 29.3 TFLOP, of which the projections are the 90.6 % a sparsity allocation can act on
    assert (prefill[:, 0].sum() + fixed) / 1e12 == pytest.approx(29.26, abs=0.01)


def test_llama2_7b_decode_bytes_and_bits_by_hand():
    # fp16 decode reads every weight once: 202,375,168 params x 2 bytes = 404,750,336 bytes per layer.
    # 4-bit with one fp16 scale per 128 weights: 0.5 + 2/128 = 0.515625 bytes/weight -> 104,349,696.
    tables = analytic_tables("llama-2-7b", make_levels(s=[0.0, 0.5], bits=[16, 4]), unit="layer")
    levels = tables.levels.to_dict(orient="records")
    col = {(lv["s"], lv["bits"]): i for i, lv in enumerate(levels)}
    bytes_decode = tables.cost("bytes_decode")[0]
    assert bytes_decode[col[(0.0, 16)]] == 404_750_336
    assert bytes_decode[col[(0.5, 16)]] == 202_375_168
    assert bytes_decode[col[(0.0, 4)]] == 104_349_696
    assert tables.cost("flops_decode")[0, col[(0.0, 16)]] == 2 * 202_375_168
    # bits do not change the FLOP count
    assert tables.cost("flops_decode")[0, col[(0.0, 4)]] == 2 * 202_375_168


def test_rsparse_split_by_hand():
    # gate_proj of Llama-2-7B (d_out 11008, d_in 4096) at s = 0.5, rho = 0.9:
    # k = floor(4096 * 0.5 * 0.9) = 1843; B = 4096 * 11008 * 0.5 = 22,544,384;
    # r = floor((22,544,384 - 1843 * 11008) / (4096 + 11008)) = floor(2,256,640 / 15104) = 149
    assert rsparse_split(d_out=11008, d_in=4096, s=0.5, rho=0.9) == (1843, 149)
    c = projection_costs(11008, 4096, Level(0.5, 0.9), tokens=1)
    assert c["flops_decode"] == 2 * (1843 * 11008 + 149 * 15104)
    # the R-Sparse examples: gate 4096->14336 at s=.5, a=.8 gives k=1638, r=318; q 4096^2 at s=.5, a=.5 k=1024, r=512
    assert rsparse_split(d_out=14336, d_in=4096, s=0.5, rho=0.8) == (1638, 318)
    assert rsparse_split(d_out=4096, d_in=4096, s=0.5, rho=0.5) == (1024, 512)
    # rho = 1 is pure sparsity (no rank), s = 0 is dense
    assert rsparse_split(d_out=4096, d_in=4096, s=0.5, rho=1.0) == (2048, 0)
    assert rsparse_split(d_out=4096, d_in=4096, s=0.0, rho=0.3) == (4096, 0)


def test_gqa_shapes_are_real():
    shape = model_shape("llama-3-8b")
    p = shape.projection_shapes()
    assert p["k"] == (1024, 4096) and p["v"] == (1024, 4096) and p["q"] == (4096, 4096)
    assert p["gate"] == (14336, 4096) and p["down"] == (4096, 14336)
    smol = model_shape("smollm2-135m").projection_shapes()
    assert smol["k"] == (192, 576) and smol["gate"] == (1536, 576)
    gemma = model_shape("gemma-7b").projection_shapes()
    assert gemma["q"] == (16 * 256, 3072)


def test_shipped_configs_and_parameter_counts():
    names = shipped_model_configs()
    for needed in ("llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "mistral-7b",
                   "qwen2.5-7b", "gemma-7b", "smollm2-135m"):
        assert needed in names
    # projection parameters of SmolLM2-135M: 30 layers x (576*576*2 + 576*192*2 + 3*576*1536) = 106,168,320
    t = analytic_tables("smollm2-135m", make_levels(s=[0.0]))
    assert sum(u.params for u in t.units) == 106_168_320
    # per-projection, per-block and per-input units partition the same costs
    for unit, per_layer in (("projection", 7), ("block", 2), ("input", 4)):
        tp = analytic_tables("smollm2-135m", make_levels(s=[0.0, 0.5]), unit=unit)
        assert tp.n_units == 30 * per_layer
        np.testing.assert_allclose(tp.cost("bytes_decode").sum(axis=0), t.cost("bytes_decode").sum() * np.array([1, 0.5]),
                                   rtol=1e-3)
    names = analytic_tables("smollm2-135m", make_levels(s=[0.0]), unit="input").unit_names[:4]
    assert names == ["layers.0.q+k+v", "layers.0.o", "layers.0.gate+up", "layers.0.down"]


def test_fixed_costs_decode():
    shape = model_shape("llama-3-8b")
    fixed = fixed_costs(shape, tokens=1, context=4096)
    # LM head dominates: 2 * 4096 * 128256 FLOPs, 4096 * 128256 * 2 bytes
    assert fixed["flops_decode"] >= 2 * 4096 * 128256
    assert fixed["bytes_decode"] >= 4096 * 128256 * 2


def test_unknown_model_config_lists_shipped():
    with pytest.raises(FileNotFoundError, match="llama-2-7b"):
        analytic_tables("no-such-model", make_levels(s=[0.0]))


def test_rsparse_split_is_keyword_only():
    with pytest.raises(TypeError):
        rsparse_split(4096, 4096, 0.5, 0.5)


def test_rank_clamp_never_binds_on_shipped_configs():
    """r = d_in d_out (1-s)(1-rho) / (d_in + d_out) <= min(d_in, d_out): the clamp leaves every cost table as it was."""
    grid = np.linspace(0.0, 1.0, 41)
    for name in shipped_model_configs():
        for d_out, d_in in set(model_shape(name).projection_shapes().values()):
            for s in grid[1:]:
                for rho in grid[:-1]:
                    kept = int(d_in * (1 - s) * rho)
                    unclamped = max(int((d_in * d_out * (1 - s) - kept * d_out) / (d_in + d_out)), 0)
                    assert rsparse_split(d_out=d_out, d_in=d_in, s=s, rho=rho) == (kept, unclamped)


@pytest.mark.parametrize("patch, match", [
    ({"hidden_size": 0}, "hidden_size=0 must be an integer >= 1"),
    ({"num_attention_heads": 0}, "num_attention_heads=0"),
    ({"hidden_size": 576.5}, "hidden_size=576.5"),
    ({"intermediate_size": -1536}, "intermediate_size=-1536"),
    ({"num_hidden_layers": "30"}, "num_hidden_layers='30'"),
    ({"hidden_size": 577, "head_dim": None}, "not divisible by num_attention_heads=9"),
    ({"num_key_value_heads": 2}, "not a multiple of num_key_value_heads=2"),
])
def test_model_shape_rejects_bad_sizes(patch, match):
    from allocator import TablesError, load_model_config
    cfg = {**load_model_config("smollm2-135m"), **patch}
    with pytest.raises(TablesError, match=match):
        model_shape(cfg)


def test_malformed_config_json_names_the_file(tmp_path):
    from allocator import TablesError
    (tmp_path / "config.json").write_text('{"hidden_size": 576,')
    with pytest.raises(TablesError, match=r"config\.json is not valid UTF-8 JSON"):
        model_shape(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(TablesError, match="not an object"):
        model_shape(tmp_path / "config.json")
