"""Verdicts on all-NaN steps and constant input: no scipy RuntimeWarning, a reasoned
"not computable"."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from gradlens.cli import main
from gradlens.report.verdicts import compute_verdicts, layer_ranking, role_spread_table
from tests.report._synth import make_spikes, make_table, write_run

ESTIMATORS = ("twobatch_trace", "noise_scale", "var_per_element", "unit_nsr_median")
SPREAD = ("unit_rms_cv", "unit_rms_gini", "fan_rms_cv")


def _table(case: str):
    df = make_table(30, seed=1)
    if case == "all_nan":
        df["value"] = np.nan
    elif case == "nan_steps":
        df.loc[df["step"] < 11, "value"] = np.nan
    elif case == "constant":
        df["value"] = 1.0
    elif case == "constant_spread":
        df.loc[df["stat"].isin(SPREAD), "value"] = 2.0
    return df


def _verdicts(df):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any RuntimeWarning from numpy or scipy fails here
        out = {(v.kind, v.stat): v for v in compute_verdicts(df)}
        for stat in (*ESTIMATORS, *SPREAD):
            layer_ranking(df, stat, n_boot=50)
            role_spread_table(df, stat, n_boot=50)
    return out


def test_all_nan_steps_are_not_computable_with_the_reason() -> None:
    df = _table("all_nan")
    v = _verdicts(df)
    for est in ESTIMATORS:
        n_rows = int((df["stat"] == est).sum())
        assert v[("output_highest", est)].answer == "not computable"
        assert v[("output_highest", est)].reason.startswith(
            f"every {est} value is NaN ({n_rows} rows over 30 steps)")
    for stat in SPREAD:
        assert v[("column_spread", stat)].answer == "not computable"
        assert v[("column_spread", stat)].reason.startswith(f"every {stat} value is NaN")


def test_some_all_nan_steps_still_give_answers() -> None:
    v = _verdicts(_table("nan_steps"))
    assert v[("output_highest", "noise_scale")].answer == "yes"
    assert v[("output_highest", "noise_scale")].numbers["n_steps"] == 19


def test_constant_input_is_not_computable_with_the_reason() -> None:
    v = _verdicts(_table("constant"))
    for est in ESTIMATORS:
        out = v[("output_highest", est)]
        assert out.answer == "not computable" and "constant input" in out.reason
    for stat in SPREAD:
        out = v[("column_spread", stat)]
        assert out.answer == "not computable" and "constant input" in out.reason


def test_constant_column_spread_only() -> None:
    v = _verdicts(_table("constant_spread"))
    assert v[("column_spread", "unit_rms_cv")].answer == "not computable"
    assert "every role has the same median of unit_rms_cv" in \
        v[("column_spread", "unit_rms_cv")].reason
    assert v[("output_highest", "noise_scale")].answer == "yes"  # the rest is untouched


@pytest.mark.parametrize("case", ["all_nan", "nan_steps", "constant"])
def test_gradlens_report_prints_no_runtime_warning(case: str, tmp_path: Path, capfd) -> None:
    run = write_run(tmp_path / case, _table(case), make_spikes(), name=case)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        assert main(["report", str(run), "-o", str(tmp_path / "report"), "--quiet"]) == 0
    err = capfd.readouterr().err
    assert "RuntimeWarning" not in err, err
    assert (tmp_path / "report" / "report.html").is_file()
