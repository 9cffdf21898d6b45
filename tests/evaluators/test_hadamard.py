"""Hadamard matrices (evaluators.hadamard): H H^T = n I with +-1 entries for every order the constructions cover
up to 4096 (all exactly up to 512, the rest by a randomized product check), the real models' sizes, a clear
error for impossible orders, and the orthogonal fallbacks."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from allocator.evaluators.hadamard import (HadamardError, hadamard, hadamard_pm1, has_hadamard,  # noqa: E402
                                           orthogonal, random_hadamard, random_orthogonal)

#: SmolLM2-135M (hidden, intermediate, head_dim) and Gemma-3-270M (hidden, intermediate, head_dim)
REAL_SIZES = (576, 1536, 64, 640, 2048, 256)


def _covered(lo: int, hi: int) -> list[int]:
    return [n for n in range(lo, hi + 1) if has_hadamard(n)]


def _check_product(n: int, rng: np.random.Generator) -> None:
    """+-1 entries and ``H (H^T V) == n V`` for random +-1 ``V`` (Freivalds): exact in float32 for n <= 4096."""
    h = hadamard_pm1(n, torch.float32)
    assert bool((h.abs() == 1).all()), n
    v = torch.from_numpy(rng.choice(np.array([-1.0, 1.0], dtype=np.float32), (n, 4)))
    assert torch.equal(h @ (h.T @ v), n * v), n


def test_every_covered_order_up_to_512_is_hadamard():
    orders = _covered(1, 512)
    assert {1, 2, 4, 12, 20, 24, 28, 36, 44, 60, 64, 256} <= set(orders)
    for n in orders:
        h = hadamard_pm1(n)
        assert h.shape == (n, n) and bool((h.abs() == 1).all()), n
        assert torch.equal(h @ h.T, n * torch.eye(n, dtype=h.dtype)), n


def test_real_model_sizes_are_hadamard_and_orthogonal():
    for n in REAL_SIZES:
        h = hadamard(n)
        assert torch.equal(hadamard_pm1(n).abs(), torch.ones(n, n))
        assert torch.allclose(h @ h.T, torch.eye(n, dtype=h.dtype), atol=1e-12), n


@pytest.mark.slow
def test_every_covered_order_up_to_4096_is_hadamard():
    rng = np.random.default_rng(0)
    orders = _covered(513, 4096)
    assert len(orders) > 500 and 4096 in orders
    for n in orders:
        _check_product(n, rng)


def test_impossible_orders_raise_a_clear_error():
    for n in (3, 6, 9, 10, 18):            # orders above 2 must be multiples of 4
        assert not has_hadamard(n)
        with pytest.raises(HadamardError, match="multiples of 4"):
            hadamard(n)
    assert not has_hadamard(92)            # a Hadamard of order 92 exists, but none of these constructions
    with pytest.raises(HadamardError, match="orthogonal"):
        hadamard(92)


def test_random_hadamard_is_orthogonal_signed_and_seeded():
    q = random_hadamard(576, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(576, dtype=q.dtype), atol=1e-12)
    assert torch.allclose(q.abs(), torch.full_like(q, 1 / math.sqrt(576)))
    assert torch.equal(q, random_hadamard(576, seed=3)) and not torch.equal(q, random_hadamard(576, seed=4))
    signs = (q * math.sqrt(576) / hadamard_pm1(576))[:, 0]      # diag(s) H: one sign per row
    assert set(signs.tolist()) == {-1.0, 1.0}


def test_orthogonal_falls_back_where_no_hadamard_exists():
    nine = orthogonal(9, seed=0)                # SmolLM2's 9 heads: no Hadamard of order 9
    assert torch.allclose(nine @ nine.T, torch.eye(9, dtype=nine.dtype), atol=1e-12)
    assert torch.equal(nine, random_orthogonal(9, seed=0))
    assert torch.equal(orthogonal(12, seed=1), random_hadamard(12, seed=1))
    r = orthogonal(12, seed=1, kind="random")
    assert torch.allclose(r @ r.T, torch.eye(12, dtype=r.dtype), atol=1e-12)
    assert not torch.allclose(r.abs(), torch.full_like(r, 1 / math.sqrt(12)))
    with pytest.raises(ValueError, match="hadamard"):
        orthogonal(12, kind="givens")
