"""CPU correctness of the low-bit (sparse) decode GEMV under TRITON_INTERPRET=1 (small, ragged shapes; fp16, fp32).

Conventions of test_sparse_gemv_cpu.py: fresh random inputs every run (no fixed seed), output buffers poisoned
with NaN (scratch with garbage) before each call, masks dropping 0 / 50 / 100% of the channels, batch 1..4.
Every output is compared with `lowbit_gemv_reference` (dequantize, then the fp32 PyTorch product). bf16 is not
tested here: the interpreter's bf16 arithmetic is wrong.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
if not torch.cuda.is_available():  # conftest.py sets it too; it must precede the first import of the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

from allocator.kernels import (  # noqa: E402
    GemvConfig,
    LowbitConfig,
    lowbit_gemv_reference,
    lowbit_gemv_triton,
    pack_fp8,
    pack_int4,
    pack_int8,
)
from allocator.kernels import gemv as sg  # noqa: E402
from allocator.kernels import lowbit_gemv as lb  # noqa: E402
from allocator.kernels.lowbit_gemv import dequantize  # noqa: E402
from allocator.kernels.testing import poison_empty, relative_error  # noqa: E402

pytestmark = pytest.mark.skipif(
    not sg._interpreting() or "Interpreted" not in type(lb._int4_gemv_kernel).__name__,
    reason="CPU kernel tests need TRITON_INTERPRET=1 set before allocator.kernels is first imported",
)

THR = 0.5
PACK = {"int4": pack_int4, "int8": pack_int8, "fp8": pack_fp8}
ROOT = Path(__file__).resolve().parents[2]


def _input(batch: int, K: int, drop: float, dtype) -> torch.Tensor:
    """x [batch, K] whose union mask drops a random `drop` share of channels (|x| < THR), keeps the rest."""
    x = (THR + 0.1 + torch.rand(batch, K)) * torch.sign(torch.randn(batch, K))
    dropped = torch.randperm(K)[: int(round(drop * K))]
    x[:, dropped] = (torch.rand(batch, len(dropped)) * 2 - 1) * THR * 0.9
    return x.to(dtype)


@pytest.fixture
def poisoned(monkeypatch):
    """torch.empty returns NaN-filled (float) or garbage (int32 scratch) buffers; fresh workspace."""
    poison_empty(monkeypatch)


def _check(y, ref, dtype):
    err = relative_error(y, ref)
    assert err < (1e-5 if dtype == torch.float32 else 2e-3), f"relative error {err:.2e}"


CASES = [  # (batch, K, N, fmt, group, config): ragged K and N (odd N for int4), every path
    (1, 300, 97, "int4", 128, GemvConfig(block_n=32, block_k=16, n_splits=2, use_dot=True)),
    (2, 200, 70, "int4", 32, GemvConfig(block_n=16, block_k=32, n_splits=3)),
    (3, 333, 64, "int4", 128, GemvConfig(block_n=64, block_k=64, n_splits=1, use_dot=True)),
    (2, 260, 64, "int4", 128, LowbitConfig(block_n=32, block_k=32, n_splits=2, use_dot=True, swap_ab=True)),
    (4, 160, 45, "int4", 64, GemvConfig(block_n=8, block_k=16, n_splits=2)),
    (4, 160, 50, "int8", 0, GemvConfig(block_n=32, block_k=16, n_splits=2, use_dot=True)),
    (1, 100, 40, "int8", 0, LowbitConfig(block_n=32, block_k=16, n_splits=2, use_dot=True, swap_ab=True)),
    (1, 333, 96, "int8", 0, GemvConfig(block_n=32, block_k=16, n_splits=3, scan_block=64)),
    (2, 150, 40, "fp8", 0, GemvConfig(block_n=32, block_k=16, n_splits=2, use_dot=True, scan_block=32)),
    (3, 129, 33, "fp8", 0, GemvConfig(block_n=16, block_k=16, n_splits=1)),
]


def _packed(fmt, N, K, group):
    w = torch.randn(N, K)
    return pack_int4(w, group) if fmt == "int4" else PACK[fmt](w)


@pytest.mark.parametrize("drop", [0.0, 0.5, 1.0, None])  # None: the dense low-bit path (no mask)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_lowbit_gemv_matches_reference(case, drop, poisoned):
    batch, K, N, fmt, group, cfg = CASES[case]
    dtype = torch.float16 if case % 2 == 0 else torch.float32
    packed = _packed(fmt, N, K, group)
    x = _input(batch, K, 0.5 if drop is None else drop, dtype)
    thr = None if drop is None else THR
    y = lowbit_gemv_triton(x, packed, thr, config=cfg)
    ref = lowbit_gemv_reference(x, packed, thr)
    assert y.shape == (batch, N) and y.dtype == dtype
    if drop == 1.0:
        assert ref.abs().max() == 0
    _check(y, ref, dtype)


W = dict(kernel="words")
WORD_CASES = [  # (K, N, fmt, dtype, config): the batch-1 word-FMA kernel, every loop form, ragged K / N
    (300, 199, "int4", torch.float32, LowbitConfig(64, 32, n_splits=2, sub=2, **W)),  # per-group loops, odd N
    (333, 72, "int8", torch.float16, LowbitConfig(32, 32, sub=4, prefetch=True, reduce="ordered", **W)),
    (384, 64, "int4", torch.float16, LowbitConfig(64, 16, n_splits=3, sub=2, num_stages=3, pipe=True, **W)),
    (300, 200, "int4", torch.float32, LowbitConfig(128, 64, n_splits=3, sub=4, num_stages=2, pipe=True, spre=True, **W)),
    (334, 40, "int8", torch.float32, LowbitConfig(32, 8, n_splits=1, sub=1, num_stages=4, pipe=True, **W)),
]


@pytest.mark.parametrize("drop", [0.0, 0.5, 1.0, None])
@pytest.mark.parametrize("case", range(len(WORD_CASES)))
def test_word_kernel_matches_reference(case, drop, poisoned):
    K, N, fmt, dtype, cfg = WORD_CASES[case]
    packed = _packed(fmt, N, K, 128)
    assert lb.words_apply(packed, 1)
    x = _input(1, K, 0.5 if drop is None else drop, dtype)
    thr = None if drop is None else THR
    y = lowbit_gemv_triton(x, packed, thr, config=cfg)
    _check(y, lowbit_gemv_reference(x, packed, thr), dtype)
    acc = lb._ACCUMULATORS.get(torch.device("cpu"))
    assert acc is None or int(acc.abs().sum()) == 0  # the atomic split-K accumulator is zero at rest


def test_word_config_falls_back_where_it_does_not_apply(poisoned):
    """Batch > 1, an INT4 group other than 128, or FP8: a word config runs the tile kernel (same result)."""
    cfg = LowbitConfig(64, 32, n_splits=2, sub=2, kernel="words")
    for fmt, group, batch in (("int4", 128, 2), ("int4", 64, 1), ("fp8", 0, 1)):
        packed = _packed(fmt, 64, 256, group)
        assert not lb.words_apply(packed, batch)
        x = _input(batch, 256, 0.5, torch.float32)
        _check(lowbit_gemv_triton(x, packed, THR, config=cfg), lowbit_gemv_reference(x, packed, THR), torch.float32)


def test_one_dimensional_x_and_default_config(poisoned):
    packed = pack_int4(torch.randn(48, 256))
    x = _input(1, 256, 0.5, torch.float32)[0]
    y = lowbit_gemv_triton(x, packed, THR, config=GemvConfig(block_n=16, block_k=32, n_splits=2))
    assert y.shape == (48,)
    _check(y, lowbit_gemv_reference(x, packed, THR), torch.float32)
    y = lowbit_gemv_triton(x, packed, None)  # the GPU default tile (256 x 64, tensor cores), dense path
    _check(y, lowbit_gemv_reference(x, packed, None), torch.float32)


def test_repeated_calls_reset_counters(poisoned):
    """The split-K arrival counters (shared with gemv.py) are back at zero after every call."""
    cfg = GemvConfig(block_n=32, block_k=16, n_splits=4)
    for fmt in ("int4", "int8", "int4"):
        packed = _packed(fmt, 80, 512, 128)
        x = _input(2, 512, 0.5, torch.float32)
        _check(lowbit_gemv_triton(x, packed, THR, config=cfg), lowbit_gemv_reference(x, packed, THR), torch.float32)
    assert int(sg._workspace(torch.device("cpu")).counters.abs().sum()) == 0


def test_dropped_rows_are_never_read(poisoned):
    """NaN in every dropped row of an FP8 weight: a kernel that touched one would return NaN."""
    K, N = 200, 64
    packed = pack_fp8(torch.randn(N, K))
    x = _input(1, K, 0.5, torch.float32)
    dropped = x[0].abs() <= THR
    q = packed.qweight.view(torch.uint8).clone()
    q[dropped] = 0x7F  # e4m3fn NaN
    q = q.view(torch.float8_e4m3fn)
    poisoned_w = lb.LowbitWeight("fp8", q, packed.scales, N, K)
    assert torch.isnan(dequantize(poisoned_w)).any()
    y = lowbit_gemv_triton(x, poisoned_w, THR, config=GemvConfig(block_n=32, block_k=16, n_splits=2))
    _check(y, lowbit_gemv_reference(x, packed, THR), torch.float32)


def test_int4_layout_is_packed_along_n():
    """Row j of qweight is input channel j alone (N / 2 contiguous bytes), columns 2c / 2c + 1 in the low /
    high nibble as code + 8; codes in [-8, 7]; one fp16 scale per (group, column); error <= ~scale / 2."""
    N, K, G = 7, 300, 128
    w = torch.randn(N, K)
    p = pack_int4(w, G)
    assert p.qweight.dtype == torch.uint8 and p.qweight.shape == (K, 4)
    assert p.scales.dtype == torch.float16 and p.scales.shape == (3, N)
    w2 = w.clone()
    w2[:, 5] += 10.0  # changes channel 5 only -> only row 5 of the packed bytes (and its group's scales)
    changed = (pack_int4(w2, G).qweight != p.qweight).any(dim=1)
    assert changed[5] and not changed[G:].any()
    lo, hi = (p.qweight & 15).int() - 8, (p.qweight >> 4).int() - 8
    codes = torch.stack([lo, hi], -1).reshape(K, -1)[:, :N]
    assert codes.min() >= -8 and codes.max() <= 7 and (hi[:, -1] == 0).all()  # the odd N pad column is code 0
    scale_rows = p.scales.float()[torch.arange(K) // G]
    torch.testing.assert_close(dequantize(p), codes.float() * scale_rows)
    assert ((dequantize(p) - w.T).abs() <= scale_rows * 0.505).all()  # + 7.5 x the fp16 rounding of the scale


def test_channel_formats_round_trip():
    w = torch.randn(33, 70)
    for fmt, rel in (("int8", 0.01), ("fp8", 0.05)):
        p = PACK[fmt](w)
        assert p.qweight.shape == (70, 33) and p.scales.shape == (33,) and p.scales.dtype == torch.float32
        assert ((dequantize(p) - w.T).norm() / w.norm()) < rel
    assert pack_int8(w).qweight.abs().max() <= 127


def _bench():
    spec = importlib.util.spec_from_file_location("lowbit_bench", ROOT / "studies" / "lowbit_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_pure_parts_and_clean_failure_without_cuda(tmp_path):
    bench = _bench()
    assert bench.weight_bytes("int4_sparse", 4096, 4096, 0.5) == 4096 * 4096 // 4 + 32 * 4096 * 2
    assert bench.weight_bytes("cublas_bf16", 4096, 4096, 0.0) == 2 * 4096 * 4096
    assert all(c.block_k <= 128 for c in bench.tile_candidates("int4", quick=False))
    rows = [bench.result_row("NoGPU", 14336, 4096, 1, k, s, us, 40.0, 3e12)
            for k, s, us in (("cublas_bf16", 0.0, 40.0), ("int4_dense", 0.0, 12.0), ("int4_sparse", 0.5, 7.0))]
    md = bench.markdown(pd.DataFrame(rows), {"gpu": "NoGPU", "copy_tbps": 3.0})
    assert "NoGPU" in md and "int4_sparse" in md and "| 14336x4096 |" in md
    cmd = [sys.executable, str(ROOT / "studies" / "lowbit_bench.py"), "--out", str(tmp_path / "x"), "--quick"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "x").exists()  # nothing written
