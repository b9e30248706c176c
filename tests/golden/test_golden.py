"""The collector's output must not change by accident: fresh runs against saved golden files."""

from __future__ import annotations

import json
import math

import pytest

from tests.golden._scenarios import SCENARIOS, golden_path, run_scenario


def assert_close(got: dict, want: dict, what: str, rel: float = 1e-6) -> None:
    """Every golden key is present with an equal value (NaN where NaN; extra keys allowed:
    a new statistic adds rows without changing the old ones)."""
    missing = sorted(set(want) - set(got))
    assert not missing, f"{what}: missing {missing[:5]} ({len(missing)} in all)"
    bad = []
    for key, w in want.items():
        g = got[key]
        w_f, g_f = float(w), float(g)
        if math.isnan(w_f) or math.isnan(g_f):
            ok = math.isnan(w_f) and math.isnan(g_f)
        else:
            ok = math.isclose(g_f, w_f, rel_tol=rel, abs_tol=1e-12)
        if not ok:
            bad.append((key, w, g))
    assert not bad, f"{what}: {len(bad)} differ, e.g. {bad[:5]}"


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_rows_equal_golden(name):
    want = json.loads(golden_path(name).read_text())
    got = run_scenario(name)
    assert_close(got["rows"], want["rows"], f"{name} rows")
    assert [e[:3] for e in got["events"]] == [e[:3] for e in want["events"]]
    for g, w in zip(got["events"], want["events"], strict=True):
        assert_close({"v": g[3], "s": g[4]}, {"v": w[3], "s": w[4]}, f"{name} event {w[:3]}")
    assert sorted(got["histograms"]) == sorted(want["histograms"])
    for key, (edges, counts) in want["histograms"].items():
        g_edges, g_counts = got["histograms"][key]
        assert g_counts == counts, key
        assert_close(dict(enumerate(g_edges)), dict(enumerate(edges)), f"{name} hist {key}")
