"""Model loading and discovery errors; shipped text and windows."""
import pytest
import torch

from allocator import make_levels
from allocator.levels import Level
from allocator.evaluators.models import (ModelError, cache_dir, embedded_gguf_path, find_projections, load_model,
                                         model_id, weights_fingerprint)
from allocator.evaluators.plan import Target
from allocator.evaluators.stages import operating_level
from allocator.evaluators.text import (CALIBRATION_SOURCES, MIXTURES, TextError, load_text, token_windows,
                                       wiki_articles)
from allocator.tables import TablesError


def test_discovery_finds_seven_projections_with_real_gqa_shapes(small_model):
    rows = find_projections(small_model[0])
    assert len(rows) == 4
    assert [(p.kind, p.d_out, p.d_in) for p in rows[0]] == [
        ("q", 576, 576), ("k", 192, 576), ("v", 192, 576), ("o", 576, 576),
        ("gate", 1536, 576), ("up", 1536, 576), ("down", 576, 1536)]
    assert [p.kind for p in Target.of(2, ("gate", "up", "down")).projections(rows)] == ["gate", "up", "down"]
    assert len(Target.span(1, 3).projections(rows)) == 21


def test_unknown_architecture_lists_what_was_found(small_model):
    model = small_model[0]
    model.config.model_type = "mystery"
    try:
        with pytest.raises(ModelError, match=r"unknown architecture family 'mystery'.*q_proj.*down_proj"):
            find_projections(model)
    finally:
        model.config.model_type = "llama"


def test_missing_projection_lists_what_was_found(small_model):
    with pytest.raises(ModelError, match=r"no linear 'mlp.w3' for projection 'up'.*gate_proj"):
        find_projections(small_model[0], {"q": "self_attn.q_proj", "up": "mlp.w3"})
    with pytest.raises(ModelError, match="model has 4 layers"):
        Target.of(7).projections(find_projections(small_model[0]))


def test_model_id_is_derived_from_the_model_not_stored_on_it(small_model):
    model = small_model[0]
    assert model_id(model) == "smollm2-135m[:4]"
    assert not hasattr(model.config, "name_or_path_for_allocator")


def test_an_identical_reload_has_the_same_weights_fingerprint(small_model):
    again, _ = load_model("smollm2-135m", dtype="float32", max_layers=4)
    assert weights_fingerprint(again) == weights_fingerprint(small_model[0])
    again.model.layers[1].self_attn.q_proj.weight[5, 7] *= 1.001
    assert weights_fingerprint(again) != weights_fingerprint(small_model[0])


def test_budget_outside_the_level_grid_is_a_clear_error():
    levels = make_levels(s=[0.0, 0.3, 0.5, 0.7])
    assert operating_level(levels, 0.5) == Level(0.5, 1.0, 16)
    with pytest.raises(TablesError, match=r"outside the level grid s in \[0.0, 0.7\]"):
        operating_level(levels, 0.9)
    with pytest.raises(TablesError, match="not a level of the grid"):
        operating_level(levels, 0.45)


def test_embedded_model_is_cached_under_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "allocator"
    try:
        assert embedded_gguf_path().suffix == ".gguf"
    except ModelError as exc:
        pytest.skip(str(exc))


def test_calibration_and_evaluation_text_never_overlap():
    calib = set(MIXTURES["calibration"])
    assert calib == CALIBRATION_SOURCES and not calib & set(MIXTURES["evaluation"])
    articles = wiki_articles()
    assert len(articles) == 105
    first, second = load_text("wiki_calib"), load_text("wiki_eval")
    assert articles[0] in first and articles[0] not in second and articles[-1] in second
    assert "Jane Austen" in load_text("emma")[:200]


def test_windows_are_deterministic_and_disjoint(small_model, tmp_path):
    tok = small_model[1]
    a = token_windows(tok, "calibration", 6, 32, seed=3)
    assert a.shape == (6, 32) and torch.equal(a, token_windows(tok, "calibration", 6, 32, seed=3))
    assert not torch.equal(a, token_windows(tok, "calibration", 6, 32, seed=4))
    calib = {tuple(r) for r in token_windows(tok, "calibration", 12, 32).tolist()}
    held = {tuple(r) for r in token_windows(tok, "evaluation", 12, 32).tolist()}
    assert not calib & held
    path = tmp_path / "mine.txt"
    path.write_text("word " * 500)
    assert token_windows(tok, str(path), 2, 16).shape == (2, 16)
    with pytest.raises(TextError, match="not enough"):
        token_windows(tok, str(path), 400, 16)
    with pytest.raises(TextError, match="unknown text source"):
        load_text("no-such-source")
