"""Sparse low-bit decode GEMV (kernels/lowbit_gemv.py) vs cuBLAS bf16, our bf16 sparse GEMV and tinygemm (GPU only).

    python studies/lowbit_bench.py --out DIR            # tune + table, Llama-3-8B shapes (~5 min on the H200)
    python studies/lowbit_bench.py --out DIR --quick    # one shape, batch 1, two tiles: a smoke run (~1 min)

Kernels per shape (N x K = d_out x d_in; bf16 activations): ``cublas_bf16`` (``F.linear`` on the row-major
W), ``sparse_bf16`` (kernels.gemv ``sparse_gemv_triton`` on Wt), ``tinygemm_int4`` (``torch.ops.aten.
_weight_int4pack_mm``, group 128, fed our codes and scales, zero points 0; skipped where the op is missing),
``int4_dense`` / ``int4_sparse`` (INT4, one fp16 scale per 128 input channels and column), ``int8_*`` and
``fp8_*`` (one fp32 scale per column); ``*_dense`` is the dense low-bit path (no mask, no scan), ``*_sparse``
the activation-sparse one at s.

Protocol (kernels/latency.py ``graph_time_us``, as studies/kernel_bench.py): each call captured in a CUDA graph
that cycles through >= 300 MB of weight copies (L2 defeated), median of triton.testing.do_bench over graph
replays; random unstructured masks at exactly s shared by the batch rows. Before any timing every kernel's
output is checked against its reference (``lowbit_gemv_reference``: dequantize, then the fp32 product); a
wrong answer stops the run, except tinygemm's (recorded in ``rel_err``). Tuning: for INT4 and INT8, a few tiles
x K splits and batch-1 word-FMA configs per shape, best dense-path config by the dense time, best sparse config
by the time at s = 0.5 (batch 2 / 4 and FP8 get the best tensor-core tile: the word kernel is batch 1, INT4 /
INT8 only); written to DIR/tuned.json
(``allocator.kernels.lowbit_gemv.load_tuned``).

Columns: ``us``; ``speedup`` = cuBLAS bf16 / us at the same batch; ``bytes`` = weight + scale bytes the call
must read (kept rows only for the sparse kernels); ``ideal`` = bf16 bytes / bytes (the bytes ratio);
``frac_ideal`` = speedup / ideal; ``floor_us`` = bytes / the measured device-copy bandwidth; ``frac_floor`` =
floor_us / us. Outputs: DIR/lowbit_bench.csv, DIR/lowbit_tune.csv, DIR/tuned.json, DIR/lowbit_bench.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import pandas as pd

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import add_common_args  # noqa: E402

SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096), (6144, 4096)]  # (d_out, d_in): gate/up, down, o, q|k|v
SPARSITIES = (0.0, 0.5, 0.7)
GROUP = 128
TOL = 2e-2  # bf16 output rounding


def weight_bytes(kernel: str, d_out: int, d_in: int, s: float, group: int = GROUP) -> int:
    """Bytes one call must read from memory (weights of the kept rows + scales; x and y are negligible)."""
    keep = 1.0 if kernel.endswith("_dense") or kernel in ("cublas_bf16", "tinygemm_int4") else 1.0 - s
    groups = -(-d_in // group)
    if kernel in ("cublas_bf16", "sparse_bf16"):
        return int(round(keep * d_in * d_out * 2))
    if kernel == "tinygemm_int4":
        return d_in * d_out // 2 + groups * d_out * 4  # bf16 scale + bf16 zero per group and column
    if kernel.startswith("int4"):
        return int(round(keep * d_in * d_out / 2)) + groups * d_out * 2
    return int(round(keep * d_in * d_out)) + d_out * 4  # int8 / fp8, fp32 scale per column


def result_row(gpu: str, d_out: int, d_in: int, batch: int, kernel: str, s: float, us: float, cublas_us: float,
               copy_bw: float, rel_err: float = float("nan"), config: str = "") -> dict:
    """One CSV row; copy_bw in bytes per second."""
    nbytes = weight_bytes(kernel, d_out, d_in, s)
    speedup = cublas_us / us
    ideal = 2 * d_out * d_in / nbytes
    floor_us = nbytes / copy_bw * 1e6
    return dict(gpu=gpu, d_out=d_out, d_in=d_in, batch=batch, kernel=kernel, s=s, us=us, speedup=speedup,
                bytes=nbytes, ideal=ideal, frac_ideal=speedup / ideal, floor_us=floor_us, frac_floor=floor_us / us,
                tbps=nbytes / us / 1e6, rel_err=rel_err, config=config)


def tile_candidates(fmt: str, quick: bool = False) -> list:
    """Launch configs tried per shape: tensor-core tiles (``tune`` adds the K splits: automatic and twice that) and
    batch-1 word-FMA configs (kernels/NOTES.md, "lowbit GEMV on the H200"); a negative ``n_splits`` there means
    K splits of that many scale groups (128 channels) each."""
    from allocator.kernels import LowbitConfig

    w = dict(kernel="words")
    if fmt == "int4":  # block_k must divide the group (128)
        tiles = [LowbitConfig(128, 128, use_dot=True, num_warps=4, num_stages=4),
                 LowbitConfig(512, 32, sub=4, **w),  # per-group loops, compaction per group (the sparse default)
                 LowbitConfig(128, 64, use_dot=True, num_warps=4, num_stages=3),
                 LowbitConfig(512, 32, n_splits=-1, sub=4, num_stages=5, pipe=True, spre=True, **w),
                 LowbitConfig(1024, 16, n_splits=-1, sub=4, num_stages=5, pipe=True, **w),
                 LowbitConfig(512, 16, n_splits=-4, sub=2, num_stages=4, pipe=True, **w),
                 LowbitConfig(1024, 8, n_splits=-1, sub=2, num_stages=4, pipe=True, **w)]
    else:
        tiles = [LowbitConfig(128, 64, use_dot=True, num_warps=4, num_stages=3),
                 LowbitConfig(256, 16, n_splits=-4, sub=2, num_stages=4, pipe=True, **w),  # the INT8 default
                 LowbitConfig(128, 128, use_dot=True, num_warps=4, num_stages=3),
                 LowbitConfig(256, 16, n_splits=-2, sub=2, num_stages=4, pipe=True, **w),
                 LowbitConfig(256, 32, n_splits=-4, sub=4, num_stages=5, pipe=True, **w),
                 LowbitConfig(256, 16, sub=2, **w)]
    return tiles[:2] if quick else tiles


def _cfg_str(cfg) -> str:
    if getattr(cfg, "kernel", "tile") == "words":
        kind = "words" + (f" pipe st{cfg.num_stages}" if cfg.pipe else "") + (" pf" if cfg.prefetch else "") + (
            " spre" if cfg.spre else "") + ("" if cfg.reduce == "atomic" else f" {cfg.reduce}")
        return f"bn{cfg.block_n} bk{cfg.block_k} sub{cfg.sub} S{cfg.n_splits} w{cfg.num_warps} {kind}"
    kind = ("dot-swap" if getattr(cfg, "swap_ab", False) else "dot") if cfg.use_dot else "fma"
    return f"bn{cfg.block_n} bk{cfg.block_k} S{cfg.n_splits} w{cfg.num_warps} st{cfg.num_stages} {kind}"


def _rel(y, ref) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12)).item()


def copy_bandwidth(device) -> float:
    """Device-copy bandwidth (bytes/s: read + write of a 512 MB buffer), the floor's denominator."""
    import torch

    from allocator.kernels.latency import graph_time_us

    src = torch.empty(2**28, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    us = graph_time_us([lambda: dst.copy_(src)] * 4, 20)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2**29 / (us * 1e-6)


def _packed_copies(fmt, d_out, d_in, device):
    import torch

    from allocator.kernels import pack_fp8, pack_int4, pack_int8
    from allocator.kernels.latency import n_copies_for

    pack = {"int4": pack_int4, "int8": pack_int8, "fp8": pack_fp8}[fmt]
    copies = n_copies_for(weight_bytes(f"{fmt}_dense", d_out, d_in, 0.0))
    return [pack(torch.randn(d_out, d_in, device=device) * d_in**-0.5) for _ in range(copies)]


def tune(fmt, packed, xs, refs, quick, rep_ms=10):
    """Best config per path for one shape at batch 1, the best tensor-core tile per path (batch 2 / 4 and FP8 run
    tiles: the word kernel is batch 1, INT4 / INT8 only), and the rows of the sweep."""
    from allocator.kernels import lowbit_gemv_triton
    from allocator.kernels.latency import THRESHOLD, graph_time_us
    from allocator.kernels.lowbit_gemv import launch_geometry

    rows, best, best_tile = [], {}, {}
    device = xs[0.5].device
    K = packed[0].k
    for path, x, thr in (("dense", xs[0.0], None), ("sparse", xs[0.5], THRESHOLD)):
        scores = []
        for base in tile_candidates(fmt, quick):
            if base.kernel == "words":
                if base.n_splits < 0:
                    base = dataclasses.replace(base, n_splits=max(1, K // (128 * -base.n_splits)))
                cands = [base]
            else:
                auto, _ = launch_geometry(packed[0], base, device)
                cands = [dataclasses.replace(base, n_splits=n) for n in sorted({auto} if quick else {auto, 2 * auto})]
            for cfg in cands:
                try:
                    err = _rel(lowbit_gemv_triton(x, packed[0], thr, config=cfg), refs[path])
                    if err > TOL:
                        print(f"  skip {fmt} {path} {_cfg_str(cfg)}: relative error {err:.2e}", flush=True)
                        continue
                    us = graph_time_us([lambda p=p: lowbit_gemv_triton(x, p, thr, config=cfg) for p in packed], rep_ms)
                except Exception as exc:  # a tile that does not compile (registers, shared memory)
                    print(f"  skip {fmt} {path} {_cfg_str(cfg)}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                    continue
                rows.append(dict(fmt=fmt, path=path, us=us, **dataclasses.asdict(cfg)))
                scores.append((us, cfg))
        if not scores:
            raise RuntimeError(f"no {fmt} {path} config compiled and passed the check")
        scores.sort(key=lambda r: r[0])
        best[path] = scores[0][1]
        tiles = [sc for sc in scores if sc[1].kernel == "tile"]
        best_tile[path] = tiles[0][1] if tiles else scores[0][1]
        print(f"  tune {fmt} {path}: best {_cfg_str(scores[0][1])} {scores[0][0]:.2f} us; next "
              f"{[(round(t, 2), _cfg_str(c)) for t, c in scores[1:3]]}", flush=True)
    return best, best_tile, rows


def bench_shape(d_out, d_in, gpu, copy_bw, batches, quick, device, tuned_out, rep_ms=25, dtype=None):
    """Rows of every kernel at every batch and s for one shape (tunes INT4 / INT8 at batch 1 first)."""
    import torch
    import torch.nn.functional as F

    from allocator.kernels import lowbit_gemv_reference, lowbit_gemv_triton, sparse_gemv_reference, sparse_gemv_triton
    from allocator.kernels import lowbit_gemv as lb
    from allocator.kernels.latency import THRESHOLD, graph_time_us, n_copies_for, sparse_input

    dt = dtype or torch.bfloat16  # bf16 is the measured case (fp16: CPU dry runs, the interpreter's bf16 is wrong)
    rows, tune_rows = [], []
    copies = n_copies_for(2 * d_out * d_in)
    w = [(torch.randn(d_out, d_in, device=device) * d_in**-0.5).to(dt) for _ in range(copies)]
    wt = [m.T.contiguous() for m in w]
    packed = {fmt: _packed_copies(fmt, d_out, d_in, device) for fmt in ("int4", "int8", "fp8")}
    for batch in batches:
        sp = SPARSITIES if batch == 1 else (0.0, 0.5)
        xs = {s: sparse_input(batch, d_in, s, dt, device) for s in sp}
        x0 = xs[0.0]

        def add(kernel, s, us, err=float("nan"), cfg=""):
            rows.append(result_row(gpu, d_out, d_in, batch, kernel, s, us, cublas, copy_bw, err, cfg))
            r = rows[-1]
            print(f"{d_out}x{d_in} b{batch} {kernel:14s} s={s:.1f}: {us:7.2f} us  x{r['speedup']:.2f} "
                  f"({r['frac_ideal']:.0%} of ideal x{r['ideal']:.2f}, {r['frac_floor']:.0%} of floor) "
                  f"{cfg}", flush=True)

        err = _rel(F.linear(x0, w[0]), x0.float() @ w[0].float().T)
        assert err < TOL, f"cuBLAS: relative error {err:.2e}"
        cublas = graph_time_us([lambda m=m: F.linear(x0, m) for m in w], rep_ms)
        add("cublas_bf16", 0.0, cublas, err)
        for s, x in xs.items():
            err = _rel(sparse_gemv_triton(x, wt[0], THRESHOLD), sparse_gemv_reference(x, wt[0], THRESHOLD))
            assert err < TOL, f"sparse_bf16 s={s}: relative error {err:.2e}"
            add("sparse_bf16", s, graph_time_us([lambda m=m: sparse_gemv_triton(x, m, THRESHOLD) for m in wt], rep_ms),
                err)
        try:
            tg = [lb.tinygemm_pack(p) for p in packed["int4"]]
            y = torch.ops.aten._weight_int4pack_mm(x0, tg[0][0], GROUP, tg[0][1])
            err = _rel(y, lowbit_gemv_reference(x0, packed["int4"][0], None))
            if err > TOL:
                print(f"  warning: tinygemm differs from our INT4 reference by {err:.2e} (timed anyway)", flush=True)
            us = graph_time_us([lambda t=t: torch.ops.aten._weight_int4pack_mm(x0, t[0], GROUP, t[1]) for t in tg],
                               rep_ms)
            add("tinygemm_int4", 0.0, us, err)
            del tg
        except Exception as exc:  # op missing in this build, or shape / dtype unsupported
            print(f"  tinygemm unavailable: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
        for fmt in ("int4", "int8", "fp8"):
            p = packed[fmt]
            refs = {"dense": lowbit_gemv_reference(x0, p[0], None)}
            refs["sparse"] = lowbit_gemv_reference(xs[0.5], p[0], THRESHOLD)
            if batch == 1 and fmt != "fp8":
                best, best_tile, trows = tune(fmt, p, xs, refs, quick)
                tune_rows += [dict(d_out=d_out, d_in=d_in, **r) for r in trows]

                def put(f, path, b, cfg):
                    lb.TUNED_CONFIGS[(f, path == "dense", d_in, d_out, b)] = cfg
                    tuned_out[f"{f},{path},{d_in},{d_out},{b}"] = dataclasses.asdict(cfg)

                for path, cfg in best.items():
                    put(fmt, path, 1, cfg)
                    for b in (2, 4):  # the word kernel is batch 1 only: larger batches run the best tile
                        put(fmt, path, b, best_tile[path])
                    if fmt == "int8":  # FP8 runs the INT8 tile kernel with another element type
                        for b in (1, 2, 4):
                            put("fp8", path, b, best_tile[path])
            cfg = lb.default_lowbit_config(fmt, d_in, d_out, batch, True)
            err = _rel(lowbit_gemv_triton(x0, p[0], None, config=cfg), refs["dense"])
            assert err < TOL, f"{fmt}_dense b{batch}: relative error {err:.2e}"
            add(f"{fmt}_dense", 0.0, graph_time_us([lambda q=q: lowbit_gemv_triton(x0, q, None, config=cfg) for q in p],
                                                   rep_ms), err, _cfg_str(cfg))
            cfg = lb.default_lowbit_config(fmt, d_in, d_out, batch, False)
            for s, x in xs.items():
                err = _rel(lowbit_gemv_triton(x, p[0], THRESHOLD, config=cfg),
                           lowbit_gemv_reference(x, p[0], THRESHOLD))
                assert err < TOL, f"{fmt}_sparse b{batch} s={s}: relative error {err:.2e}"
                us = graph_time_us([lambda q=q: lowbit_gemv_triton(x, q, THRESHOLD, config=cfg) for q in p], rep_ms)
                add(f"{fmt}_sparse", s, us, err, _cfg_str(cfg))
    del w, wt, packed
    torch.cuda.empty_cache()
    return rows, tune_rows


def _fmt_table(df: pd.DataFrame) -> str:
    cols = ["shape", "kernel", "s", "us", "speedup", "ideal", "frac_ideal", "frac_floor", "tbps", "rel_err", "config"]
    fmt = {"s": "{:.1f}", "us": "{:.2f}", "speedup": "{:.2f}x", "ideal": "{:.2f}x", "frac_ideal": "{:.0%}",
           "frac_floor": "{:.0%}", "tbps": "{:.2f}", "rel_err": "{:.1e}"}
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        r = dict(r, shape=f"{r['d_out']}x{r['d_in']}")
        lines.append("| " + " | ".join(fmt.get(c, "{}").format(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def markdown(df: pd.DataFrame, meta: dict) -> str:
    """The report: targets of issue 12 first, then one table per batch."""
    parts = [f"# Sparse low-bit decode GEMV on the {meta['gpu']}", "",
             "Generated by `python studies/lowbit_bench.py` (protocol and columns in its docstring). Times in "
             "microseconds per call (median, CUDA graphs, L2 defeated), bf16 activations, random weights. "
             f"speedup = cuBLAS bf16 / ours; ideal = bf16 bytes / bytes read; floor = bytes / device copy "
             f"({meta['copy_tbps']:.2f} TB/s measured). "
             + " ".join(f"{k}: {v}." for k, v in meta.items() if k not in ("gpu", "copy_tbps")), ""]
    b1 = df[df["batch"] == 1]

    def get(kernel, shape, s):
        sub = b1[(b1["kernel"] == kernel) & (b1["d_out"] == shape[0]) & (b1["d_in"] == shape[1]) & (b1["s"] == s)]
        return sub["speedup"].iloc[0] if len(sub) else float("nan")

    parts += ["## Targets (issue 12, batch 1)", "", "| shape | tinygemm | INT4 dense (>= 3x) | INT4 s=0.5 "
              "(>= 5x on the MLP shapes) | INT4 s=0.7 | INT8 dense | INT8 s=0.5 |", "|---|---|---|---|---|---|---|"]
    for shape in sorted({(r.d_out, r.d_in) for r in b1.itertuples()}, key=lambda t: -t[0] * t[1]):
        vals = [get("tinygemm_int4", shape, 0.0), get("int4_dense", shape, 0.0), get("int4_sparse", shape, 0.5),
                get("int4_sparse", shape, 0.7), get("int8_dense", shape, 0.0), get("int8_sparse", shape, 0.5)]
        parts.append(f"| {shape[0]}x{shape[1]} | " + " | ".join("n/a" if v != v else f"{v:.2f}x" for v in vals) + " |")
    parts.append("")
    for batch, sub in df.groupby("batch", sort=True):
        parts += [f"## Batch {batch}", "", _fmt_table(sub), ""]
    return "\n".join(parts) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, device="cuda", quick="one shape (14336x4096), batch 1, two tiles, one K split (a smoke run)",
                    seed="torch seed of the random weights and masks")
    p.add_argument("--batches", default="1,2,4", help="comma-separated batch sizes (2 and 4: s in {0, 0.5})")
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="d_out x d_in list")
    a = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available() or not str(a.device).startswith("cuda"):
        print(f"lowbit_bench needs a CUDA GPU (device {a.device!r}, torch.cuda.is_available() = "
              f"{torch.cuda.is_available()}): nothing measured, nothing written", file=sys.stderr)
        return 2
    import triton

    a.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    batches = [int(b) for b in a.batches.split(",")]
    if a.quick:
        shapes, batches = shapes[:1], [1]
    gpu = torch.cuda.get_device_name(device)
    t0 = time.time()
    bw = copy_bandwidth(device)
    print(f"{gpu}: device copy {bw / 1e12:.2f} TB/s", flush=True)
    rows, tune_rows, tuned = [], [], {}
    for d_out, d_in in shapes:
        r, tr = bench_shape(d_out, d_in, gpu, bw, batches, a.quick, device, tuned)
        rows += r
        tune_rows += tr
        pd.DataFrame(rows).to_csv(a.out / "lowbit_bench.csv", index=False)
        pd.DataFrame(tune_rows).to_csv(a.out / "lowbit_tune.csv", index=False)
        (a.out / "tuned.json").write_text(json.dumps(tuned, indent=1))
        print(f"[{time.time() - t0:.0f}s]", flush=True)
    meta = {"gpu": gpu, "copy_tbps": bw / 1e12, "torch": torch.__version__, "triton": triton.__version__,
            "command": "`python studies/lowbit_bench.py " + " ".join(sys.argv[1:] if argv is None else argv) + "`",
            "wall time": f"{time.time() - t0:.0f} s"}
    md = markdown(pd.DataFrame(rows), meta)
    (a.out / "lowbit_bench.md").write_text(md)
    print(md.split("## Batch")[0], flush=True)  # the targets table
    print(f"wrote {a.out / 'lowbit_bench.csv'}, {a.out / 'lowbit_bench.md'} ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
