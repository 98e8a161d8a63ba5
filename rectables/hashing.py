"""Deterministic 64-bit hashing of raw int64 ids (never Python ``hash()``).

The mixer is the SplitMix64 finaliser (Steele, Lea & Flood, "Fast splittable
pseudorandom number generators", OOPSLA 2014).  Ids are treated as unsigned 64-bit
words; torch int64 arithmetic wraps modulo 2^64, so the same bits come out as in C.

    key(seed, s...) = k <- mix(seed + GOLDEN); k <- mix(k ^ mix(s + 2 GOLDEN)) per salt s
                                                              (done once, stored as a buffer)
    hash(x, key)    = mix(x XOR key)                          (unsigned 64-bit word)
    bucket(x, key, M) = (hash(x, key) >>> 1) mod M            (63 bits, so torch's signed
                                                               ``remainder`` is exact)

The golden values in ``tests/test_hashing.py`` are the spec: changing this file
silently changes every trained model.
"""
from __future__ import annotations

import torch

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def _signed(u: int) -> int:
    """The int64 whose bits are the unsigned 64-bit word ``u``."""
    u &= MASK64
    return u - (1 << 64) if u >= 1 << 63 else u


def mix64_int(x: int) -> int:
    """SplitMix64 finaliser on a Python int; returns the unsigned 64-bit word."""
    x &= MASK64
    x = ((x ^ (x >> 30)) * _M1) & MASK64
    x = ((x ^ (x >> 27)) * _M2) & MASK64
    return x ^ (x >> 31)


def salt_key(seed: int, *salt: int) -> int:
    """int64 key for a seed and optional salts (feature index, chunk index, ...)."""
    k = mix64_int(seed + GOLDEN)
    for s in salt:
        k = mix64_int(k ^ mix64_int(s + 2 * GOLDEN))  # another offset than the seed's
    return _signed(k)


def _mix64_(y: torch.Tensor, tmp: torch.Tensor | None = None) -> torch.Tensor:
    """In-place SplitMix64 finaliser of ``y``; ``tmp`` is scratch of y's shape."""
    tmp = torch.empty_like(y) if tmp is None else tmp
    for shift, mult in ((30, _M1), (27, _M2), (31, None)):
        torch.bitwise_right_shift(y, shift, out=tmp)
        tmp &= (1 << (64 - shift)) - 1
        y ^= tmp
        if mult is not None:
            y *= _signed(mult)
    return y


def bucket(ids: torch.Tensor, key: torch.Tensor | int, num_buckets: int) -> torch.Tensor:
    """Rows in [0, num_buckets) for raw ids [N]."""
    y = ids ^ key
    tmp = torch.empty_like(y)
    _mix64_(y, tmp)
    torch.bitwise_right_shift(y, 1, out=tmp)
    tmp &= (1 << 63) - 1
    if num_buckets & (num_buckets - 1) == 0:  # power of two: same result as %, 7x cheaper
        return tmp.bitwise_and_(num_buckets - 1)
    return tmp.remainder_(num_buckets)


def bucket_int(x: int, key: int, num_buckets: int) -> int:
    """Pure-Python reference of :func:`bucket` for one id (used by tests)."""
    return (mix64_int((x & MASK64) ^ (key & MASK64)) >> 1) % num_buckets
