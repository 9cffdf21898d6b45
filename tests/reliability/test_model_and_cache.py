"""Bad inputs to model loading, text windows and the profile cache: each fails with the project's own error (or
a standard one), naming the input and the fix. Then the real SmolLM2 cut to 2 layers, profiled in child
processes: a kill -9 mid-profile resumes with no finished row recomputed and a byte-identical table, and two runs
on one empty cache measure each row once.

Run as a script (``python test_model_and_cache.py child ...``) the file is the child process of those tests.
"""
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from allocator import make_levels  # noqa: E402
from allocator.evaluators.methods import get_method  # noqa: E402
from allocator.evaluators.models import (ModelError, embedded_model_path, load_model, set_threads,  # noqa: E402
                                         truncate_layers_)
from allocator.evaluators.plan import Target  # noqa: E402
from allocator.evaluators.profile_cache import ProfileCacheError, RowCache  # noqa: E402
from allocator.evaluators.profiling import BASE, profile  # noqa: E402
from allocator.evaluators.text import TextError, load_text, token_windows  # noqa: E402

N_LAYERS = 2
UNITS = [Target.of(0), Target.of(1)]
LEVELS = make_levels(s=[0.0, 0.3, 0.6])
ROWS = {(u.name, j) for u in UNITS for j in (1, 2)}     # the s=0 column needs no row
CHILD_TIMEOUT_S = 240


# ---------------------------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def checkpoint_config() -> dict:
    try:
        return json.loads((embedded_model_path() / "config.json").read_text())
    except ModelError as exc:
        pytest.skip(f"embedded SmolLM2 unavailable: {exc}")


@pytest.fixture
def no_weight_read(monkeypatch):
    """Every bad loading input must be refused before transformers reads a weight."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the bad input was not caught before loading")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def _folder(tmp_path: Path, config_text: str | None) -> str:
    folder = tmp_path / "model"
    folder.mkdir()
    if config_text is not None:
        (folder / "config.json").write_text(config_text)
    return str(folder)


def _config_with(config: dict, **changes) -> str:
    return json.dumps({**config, **changes})


def _file(tmp_path: Path) -> str:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\0" * 16)
    return str(path)


#: case -> (tmp_path, checkpoint config) -> (name_or_path, load_model options, fragments the message must hold)
LOADING = {
    "missing relative folder": lambda tmp, cfg: ("./no/such/model", {}, [
        "no such directory: ./no/such/model", "smollm2-135m", "a hub id or an existing local folder"]),
    "missing folder in home": lambda tmp, cfg: ("~/no-such-model-folder", {}, [
        "no such directory: ~/no-such-model-folder", "existing local folder"]),
    "missing folder, existing parent": lambda tmp, cfg: (f"{tmp}/absent", {}, [
        f"no such directory: {tmp}/absent", "embedded name"]),
    "a file, not a folder": lambda tmp, cfg: (_file(tmp), {}, ["model.safetensors is a file", "holding config.json"]),
    "folder without config.json": lambda tmp, cfg: (_folder(tmp, None), {}, [
        "has no config.json", "save_pretrained"]),
    "malformed config.json": lambda tmp, cfg: (_folder(tmp, '{"hidden_size": 5'), {}, [
        "malformed model config", "model/config.json", "restore it"]),
    "config with zero attention heads": lambda tmp, cfg: (_folder(tmp, _config_with(cfg, num_attention_heads=0)), {}, [
        "num_attention_heads=0", "config.json", "positive integer"]),
    "config with zero hidden size": lambda tmp, cfg: (_folder(tmp, _config_with(cfg, hidden_size=0)), {}, [
        "hidden_size=0", "config.json", "restore the file"]),
    "unknown device": lambda tmp, cfg: ("smollm2-135m", {"device": "gpu7"}, ["unknown device 'gpu7'", "'cpu'"]),
    "unknown dtype": lambda tmp, cfg: ("smollm2-135m", {"dtype": "float8"}, ["unknown dtype 'float8'", "bfloat16"]),
    "max_layers=0": lambda tmp, cfg: ("smollm2-135m", {"max_layers": 0}, [
        "max_layers=0", f"1..{cfg['num_hidden_layers']}"]),
    "max_layers=-1": lambda tmp, cfg: ("smollm2-135m", {"max_layers": -1}, [
        "max_layers=-1", f"1..{cfg['num_hidden_layers']}"]),
    "max_layers past the model": lambda tmp, cfg: ("smollm2-135m", {"max_layers": cfg["num_hidden_layers"] + 1}, [
        f"max_layers={cfg['num_hidden_layers'] + 1}", f"1..{cfg['num_hidden_layers']}"]),
    "max_layers not an integer": lambda tmp, cfg: ("smollm2-135m", {"max_layers": "3"}, ["max_layers='3'", "1.."]),
}


@pytest.mark.parametrize("case", sorted(LOADING))
def test_a_bad_loading_input_is_refused_before_loading(case, tmp_path, checkpoint_config, no_weight_read):
    name, options, fragments = LOADING[case](tmp_path, checkpoint_config)
    with pytest.raises(ModelError) as info:
        load_model(name, **options)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_refused_before_loading(checkpoint_config, no_weight_read):
    with pytest.raises(ModelError, match=r"device 'cuda' needs a CUDA GPU.*use device=cpu"):
        load_model("smollm2-135m", device="cuda")


@pytest.mark.parametrize("threads", [0, -1, 2.5, True])
def test_a_bad_thread_count_is_refused_not_ignored(threads):
    before = torch.get_num_threads()
    with pytest.raises(ModelError) as info:
        set_threads(threads)
    assert f"threads={threads!r}" in str(info.value) and "positive integer" in str(info.value)
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------------------------------------- real model
def _real_setup():
    """The 2-layer model, TEAL calibrated on its own windows, and the profiling windows (parent and children)."""
    set_threads(1)
    model, tokenizer = load_model("smollm2-135m", dtype="float32", max_layers=N_LAYERS)
    method = get_method("teal").calibrate(model, token_windows(tokenizer, "calibration", 2, 32, seed=0))
    return model, tokenizer, method, token_windows(tokenizer, "calibration", 2, 32, seed=1)


@pytest.fixture(scope="module")
def real():
    threads = torch.get_num_threads()
    try:
        yield _real_setup()
    except ModelError as exc:
        pytest.skip(f"embedded SmolLM2 unavailable: {exc}")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(real):
    model, _, method, windows = real
    return profile(model, method, windows, LEVELS, UNITS, cache=False, progress=False)


def test_cutting_to_zero_layers_names_the_valid_range(real):
    with pytest.raises(ModelError, match=rf"max_layers=0 is out of range: use an integer in 1..{N_LAYERS}"):
        truncate_layers_(real[0], 0)


# ---------------------------------------------------------------------------------------------- text
def _text_file(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "calibration.txt"
    path.write_bytes(data)
    return str(path)


#: case -> tmp_path -> (source, n, length, fragments the message must hold)
TEXT = {
    "random bytes": lambda tmp: (_text_file(tmp, random.Random(0).randbytes(4096)), 2, 16, [
        "calibration.txt is not valid UTF-8", "give a UTF-8 text file"]),
    "NUL-padded text": lambda tmp: (_text_file(tmp, b"word\0" * 500), 2, 16, [
        "calibration.txt looks binary", "plain UTF-8 text file"]),
    "no windows": lambda tmp: ("emma", 0, 16, ["n=0", "data.profile_windows", "positive integer"]),
    "negative windows": lambda tmp: ("emma", -3, 16, ["n=-3", "positive integer"]),
    "one-token windows": lambda tmp: ("emma", 2, 1, ["length=1", "data.profile_length", ">= 2"]),
    "windows longer than the text": lambda tmp: (_text_file(tmp, b"word " * 50), 1, 4096, [
        "calibration.txt' has", "length=4096", "lower n", "longer text"]),
    "too many windows": lambda tmp: (_text_file(tmp, b"word " * 50), 400, 16, ["not enough for 400 windows", "n=400"]),
    "unknown source": lambda tmp: ("no-such-source", 2, 16, ["unknown text source 'no-such-source'", "emma"]),
}


@pytest.mark.parametrize("case", sorted(TEXT))
def test_a_bad_text_input_names_the_option_and_the_fix(case, tmp_path, real):
    source, n, length, fragments = TEXT[case](tmp_path)
    with pytest.raises(TextError) as info:
        token_windows(real[1], source, n, length)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_valid_text_files_still_load_as_before(tmp_path):
    text = "Émma — “quoted”\twith tabs\r\nand a form feed\f, old Mac line\r.\n" * 20
    assert load_text(_text_file(tmp_path, text.encode())) == text.replace("\r\n", "\n").replace("\r", "\n")


# ---------------------------------------------------------------------------------------------- cache
#: case -> (meta.json text, fragments the message must hold; {dir}: the cache directory)
CACHE = {
    "corrupt meta.json": ("{broken", ["corrupt profile cache", "meta.json", "delete {dir} to re-profile"]),
    "meta of another run": ('{"a": 2}', ["profile cache {dir} was written for another run", "delete it"]),
}


@pytest.mark.parametrize("case", sorted(CACHE))
def test_an_unusable_cache_names_the_directory_to_delete(case, tmp_path):
    meta, fragments = CACHE[case]
    (tmp_path / "meta.json").write_text(meta)
    with pytest.raises(ProfileCacheError) as info:
        RowCache(tmp_path, {"a": 1})
    for fragment in fragments:
        assert fragment.format(dir=tmp_path) in str(info.value)


# ---------------------------------------------------------------------------------------------- child runs
def _spawn(cache: Path, report: Path, *, stall_at_append: int = 0, go: Path | None = None) -> subprocess.Popen:
    args = [sys.executable, __file__, "child", str(cache), str(report), str(stall_at_append), str(go or "")]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, children: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not path.exists():
        for child in children:
            if child.poll() is not None:
                pytest.fail(f"child exited with {child.returncode} before {path.name}: {child.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {path.name} after {CHILD_TIMEOUT_S} s")
        time.sleep(0.1)


def _file_rows(cache: Path) -> list[tuple[str, int]]:
    """The complete lines of the rows file (a last line cut short by a kill is left out)."""
    [rows] = list(cache.glob("*/rows.jsonl"))
    return [(r["unit"], r["level"]) for r in map(json.loads, rows.read_text().split("\n")[:-1])]


def _child(cache: str, report: str, stall_at_append: str, go: str) -> None:
    """Profile into ``cache``; with ``stall_at_append=k`` write half of the k-th row and hang (to be killed)."""
    model, _, method, windows = _real_setup()
    if int(stall_at_append):
        _stall_at(int(stall_at_append), Path(report + ".stalled"))
    Path(report + ".ready").touch()
    while go and not Path(go).exists():
        time.sleep(0.02)
    computed = []
    profile(model, method, windows, LEVELS, UNITS, cache=Path(cache), progress=False,
            on_row=lambda unit, level: computed.append([unit, level]))
    Path(report).write_text(json.dumps(computed))


def _stall_at(k: int, stalled: Path) -> None:
    append, calls = RowCache.append, []

    def append_then_stall(self, row):
        calls.append(row)
        if len(calls) < k:
            return append(self, row)
        with open(self.rows_path, "a") as f:
            f.write(json.dumps(row)[:20])                # the kill lands inside this write
        stalled.touch()
        time.sleep(CHILD_TIMEOUT_S)
    RowCache.append = append_then_stall


def test_a_kill_9_mid_profile_resumes_recomputing_no_finished_row(real, reference, tmp_path, caplog):
    model, _, method, windows = real
    cache = tmp_path / "cache"
    child = _spawn(cache, tmp_path / "killed.json", stall_at_append=4)    # base + 2 rows written, 3rd cut short
    try:
        _wait_for(tmp_path / "killed.json.stalled", [child])
    finally:
        child.kill()
        child.wait()
    finished = set(_file_rows(cache)) - {(BASE, 0)}
    computed = []
    with caplog.at_level("WARNING"):
        resumed = profile(model, method, windows, LEVELS, UNITS, cache=cache, progress=False,
                          on_row=lambda unit, level: computed.append((unit, level)))
    assert len(finished) == 2 and not finished & set(computed) and finished | set(computed) == ROWS
    assert resumed.kl.tobytes() == reference.kl.tobytes() and resumed.nll.tobytes() == reference.nll.tobytes()
    assert "a half-written last row" in caplog.text and "taking over the claim" in caplog.text


def test_two_runs_on_one_empty_cache_measure_each_row_once(real, reference, tmp_path):
    model, _, method, windows = real
    cache, go = tmp_path / "cache", tmp_path / "go"
    reports = [tmp_path / f"run{i}.json" for i in range(2)]
    children = [_spawn(cache, report, go=go) for report in reports]
    try:
        for report in reports:
            _wait_for(Path(f"{report}.ready"), children)
        go.touch()                                       # both start profiling together
        for child in children:
            assert child.wait(timeout=CHILD_TIMEOUT_S) == 0, child.stderr.read()[-2000:]
    finally:
        for child in children:
            child.kill()
    measured = [tuple(row) for report in reports for row in json.loads(report.read_text())]
    assert sorted(measured) == sorted(ROWS)              # no row measured twice
    assert sorted(_file_rows(cache)) == sorted(ROWS | {(BASE, 0)})
    again = profile(model, method, windows, LEVELS, UNITS, cache=cache, progress=False)
    assert again.kl.tobytes() == reference.kl.tobytes()


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    _child(*sys.argv[2:6])
