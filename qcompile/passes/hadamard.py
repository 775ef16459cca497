"""Orthogonal matrices for the rotation passes (:mod:`.rotate`, :mod:`.rotate_inner`).

A *Hadamard* matrix has entries ±1 and orthogonal rows; divided by ``√n`` it is orthogonal and
spreads any one-hot vector evenly over all ``n`` channels (every entry of magnitude ``1/√n``): what
makes an outlier channel harmless to a per-token quantizer. Orders come from two constructions:

* Sylvester: ``2^k`` (``H_{2n} = [[H, H], [H, -H]]``);
* Paley I: ``q + 1`` for a prime ``q ≡ 3 (mod 4)`` (12, 20, 24, 32, 44, 48, 60, 68, …), built from
  the quadratic residues mod ``q`` — no hard-coded tables;

and their Kronecker products. Sizes of LLMs are usually ``2^k · 3`` (SmolLM2's intermediate
1536 = 12 · 128, Llama's 11008 = 172 · 64 is not covered) or powers of two.

For a size with no such factorization, :func:`hadamard_factors` falls back to a seeded random
orthogonal block of the odd part (QR of a Gaussian) Kronecker a Sylvester Hadamard: orthogonal, so
the rotated float model is still exact, but an outlier is spread over ``n / odd`` channels only.
"""
from __future__ import annotations

import math

import torch


def hadamard(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order ``n`` (a power of two), entries ±1, float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard matrices have power-of-two orders, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def paley_hadamard(n: int) -> torch.Tensor:
    """Paley's (type I) Hadamard matrix of order ``n = q + 1``, ``q`` a prime ``≡ 3 (mod 4)``; entries
    ±1, float64: ``I + [[0, 1ᵀ], [-1, J]]`` with ``J[i, j] = χ(j - i)``, ``χ`` the quadratic character mod ``q``."""
    q = n - 1
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"Paley I Hadamard matrices have orders q + 1 with q a prime ≡ 3 mod 4, got {n}")
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if d in residues else -1.0 for d in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:], s[1:, 0] = 1.0, -1.0
    s[1:, 1:] = chi[(idx[None, :] - idx[:, None]) % q]
    return torch.eye(n, dtype=torch.float64) + s


MAX_PALEY_ORDER = 256   # larger dense factors cost more to apply online than they gain over the fallback


def _paley_order(odd: int, pow2: int) -> int:
    """The smallest Paley order ``odd · 2^i`` (``2^i`` dividing ``pow2``), or 0."""
    d = odd
    while d <= min(odd * pow2, MAX_PALEY_ORDER):
        if d > 2 and _is_prime(d - 1) and (d - 1) % 4 == 3:
            return d
        d *= 2
    return 0


def hadamard_factors(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(A, B, is_hadamard)``: orthogonal float64 matrices with ``A ⊗ B`` of order ``n``, ``B`` a
    normalized Sylvester Hadamard, ``A`` a normalized Hadamard (Sylvester, Paley or their product) —
    or, when ``n``'s odd part fits no Paley order (``is_hadamard`` False), a seeded random orthogonal
    block of the odd part times a Sylvester Hadamard. The split balances the two orders (the cost
    of applying ``A ⊗ B`` to a vector as two small matmuls is ``n · (a + b)``, against ``n²`` dense).

    Example::

        >>> a, b, exact = hadamard_factors(1536)   # a: H_12 ⊗ H_4 / √48, b: H_32 / √32, exact True"""
    if n < 1:
        raise ValueError(f"a rotation needs a positive order, got {n}")
    pow2 = n & -n
    odd = n // pow2
    is_hadamard = True
    if odd == 1:
        core, rest = torch.ones(1, 1, dtype=torch.float64), pow2
    else:
        order = _paley_order(odd, pow2)
        if order:
            core, rest = paley_hadamard(order) / math.sqrt(order), n // order
        else:
            g = torch.Generator().manual_seed(seed)
            r, tri = torch.linalg.qr(torch.randn(odd, odd, generator=g, dtype=torch.float64))
            core, rest, is_hadamard = r * torch.sign(torch.diagonal(tri))[None, :], pow2, False
    # rest is a power of two: give A the share of it that minimizes a + b
    a_pow = min((1 << i for i in range(rest.bit_length())), key=lambda p: core.shape[0] * p + rest // p)
    b = rest // a_pow
    a = torch.kron(core.contiguous(), hadamard(a_pow) / math.sqrt(a_pow))
    return a, hadamard(b) / math.sqrt(b), is_hadamard


def orthogonal_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """The dense orthogonal ``n × n`` matrix ``A ⊗ B`` of :func:`hadamard_factors` (float64)."""
    a, b, _ = hadamard_factors(n, seed)
    return torch.kron(a.contiguous(), b.contiguous())


def rotation_matrix(n: int, seed: int = 0) -> torch.Tensor:
    """The orthogonal ``n × n`` rotation of the residual stream (float64): ``diag(±1) · (H_{2^k} / √2^k ⊗ R_m)``
    with ``n = 2^k · m``, ``m`` odd, random signs and ``R_m`` (QR of a Gaussian, signs fixed) from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    pow2 = n & -n
    odd = n // pow2
    q = hadamard(pow2) / math.sqrt(pow2)
    if odd > 1:
        r, tri = torch.linalg.qr(torch.randn(odd, odd, generator=g, dtype=torch.float64))
        q = torch.kron(q.contiguous(), (r * torch.sign(torch.diagonal(tri))[None, :]).contiguous())
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return signs[:, None] * q
