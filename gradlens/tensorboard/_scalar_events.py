"""TensorBoard scalar events encoded from a template of their tags, with numpy.

A step's scalars are one ``Event`` holding one ``Summary`` of many ``Value(tag, simple_value)``.
A run writes the same tags at every logged step, so the bytes of the summary are the same but
for the 4 bytes of each float. The template (every value's framing and tag) is built once
per tag list and kept by the caller; a step then costs one float32 cast and one scatter of
the value bytes, instead of one protobuf object per value (with the CRC and the group
aggregates, the TensorBoard sink's host time for a ``standard`` step is 0.60x,
``benchmarks/bench_sinks.py``).
Values can be left out (``keep``) without a new template. The wire format, field by field:

    Event:   1 wall_time (double), 2 step (varint, omitted when 0), 5 summary (bytes)
    Summary: 1 value (bytes, repeated)
    Value:   1 tag (string), 2 simple_value (float32)

Equal, byte for byte, to protobuf's serialization of the same event (tested).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

__all__ = ["ScalarTemplate"]


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement, as protobuf writes a negative step
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


class ScalarTemplate:
    """The summary bytes of one tag list, with the offsets of its values and their floats;
    :meth:`event` fills in one step's values."""

    def __init__(self, tags: Sequence[str]) -> None:
        parts, starts, floats = [], [], []
        at = 0
        for tag in tags:
            value = _field(1, tag.encode("utf-8")) + b"\x15\x00\x00\x00\x00"
            part = _field(1, value)
            parts.append(part)
            starts.append(at)
            at += len(part)
            floats.append(at - 4)
        self.bytes = np.frombuffer(b"".join(parts), dtype=np.uint8)
        self.starts = np.asarray(starts, dtype=np.int64)
        self.lengths = np.diff(np.append(self.starts, at))
        self.float_bytes = np.asarray(floats, dtype=np.int64)[:, None] + np.arange(4)

    def event(self, values: np.ndarray, step: int, wall_time: float,
              keep: np.ndarray | None = None) -> bytes:
        """The serialized ``Event``: ``tags[i]`` with ``float32(values[i])`` where
        ``keep[i]`` (all when None)."""
        head = b"\x09" + struct.pack("<d", wall_time)
        if step:
            head += b"\x10" + _varint(int(step))
        return head + _field(5, self._summary(np.asarray(values, dtype=np.float64), keep))

    def _summary(self, values: np.ndarray, keep: np.ndarray | None) -> bytes:
        buf = self.bytes.copy()
        with np.errstate(over="ignore"):  # beyond float32: inf, as TensorBoard stores it
            f32 = values.astype("<f4")
        buf[self.float_bytes] = f32.view(np.uint8).reshape(-1, 4)
        if keep is None or keep.all():
            return buf.tobytes()
        starts, lengths = self.starts[keep], self.lengths[keep]
        # the byte indices of the kept values: each start, then its run of bytes
        offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
        return buf[offsets + np.arange(int(lengths.sum()))].tobytes()
