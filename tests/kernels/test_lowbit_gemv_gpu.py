"""GPU correctness of the low-bit (sparse) decode GEMV at real shapes: fp16 and bf16, batch 1..4, INT4 / INT8 /
FP8, sparse and dense paths, every tile kind and the batch-1 word-FMA kernel's loop forms; CUDA-graph replay;
tinygemm computes the same function.

Skipped without a CUDA GPU (or when Triton is being interpreted). Fresh random inputs each run; outputs
poisoned with NaN before each run.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from allocator.kernels import (  # noqa: E402
    LowbitConfig,
    lowbit_gemv_reference,
    lowbit_gemv_triton,
    pack_fp8,
    pack_int4,
    pack_int8,
)
from allocator.kernels import gemv as sg  # noqa: E402
from allocator.kernels.testing import poison_empty, relative_error  # noqa: E402
from allocator.kernels import lowbit_gemv as lb  # noqa: E402
from allocator.kernels.latency import THRESHOLD, sparse_input  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or sg._interpreting(), reason="needs a CUDA GPU"),
]

TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}
PACK = {"int4": pack_int4, "int8": pack_int8, "fp8": pack_fp8}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    poison_empty(monkeypatch)


def _packed(fmt, d_out, d_in):
    return PACK[fmt](torch.randn(d_out, d_in, device="cuda") * d_in**-0.5)


@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (4096, 14336), (1000, 777)])
@pytest.mark.parametrize("batch", [1, 2, 4])
@pytest.mark.parametrize("s", [0.0, 0.5, 1.0, None])  # None: the dense low-bit path
def test_lowbit_gemv_matches_reference(fmt, dtype, shape, batch, s):
    d_out, d_in = shape
    packed = _packed(fmt, d_out, d_in)
    x = sparse_input(batch, d_in, 0.0 if s is None else s, dtype, "cuda")
    thr = None if s is None else THRESHOLD
    y = lowbit_gemv_triton(x, packed, thr)
    ref = lowbit_gemv_reference(x, packed, thr)
    if s == 1.0:
        assert not torch.isnan(y).any() and y.abs().max() == 0
    else:
        assert relative_error(y, ref) < TOL[dtype]


TILES = [LowbitConfig(256, 64, 0, 4, 3, True), LowbitConfig(128, 64, 8, 4, 3, True, swap_ab=True),
         LowbitConfig(256, 128, 4, 8, 3, True, swap_ab=True), LowbitConfig(512, 64, 2, 8, 3, True),
         LowbitConfig(64, 32, 16, 2, 2, False), LowbitConfig(128, 32, 0, 4, 2, False)]


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("cfg", range(len(TILES)))
@pytest.mark.parametrize("dense", [True, False])
def test_every_tile_kind(fmt, cfg, dense):
    packed = _packed(fmt, 6144, 4096)
    x = sparse_input(3, 4096, 0.5, torch.bfloat16, "cuda")
    thr = None if dense else THRESHOLD
    y = lowbit_gemv_triton(x, packed, thr, config=TILES[cfg])
    assert relative_error(y, lowbit_gemv_reference(x, packed, thr)) < TOL[torch.bfloat16]


def test_cuda_graph_replay_follows_new_inputs():
    packed = _packed("int4", 14336, 4096)
    x = sparse_input(1, 4096, 0.5, torch.float16, "cuda")
    sg.reserve_workspace(torch.device("cuda"), 4096, 14336)
    y = lowbit_gemv_triton(x, packed, THRESHOLD)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = lowbit_gemv_triton(x, packed, THRESHOLD)
    for s in (0.3, 0.7):
        x.copy_(sparse_input(1, 4096, s, torch.float16, "cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert relative_error(y, lowbit_gemv_reference(x, packed, THRESHOLD)) < TOL[torch.float16]
    assert int(sg._workspace(torch.device("cuda")).counters.abs().sum()) == 0
    acc = lb._ACCUMULATORS.get(torch.device("cuda", torch.cuda.current_device()))
    assert acc is None or int(acc.abs().sum()) == 0


W = dict(kernel="words")
WORD_TILES = [LowbitConfig(512, 32, sub=4, **W), LowbitConfig(512, 32, n_splits=8, sub=4, prefetch=True, **W),
              LowbitConfig(512, 32, sub=4, reduce="ordered", **W),
              LowbitConfig(512, 32, n_splits=32, sub=4, num_stages=5, pipe=True, spre=True, **W),
              LowbitConfig(1024, 16, n_splits=32, sub=4, num_stages=5, pipe=True, **W),
              LowbitConfig(256, 16, n_splits=8, sub=2, num_stages=4, pipe=True, **W)]


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("cfg", range(len(WORD_TILES)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("s", [0.5, None])
def test_word_kernel_variants(fmt, cfg, dtype, s):
    packed = _packed(fmt, 14336, 4096)
    assert lb.words_apply(packed, 1)
    x = sparse_input(1, 4096, 0.0 if s is None else s, dtype, "cuda")
    thr = None if s is None else THRESHOLD
    y = lowbit_gemv_triton(x, packed, thr, config=WORD_TILES[cfg])
    assert relative_error(y, lowbit_gemv_reference(x, packed, thr)) < TOL[dtype]
    acc = lb._ACCUMULATORS.get(x.device)
    assert acc is None or int(acc.abs().sum()) == 0


@pytest.mark.parametrize("shape", [(14336, 4096), (4096, 14336)])
def test_tinygemm_computes_the_same_function(shape):
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        pytest.skip("torch.ops.aten._weight_int4pack_mm missing")
    d_out, d_in = shape
    packed = _packed("int4", d_out, d_in)
    w4, scales_and_zeros = lb.tinygemm_pack(packed)
    x = sparse_input(1, d_in, 0.0, torch.bfloat16, "cuda")
    y = torch.ops.aten._weight_int4pack_mm(x, w4, 128, scales_and_zeros)
    assert relative_error(y, lowbit_gemv_reference(x, packed, None)) < TOL[torch.bfloat16]
