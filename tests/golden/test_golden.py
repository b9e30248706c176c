"""The collector's output must not change by accident, on any CPU: fresh runs against the saved
golden files, with the structure exact and each value within the move that rounding on
another machine can cause (``_conditions`` derives it); the two-batch estimators also against
a float64 reference built from the same run's micro-batch gradients."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.golden import _conditions as C
from tests.golden import _scenarios as G
from tests.golden._twobatch import ema_ratio, nsr, nsr_interval

ROOT = Path(__file__).parents[2]


def _f(v: Any) -> float:
    return float(v)


def compare_rows(got: Mapping[str, Any], want: Mapping[str, Any], cond: Mapping[str, Any],
                 rounding: Mapping[str, float], floor: float, what: str,
                 count_slack: Mapping[str, Any] | None = None) -> list[str]:
    """Failures of ``got`` against a golden document's rows: the same keys and NaN pattern;
    each value within ``max(kappa 2 d(step), floor)`` relative (``kappa`` from ``cond``,
    ``d`` from ``rounding``); counts (kappa 0) equal; a value whose bound exceeds
    ``C.BEYOND`` is compared for its NaN pattern only. A fraction of entries past a threshold
    in ``count_slack`` (``[entries near the threshold, entries]``) may move by that many
    entries."""
    out = []
    count_slack = count_slack or {}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        out.append(f"{what}: keys differ: missing {missing[:5]} ({len(missing)}), new "
                   f"{extra[:5]} ({len(extra)}); rewrite the golden file for an intended change")
    for key in sorted(set(want) & set(got)):
        g, w = _f(got[key]), _f(want[key])
        if math.isnan(g) or math.isnan(w):
            if math.isnan(g) != math.isnan(w):
                out.append(f"{what} {key}: NaN pattern: golden {w}, now {g}")
            continue
        if math.isinf(g) or math.isinf(w):
            if g != w:
                out.append(f"{what} {key}: golden {w}, now {g}")
            continue
        if key in count_slack:
            near, n = count_slack[key]
            if not abs(g - w) * n < near + 0.5:  # whole entries
                out.append(f"{what} {key}: golden {w!r}, now {g!r}: more than {near} of {n} "
                           "entries crossed the threshold")
            continue
        kappa = _f(cond[key])
        tol = kappa * 2 * C.drift(int(key.split("|")[0]), rounding["n"], rounding["u"])
        if tol > C.BEYOND:
            continue
        tol = max(tol, floor) if kappa else 0.0
        if key.endswith("|loss"):  # the lens keeps the loss in float32: one ulp may flip
            tol = max(tol, 2 * C.U32)
        if not abs(g - w) <= tol * abs(w):
            out.append(f"{what} {key}: golden {w!r}, now {g!r} (rel {abs(g - w) / abs(w):.1e}"
                       f" > {tol:.1e}, kappa {kappa:.3g})")
    return out


def compare_histograms(got: Mapping[str, Any], doc: Mapping[str, Any], floor: float,
                       what: str) -> list[str]:
    """Same histograms; edges within ``2 d(step)`` (kappa 1); each count equal up to the
    values the golden run found within rounding of a bucket edge (``hist_slack``); the total
    (finite units) equal."""
    out, want, r = [], doc["histograms"], doc["rounding"]
    if sorted(got) != sorted(want):
        return [f"{what}: histogram keys differ"]
    for key, (edges, counts) in want.items():
        g_edges, g_counts = got[key]
        tol = max(2 * C.drift(int(key.split("|")[0]), r["n"], r["u"]), floor)
        if any(not abs(_f(a) - _f(b)) <= tol * abs(_f(b))
               for a, b in zip(g_edges, edges, strict=True)):
            out.append(f"{what} hist {key}: edges moved beyond {tol:.1e}")
        slack = doc["hist_slack"].get(key, [0] * len(counts))
        if sum(g_counts) != sum(counts) or any(
                abs(a - b) > s for a, b, s in zip(g_counts, counts, slack, strict=True)):
            out.append(f"{what} hist {key}: counts {g_counts} != {counts} (slack {slack})")
    return out


def compare_events(got: list, want: list, rounding: Mapping[str, float], floor: float,
                   what: str) -> list[str]:
    if [e[:3] for e in got] != [e[:3] for e in want]:
        return [f"{what}: events differ: {[e[:3] for e in got]} != {[e[:3] for e in want]}"]
    out = []
    for g, w in zip(got, want, strict=True):
        tol = max(2 * C.drift(int(w[0]), rounding["n"], rounding["u"]), floor)
        for a, b in zip(g[3:], w[3:], strict=True):
            a, b = _f(a), _f(b)
            if math.isnan(a) != math.isnan(b) or abs(a - b) > tol * abs(b):
                out.append(f"{what} event {w[:3]}: {g[3:]} != {w[3:]}")
    return out


def floor_of(name: str) -> float:
    """The smallest tolerance: float32 loss rounding for LLaMA, 1e-9 for the float64 model."""
    return G.REL_F64 if G.ROUNDING[name]["u"] == C.U64 else 2 * C.U32


def check_scenario(name: str, run: dict[str, Any] | None = None) -> list[str]:
    """Every failure of a fresh run of ``name`` against its golden file."""
    doc = json.loads(G.golden_path(name).read_text())
    run = run if run is not None else G.run_scenario(name)
    fl = floor_of(name)
    return (compare_rows(run["rows"], doc["rows"], doc["cond"], doc["rounding"], fl, name,
                         doc["count_slack"])
            + compare_events(run["events"], doc["events"], doc["rounding"], fl, name)
            + compare_histograms(run["histograms"], doc, fl, name))


@cache
def _run(name: str) -> dict[str, Any]:
    return G.run_scenario(name)


@pytest.mark.parametrize("name", sorted(G.SCENARIOS))
def test_rows_equal_golden(name):
    failures = check_scenario(name, _run(name))
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:15])


# d_ref: the lens and the reference sum the same float64 gradients in another order; a sum
# of n <= 4096 squares moves by n u64 at most
D_REF = 4096 * C.U64


@pytest.mark.parametrize("name", [n for n, o in sorted(G.SCENARIOS.items()) if o["micro"] > 1])
def test_two_batch_equals_float64_reference_of_the_same_gradients(name):
    """The estimators a CPU moves most, checked where no CPU can move them: against float64
    arithmetic on the very gradients the lens saw (units whose sign test rounding could flip
    are bounded by ``nsr_interval``)."""
    run = _run(name)
    rows, beta = run["rows"], G.meta(name)["noise_ema"]
    checked, history = 0, {}
    for step, layers in sorted(run["_refs"].items()):
        for layer, ref in layers.items():
            key = f"{step}|{layer}|"
            hist = history.setdefault(layer, [])
            hist.append(((ref["T"], ref["kT"]), (ref["S"], ref["kS"])))
            ns, k_ns = ema_ratio([t for t, _ in hist], [s for _, s in hist], beta)
            want = {"twobatch_trace": (ref["T"], ref["kT"]), "twobatch_signal": (ref["S"],
                                                                               ref["kS"]),
                    "noise_scale": (ns, k_ns)}
            for stat, (w, kappa) in want.items():
                g = _f(rows[key + stat])
                if math.isnan(w):
                    assert math.isnan(g), (key + stat, g)
                    continue
                assert abs(g - w) <= kappa * 2 * D_REF * abs(w) + 1e-300, (key + stat, g, w)
            if "uT" in ref:
                med, mean = nsr(ref["uT"], ref["uS"])
                (m_lo, m_hi), (a_lo, a_hi) = nsr_interval(ref, D_REF)
                g_med, g_mean = _f(rows[key + "unit_nsr_median"]), _f(rows[key + "unit_nsr_mean"])
                if math.isnan(med):
                    assert math.isnan(g_med) and math.isnan(g_mean), key
                else:
                    assert m_lo - 1e-15 * abs(med) <= g_med <= m_hi + 1e-15 * abs(med), \
                        (key, g_med, med)
                    assert a_lo - 1e-15 * abs(mean) <= g_mean <= a_hi + 1e-15 * abs(mean), \
                        (key, g_mean, mean)
            checked += 1
    assert checked >= 20


def test_float64_scenario_is_held_to_1e9():
    """The float64 model's bounds are below 1e-9 for every value but the unit means whose
    sign test rounding could flip: it is a 1e-9 comparison, not a loose one."""
    doc = json.loads(G.golden_path("f64_mlp").read_text())
    r = doc["rounding"]
    wide = [k for k, kappa in doc["cond"].items()
            if _f(kappa) * 2 * C.drift(int(k.split("|")[0]), r["n"], r["u"]) > 2 * G.REL_F64
            and not k.endswith("spam_fraction")]
    assert len(wide) <= len(doc["rows"]) // 50, wide[:10]
    assert r["u"] == C.U64


def test_every_value_has_a_tolerance_class():
    """Only the discontinuous statistics, or values whose first-order bound says nothing,
    are compared for their NaN pattern alone; every other value is compared."""
    for name in G.SCENARIOS:
        doc = json.loads(G.golden_path(name).read_text())
        r = doc["rounding"]
        loose = [k for k, kappa in doc["cond"].items()
                 if k.split("|")[2] not in C.PATTERN and not math.isnan(_f(doc["rows"][k]))
                 and _f(kappa) * 2 * C.drift(int(k.split("|")[0]), r["n"], r["u"]) > C.BEYOND]
        assert len(loose) <= len(doc["rows"]) // 50, (name, loose[:10])


def test_header_names_the_machine():
    for name in G.SCENARIOS:
        head = json.loads(G.golden_path(name).read_text())["header"]
        assert {"torch", "cpu_capability", "platform"} <= set(head)


def test_golden_passes_on_another_kernel_path_and_thread_count():
    """The same comparisons in a process with ATen's portable (non-vectorized) kernels and
    two threads: another reduction order everywhere, as on another CPU."""
    code = ("import sys, torch; torch.set_num_threads(2)\n"
            "from tests.golden.test_golden import check_scenario\n"
            "from tests.golden._scenarios import SCENARIOS\n"
            "assert str(torch.backends.cpu.get_cpu_capability()) == 'DEFAULT'\n"
            "bad = [f for n in SCENARIOS for f in check_scenario(n)]\n"
            "print('\\n'.join(bad[:20])); sys.exit(1 if bad else 0)\n")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "PYTHONPATH": str(ROOT),
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
