"""Profiling on a real (truncated) SmolLM2: consistency with a full forward, resumable cache, clear errors."""
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from allocator import make_levels
from allocator.evaluators.metrics import measure
from allocator.evaluators.models import weights_fingerprint
from allocator.evaluators.plan import Target, apply_levels, restore_
from allocator.evaluators.profile_cache import RowCache
from allocator.evaluators.profiling import ProfileCacheError, profile

UNITS = [Target.of(i) for i in range(4)]
LEVELS = make_levels(s=[0.0, 0.4, 0.7])


@pytest.fixture(scope="module")
def windows(calib_windows):
    return calib_windows[:2, :48]


def test_row_equals_a_full_forward_with_that_unit_compressed(small_model, calibrated, windows):
    """Running from the cached layer input must give what the whole model gives."""
    model = small_model[0]
    prof = profile(model, calibrated["teal"], windows, LEVELS, UNITS, cache=False, progress=False)
    assert prof.kl.shape == (4, 3) and (prof.kl[:, 0] == 0).all() and (prof.kl[:, 2] > prof.kl[:, 1]).all()
    apply_levels(model, calibrated["teal"], [(UNITS[2], {"s": 0.7})])
    try:
        full = measure(model, windows, batch_size=8)
    finally:
        restore_(model)
    assert prof.kl[2, 2] == pytest.approx(full["kl"], rel=1e-4, abs=1e-7)
    assert np.exp(prof.nll[2, 2]) == pytest.approx(full["perplexity"], rel=1e-4)


def test_operating_point_table_sums_to_the_measured_uniform_kl(small_model, calibrated, windows):
    model = small_model[0]
    prof = profile(model, calibrated["teal"], windows, LEVELS, UNITS, mode="operating_point",
                   operating_level={"s": 0.4, "rho": 1.0}, cache=False, progress=False)
    apply_levels(model, calibrated["teal"], [(u, {"s": 0.4}) for u in UNITS])
    try:
        full = measure(model, windows, batch_size=8)
    finally:
        restore_(model)
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


def _cached_rows(model, method, windows, tmp_path):
    """Profile one unit into a fresh cache; its rows file and lines (base row, then the two s > 0 rows)."""
    profile(model, method, windows, LEVELS, UNITS[:1], cache=tmp_path, progress=False)
    [rows] = list(tmp_path.glob("*/rows.jsonl"))
    return rows, rows.read_text().splitlines()


def _rerun(model, method, windows, tmp_path):
    computed = []
    prof = profile(model, method, windows, LEVELS, UNITS[:1], cache=tmp_path, progress=False,
                   on_row=lambda u, j: computed.append((u, j)))
    return prof, computed


def test_a_corrupt_middle_line_is_dropped_and_the_valid_rows_kept(small_model, calibrated, windows, tmp_path, caplog):
    model, method = small_model[0], calibrated["teal"]
    rows, lines = _cached_rows(model, method, windows, tmp_path)
    rows.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    with caplog.at_level(logging.WARNING):
        _, computed = _rerun(model, method, windows, tmp_path)
    assert computed == []                                        # no valid row is thrown away
    assert f"{rows}: dropped line 2" in caplog.text
    assert rows.read_text().splitlines() == lines                # rewritten without the bad line


def test_conflicting_duplicate_rows_keep_the_first(small_model, calibrated, windows, tmp_path, caplog):
    model, method = small_model[0], calibrated["teal"]
    rows, lines = _cached_rows(model, method, windows, tmp_path)
    first = json.loads(lines[1])
    rows.write_text("\n".join([*lines, json.dumps({**first, "kl": first["kl"] + 1.0})]) + "\n")
    with caplog.at_level(logging.WARNING):
        prof, computed = _rerun(model, method, windows, tmp_path)
    assert computed == [] and prof.kl[0, first["level"]] == first["kl"]
    assert "line 4 (a second, different row" in caplog.text and "the first is kept" in caplog.text
    assert rows.read_text().splitlines() == lines


def test_a_corrupt_meta_file_is_reported_with_the_directory_to_delete(small_model, calibrated, windows, tmp_path):
    model, method = small_model[0], calibrated["teal"]
    rows, _ = _cached_rows(model, method, windows, tmp_path)
    (rows.parent / "meta.json").write_text("{broken")
    with pytest.raises(ProfileCacheError, match=f"corrupt profile cache .*meta.json.*delete {rows.parent}"):
        _rerun(model, method, windows, tmp_path)


def test_new_weights_under_the_same_name_miss_the_cache(small_model, calibrated, windows, tmp_path):
    """The key holds a fingerprint of the weights, not only the model's path."""
    model, method = small_model[0], calibrated["teal"]
    _cached_rows(model, method, windows, tmp_path)
    weight = model.model.layers[0].mlp.down_proj.weight
    before, kept = weights_fingerprint(model), weight[0, 0].item()
    try:
        weight[0, 0] += 1e-3
        assert weights_fingerprint(model) != before
        _, computed = _rerun(model, method, windows, tmp_path)
    finally:
        weight[0, 0] = kept
    assert len(computed) == 2 and len(list(tmp_path.glob("*/rows.jsonl"))) == 2
    assert weights_fingerprint(model) == before and _rerun(model, method, windows, tmp_path)[1] == []


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
    units = [Target.of(0, ("q", "k", "v", "o"), "layers.0.attn"), Target.of(0, ("gate", "up", "down"), "layers.0.mlp"),
             Target.of(1, ("down",)), Target.span(2, 3)]
    prof = profile(model, calibrated["teal"], windows, make_levels(s=[0.0, 0.6]), units, cache=False, progress=False)
    assert (prof.kl[:, 1] > 0).all()
    with pytest.raises(ValueError, match="operating_level"):
        profile(model, calibrated["teal"], windows, LEVELS, units, mode="operating_point", cache=False)


def _row_cache(tmp_path) -> RowCache:
    cache = RowCache(tmp_path / "cache", {"test": 1}, poll_s=0.05)
    cache.load({"layers.0", "layers.1"}, 2)
    return cache


def _row(unit, level, kl=0.5):
    return {"unit": unit, "level": level, "kl": kl, "nll": 3.0}


def test_a_row_claimed_by_a_live_run_is_awaited_not_recomputed(tmp_path):
    first, second = _row_cache(tmp_path), _row_cache(tmp_path)
    assert first.claim(("layers.0", 1))
    done, measured = {}, []
    for row in second.claim_each([("layers.0", 1), ("layers.1", 1)], done):
        measured.append(row)
        second.append(_row(*row))
        first.append(_row("layers.0", 1, kl=0.25))      # the other run finishes its row meanwhile
    assert measured == [("layers.1", 1)] and done[("layers.0", 1)]["kl"] == 0.25
    assert not list(first.claims_dir.iterdir())              # every claim released with its row


def test_the_claim_of_a_killed_run_is_taken_over(tmp_path, caplog):
    cache = _row_cache(tmp_path)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim = cache.claims_dir / "layers.1@0"
    claim.write_text(json.dumps({"pid": int(gone.stdout), "started": 1, "host": os.uname().nodename}))
    with caplog.at_level(logging.WARNING):
        assert cache.claim(("layers.1", 0))
    assert "taking over the claim" in caplog.text and json.loads(claim.read_text())["pid"] == os.getpid()
    cache.release_claims()
    assert not claim.exists()
