"""Kernel tests: interpret Triton on the CPU when no GPU is present.

TRITON_INTERPRET must be set before `triton.jit` decorates the kernels (first import of allocator.kernels),
so it is set here, at collection of this folder. CI should also export TRITON_INTERPRET=1 in case another
test imported allocator.kernels first (the CPU tests then skip with a message saying so).
"""

import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # the tests importorskip torch themselves
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

