"""One convention for "how much better than uniform": the share of uniform's increase over dense removed.

``share_removed(dense, uniform, allocated) = (uniform - allocated) / (uniform - dense)``: 1 when the allocation
is as good as dense, 0 when it is no better than uniform, negative when worse. Every report and study states
its gains this way (perplexity or KL; for KL, dense is 0).
"""
from __future__ import annotations

import math


def share_removed(dense: float, uniform: float, allocated: float) -> float:
    """Share of uniform's increase over dense that the allocation removes (NaN when uniform equals dense)."""
    increase = uniform - dense
    if increase == 0 or not all(map(math.isfinite, (dense, uniform, allocated))):
        return float("nan")
    return (uniform - allocated) / increase


def describe_gain(source: str, name: str, dense: float, uniform: float, allocated: float,
                  quantity: str = "perplexity") -> str:
    share = share_removed(dense, uniform, allocated)
    return (f"{source}: {name} {quantity} {allocated:.3g} vs uniform {uniform:.3g} (dense {dense:.3g}): "
            f"{share:+.0%} of uniform's increase removed")


def paired_difference(a, b) -> tuple[float, float, int]:
    """Mean and standard error of the per-window differences ``a - b`` (paired: the same windows), and n."""
    import numpy as np

    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = diff.size
    se = float(diff.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return float(diff.mean()), se, n


def verdict(mean: float, se: float, z: float = 2.0) -> str:
    """"better" / "worse" (lower is better) when the paired mean is beyond ``z`` standard errors, else "tie"."""
    if not math.isfinite(se) or abs(mean) <= z * se:
        return "tie"
    return "better" if mean < 0 else "worse"
