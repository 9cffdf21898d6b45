"""Hadamard and random orthogonal matrices for the sizes real models have (rotations of the bits axis).

A Hadamard matrix ``H`` of order ``n`` has entries +-1 and ``H H^T = n I``; ``H / sqrt(n)`` is orthogonal and
spreads every coordinate over all others (what QuaRot uses to remove activation outliers before low-bit
quantization). Orders other than 1 and 2 are multiples of 4, so a head count of 9 has none.

Constructions (each exact, integer arithmetic in int8):

- Sylvester: ``H_{2n} = [[H, H], [H, -H]]`` for powers of two.
- Paley I (q prime, q = 3 mod 4), order ``q + 1``: ``H = I + S`` with ``S = [[0, 1^T], [-1, J]]`` and ``J`` the
  Jacobsthal matrix ``J_ij = chi(j - i)`` (``chi`` the Legendre symbol); ``S`` is skew with ``S S^T = q I``.
  Orders 12, 20, 24, 32, 44, 48, 60, 68, 72, 80, 84, ...
- Paley II (q prime, q = 1 mod 4), order ``2 (q + 1)``: the symmetric conference matrix
  ``C = [[0, 1^T], [1, J]]`` gives ``H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]]``.
  Orders 12, 28, 36, 60, 76, 84, ...
- Kronecker products ``H_a (x) H_b`` of the above: ``n = K_1 K_2 ... 2^m`` (SmolLM2's 576 = 36 * 16,
  1536 = 12 * 128; Gemma-3-270M's 640 = 20 * 32).

Complexity: building ``H`` of order ``n`` is ``O(n^2)`` time and memory (a search over the factorizations of
``n``, memoized, is negligible); applying it as a dense matrix is ``O(n^2)`` per vector (the fast Walsh-Hadamard
transform's ``O(n log n)`` is the kernels' business).

Where no Hadamard is constructed, ``orthogonal(n, seed)`` falls back to a random orthogonal matrix: the Q factor
of a Gaussian matrix with the signs of R's diagonal moved into Q, which makes it Haar-distributed (Mezzadri
2007). Sources: QuaRot (Ashkboos et al., 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", its
``random_hadamard_matrix`` and ``get_hadK``); R. E. A. C. Paley, "On orthogonal matrices" (1933); J. J.
Sylvester (1867).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

__all__ = ["HadamardError", "hadamard_pm1", "has_hadamard", "hadamard", "random_hadamard", "random_orthogonal",
           "orthogonal"]


class HadamardError(ValueError):
    """No construction here gives a Hadamard matrix of the requested order."""


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """``J_ij = chi(j - i mod q)``, the Legendre symbol of the difference (0 on the diagonal)."""
    residues = np.zeros(q, dtype=np.int8)
    residues[(np.arange(1, q) ** 2) % q] = 1
    chi = np.where(residues == 1, 1, -1).astype(np.int8)
    chi[0] = 0
    rows = np.lib.stride_tricks.sliding_window_view(np.concatenate([chi, chi]), q)   # rows[k, j] = chi[k + j]
    return rows[(-np.arange(q)) % q]                                                   # circulant, O(q^2)


def _paley1(q: int) -> np.ndarray:
    n = q + 1
    s = np.zeros((n, n), dtype=np.int8)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return s + np.eye(n, dtype=np.int8)


def _paley2(q: int) -> np.ndarray:
    c = np.zeros((q + 1, q + 1), dtype=np.int8)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    a = np.array([[1, 1], [1, -1]], dtype=np.int8)
    b = np.array([[1, -1], [-1, -1]], dtype=np.int8)
    return np.kron(c, a) + np.kron(np.eye(q + 1, dtype=np.int8), b)


def _paley_base(order: int) -> tuple[str, int] | None:
    """The Paley construction of exactly this order, if any (Paley I first)."""
    if _is_prime(order - 1) and (order - 1) % 4 == 3:
        return "paley1", order - 1
    if order % 2 == 0 and _is_prime(order // 2 - 1) and (order // 2 - 1) % 4 == 1:
        return "paley2", order // 2 - 1
    return None


@functools.lru_cache(maxsize=None)
def _plan(n: int) -> tuple[tuple[str, int], ...] | None:
    """Factors (Paley bases, largest first, then ``('sylvester', 2^m)``) whose Kronecker product has order ``n``."""
    if n >= 1 and n & (n - 1) == 0:
        return (("sylvester", n),)
    for order in range(n, 11, -4):
        base = _paley_base(order) if n % order == 0 and order & (order - 1) else None
        rest = _plan(n // order) if base else None
        if rest is not None:
            return (base,) + rest
    return None


def has_hadamard(n: int) -> bool:
    """Whether ``hadamard(n)`` has a construction here."""
    return int(n) >= 1 and _plan(int(n)) is not None


def _sylvester_kron(h: np.ndarray, m: int) -> np.ndarray:
    """``h (x) H_m`` for a power of two ``m``, by doubling: ``[[h, h], [h, -h]]`` (the Sylvester step)."""
    while m > 1:
        n = h.shape[0]
        out = np.empty((2 * n, 2 * n), dtype=np.int8)
        out[:n, :n] = out[:n, n:] = out[n:, :n] = h
        np.negative(h, out=out[n:, n:])
        h, m = out, m // 2
    return h


def _factor(kind: str, value: int) -> np.ndarray:
    if kind == "sylvester":
        return _sylvester_kron(np.ones((1, 1), dtype=np.int8), value)
    return _paley1(value) if kind == "paley1" else _paley2(value)


@functools.lru_cache(maxsize=8)
def _pm1(n: int) -> np.ndarray:
    plan = _plan(n) if n >= 1 else None
    if plan is None:
        odd = n // (n & -n) if n >= 1 else n
        raise HadamardError(
            f"no Hadamard matrix of order {n} can be built here (Sylvester 2^m, Paley I / II orders and their "
            f"Kronecker products; the odd part {odd} is not covered"
            + ("; orders above 2 must be multiples of 4" if n > 2 and n % 4 else "")
            + "); use orthogonal(n, seed), which falls back to a random orthogonal matrix")
    h = _factor(*plan[0])
    for kind, value in plan[1:]:
        h = _sylvester_kron(h, value) if kind == "sylvester" else np.kron(h, _factor(kind, value))
    h.setflags(write=False)
    return h


def hadamard_pm1(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The unnormalized +-1 Hadamard matrix of order ``n`` (``H H^T = n I``)."""
    return torch.from_numpy(_pm1(int(n)).astype(np.float32 if dtype == torch.float32 else np.float64)).to(dtype)


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthogonal ``H / sqrt(n)``; ``HadamardError`` if no construction covers ``n``."""
    return (hadamard_pm1(n) / math.sqrt(n)).to(dtype)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def random_hadamard(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """QuaRot's randomized Hadamard ``diag(s) H / sqrt(n)``, ``s`` random signs from ``seed``.

    The signs come first on the row-vector convention ``x -> x Q``: ``x Q = (x * s) H`` flips input signs before
    mixing (signs applied after ``H`` would not change any magnitude)."""
    signs = torch.randint(0, 2, (int(n),), generator=_generator(seed), dtype=torch.int64) * 2 - 1
    return (signs.to(torch.float64)[:, None] * hadamard(n)).to(dtype)


def random_orthogonal(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A Haar-random orthogonal matrix: QR of a Gaussian, with ``sign(diag(R))`` folded into Q."""
    g = torch.randn(int(n), int(n), generator=_generator(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return (q * torch.sign(torch.diagonal(r))[None, :]).to(dtype).contiguous()


def orthogonal(n: int, seed: int = 0, kind: str = "hadamard", dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """An orthogonal ``n x n`` rotation: ``kind="hadamard"`` is ``random_hadamard(n, seed)`` where a Hadamard of
    order ``n`` exists and, where none does (e.g. 9 heads), ``random_orthogonal(n, seed)`` instead (the stated
    fallback); ``kind="random"`` is always ``random_orthogonal``."""
    if kind not in ("hadamard", "random"):
        raise ValueError(f"orthogonal(kind={kind!r}): expected 'hadamard' or 'random'")
    if kind == "hadamard" and has_hadamard(n):
        return random_hadamard(n, seed, dtype)
    return random_orthogonal(n, seed, dtype)
