"""The orthogonal rotation of int4-rot: ``R = diag(s) @ blockdiag(H_b, ..., H_b)``, applied with a fast
Walsh-Hadamard transform (O(H log b) per token); see :func:`rotation_matrix`."""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache

import numpy as np

from ._common import CodecError

UINT64_MAX = 2**64 - 1


@lru_cache(maxsize=64)
def _rotation_signs(hidden: int, seed: int) -> np.ndarray:
    """±1 float32 ``[hidden]`` from SHAKE-256("seamline-rot:{hidden}:{seed}"), bit i -> sign i."""
    digest = hashlib.shake_256(f"seamline-rot:{hidden}:{seed}".encode()).digest((hidden + 7) // 8)
    bits = np.unpackbits(np.frombuffer(digest, dtype=np.uint8), bitorder="little")[:hidden]
    signs = (1.0 - 2.0 * bits).astype(np.float32)
    signs.flags.writeable = False
    return signs


def _hadamard_block(hidden: int) -> int:
    """Largest power of two dividing ``hidden`` (the Hadamard block size)."""
    return hidden & -hidden


def _fwht(x: np.ndarray, block: int) -> np.ndarray:
    """``x @ blockdiag(H_block, ...)`` for ``x`` float32 ``[T, H]``, normalized Sylvester Hadamard."""
    tokens, hidden = x.shape
    y = x.reshape(tokens, hidden // block, block)
    h = 1
    while h < block:
        y = y.reshape(tokens, hidden // block, block // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = np.stack((a + b, a - b), axis=-2)
        h *= 2
    return (y.reshape(tokens, hidden) * np.float32(1.0 / math.sqrt(block))).astype(np.float32, copy=False)


def rotate(x: np.ndarray, seed: int, inverse: bool = False) -> np.ndarray:
    """``x @ R`` (or ``x @ R.T`` when ``inverse``) for ``x`` float32 ``[T, H]``, without forming ``R``."""
    hidden = x.shape[1]
    signs = _rotation_signs(hidden, int(seed))
    block = _hadamard_block(hidden)
    if inverse:  # R.T = blockdiag(H) @ diag(s): H is symmetric
        return _fwht(x, block) * signs
    return _fwht(x * signs, block)


@lru_cache(maxsize=16)
def _rotation_matrix_cached(hidden: int, seed: int) -> np.ndarray:
    r = rotate(np.eye(hidden, dtype=np.float32), seed)  # rows of I @ R = R
    r.flags.writeable = False
    return r


def rotation_matrix(hidden: int, seed: int) -> np.ndarray:
    """Orthogonal float32 ``[hidden, hidden]`` used by int4-rot: ``R = diag(s) @ blockdiag(H_b, ...)``.

    ``b`` is the largest power of two dividing ``hidden`` (192 -> three 64-blocks, 768 -> three
    256-blocks, 4096 -> one block), ``H_b`` is the Sylvester Hadamard matrix scaled by ``1/sqrt(b)``
    (exactly orthogonal: entries ±1/sqrt(b)), and ``s`` is a ±1 vector derived from SHAKE-256 of
    ``(hidden, seed)``. Each int4 group (32 or 64 channels, both dividing ``b``) lies inside one block.
    Cached per ``(hidden, seed)``; the returned array is read-only.
    """
    if not isinstance(hidden, (int, np.integer)) or isinstance(hidden, bool) or hidden < 1:
        raise CodecError(f"rotation hidden size must be a positive integer, got {hidden!r}")
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed <= UINT64_MAX:
        raise CodecError(f"rotation seed {seed!r} is not an integer in [0, 2**64)")
    return _rotation_matrix_cached(int(hidden), int(seed))
