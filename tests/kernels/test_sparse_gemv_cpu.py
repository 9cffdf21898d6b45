"""CPU correctness of the Triton kernels under TRITON_INTERPRET=1 (small, ragged shapes; fp16 and fp32).

Every run draws fresh random inputs (no fixed seed: the kernel must compute the same function on any valid
input), and the output buffers the kernel writes are poisoned with NaN first, so an element the kernel
forgets to write fails the comparison. bf16 is not tested here: the interpreter's bf16 arithmetic is wrong.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from allocator.kernels import (  # noqa: E402
    GemvConfig,
    keep_mask,
    low_rank_factors,
    rsparse_gemv_reference,
    rsparse_gemv_triton,
    rsparse_gemv_two_launch_triton,
    sparse_gemv_reference,
    sparse_gemv_triton,
)
from allocator.kernels import gemv as sg  # noqa: E402
from allocator.kernels.testing import poison_empty, relative_error  # noqa: E402

pytestmark = pytest.mark.skipif(
    not sg._interpreting() or "Interpreted" not in type(sg._sparse_gemv_kernel).__name__,
    reason="CPU kernel tests need TRITON_INTERPRET=1 set before allocator.kernels is first imported",
)

THR = 0.5


def _input(batch: int, K: int, drop: float, dtype) -> torch.Tensor:
    """x [batch, K] whose union mask drops a random `drop` share of channels (|x| < THR), keeps the rest."""
    x = (THR + 0.1 + torch.rand(batch, K)) * torch.sign(torch.randn(batch, K))
    dropped = torch.randperm(K)[: int(round(drop * K))]
    x[:, dropped] = (torch.rand(batch, len(dropped)) * 2 - 1) * THR * 0.9
    return x.to(dtype)


def _poison_outputs(monkeypatch):
    """Make torch.empty return NaN-filled (float) or garbage (int32 scratch) buffers."""
    poison_empty(monkeypatch)


def _check(y, ref, dtype):
    err = relative_error(y, ref)
    assert err < (1e-5 if dtype == torch.float32 else 2e-3), f"relative error {err:.2e}"


CASES = [  # (batch, K, N, config)
    (1, 200, 130, GemvConfig(block_n=64, block_k=16, n_splits=1, scan_block=128)),
    (1, 333, 96, GemvConfig(block_n=32, block_k=16, n_splits=3, scan_block=64)),
    (2, 160, 70, GemvConfig(block_n=64, block_k=32, n_splits=2, use_dot=True)),
    (3, 97, 50, GemvConfig(block_n=16, block_k=16, n_splits=1)),
    (4, 256, 64, GemvConfig(block_n=32, block_k=16, n_splits=4, use_dot=True, scan_block=32)),
    (1, 300, 100, GemvConfig(block_n=64, block_k=32, n_splits=2)),
    (3, 150, 40, GemvConfig(block_n=32, block_k=16, n_splits=1, use_dot=True)),
]


@pytest.mark.parametrize("drop", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_sparse_gemv_matches_reference(case, drop, monkeypatch):
    _poison_outputs(monkeypatch)
    batch, K, N, cfg = CASES[case]
    dtype = torch.float16 if case % 2 == 0 else torch.float32
    x, wt = _input(batch, K, drop, dtype), torch.randn(K, N).to(dtype)
    scale = torch.rand(K) + 0.5 if case in (1, 5) else None
    y = sparse_gemv_triton(x, wt, THR, col_scale=scale, config=cfg)
    ref = sparse_gemv_reference(x, wt, THR, col_scale=scale)
    if drop == 1.0 and scale is None:
        assert ref.abs().max() == 0
    _check(y, ref, dtype)


def test_repeated_calls_reset_counters(monkeypatch):
    """The split-K arrival counters must be back at zero after every call (reused across calls)."""
    _poison_outputs(monkeypatch)
    cfg = GemvConfig(block_n=32, block_k=16, n_splits=4)
    for _ in range(3):
        x, wt = _input(1, 150, 0.5, torch.float32), torch.randn(150, 80)
        _check(sparse_gemv_triton(x, wt, THR, config=cfg), sparse_gemv_reference(x, wt, THR), torch.float32)
    assert int(sg._workspace(torch.device("cpu")).counters.abs().sum()) == 0


def test_rsparse_fused_resets_its_counters(monkeypatch):
    _poison_outputs(monkeypatch)
    K, N, rank = 100, 64, 10
    w = torch.randn(N, K)
    at, bt = low_rank_factors(w, rank)
    cfg, zcfg = GemvConfig(block_n=32, block_k=16, n_splits=2), GemvConfig(block_n=8, block_k=16, n_splits=4)
    for rank_cfg in (cfg, GemvConfig(block_n=32, block_k=4, n_splits=2)):  # Bt rows in one tile, and in a loop
        x = _input(2, K, 0.5, torch.float32)
        cfg = rank_cfg
        y = rsparse_gemv_triton(x, w.T.contiguous(), at, bt, THR, config=cfg, low_rank_config=zcfg)
        _check(y, rsparse_gemv_reference(x, w.T.contiguous(), at, bt, THR), torch.float32)
    assert int(sg._workspace(torch.device("cpu")).counters.abs().sum()) == 0


def test_segments_have_their_own_thresholds(monkeypatch):
    """Fused q|k|v: three column segments, three thresholds, one launch."""
    _poison_outputs(monkeypatch)
    K, segs, N = 120, (64, 96), 128
    x, wt = _input(2, K, 0.3, torch.float32), torch.randn(K, N)
    thr = [0.3, THR, 0.9]
    y = sparse_gemv_triton(x, wt, thr, segments=segs, config=GemvConfig(block_n=32, block_k=16, n_splits=2))
    _check(y, sparse_gemv_reference(x, wt, thr, segments=segs), torch.float32)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("drop", [0.0, 0.5, 1.0])
def test_rsparse_matches_reference(drop, fused, monkeypatch):
    _poison_outputs(monkeypatch)
    K, N, rank = 150, 90, 12
    w = torch.randn(N, K)
    at, bt = low_rank_factors(w, rank)
    x = _input(1, K, drop, torch.float32)
    scale = w.norm(dim=0)
    cfg = GemvConfig(block_n=32, block_k=16, n_splits=2, use_dot=drop == 0.5)
    fn = rsparse_gemv_triton if fused else rsparse_gemv_two_launch_triton
    zcfg = GemvConfig(block_n=8, block_k=16, n_splits=3)
    y = fn(x, w.T.contiguous(), at, bt, THR, col_scale=scale, config=cfg, low_rank_config=zcfg)
    ref = rsparse_gemv_reference(x, w.T.contiguous(), at, bt, THR, col_scale=scale)
    _check(y, ref, torch.float32)


def test_rsparse_full_rank_recovers_dense():
    """With the full rank the low-rank branch is exact, so the layer equals the dense product."""
    K, N = 40, 24
    w = torch.randn(N, K, dtype=torch.float64).float()
    at, bt = low_rank_factors(w, min(K, N))
    x = _input(1, K, 0.5, torch.float32)
    y = rsparse_gemv_triton(x, w.T.contiguous(), at, bt, THR, config=GemvConfig(block_n=32, block_k=16))
    torch.testing.assert_close(y, x @ w.T, rtol=1e-4, atol=1e-4)


def test_keep_mask_is_union_over_batch():
    x = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, -2.0]])
    assert keep_mask(x, 0.5).tolist() == [False, True, True]
