"""The catalog of statistics: what each family emits, and the presets, as plain data.

The one owner of every statistic's metadata. A family (the torch side in
:mod:`gradlens.families`) points at its :class:`FamilySpec` here; everything else reads this
module: the documented schema (:data:`gradlens.schema.STATS`), the presets and
``LensConfig.stat_names``, the run-level rows of a flush, the dashboards' generated "other
statistics" section, the report's heatmaps and its variance rankings (each estimator's
``question``). Nothing here imports torch, so the report
and the TensorBoard plugin read it without the collector.

Per statistic (:class:`StatSpec`): its doc, its ``category`` (the dashboards' and report's
grouping: norms, columns, variance, spikes, run, ...), its ``scope`` (``layer``: a value per
layer, and a ``global`` row where the family writes one; ``global``: the run-level row only,
per-layer entries are placeholders written only where set; ``run``: one value of the step),
how it crosses ranks (``reduce``), whether a variance estimator is size-fair, and its heatmap
slot in the report. Per family: its needs (hooks and observations, checked by
:data:`NEEDS`), the shared intermediates it reads (:data:`INTERMEDIATES`, computed once per
layer per step by the collector), the ``LensConfig`` flag that switches it, and the rank-local
partials it hands to a flush's ONE collective (:class:`Partial`; the intermediates':
:data:`INTERMEDIATE_PARTIALS`): the collector packs each with its declared reduction and
nothing else.

Adding a built-in family: a kernel in ``gradlens/stats``, a family file in
``gradlens/families`` (``spec = catalog.FAMILIES["name"]``), and here its declaration and one
preset line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

# Needs a family may declare (the collector installs the hooks and observations once).
NEEDS = frozenset({
    "microbatch_grads",  # a hook per parameter per backward pass (Tensor.register_hook)
    "layer_io",  # forward hooks on the owning modules: inputs and output gradients
    "step_grad",  # p.grad at the optimizer step (always available)
    "consistent_grad",  # the gradient the hooks saw and p.grad at the step must agree
    "optimizer_state",  # the optimizer's per-parameter state
    "loss",  # the loss handed to observe_loss
    "batch_size",  # micro-batch sizes from the tracked layers' inputs
})
# Shared per-step intermediates (core.intermediates computes each once per layer per step).
INTERMEDIATES = frozenset({
    "unit_sq_norms",  # per-output-unit squared norms of each matrix's step gradient
    "fan_sq_norms",  # per-input (fan) squared norms and finite counts
    "raw_sq_norms",  # squared norms before any edit between backward and step
})
CATEGORIES = ("norms", "columns", "variance", "spikes", "run", "lag", "custom")
SCOPES = ("layer", "global", "run")
REDUCTIONS = ("sum", "max", "mean", "derived")
# a packed partial's reduction across ranks and its shape (see Partial)
PARTIAL_REDUCTIONS = ("sum", "max", "mean")
PARTIAL_SHAPES = ("layer", "unit", "fan", "scalar")
# the report's heatmaps: per slot (in this order, then user slots), the first statistic present
HEATMAP_SLOTS = ("grad_norm", "per_element_variance", "noise_scale", "unit_spread")
# the report's variance questions, ranked per layer: the total variance tr(Sigma), per entry
# tr(Sigma)/numel, and the noise scale tr(Sigma)/|G|^2
QUESTIONS = ("total", "per_entry", "gns")


@dataclass(frozen=True)
class StatSpec:
    """One statistic's declaration.

    ``reduce``: across data-parallel ranks, ``sum`` (partial sums add: squared norms, counts),
    ``max``, ``mean`` (averaged over ranks) or ``derived`` (computed after the one collective
    from reduced sums, as every ratio and estimator is). ``estimator``: the variance verdicts'
    name for it (None: not an estimator the report judges). ``question``: which of the report's
    variance questions (:data:`QUESTIONS`) the estimator answers in the rankings and the
    output-layer verdict. ``heatmap``: the report's heatmap slot (None: no heatmap; a user
    statistic's slot is its own name).
    """

    name: str
    doc: str
    category: str
    scope: str = "layer"
    reduce: str = "derived"
    estimator: str | None = None
    size_fair: bool = False
    heatmap: str | None = None
    question: str | None = None

    def __post_init__(self) -> None:
        if self.question is not None and self.question not in QUESTIONS:
            raise ValueError(f"statistic {self.name!r}: question must be one of {QUESTIONS}, "
                             f"got {self.question!r}")
        for key, value, allowed in (("category", self.category, CATEGORIES),
                                    ("scope", self.scope, SCOPES),
                                    ("reduce", self.reduce, REDUCTIONS)):
            if value not in allowed:
                raise ValueError(f"statistic {self.name!r}: {key} must be one of {allowed}, "
                                 f"got {value!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Partial:
    """One rank-local quantity a family hands to a flush's ONE collective, by this name.

    The collector packs it and reduces it with ``reduce`` (``sum``: partial sums and counts
    add; ``max``: one slot per rank, max taken after the sum; ``mean``: the sum / world),
    then hands the family the reduced value by ``name`` (in one process: the value as given).
    ``shape``: ``layer`` ``(L,)``; ``unit`` / ``fan``: ``{layer index: vector}`` of a matrix's
    units / fans; ``scalar``: one value. ``per_step``: packed at every deferred step (the
    detectors' inputs of ``every_step`` families), else at logged steps only. ``feeds``: the
    statistics (or histograms) computed from it.
    """

    name: str
    reduce: str
    shape: str = "layer"
    doc: str = ""
    per_step: bool = False
    feeds: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for key, value, allowed in (("reduce", self.reduce, PARTIAL_REDUCTIONS),
                                    ("shape", self.shape, PARTIAL_SHAPES)):
            if value not in allowed:
                raise ValueError(f"partial {self.name!r}: {key} must be one of {allowed}, "
                                 f"got {value!r}")


@dataclass(frozen=True)
class FamilySpec:
    """One family's declaration: ``impl`` is ``"module:Class"`` of its torch side (empty for
    the collector's own rows), ``flag`` the ``LensConfig`` switch (None: always on when in a
    preset, opt-in otherwise), ``histograms`` the histogram names it writes, ``partials`` what
    it packs into a flush's one collective (each feeds some of its statistics)."""

    name: str
    stats: tuple[StatSpec, ...]
    impl: str = ""
    flag: str | None = None
    needs: frozenset[str] = frozenset()
    intermediates: frozenset[str] = frozenset()
    histograms: tuple[str, ...] = ()
    partials: tuple[Partial, ...] = ()

    def __post_init__(self) -> None:
        bad = (set(self.needs) - NEEDS) | (set(self.intermediates) - INTERMEDIATES)
        if bad:
            raise ValueError(f"family {self.name!r}: unknown needs {sorted(bad)}; choose from "
                             f"{sorted(NEEDS | INTERMEDIATES)}")
        if len({p.name for p in self.partials}) != len(self.partials):
            raise ValueError(f"family {self.name!r}: partial names repeat: {self.partials}")
        for p in self.partials:
            stray = set(p.feeds) - set(self.names) - set(self.histograms)
            if not p.feeds or stray:
                raise ValueError(f"family {self.name!r}: partial {p.name!r} must feed some of "
                                 f"the family's statistics {self.names}, got {p.feeds}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stats)


def _s(name: str, category: str, doc: str, **kw: Any) -> StatSpec:
    return StatSpec(name, doc, category, **kw)


def _variance(name: str, doc: str, heatmap: str | None = None, fair: bool = False,
              estimator: bool = True, question: str | None = None) -> StatSpec:
    return StatSpec(name, doc, "variance", estimator=name if estimator else None,
                    size_fair=fair, heatmap=heatmap, question=question)


def _p(name: str, reduce: str, doc: str, feeds: tuple[str, ...], shape: str = "layer",
       per_step: bool = False) -> Partial:
    return Partial(name, reduce, shape, doc, per_step, feeds)


_SPREADS = (("cv", "coefficient of variation std/mean"), ("max_min", "max/min ratio"),
            ("p99_p50", "99th/50th percentile ratio"), ("gini", "Gini coefficient"))
_AXES = (("unit", "output-unit (SCALE's axis)"), ("fan", "input (other axis)"))

_BUILTIN = (
    FamilySpec("norms", (
        _s("grad_norm", "norms", "||g||_2 of the gradient the optimizer consumes", reduce="sum",
           heatmap="grad_norm"),
        _s("grad_rms", "norms", "||g||_2 / sqrt(numel)", reduce="sum"),
        _s("grad_max_abs", "norms", "max |g_i| over finite entries", reduce="max"),
        _s("nonfinite_count", "norms", "number of NaN/Inf entries (excluded from every other "
           "stat)", reduce="sum"),
        _s("grad_norm_preclip", "norms", "raw ||g||_2: after the last backward and the "
           "data-parallel reduction, before clipping or any other edit, unscaled (per layer "
           "and global, every preset)", reduce="sum"),
    ), "gradlens.families.norms:Norms", needs=frozenset({"step_grad"}),
        intermediates=frozenset({"raw_sq_norms"}), partials=(  # FSDP2: this rank's shards
        _p("sq", "sum", "finite squared norms", ("grad_norm", "grad_rms", "grad_norm_preclip"),
           per_step=True),
        _p("nonfinite", "sum", "non-finite entries (a layer without a finite one has no norm)",
           ("nonfinite_count", "grad_norm", "grad_rms", "grad_norm_preclip"), per_step=True),
        _p("max_abs", "max", "largest finite |g_i|", ("grad_max_abs",)),
        _p("pre_sq", "sum", "raw squared norms (end of the last backward; contributing ranks)",
           ("grad_norm_preclip",), per_step=True))),
    FamilySpec("spikes", (
        _s("grad_norm_z", "spikes", "z-score of log grad_norm_preclip (the raw norm) against "
           "its forecast"),
        _s("grad_norm_ratio_max", "spikes", "grad_norm_preclip / running maximum of earlier "
           "steps"),
        _s("loss", "run", "training loss handed to the lens", scope="run", reduce="mean"),
        _s("loss_z", "run", "z-score of the loss against its EMA mean/variance", scope="run"),
    ), "gradlens.families.spikes:Spikes", needs=frozenset({"step_grad", "loss"}), partials=(
        _p("loss", "mean", "the rank's summed micro-batch losses", ("loss", "loss_z"),
           shape="scalar", per_step=True),)),
    FamilySpec("columns", tuple(  # 'unit' = SCALE's axis (one RMS per output unit)
        _s(f"{axis}_rms_{s}", "columns", f"{desc} of the per-{what} RMS vector",
           heatmap="unit_spread" if (axis, s) == ("unit", "cv") else None)
        for axis, what in _AXES for s, desc in _SPREADS),
        "gradlens.families.columns:Columns", flag="columns", needs=frozenset({"step_grad"}),
        intermediates=frozenset({"unit_sq_norms", "fan_sq_norms"})),
    FamilySpec("twobatch", (  # McCandlish et al., arXiv 1812.06162
        _variance("twobatch_trace", "tr(Sigma) from micro-batch (or rank-local) vs full-batch "
                  "squared norms (McCandlish et al.)", question="total"),
        _variance("twobatch_signal", "|G|^2 estimated by the two-batch estimator",
                  estimator=False),
        _variance("noise_scale", "B_simple = EMA tr(Sigma) / EMA |G|^2 (two-batch)",
                  "noise_scale", fair=True, question="gns"),
        _variance("var_per_element", "two-batch tr(Sigma) / numel", "per_element_variance",
                  fair=True, question="per_entry"),
        _variance("unit_nsr_median", "median over output units of tr(Sigma_i)/||G_i||^2",
                  fair=True),
        _variance("unit_nsr_mean", "mean over output units of tr(Sigma_i)/||G_i||^2",
                  fair=True),
    ), "gradlens.families.twobatch:TwoBatch", flag="microbatch",
        needs=frozenset({"microbatch_grads", "consistent_grad", "batch_size"}),
        intermediates=frozenset({"unit_sq_norms", "raw_sq_norms"}), partials=(  # W > 1
        _p("a", "sum", "sum_k b_k ||G_k||^2 of the rank's micro-batches (hooks' scale)",
           ("twobatch_trace", "twobatch_signal", "noise_scale", "var_per_element")),
        _p("has", "sum", "ranks whose hooks saw the layer (none: NaN, not a zero gradient)",
           ("twobatch_trace", "twobatch_signal", "noise_scale", "var_per_element",
            "unit_nsr_median", "unit_nsr_mean")),
        _p("unit", "sum", "per-unit sum_k b_k ||G_k,i||^2 of the rank's micro-batches",
           ("unit_nsr_median", "unit_nsr_mean"), shape="unit"))),
    FamilySpec("per_example", (
        _variance("pe_trace", "per-example covariance trace B/(B-1)(mean ||g_b||^2 - ||G||^2)", question="total"),
        _variance("pe_signal", "per-example unbiased |G|^2 estimate ||G||^2 - pe_trace/B (the "
                  "noise scale's denominator; summed over layers for the run's GNS)",
                  estimator=False),
        _variance("pe_noise_scale", "per-example tr(Sigma) / unbiased |G|^2", "noise_scale",
                  fair=True, question="gns"),
        _variance("pe_var_per_element", "per-example tr(Sigma) / numel", "per_element_variance",
                  fair=True, question="per_entry"),
        _s("critical_batch_size", "run", "B_crit ~ B_simple = EMA(sum_l pe_trace) / "
           "EMA(sum_l pe_signal) over all layers, in examples (McCandlish et al.)",
           scope="global"),
    ), "gradlens.families.per_example:PerExample", flag="per_example",
        needs=frozenset({"layer_io", "consistent_grad", "batch_size"}),
        intermediates=frozenset({"raw_sq_norms"}), partials=(  # W > 1
        _p("sq", "sum", "weighted sum of the rank's per-example squared norms",
           ("pe_trace", "pe_signal", "pe_noise_scale", "pe_var_per_element",
            "critical_batch_size")),)),
    FamilySpec("temporal", (
        _variance("temporal_var", "E||g||^2 - ||E g||^2 across steps (EMA)", question="total"),
        _variance("temporal_var_per_element", "temporal_var / numel", "per_element_variance",
                  fair=True, question="per_entry"),
        _variance("temporal_noise_scale", "temporal_var / ||E g||^2", "noise_scale", fair=True, question="gns"),
        _variance("temporal_var_normalized", "temporal variance of SCALE's normalized "
                  "gradient G/r, per element", fair=True),
    ), "gradlens.families.temporal:Temporal", flag="temporal", needs=frozenset({"step_grad"})),
    FamilySpec("histograms", (), "gradlens.families.histograms:Histograms", flag="histograms",
               needs=frozenset({"step_grad"}), intermediates=frozenset({"unit_sq_norms"}),
               histograms=("unit_rms_hist",)),
    FamilySpec("spam", (
        _s("spam_fraction", "spikes", "fraction of entries with g^2 > theta * v (Adam's v)",
           reduce="sum"),
    ), "gradlens.families.spam:Spam", flag="spam",
        needs=frozenset({"step_grad", "optimizer_state"}), partials=(  # FSDP2: the shards'
        _p("hits", "sum", "entries with g^2 > theta v", ("spam_fraction",)),
        _p("ok", "sum", "entries counted (finite g and v)", ("spam_fraction",)))),
    FamilySpec("grad_lag", (  # opt-in: statistics=[GradLag] (the momentum advisor's evidence)
        _s("grad_lag1_dot", "lag", "<g_t, g_{t-1}>: the gradient's lag-1 inner product"),
        _s("grad_lag2_dot", "lag", "<g_t, g_{t-2}>: the gradient's lag-2 inner product"),
    ), "gradlens.families.lag:GradLag", needs=frozenset({"step_grad"})),
)
# the shared intermediates' partials (FSDP2: the rank's pieces of sharded matrices, placed at
# their offsets in the global vectors); the raw norms' are the norms family's ``pre_sq``
INTERMEDIATE_PARTIALS: dict[str, tuple[Partial, ...]] = {
    "unit_sq_norms": (_p("unit", "sum", "per-unit squared norms of the step gradient", (
        *(f"unit_rms_{s}" for s, _ in _SPREADS), "unit_nsr_median", "unit_nsr_mean",
        "unit_rms_hist"), shape="unit"),),
    "fan_sq_norms": tuple(
        _p(name, "sum", doc, tuple(f"fan_rms_{s}" for s, _ in _SPREADS), shape="fan")
        for name, doc in (("fan", "per-fan squared norms over finite entries"),
                          ("fan_count", "per-fan finite entries"))),
    "raw_sq_norms": (),
}

# the collector's own run-level rows (core.records), not a family's
STEP_ROWS = (
    _s("microbatches", "run", "micro-batches (backward passes) in the step", scope="run"),
    _s("skipped_step", "run", "1 when AMP's GradScaler skipped the step (inf/NaN)",
       scope="run"),
    _s("batch_size", "run", "examples per optimizer step (all micro-batches and ranks): the "
       "B the critical batch size is compared with", scope="run", reduce="sum"),
)
BATCH_SIZE_ROW = "batch_size"  # written when a family needs the batch sizes

# presets: lists of families, each the one before plus what it adds
MINIMAL = ("norms", "spikes")
STANDARD = (*MINIMAL, "columns", "twobatch")
GNS = (*STANDARD, "per_example")
FULL = (*STANDARD, "per_example", "temporal", "histograms", "spam")
PRESETS: dict[str, tuple[str, ...]] = {"minimal": MINIMAL, "standard": STANDARD, "gns": GNS,
                                       "full": FULL}
PRESET_OPTIONS: dict[str, dict[str, Any]] = {"gns": {"per_example_scope": "norms"}}

# ----------------------------------------------------------------------------- the registry

FAMILIES: dict[str, FamilySpec] = {f.name: f for f in _BUILTIN}
BUILTIN = frozenset(FAMILIES)
STATS: dict[str, StatSpec] = {s.name: s for f in _BUILTIN for s in f.stats}
STATS.update({s.name: s for s in STEP_ROWS})
_OWNER: dict[str, str] = {s.name: f.name for f in _BUILTIN for s in f.stats}


def register(spec: FamilySpec) -> FamilySpec:
    """Add a user family's declaration. A family name or statistic that another family owns
    is an error (a silent clash would mix two meanings under one name); registering the same
    declaration again is not."""
    old = FAMILIES.get(spec.name)
    if old is not None and old != spec:
        raise ValueError(f"a statistic family named {spec.name!r} is already registered")
    for s in spec.stats:
        owner = _OWNER.get(s.name) or (None if s.name not in STATS else "the collector")
        if owner is not None and owner != spec.name:
            raise ValueError(f"statistic {s.name!r} already exists (family {owner!r}, "
                             f"category {STATS[s.name].category!r}); choose another name")
    FAMILIES[spec.name] = spec
    for s in spec.stats:
        STATS[s.name] = s
        _OWNER[s.name] = spec.name
    return spec


def unregister(name: str) -> None:
    """Remove a user family's declaration and its statistics (a built-in one is an error)."""
    if name in BUILTIN:
        raise ValueError(f"{name!r} is a built-in family; it cannot be unregistered")
    spec = FAMILIES.pop(name, None)
    for s in spec.stats if spec is not None else ():
        if _OWNER.get(s.name) == name:
            del _OWNER[s.name]
            STATS.pop(s.name, None)


def enabled(settings: Mapping[str, Any]) -> list[str]:
    """The built-in families a configuration runs, in catalog order: those in every preset,
    and each whose flag is set in ``settings`` (``LensConfig`` fields)."""
    always = set.intersection(*(set(p) for p in PRESETS.values()))
    return [f.name for f in _BUILTIN
            if f.name in always or (f.flag is not None and settings.get(f.flag))]


def flags() -> dict[str, str]:
    """``{LensConfig flag: family}`` of the switchable built-in families."""
    return {f.flag: f.name for f in _BUILTIN if f.flag}


def preset_flags(preset: str) -> dict[str, Any]:
    """The ``LensConfig`` fields a preset sets: each family flag, then its options."""
    chosen = PRESETS[preset]
    return {**{flag: fam in chosen for flag, fam in flags().items()},
            **PRESET_OPTIONS.get(preset, {})}


def stat_names(families: Iterable[str]) -> list[str]:
    """The statistics the given families (names, in order) write, then the collector's
    run-level rows (``batch_size`` only when a family reads the batch sizes)."""
    specs = [FAMILIES[f] for f in families]
    names = [s.name for f in specs for s in f.stats]
    sizes = any("batch_size" in f.needs for f in specs)
    return names + [s.name for s in STEP_ROWS if s.name != BATCH_SIZE_ROW or sizes]


def user_specs(names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Declarations of the non-built-in statistics among ``names`` (run.json's
    ``stat_specs``: how a report in another process learns a user statistic)."""
    return {n: STATS[n].to_json() for n in names
            if n in STATS and _OWNER.get(n) not in BUILTIN and n not in _ROW_NAMES}


_ROW_NAMES = frozenset(s.name for s in STEP_ROWS)


def spec_of(name: str, metas: Iterable[Mapping[str, Any]] = ()) -> StatSpec | None:
    """A statistic's declaration: the registry's, else one a run recorded (run.json's
    ``stat_specs``), else None."""
    if name in STATS:
        return STATS[name]
    for meta in metas:
        raw = (meta.get("stat_specs") or {}).get(name)
        if raw:
            return StatSpec(**{k: v for k, v in raw.items()
                               if k in StatSpec.__dataclass_fields__})
    return None


def heatmap_stats(present: Iterable[str], metas: Iterable[Mapping[str, Any]] = ()) -> list[str]:
    """The report's heatmaps: per slot (:data:`HEATMAP_SLOTS`, then user statistics' slots),
    the first statistic present in registry order. A per-layer statistic no registry or run
    declares (a user statistic of a run written before run.json kept specs) gets its own."""
    metas = list(metas)
    present = set(present)
    order = {n: i for i, n in enumerate(STATS)}
    slots: dict[str, list[str]] = {}
    for name in sorted(present, key=lambda n: (order.get(n, len(order)), n)):
        spec = spec_of(name, metas)
        slot = name if spec is None else spec.heatmap
        if slot is not None:
            slots.setdefault(slot, []).append(name)
    ranked = [s for s in HEATMAP_SLOTS if s in slots] + [s for s in slots
                                                          if s not in HEATMAP_SLOTS]
    return [slots[s][0] for s in ranked]


def scope(name: str) -> str:
    """A statistic's scope (``layer`` for a name nobody declared)."""
    spec = STATS.get(name)
    return "layer" if spec is None else spec.scope


def question_estimators(question: str) -> tuple[str, ...]:
    """The estimators answering one of the report's variance questions (:data:`QUESTIONS`),
    in registry order (two-batch, per-example, temporal): the first a run has is the one its
    figures and plain words use."""
    if question not in QUESTIONS:
        raise ValueError(f"question must be one of {QUESTIONS}, got {question!r}")
    return tuple(s.name for s in STATS.values() if s.estimator and s.question == question)


def family_of(name: str) -> str | None:
    """The family that emits a statistic (None: the collector's own rows, or undeclared)."""
    return _OWNER.get(name)


def variance_estimators() -> tuple[str, ...]:
    return tuple(s.name for s in STATS.values() if s.estimator)
