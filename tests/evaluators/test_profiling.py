"""Profiling on a real (truncated) SmolLM2: consistency with a full forward, resumable cache, clear errors."""
import json

import numpy as np
import pytest
import torch

from allocator import make_levels
from allocator.evaluators.methods import apply_allocation_, remove_compression_
from allocator.evaluators.metrics import measure
from allocator.evaluators.profiling import ProfileCacheError, profile

UNITS = ["layers.0", "layers.1", "layers.2", "layers.3"]
LEVELS = make_levels(s=[0.0, 0.4, 0.7])


@pytest.fixture(scope="module")
def windows(calib_windows):
    return calib_windows[:2, :48]


def test_row_equals_a_full_forward_with_that_unit_compressed(small_model, calibrated, windows):
    """Running from the cached layer input must give what the whole model gives."""
    model = small_model[0]
    prof = profile(model, calibrated["teal"], windows, LEVELS, UNITS, cache=False, progress=False)
    assert prof.kl.shape == (4, 3) and (prof.kl[:, 0] == 0).all() and (prof.kl[:, 2] > prof.kl[:, 1]).all()
    apply_allocation_(model, {"layers.2": {"s": 0.7}}, calibrated["teal"])
    try:
        full = measure(model, windows, batch_size=8)
    finally:
        remove_compression_(model)
    assert prof.kl[2, 2] == pytest.approx(full["kl"], rel=1e-4, abs=1e-7)
    assert np.exp(prof.nll[2, 2]) == pytest.approx(full["perplexity"], rel=1e-4)


def test_operating_point_table_sums_to_the_measured_uniform_kl(small_model, calibrated, windows):
    model = small_model[0]
    prof = profile(model, calibrated["teal"], windows, LEVELS, UNITS, mode="operating_point",
                   operating_level={"s": 0.4, "rho": 1.0}, cache=False, progress=False)
    apply_allocation_(model, {u: {"s": 0.4} for u in UNITS}, calibrated["teal"])
    try:
        full = measure(model, windows, batch_size=8)
    finally:
        remove_compression_(model)
    assert prof.table("kl")[:, 1].sum() == pytest.approx(full["kl"], rel=1e-4)
    assert (prof.kl[:, 0] < prof.base_kl).all() and (prof.kl[:, 2] > prof.base_kl).all()


def test_a_killed_profile_restarts_without_recomputing_finished_rows(small_model, calibrated, windows, tmp_path):
    model = small_model[0]
    computed = []

    def killed_after_three(unit, level):
        computed.append((unit, level))
        if len(computed) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        profile(model, calibrated["teal"], windows, LEVELS, UNITS, cache=tmp_path, progress=False,
                on_row=killed_after_three)
    first = list(computed)
    computed.clear()
    resumed = profile(model, calibrated["teal"], windows, LEVELS, UNITS, cache=tmp_path, progress=False,
                      on_row=lambda u, j: computed.append((u, j)))
    assert not set(first) & set(computed)
    assert len(first) + len(computed) == len(UNITS) * 2          # the s=0 column needs no row
    computed.clear()
    again = profile(model, calibrated["teal"], windows, LEVELS, UNITS, cache=tmp_path, progress=False,
                    on_row=lambda u, j: computed.append((u, j)))
    assert computed == [] and np.array_equal(again.kl, resumed.kl)


def test_a_corrupt_cache_is_reported_with_the_file_to_delete(small_model, calibrated, windows, tmp_path):
    model = small_model[0]
    profile(model, calibrated["teal"], windows, LEVELS, UNITS[:1], cache=tmp_path, progress=False)
    [rows] = list(tmp_path.glob("*/rows.jsonl"))
    lines = rows.read_text().splitlines()
    rows.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    with pytest.raises(ProfileCacheError, match="corrupt profile cache .*line 2.*delete"):
        profile(model, calibrated["teal"], windows, LEVELS, UNITS[:1], cache=tmp_path, progress=False)
    (rows.parent / "meta.json").write_text("{broken")
    with pytest.raises(ProfileCacheError, match="corrupt"):
        profile(model, calibrated["teal"], windows, LEVELS, UNITS[:1], cache=tmp_path, progress=False)


def test_a_half_written_last_row_is_recomputed_not_an_error(small_model, calibrated, windows, tmp_path):
    model = small_model[0]
    first = profile(model, calibrated["teal"], windows, LEVELS, UNITS[:1], cache=tmp_path, progress=False)
    [rows] = list(tmp_path.glob("*/rows.jsonl"))
    text = rows.read_text()
    rows.write_text(text[:-8])                                   # the kill landed inside the last write
    computed = []
    again = profile(model, calibrated["teal"], windows, LEVELS, UNITS[:1], cache=tmp_path, progress=False,
                    on_row=lambda u, j: computed.append((u, j)))
    assert len(computed) == 1 and np.allclose(again.kl, first.kl)
    assert all(json.loads(line) for line in rows.read_text().splitlines())


def test_units_may_be_blocks_projections_or_groups(small_model, calibrated, windows):
    model = small_model[0]
    units = ["layers.0.attn", "layers.0.mlp", "layers.1.down", "layers.2-3"]
    prof = profile(model, calibrated["teal"], windows, make_levels(s=[0.0, 0.6]), units, cache=False, progress=False)
    assert (prof.kl[:, 1] > 0).all()
    with pytest.raises(ValueError, match="operating_level"):
        profile(model, calibrated["teal"], windows, LEVELS, units, mode="operating_point", cache=False)
