"""One profiling run of the cut real SmolLM2 (2 layers, float32, 8 input units x 3 levels = 24 rows), as a single
process (``python profile_worker.py ...``) or as a rank under ``torchrun``; ``profile(..., distributed="auto")``.

argv: CACHE_DIR OUT_DIR [KILL_AFTER]: the table goes to ``OUT_DIR/table-rank<R>.npy``, each measured row to
``OUT_DIR/rows-rank<R>.log``; with KILL_AFTER, rank 1 SIGKILLs itself after measuring that many rows.
"""
import os
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from allocator import analytic_tables, make_levels
from allocator.evaluators.distributed import resolve
from allocator.evaluators.methods import get_method
from allocator.evaluators.models import load_model
from allocator.evaluators.profiling import profile
from allocator.evaluators.text import token_windows

LEVELS = [0.0, 0.3, 0.5, 0.7]


def main(cache: str, out: str, kill_after: int | None = None) -> None:
    torch.set_num_threads(1)            # the same thread count in every process: bitwise equal rows
    ranks = resolve("auto")
    model, tok = load_model("smollm2-135m", dtype="float32", max_layers=2)
    method = get_method("teal").calibrate(model, token_windows(tok, "calibration", 2, 32, seed=0))
    windows = token_windows(tok, "calibration", 2, 32, seed=1)
    levels = make_levels(s=LEVELS)
    tables = analytic_tables(model.config.to_dict(), levels, unit="input")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    measured = []

    def on_row(unit, level):
        measured.append(f"{unit}@{level}")
        with open(out / f"rows-rank{ranks.rank}.log", "a") as f:
            f.write(f"{unit}@{level}\n")
        if kill_after is not None and ranks.rank == 1 and len(measured) >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    prof = profile(model, method, windows, levels, tables.units, cache=cache, progress=False, on_row=on_row,
                   distributed="auto")
    np.save(out / f"table-rank{ranks.rank}.npy", np.stack([prof.kl, prof.nll]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
