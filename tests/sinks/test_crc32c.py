"""The vectorized CRC-32C equals TensorBoard's record format byte for byte."""

from __future__ import annotations

import io
import random

import pytest
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tb_masked
from tensorboard.summary.writer.record_writer import RecordWriter

from gradlens.sinks import _crc32c


@pytest.mark.parametrize("n", [0, 1, 7, 63, 64, 65, 255, 256, 257, 1000, 4097, 35001])
def test_crc_and_record_equal_tensorboard(n: int) -> None:
    data = random.Random(n).randbytes(n)
    assert _crc32c.masked_crc32c(data) == tb_masked(data)
    buf = io.BytesIO()
    RecordWriter(buf).write(data)
    assert _crc32c.record(data) == buf.getvalue()


def test_known_value() -> None:
    assert _crc32c.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
