"""torch.distributed: a 2-rank gloo group (DDP, FSDP2) must log what one process logs on the
same global batch, with ONE lens collective per flush; SCALE must take the same steps.

All scenarios run in one spawned group (``_workers.run``, ~10 s); the tests compare its
results with single-process runs and exact computations made here.
"""

from __future__ import annotations

import math
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradlens.roles import output_units_view
from tests.distributed import _workers as W

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

TWO_BATCH = {"twobatch_trace", "twobatch_signal", "noise_scale", "var_per_element",
             "unit_nsr_median", "unit_nsr_mean"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Spawned:
    """WORLD processes running ``fn(rank, *args)``, started without waiting."""

    def __init__(self, fn: Any, args: tuple) -> None:
        self.ctx = mp.start_processes(fn, args=args, nprocs=W.WORLD, join=False,
                                      start_method="spawn")

    def join(self, timeout: float = 180.0) -> None:
        """Wait for every rank (a failure re-raises its traceback); stop them on a timeout."""
        deadline = time.monotonic() + timeout
        while not self.ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in self.ctx.processes:
                    if p.is_alive():
                        p.kill()
                pytest.fail(f"distributed workers did not finish within {timeout:.0f} s")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    """The 2-rank results and the single-process references (computed while the ranks run)."""
    out = tmp_path_factory.mktemp("dist")
    group = Spawned(W.run, (free_port(), str(out)))
    torch.set_num_threads(1)
    references = {
        "ddp": W.reference_run(W.global_batches(2, 1), micro=1, steps=2, log_every=1,
                               preset="standard"),
        "ddp_accum": W.reference_run(W.global_batches(4, 2), micro=2, steps=2, log_every=2,
                                     preset="full"),
        "fsdp": W.reference_run(W.global_batches(4, 3), micro=2, steps=2, log_every=2,
                                preset="full", temporal=False),
        "ddp_clip": W.reference_run(W.global_batches(4, 4), micro=2, steps=2, log_every=1,
                                    preset="full", clip=W.CLIP),
        "ddp_value_clip": W.reference_run(W.global_batches(2, 5), micro=2, steps=1,
                                          log_every=1, preset="minimal"),
        "fsdp_clip": W.reference_run(W.global_batches(4, 6), micro=2, steps=2, log_every=1,
                                     preset="full", temporal=False, clip=W.CLIP),
    }
    group.join()
    results = torch.load(Path(out) / "results.pt", weights_only=False)
    return {"results": results, "references": references}


@pytest.fixture(scope="module")
def results(runs) -> dict[str, Any]:
    return runs["results"]


@pytest.fixture(scope="module")
def references(runs) -> dict[str, Any]:
    return runs["references"]


def assert_same_rows(got: dict, want: dict, skip: set[str] = frozenset(), rel: float = 1e-6,
                     ) -> None:
    """Equal rows, a few float32 ulps apart: HF LLaMA computes its RMSNorm and loss in float32,
    and each rank reduces its half of the batch on its own."""
    keys = {k for k in want if k[2] not in skip}
    assert keys <= set(got), sorted(keys - set(got))[:10]
    bad = []
    for k in sorted(keys):
        a, b = got[k], want[k]
        if math.isnan(b):
            if not math.isnan(a):
                bad.append((k, a, b))
        elif a != pytest.approx(b, rel=rel, abs=1e-12):
            bad.append((k, a, b))
    assert not bad, bad[:10]


def exact_two_batch(ref: dict, step: int, micro: int) -> dict[str, dict[str, float]]:
    """McCandlish's estimator from the exact per-(rank, micro-batch) gradients of ``step``."""
    b_small, b_big = W.PER_RANK, W.PER_RANK * W.WORLD * micro
    out: dict[str, dict[str, float]] = {}
    for name, layout, _ in ref["layers"]:
        gs = [m[name].double() for m in ref["small"][step - 1]]
        big = torch.stack(gs).mean(0)
        small_sq = float(np.mean([float((g**2).sum()) for g in gs]))
        big_sq = float((big**2).sum())
        row = {"twobatch_trace": (small_sq - big_sq) / (1 / b_small - 1 / b_big),
               "twobatch_signal": (b_big * big_sq - b_small * small_sq) / (b_big - b_small)}
        if layout != "vector":
            u_small = np.mean([output_units_view(g, layout).pow(2).sum(1).numpy() for g in gs],
                              axis=0)
            u_big = output_units_view(big, layout).pow(2).sum(1).numpy()
            trace = (u_small - u_big) / (1 / b_small - 1 / b_big)
            signal = (b_big * u_big - b_small * u_small) / (b_big - b_small)
            ok = signal > 0
            row["unit_nsr_median"] = float(np.median(trace[ok] / signal[ok])) if ok.any() \
                else math.nan
        out[name] = row
    return out


def exact_per_example(ref: dict, step: int) -> dict[str, float]:
    out = {}
    for name, _, _ in ref["layers"]:
        gs = torch.stack([e[name].double() for e in ref["per_example"][step - 1]])
        n = gs.shape[0]
        out[name] = n / (n - 1) * (float((gs**2).sum() / n) - float((gs.mean(0) ** 2).sum()))
    return out


def check_two_batch(rows: dict, ref: dict, step: int, micro: int) -> None:
    exact = exact_two_batch(ref, step, micro)
    for name, row in exact.items():
        for stat, want in row.items():
            got = rows[(step, name, stat)]
            if math.isnan(want):
                assert math.isnan(got), (name, stat)
            else:
                assert got == pytest.approx(want, rel=1e-6, abs=1e-12), (name, stat)


# ----------------------------------------------------------------------------- kernels


def test_scale_rms_on_dtensors_matches_whole_tensors(results):
    errors = results["kernels"]
    assert len(errors) > 20 and all(v < 1e-12 for v in errors.values()), errors  # NaN fails


# ----------------------------------------------------------------------------- DDP


def test_ddp_statistics_equal_one_process(results, references):
    got, want = results["ddp"], references["ddp"]
    assert_same_rows(got["rows"], want["rows"], skip=TWO_BATCH)
    assert (1, "global", "loss") in got["rows"]  # the mean of the ranks' losses
    assert {"unit_rms_cv", "fan_rms_gini", "grad_max_abs"} <= {k[2] for k in got["rows"]}


def test_ddp_ranks_give_noise_scale_without_accumulation(results, references):
    rows = results["ddp"]["rows"]
    for step in (1, 2):
        check_two_batch(rows, references["ddp"], step, micro=1)


def test_ddp_accumulation_no_sync_two_batch_and_per_example(results, references):
    got, ref = results["ddp_accum"], references["ddp_accum"]
    assert_same_rows(got["rows"], ref["rows"], skip=TWO_BATCH)
    check_two_batch(got["rows"], ref, step=2, micro=2)
    layouts = {name: layout for name, layout, _ in ref["layers"]}
    checked = 0
    for name, want in exact_per_example(ref, 2).items():
        got_pe = got["rows"][(2, name, "pe_trace")]  # 1-D tensors too (norm gains)
        assert got_pe == pytest.approx(want, rel=1e-6), (name, layouts[name])
        checked += 1
    assert checked >= 20
    assert any(k[2] == "temporal_var" for k in got["rows"])
    assert set(got["hists"]) == set(ref["hists"])


def test_ddp_parameter_hook_sees_the_local_micro_batch_gradient(results, references):
    """A tensor hook runs before DDP's reducer, in no_sync() and in the syncing backward."""
    seen = results["ddp_accum"]["hook_seen"]
    name = "model.layers.0.self_attn.q_proj.weight"
    small = references["ddp_accum"]["small"]
    # rank 0's micro-batches of step 1 (k = 0 in no_sync, k = 1 synced); the loss is / micro
    want = [small[0][0][name] / 2, small[0][W.WORLD][name] / 2]
    for got, ref in zip(seen[:2], want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-14)
    assert not torch.allclose(seen[0], seen[1])


def test_ddp_scale_steps_equal_one_process(results, references):
    for scenario in ("ddp", "ddp_accum"):
        got, want = results[scenario]["params"], references[scenario]["params"]
        for name, p in want.items():
            torch.testing.assert_close(got[name], p, rtol=1e-9, atol=1e-12, msg=name)


def test_ddp_one_lens_collective_per_flush(results):
    assert results["ddp"]["counts"] == [{"lens": 1, "scale": 0}] * 2
    # log_every=2: nothing on step 1 (its loss and detectors wait), one on the flush step
    assert results["ddp_accum"]["counts"] == [{"lens": 0, "scale": 0}, {"lens": 1, "scale": 0}]


# ----------------------------------------------------------------------------- FSDP2


def test_fsdp_statistics_equal_one_process(results, references):
    got, want = results["fsdp"], references["fsdp"]
    assert all("Shard(dim=0)" in p for p in got["placements"].values())
    assert_same_rows(got["rows"], want["rows"], skip=TWO_BATCH)
    stats = {k[2] for k in got["rows"]}
    assert {"grad_norm", "grad_max_abs", "unit_rms_cv", "fan_rms_p99_p50", "pe_trace",
            "spam_fraction", "grad_norm_ratio_max"} <= stats
    assert set(got["hists"]) == set(want["hists"])
    for key, (edges, counts) in want["hists"].items():
        np.testing.assert_allclose(got["hists"][key][0], edges, rtol=1e-6)
        assert got["hists"][key][1] == counts


def test_fsdp_two_batch_from_unsharded_hooks(results, references):
    check_two_batch(results["fsdp"]["rows"], references["fsdp"], step=2, micro=2)


def test_fsdp_scale_steps_equal_one_process_including_sharded_embedding_axis(results,
                                                                               references):
    got, want = results["fsdp"]["params"], references["fsdp"]["params"]
    for name, p in want.items():
        torch.testing.assert_close(got[name], p, rtol=1e-9, atol=1e-12, msg=name)


def test_fsdp_collectives(results):
    # lens: deferred on step 1, one all_reduce on the logged step; SCALE: one per step, for
    # the embedding (its dim-0 normalization axis is FSDP2's sharded one)
    assert results["fsdp"]["counts"] == [{"lens": 0, "scale": 1}, {"lens": 1, "scale": 1}]


# ----------------------------------------------------------------------------- user partials


def test_user_partials_reduce_as_declared(results):
    """User families under FSDP2 (each rank sees its shards): a ``sum`` and a ``mean``
    LayerStatistic and a family declaring a ``max`` partial give the sum, mean and max of
    what the two ranks computed, in the lens's one collective per flush."""
    got = results["user_partials"]
    rows, ranks, layers = got["rows"], got["ranks"], got["layers"]
    combine = {"test_shard_sq": sum, "test_shard_max": max,
               "test_shard_mean": lambda v: sum(v) / len(v)}
    differ = 0
    for step in (1, 2):
        for stat, how in combine.items():
            for k, name in enumerate(layers):
                values = [r[stat][step][k] for r in ranks]
                differ += values[0] != values[1]
                assert rows[(step, name, stat)] == pytest.approx(how(values), rel=1e-12,
                                                                 abs=0), (step, name, stat)
            # independent: the shards' squares add up to the layer's squared norm, and the
            # largest of their maxima is the lens's own grad_max_abs
            for name in layers:
                assert rows[(step, name, "test_shard_sq")] == pytest.approx(
                    rows[(step, name, "grad_norm")] ** 2, rel=1e-9)
                assert rows[(step, name, "test_shard_max")] == rows[(step, name,
                                                                      "grad_max_abs")]
    assert differ > 3 * len(layers)  # the ranks' values differ: the reduction is tested
    assert got["counts"] == [{"lens": 1, "scale": 1}] * 2  # still ONE lens collective


# ----------------------------------------------------------------------------- precision


def test_bf16_gradients_accumulate_in_float32(results):
    out = results["bf16"]
    rows = out["rows"]
    for name, exact in out["exact"].items():
        assert rows[(1, name, "grad_norm")] == pytest.approx(exact, rel=1e-6), name
    assert all(math.isfinite(v) for k, v in rows.items() if k[2] == "twobatch_trace")


def golden_doc(rows: dict, ref: dict) -> dict[str, Any]:
    """A 2-rank run's golden document: rows keyed ``step|layer|stat``, each value's condition
    number (``tests/golden/_conditions``) from the exact per-(rank, micro-batch) gradients of
    the one-process reference, and the writing machine (informational)."""
    from tests.golden import _conditions as C
    from tests.golden._scenarios import header
    from tests.golden._twobatch import two_batch

    flat = {f"{s}|{layer}|{stat}": v for (s, layer, stat), v in rows.items()}
    refs = {}
    for step in sorted({s for s, _, _ in rows}):
        small = ref["small"][step - 1]  # K = micro x ranks mean gradients; h_k = G_k / K
        K = len(small)
        refs[step] = {name: two_batch([m[name] / K for m in small], [W.PER_RANK] * K, "mean",
                                      layout) for name, layout, _ in ref["layers"]}
    rounding = {"n": W.VOCAB, "u": C.U32}
    cond = C.conditions(flat, refs, {"noise_ema": 0.0, "temporal_beta": 0.9, **rounding})
    return {"header": header(), "rounding": rounding,
            "rows": {k: (v if math.isfinite(v) else repr(v)) for k, v in flat.items()},
            "cond": {k: (v if math.isfinite(v) else repr(v)) for k, v in cond.items()}}


@pytest.mark.parametrize("scenario", ["ddp_accum", "fsdp"])
def test_rows_equal_golden(results, references, scenario):
    """The 2-rank runs' rows against the saved golden files (``tests/golden``; compared as
    there: structure exact, values within the move rounding on another CPU can cause); set
    ``GRADLENS_WRITE_GOLDEN=1`` to rewrite them after an intended change."""
    import json
    import os

    from tests.golden.test_golden import compare_rows

    path = Path(__file__).parents[1] / "golden" / f"dist_{scenario}.json"
    doc = golden_doc(results[scenario]["rows"], references[scenario])
    if os.environ.get("GRADLENS_WRITE_GOLDEN") == "1":
        path.write_text(json.dumps(doc, indent=0, sort_keys=True))
    want = json.loads(path.read_text())
    failures = compare_rows(doc["rows"], want["rows"], want["cond"], want["rounding"],
                            2 * 2.0**-24, scenario)
    assert not failures, "\n".join(failures[:15])


# ----------------------------------------------------------------------------- clipping


def exact_norms(ref: dict, step: int) -> dict[str, float]:
    """Each layer's raw (pre-clip) gradient norm: the mean of the (rank, micro-batch) means."""
    return {name: float(torch.stack([m[name].double() for m in ref["small"][step - 1]])
                        .mean(0).pow(2).sum().sqrt())
            for name, _, _ in ref["layers"]}


def check_clipped(got: dict, ref: dict, steps: tuple[int, ...], micro: int,
                  clip: float | None) -> None:
    """Under clipping (or none): the raw norms, the consumed norms and every variance estimator
    against the float64 references, at each logged step; no validity event."""
    rows = got["rows"]
    for step in steps:
        raw = exact_norms(ref, step)
        total = math.sqrt(sum(v * v for v in raw.values()))
        coef = 1.0 if clip is None else min(1.0, clip / (total + 1e-6))
        assert coef < 1 or clip is None  # the clipping is active
        for name, want in raw.items():
            assert rows[(step, name, "grad_norm_preclip")] == pytest.approx(want, rel=1e-5)
            assert rows[(step, name, "grad_norm")] == pytest.approx(want * coef, rel=1e-5)
        assert rows[(step, "global", "grad_norm_preclip")] == pytest.approx(total, rel=1e-5)
        assert rows[(step, "global", "grad_norm")] == pytest.approx(total * coef, rel=1e-5)
        check_two_batch(rows, ref, step, micro)
        for name, want in exact_per_example(ref, step).items():
            assert rows[(step, name, "pe_trace")] == pytest.approx(want, rel=1e-5), name
    assert not [e for e in got["events"] if e[2] == "validity"], got["events"]


def test_ddp_no_sync_accumulation_with_clipping_is_exact(results, references):
    """DDP, no_sync() accumulation, clip_grad_norm_ between the last backward and the step:
    every estimator describes the raw all-reduced gradient (the clip factor corrected)."""
    got, ref = results["ddp_clip"], references["ddp_clip"]
    check_clipped(got, ref, (1, 2), micro=2, clip=W.CLIP)
    assert_same_rows(got["rows"], ref["rows"], skip=TWO_BATCH)  # as one process clipping


def test_fsdp_with_clipping_is_exact(results, references):
    """FSDP2's DTensor gradients bump no version counter when clipped: their raw norms are
    measured at every step and compared with the step's."""
    got, ref = results["fsdp_clip"], references["fsdp_clip"]
    check_clipped(got, ref, (1, 2), micro=2, clip=W.CLIP)


def test_ddp_value_clipping_is_nan_with_a_reason(results, references):
    got, ref = results["ddp_value_clip"], references["ddp_value_clip"]
    rows = got["rows"]
    names = [name for name, _, _ in ref["layers"]]
    assert all(math.isnan(rows[(1, n, "twobatch_trace")]) for n in names)
    events = [e for e in got["events"] if e[2] == "validity" and e[3] == "twobatch"]
    assert sorted(e[1] for e in events) == sorted(names)  # one event per layer
    assert all("not one common factor" in e[4] for e in events)
    for name, want in exact_norms(ref, 1).items():  # the raw norms stay known
        assert rows[(1, name, "grad_norm_preclip")] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("preset", ["minimal", "standard", "full"])
def test_ddp_spike_under_clipping_is_a_global_event(results, preset):
    got = results[f"ddp_spike_{preset}"]
    glob = [e[0] for e in got["events"] if e[1] == "global" and e[2] == "grad_norm_global"]
    assert glob == [W.SPIKE]
    for step in range(1, W.SPIKE_STEPS + 1):
        assert math.isfinite(got["rows"][(step, "global", "grad_norm_preclip")])
    ratio = got["rows"][(W.SPIKE, "global", "grad_norm_preclip")] / got["rows"][
        (W.SPIKE - 1, "global", "grad_norm_preclip")]
    assert 30 < ratio < 300  # the 100x spike, as the raw norm saw it
    assert got["rows"][(W.SPIKE, "global", "grad_norm")] <= 1.0 + 1e-6  # consumed: clipped
