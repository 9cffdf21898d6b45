"""Level grids: the accepted forms, and the grids that used to be misread (2-D arrays, duplicates)."""
import numpy as np
import pandas as pd
import pytest

from allocator import Level, LevelError, Tables, TablesError, Unit, make_levels, normalize_levels


def test_make_levels_order_and_types():
    grid = make_levels(s=[0.5, 0.0], rho=[0.9, 1.0], bits=[16])
    d = {"bits": 16, "fmt": "bf16"}
    assert grid.to_dict(orient="records") == [{"s": 0.0, "rho": 1.0, **d}, {"s": 0.0, "rho": 0.9, **d},
                                              {"s": 0.5, "rho": 1.0, **d}, {"s": 0.5, "rho": 0.9, **d}]
    assert grid["bits"].dtype.kind == "i" and grid["s"].dtype == float


@pytest.mark.parametrize("levels", [[0.0, 0.5], np.array([0.0, 0.5]), [{"s": 0.0}, {"s": 0.5}],
                                    [Level(0.0), Level(0.5)], pd.DataFrame({"s": [0.0, 0.5]})])
def test_accepted_forms_give_one_frame(levels):
    assert normalize_levels(levels).equals(make_levels(s=[0.0, 0.5]))


def test_a_2d_array_is_an_error_not_four_sparsities():
    with pytest.raises(LevelError, match=r"2-D array of shape \(2, 2\).*DataFrame with columns s"):
        normalize_levels([[0.0, 1.0], [0.5, 0.9]])


@pytest.mark.parametrize("levels, match", [
    ([0.0, 0.5, 0.5], r"level 2 .*duplicates level 1"),
    ([0.0, 0.5, 0.5000000001], r"level 2 \{'s': 0.5000000001.*near-duplicate.*level 1"),
    ([{"s": 0.3, "rho": 0.9}, {"s": 0.3, "rho": 0.9, "bits": 16}], "level 1 .*duplicates level 0"),
])
def test_duplicated_levels_are_errors(levels, match):
    with pytest.raises(LevelError, match=match):
        normalize_levels(levels)


def test_out_of_range_levels_name_the_row():
    with pytest.raises(LevelError, match=r"level 1 of the grid: level s=1.5 lies outside \[0, 1\]"):
        normalize_levels([0.0, 1.5])


def test_tables_wrap_level_errors_and_hand_out_level_objects():
    units = [Unit("a", 0), Unit("b", 1)]
    with pytest.raises(TablesError, match="duplicates"):
        Tables(units, [0.0, 0.0], {"c": np.ones((2, 2))})
    t = Tables(units, make_levels(s=[0.0, 0.5], rho=[1.0, 0.8]), {"c": np.ones((2, 4))})
    assert t.level(3) == Level(0.5, 0.8, 16)
    assert t.level_objects() == [Level(0.0), Level(0.0, 0.8), Level(0.5), Level(0.5, 0.8)]


def test_level_is_an_object_not_a_dict():
    """Levels are read by attribute; the dict form is only what they serialize to."""
    lv = Level(0.5, 0.9, 8)
    assert (lv.s, lv.rho, lv.bits) == (0.5, 0.9, 8) and lv.to_dict() == {"s": 0.5, "rho": 0.9, "bits": 8,
                                                                        "fmt": "w8a16"}
    assert Level.from_mapping(lv.to_dict()) == lv
    with pytest.raises(TypeError):
        lv["s"]


def test_a_format_names_its_width_and_a_width_its_default_format():
    assert Level(fmt="w8a8-fp8").bits == 8 and Level(bits=4).fmt == "w4a16-g128" and Level().fmt == "bf16"
    assert Level(0.5, fmt="W4A16-G128") == Level(0.5, bits=4)
    assert not Level(fmt="w8a8-fp8").is_dense and Level(fmt="bf16").is_dense
    with pytest.raises(LevelError, match="contradicts fmt='w8a8-fp8'"):
        Level(bits=4, fmt="w8a8-fp8")
    with pytest.raises(LevelError, match="did you mean 'w8a8-fp8'"):
        Level(fmt="w8a8fp8")
    with pytest.raises(LevelError, match="no default format has 5-bit weights"):
        Level(bits=5)


def test_a_joint_grid_is_a_product_over_formats_and_old_frames_still_read():
    grid = make_levels(s=[0.0, 0.5], fmt=["w4a16-g128", "bf16", "w8a8-fp8"])
    assert list(grid["fmt"]) == ["bf16", "bf16", "w8a8-fp8", "w8a8-fp8", "w4a16-g128", "w4a16-g128"]
    old = pd.DataFrame({"s": [0.0, 0.5], "rho": [1.0, 1.0], "bits": [16, 4]})   # tables saved before formats
    assert list(normalize_levels(old)["fmt"]) == ["bf16", "w4a16-g128"]
    with pytest.raises(LevelError, match="either as fmt"):
        make_levels(s=[0.0], fmt=["bf16"], bits=[4])
    with pytest.raises(LevelError, match="duplicates"):
        normalize_levels([Level(0.5, fmt="w8a16"), Level(0.5, bits=8)])
