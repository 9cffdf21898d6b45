"""What kernel correctness tests share (as ``allocator.testing`` serves the solvers' conformance tests).

``poison_empty(monkeypatch)``: ``torch.empty`` returns NaN-filled floats and garbage int32 (scratch) for the rest
of the test, and the GEMV workspaces are dropped so they are allocated poisoned too: an output element a kernel
forgets to write shows up as NaN. ``relative_error(y, ref)``: the norm-relative error, failing on NaN.
"""
from __future__ import annotations

import torch


def poison_empty(monkeypatch) -> None:
    real_empty = torch.empty

    def poisoned_empty(*shape, dtype=None, device=None, **kw):
        t = real_empty(*shape, dtype=dtype, device=device, **kw)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype == torch.int32:
            t.fill_(-(2**30))
        return t

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    from . import gemv
    gemv._WORKSPACES.clear()


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(y).any(), "unwritten (NaN-poisoned) output element"
    return ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12)).item()
