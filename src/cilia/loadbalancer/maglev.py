"""Maglev consistent hashing (Eisenbud et al., NSDI'16) as Cilium computes it.

Each backend gets a permutation of the table's slots from two hashes of its name
(offset = h1 mod M, skip = h2 mod (M-1) + 1, MurmurHash3 x64_128 seeded from Cilium's
base64 hash seed); backends then take turns claiming their next free preferred slot. The
turns make the table balanced (slot counts differ by at most one) and the per-backend
permutations make it stable: removing one of N backends moves little more than its own
~M/N slots.
"""
from __future__ import annotations

import base64
from typing import Mapping, Sequence

# Cilium's --bpf-lb-maglev-table-size choices: primes, so every skip is coprime with M.
TABLE_SIZES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)
DEFAULT_TABLE_SIZE = 16381
# Cilium's --bpf-lb-maglev-hash-seed default (12 random bytes, base64).
DEFAULT_HASH_SEED = "JLfvgnHc2kaSUFaI"

_M64 = (1 << 64) - 1
_C1 = 0x87C37B91114253D5
_C2 = 0x4CF5AD432745937F


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M64


def _fmix(k: int) -> int:
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & _M64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & _M64
    return k ^ (k >> 33)


def murmur3_128(data: bytes, seed: int = 0) -> tuple[int, int]:
    """MurmurHash3_x64_128 as (h1, h2), both lanes seeded with the 32-bit seed."""
    h1 = h2 = seed & 0xFFFFFFFF
    n = len(data)
    nblocks = n // 16
    for i in range(nblocks):
        k1 = int.from_bytes(data[16 * i:16 * i + 8], "little")
        k2 = int.from_bytes(data[16 * i + 8:16 * i + 16], "little")
        h1 ^= (_rotl((k1 * _C1) & _M64, 31) * _C2) & _M64
        h1 = (((_rotl(h1, 27) + h2) & _M64) * 5 + 0x52DCE729) & _M64
        h2 ^= (_rotl((k2 * _C2) & _M64, 33) * _C1) & _M64
        h2 = (((_rotl(h2, 31) + h1) & _M64) * 5 + 0x38495AB5) & _M64
    tail = data[16 * nblocks:]
    if len(tail) > 8:
        k2 = int.from_bytes(tail[8:], "little")
        h2 ^= (_rotl((k2 * _C2) & _M64, 33) * _C1) & _M64
    if tail:
        k1 = int.from_bytes(tail[:8], "little")
        h1 ^= (_rotl((k1 * _C1) & _M64, 31) * _C2) & _M64
    h1 ^= n
    h2 ^= n
    h1 = (h1 + h2) & _M64
    h2 = (h2 + h1) & _M64
    h1, h2 = _fmix(h1), _fmix(h2)
    h1 = (h1 + h2) & _M64
    h2 = (h2 + h1) & _M64
    return h1, h2


def seed_from_base64(seed: str) -> int:
    """Cilium takes the murmur seed from the first 4 of the 12 seed bytes, big-endian."""
    raw = base64.b64decode(seed, validate=True)
    if len(raw) != 12:
        raise ValueError(f"maglev hash seed must decode to 12 bytes, got {len(raw)}")
    return int.from_bytes(raw[:4], "big")


def check_table_size(m: int) -> int:
    if m not in TABLE_SIZES:
        raise ValueError(f"maglev table size {m} is not one of {', '.join(map(str, TABLE_SIZES))}")
    return m


def offset_and_skip(name: str, m: int, seed: int) -> tuple[int, int]:
    h1, h2 = murmur3_128(name.encode(), seed)
    return h1 % m, h2 % (m - 1) + 1


def lookup_table(names: Sequence[str], m: int = DEFAULT_TABLE_SIZE,
                 seed: str = DEFAULT_HASH_SEED) -> list[int]:
    """Slot -> index into `names` (Cilium's GetLookupTable); [] for no backends.

    The result depends on the order of `names`; callers pass them sorted so that every
    node computes the same table for the same backends.
    """
    check_table_size(m)
    n = len(names)
    if n == 0:
        return []
    s = seed_from_base64(seed)
    pos, skip = zip(*(offset_and_skip(name, m, s) for name in names))
    pos, skip = list(pos), list(skip)
    entry = [-1] * m
    for turn in range(m):
        i = turn % n
        c, step = pos[i], skip[i]
        while entry[c] >= 0:
            c += step
            if c >= m:
                c -= m
        entry[c] = i
        c += step
        pos[i] = c - m if c >= m else c
    return entry


def backend_table(backends: Mapping[str, int], m: int = DEFAULT_TABLE_SIZE,
                  seed: str = DEFAULT_HASH_SEED) -> list[int]:
    """Slot -> backend id, for backends given as {name: id} (name: "ip:port/PROTO")."""
    names = sorted(backends)
    return [backends[names[i]] for i in lookup_table(names, m, seed)]
