"""gradlens.catalog: one declaration per statistic, read by the schema, the presets, the
families, the collector's records, the dashboards and the report."""

from __future__ import annotations

import subprocess
import sys
from typing import ClassVar

import pytest

from gradlens import catalog
from gradlens.catalog import FamilySpec, StatSpec
from gradlens.core.config import PRESETS, LensConfig
from gradlens.families import builtin_families, family_class
from gradlens.families.base import Statistic, register_statistic
from gradlens.schema import STATS, VARIANCE_ESTIMATORS


def test_every_family_points_at_its_declaration():
    for name, spec in catalog.FAMILIES.items():
        if name not in catalog.BUILTIN:
            continue
        cls = family_class(name)
        assert cls.spec is spec and cls.name == name
        assert cls.emits == spec.names + spec.histograms
        assert (cls.needs, cls.intermediates) == (spec.needs, spec.intermediates)


def test_presets_are_lists_of_families():
    assert catalog.STANDARD[:len(catalog.MINIMAL)] == catalog.MINIMAL
    assert set(catalog.GNS) < set(catalog.FULL) and tuple(PRESETS) == tuple(catalog.PRESETS)
    for preset, families in catalog.PRESETS.items():
        cfg = LensConfig.from_preset(preset)
        assert [f.name for f in builtin_families(cfg)] == list(families)
    assert LensConfig.from_preset("gns").per_example_scope == "norms"
    # an explicit flag wins over the preset: one more family, and its statistics promised
    cfg = LensConfig.from_preset("minimal", spam=True)
    assert [f.name for f in builtin_families(cfg)] == ["norms", "spikes", "spam"]
    assert "spam_fraction" in cfg.stat_names()
    assert "spam_fraction" not in LensConfig.from_preset("standard").stat_names()


@pytest.mark.parametrize("preset", ["minimal", "standard", "gns", "full"])
def test_stat_names_are_the_families_statistics(preset):
    names = LensConfig.from_preset(preset).stat_names()
    fams = catalog.PRESETS[preset]
    want = {s for f in fams for s in catalog.FAMILIES[f].names}
    want |= {"microbatches", "skipped_step"} | ({"batch_size"} if preset != "minimal" else set())
    assert set(names) == want and len(names) == len(want)
    assert ("critical_batch_size" in names) == ("per_example" in fams)


def test_the_schema_is_the_catalog():
    assert STATS is catalog.STATS
    assert VARIANCE_ESTIMATORS == (
        "twobatch_trace", "noise_scale", "var_per_element", "unit_nsr_median", "unit_nsr_mean",
        "pe_trace", "pe_noise_scale", "pe_var_per_element", "temporal_var",
        "temporal_var_per_element", "temporal_noise_scale", "temporal_var_normalized")
    fair = {s.name for s in STATS.values() if s.size_fair}
    assert fair == {"noise_scale", "var_per_element", "unit_nsr_median", "unit_nsr_mean",
                    "pe_noise_scale", "pe_var_per_element", "temporal_var_per_element",
                    "temporal_noise_scale", "temporal_var_normalized"}
    assert {s.name for s in STATS.values() if s.scope == "run"} == {
        "loss", "loss_z", "microbatches", "skipped_step", "batch_size"}
    assert catalog.scope("critical_batch_size") == "global"
    assert catalog.scope("not_declared") == "layer"


def test_heatmap_plan():
    """Per slot the first statistic present: the two-batch estimator, else the per-example
    one, else the temporal one; then the user statistics, each its own."""
    every = {s.name for f in catalog.BUILTIN for s in catalog.FAMILIES[f].stats}  # not a user's
    assert catalog.heatmap_stats(every) == ["grad_norm", "var_per_element", "noise_scale",
                                            "unit_rms_cv"]
    pe = {"grad_norm", "pe_var_per_element", "pe_noise_scale", "temporal_noise_scale"}
    assert catalog.heatmap_stats(pe) == ["grad_norm", "pe_var_per_element", "pe_noise_scale"]
    assert catalog.heatmap_stats({"temporal_noise_scale", "grad_rms", "zz", "aa"}) == [
        "temporal_noise_scale", "aa", "zz"]


def test_declarations_are_checked():
    with pytest.raises(ValueError, match="scope must be one of"):
        StatSpec("x", "doc", "custom", scope="layers")
    with pytest.raises(ValueError, match="category must be one of"):
        StatSpec("x", "doc", "noise")
    with pytest.raises(ValueError, match="unknown needs"):
        FamilySpec("x", (), needs=frozenset({"grads"}))
    with pytest.raises(ValueError, match="already exists"):
        catalog.register(FamilySpec("x", (StatSpec("noise_scale", "doc", "custom"),)))
    with pytest.raises(ValueError, match="already exists"):
        catalog.register(FamilySpec("x", (StatSpec("batch_size", "doc", "custom"),)))
    assert "x" not in catalog.FAMILIES
    with pytest.raises(ValueError, match="its flag 'columns'"):
        register_statistic(family_class("columns"))
    register_statistic(family_class("grad_lag"))  # opt-in: statistics=[GradLag]


def test_a_user_family_is_declared_on_registration():
    class Mine(Statistic):
        name = "test_catalog_mine"
        emits = ("test_catalog_a", "test_catalog_b")
        docs: ClassVar[dict[str, str]] = {"test_catalog_a": "the a"}
        heatmap = False
        reduce = "sum"

    register_statistic(Mine)
    register_statistic(Mine)  # idempotent
    a, b = STATS["test_catalog_a"], STATS["test_catalog_b"]
    assert (a.doc, a.category, a.scope, a.reduce, a.heatmap) == (
        "the a", "custom", "layer", "sum", None)
    assert b.doc == Mine.__doc__ or b.doc == "test_catalog_b"
    specs = catalog.user_specs(["grad_norm", "test_catalog_a", "microbatches"])
    assert list(specs) == ["test_catalog_a"] and specs["test_catalog_a"]["reduce"] == "sum"
    assert catalog.stat_names(["norms", "test_catalog_mine"])[5:7] == ["test_catalog_a",
                                                                        "test_catalog_b"]


def test_the_catalog_imports_no_torch():
    """Readable without the collector (the package's __init__ imports it, so load the file)."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('c', {catalog.__file__!r})\n"
            "m = sys.modules['c'] = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(m)\n"
            "assert m.heatmap_stats({'grad_norm'}) == ['grad_norm']\n"
            "sys.exit(1 if 'torch' in sys.modules else 0)\n")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_variance_questions_come_from_the_declarations():
    """The report's rankings ask three questions; which estimators answer each, and in which
    order, is the catalog's ``question`` field, and a new declared estimator joins them."""
    from gradlens.report.verdict_base import estimator_family

    assert catalog.question_estimators("total") == ("twobatch_trace", "pe_trace", "temporal_var")
    assert catalog.question_estimators("per_entry") == (
        "var_per_element", "pe_var_per_element", "temporal_var_per_element")
    assert catalog.question_estimators("gns") == ("noise_scale", "pe_noise_scale",
                                                  "temporal_noise_scale")
    assert [estimator_family(e) for e in ("pe_trace", "temporal_var", "unit_nsr_mean")] == [
        "per_example", "temporal", "twobatch"]
    with pytest.raises(ValueError, match="question must be one of"):
        catalog.StatSpec("x", "doc", "variance", question="loudness")
    spec = catalog.FamilySpec("question_probe", (catalog.StatSpec(
        "probe_trace", "doc", "variance", estimator="probe_trace", question="total"),))
    catalog.register(spec)
    try:
        assert catalog.question_estimators("total")[-1] == "probe_trace"
        from gradlens.report.verdicts.output_highest import ranking_stats

        assert ranking_stats()[0][-1] == "probe_trace"  # the report's rankings ask it too
    finally:
        catalog.unregister("question_probe")
    assert "probe_trace" not in catalog.question_estimators("total")
    with pytest.raises(ValueError, match="built-in"):
        catalog.unregister("twobatch")


def test_partials_feed_the_statistics_they_reduce():
    """The collective is the catalog's: every built-in statistic that crosses ranks by
    ``sum`` / ``max`` / ``mean`` is fed by declared partials of that reduction, every partial
    feeds statistics of its family (the shared intermediates': of the families reading
    them), and a family packs something exactly when it declares partials."""
    for name in catalog.BUILTIN:
        spec = catalog.FAMILIES[name]
        for s in spec.stats:
            feeders = [p for p in spec.partials if s.name in p.feeds]
            if s.reduce in ("sum", "max", "mean"):
                assert feeders, (name, s.name)
                assert {p.reduce for p in feeders} == {s.reduce}, (name, s.name)
        for p in spec.partials:
            assert p.feeds and set(p.feeds) <= set(spec.names + spec.histograms), (name, p)
        packs = family_class(name).partials is not Statistic.partials
        assert packs == bool(spec.partials), name
        assert family_class(name).partial_specs == spec.partials
    assert [p.name for p in catalog.FAMILIES["norms"].partials if p.per_step] == [
        "sq", "nonfinite", "pre_sq"]  # the detectors' inputs, at every deferred step
    assert {p.shape for p in catalog.FAMILIES["spikes"].partials} == {"scalar"}
    assert catalog.FAMILIES["spikes"].partials[0].reduce == "mean"
    names = [p.name for ps in catalog.INTERMEDIATE_PARTIALS.values() for p in ps]
    assert sorted(names) == ["fan", "fan_count", "unit"]
    assert set(catalog.INTERMEDIATE_PARTIALS) == catalog.INTERMEDIATES
    for inter, parts in catalog.INTERMEDIATE_PARTIALS.items():
        readers = [catalog.FAMILIES[f] for f in catalog.BUILTIN
                   if inter in catalog.FAMILIES[f].intermediates]
        fed = {n for f in readers for n in f.names + f.histograms}
        for p in parts:
            assert p.shape in ("unit", "fan") and p.reduce == "sum"
            assert p.feeds and set(p.feeds) <= fed, (inter, p.name, set(p.feeds) - fed)


def test_partial_declarations_are_checked():
    with pytest.raises(ValueError, match="reduce must be one of"):
        catalog.Partial("x", "median")
    with pytest.raises(ValueError, match="shape must be one of"):
        catalog.Partial("x", "sum", shape="row")
    stat = StatSpec("probe_x", "doc", "custom")
    with pytest.raises(ValueError, match="must feed some of the family's statistics"):
        FamilySpec("probe", (stat,), partials=(catalog.Partial("x", "sum", feeds=("nope",)),))
    with pytest.raises(ValueError, match="repeat"):
        FamilySpec("probe", (stat,), partials=(catalog.Partial("x", "sum", feeds=("probe_x",)),
                                               catalog.Partial("x", "max", feeds=("probe_x",))))


def test_a_user_family_declares_its_partials():
    """From ``reduce`` (one ``layer`` partial ``value``), or its own ``partial_specs``."""

    class Summed(Statistic):
        name = "test_catalog_summed"
        emits = ("test_catalog_summed_a",)
        reduce = "sum"

    class Declared(Statistic):
        name = "test_catalog_declared"
        emits = ("test_catalog_declared_a", "test_catalog_declared_b")
        partial_specs = (catalog.Partial("peak", "max", feeds=("test_catalog_declared_b",)),
                         catalog.Partial("count", "sum"))

    try:
        register_statistic(Summed)
        register_statistic(Declared)
        (p,) = catalog.FAMILIES["test_catalog_summed"].partials
        assert (p.name, p.reduce, p.shape, p.feeds) == ("value", "sum", "layer",
                                                        ("test_catalog_summed_a",))
        peak, count = catalog.FAMILIES["test_catalog_declared"].partials
        assert (peak.reduce, peak.feeds) == ("max", ("test_catalog_declared_b",))
        assert count.feeds == Declared.emits  # no feeds given: all it emits
    finally:
        catalog.unregister("test_catalog_summed")
        catalog.unregister("test_catalog_declared")
