"""Fixtures of the report tests: synthetic run directories and one report built from them."""

from __future__ import annotations

import pytest

from tests.report._synth import make_spikes, make_table, write_run


@pytest.fixture(scope="session")
def two_runs(tmp_path_factory):
    """Two run directories: SCALE (a size-fair and a raw estimator, spikes) and AdamW (the
    size-fair estimator only, no spikes)."""
    root = tmp_path_factory.mktemp("runs")
    a = write_run(root / "scale",
                  make_table(40, seed=0, estimators=("noise_scale", "twobatch_trace")),
                  make_spikes(), name="scale")
    b = write_run(root / "adamw",
                  make_table(40, seed=5, estimators=("noise_scale",), loss_scale=1.2), None,
                  name="adamw", optimizer="AdamW")
    return [a, b]


@pytest.fixture(scope="session")
def built_report(two_runs, tmp_path_factory):
    """The report of ``two_runs`` (built once per session)."""
    from gradlens.report.build import build_report

    out = tmp_path_factory.mktemp("report")
    return build_report(two_runs, out, progress=False)
