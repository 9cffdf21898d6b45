"""Kernel-time breakdown of one decode step (CUDA graph replays under torch.profiler); GPU only.

    python studies/profile_step.py --mode fused_pdl --sparsity 0.5 [--layers 32]
"""
from __future__ import annotations

import argparse
import dataclasses

import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", default="dense,fused_pdl")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--replays", type=int, default=20)
    a = p.parse_args(argv)
    from allocator.kernels.llama_decode import LLAMA3_8B, RandomLlamaDecoder

    model = RandomLlamaDecoder(dataclasses.replace(LLAMA3_8B, n_layers=a.layers), torch.float16, "cuda", max_len=512)
    model.calibrate(a.sparsity, steps=4, start_pos=400)
    token, pos = torch.zeros(1, dtype=torch.long, device="cuda"), torch.tensor([500], device="cuda")
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


if __name__ == "__main__":
    main()
