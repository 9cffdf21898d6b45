"""Kernel-time breakdown of one decode step (CUDA graph replays under torch.profiler); GPU only.

    python studies/profile_step.py --out DIR --modes dense,fused_pdl --sparsity 0.5 [--layers 32]
    python studies/profile_step.py --quick --out /tmp/profile_step     # 2 layers, 5 replays (a smoke run)

Prints the 14 longest kernels per mode and writes every kernel's time per step to ``DIR/profile_step.csv``.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import pandas as pd
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import add_common_args  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, device="cuda", quick="2 layers, 5 replays (a smoke run)", seed="seed of the random weights")
    p.add_argument("--modes", default="dense,fused_pdl")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--replays", type=int, default=20)
    a = p.parse_args(argv)
    if a.quick:
        a.layers, a.replays = 2, 5
    a.out.mkdir(parents=True, exist_ok=True)
    from allocator.kernels.llama_decode import LLAMA3_8B, RandomLlamaDecoder

    model = RandomLlamaDecoder(dataclasses.replace(LLAMA3_8B, n_layers=a.layers), torch.float16, a.device,
                               max_len=512, seed=a.seed)
    model.calibrate(a.sparsity, steps=4, start_pos=400)
    token, pos = torch.zeros(1, dtype=torch.long, device=a.device), torch.tensor([500], device=a.device)
    table = []
    for mode in a.modes.split(","):
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            for _ in range(3):
                model.step(token, pos, mode)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            model.step(token, pos, mode)
        for _ in range(5):
            g.replay()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(a.replays):
                g.replay()
            torch.cuda.synchronize()
        print(f"== {mode} at s={a.sparsity}: per step (us), {a.replays} replays")
        rows = {}
        for e in prof.key_averages():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                rows[e.key[:90]] = (e.device_time_total / a.replays, e.count // a.replays)
        for k, (us, n) in sorted(rows.items(), key=lambda r: -r[1][0])[:14]:
            print(f"{us:9.1f} us  x{n:4d}  {us / max(n, 1):7.2f} us each  {k}")
        print(f"total kernel time {sum(v[0] for v in rows.values()):.1f} us", flush=True)
        table += [{"mode": mode, "sparsity": a.sparsity, "layers": a.layers, "kernel": k, "us_per_step": us,
                   "calls_per_step": n} for k, (us, n) in rows.items()]
    pd.DataFrame(table).to_csv(a.out / "profile_step.csv", index=False)


if __name__ == "__main__":
    main()
