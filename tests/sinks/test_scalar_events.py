"""The template encoder of scalar events against protobuf's own serialization."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradlens.tensorboard._scalar_events import ScalarTemplate

pytest.importorskip("tensorboard")


def reference(tags, values, step, wall_time):
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.proto.summary_pb2 import Summary

    ev = event_pb2.Event(wall_time=wall_time, step=step)
    ev.summary.CopyFrom(Summary(value=[Summary.Value(tag=t, simple_value=v)
                                       for t, v in zip(tags, values, strict=True)]))
    return ev.SerializeToString()


@pytest.mark.parametrize("step", [0, 1, 127, 128, 300, 2**40])
def test_bytes_equal_protobuf(step):
    rng = np.random.default_rng(step % 7)
    # tags of every varint length class (a tag > 127 bytes, a value message > 127 bytes)
    tags = tuple(f"gradlens/{'x' * n}/layer{k}" for k, n in enumerate((1, 20, 130, 300, 5)))
    values = np.array([rng.standard_normal(), 0.0, math.inf, -1e-42, 3e38 * 2])
    enc = ScalarTemplate(tags)
    got = enc.event(values, step, 1764000000.123456)
    with np.errstate(over="ignore"):
        f32 = [float(np.float32(v)) for v in values]
    assert got == reference(tags, f32, step, 1764000000.123456)
    # the same template, new values
    values2 = rng.standard_normal(len(tags))
    assert enc.event(values2, step + 1, 5.5) == reference(
        tags, [float(np.float32(v)) for v in values2], step + 1, 5.5)


def test_left_out_values_and_nan():
    tags = ("a", "bb", "ccc", "dddd")
    values = np.array([1.0, math.nan, 2.5, -4.0])
    keep = np.array([True, False, True, False])
    got = ScalarTemplate(tags).event(values, 9, 2.0, keep)
    assert got == reference(("a", "ccc"), [1.0, 2.5], 9, 2.0)
    assert ScalarTemplate(tags).event(values, 9, 2.0, np.ones(4, bool)) != got
    from tensorboard.compat.proto import event_pb2

    ev = event_pb2.Event.FromString(ScalarTemplate(tags).event(values, 9, 2.0))
    assert math.isnan(ev.summary.value[1].simple_value) and ev.summary.value[3].tag == "dddd"


def test_negative_step_as_protobuf_writes_it():
    assert ScalarTemplate(("t",)).event(np.ones(1), -3, 1.0) == reference(("t",), [1.0], -3,
                                                                          1.0)
