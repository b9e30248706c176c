"""The one output schema: what the lens writes and the report reads.

Run directory (``logdir``)::

    run.json        metadata: model, optimizer, preset, layers with roles and shapes, version
    stats-*.parquet long table (default): step, layer, role, stat, value; one file per flush,
                    merged every 64 flushes (gradlens.table_parts); or stats.csv /
                    stats.jsonl, appended at every flush
    spikes.jsonl    one JSON object per event: step, layer, kind, value, score, layers
    events.out.tfevents.*   TensorBoard: scalars gradlens/global/<stat> and per group (and
                    gradlens/<stat>/<layer> with per_layer=True), raw histograms, spike text,
                    and the custom-scalar dashboard layout

Values may be NaN or +-inf: CSV writes ``nan``/``inf``/``-inf``, JSON lines the tokens ``NaN``/
``Infinity``/``-Infinity`` (Python's json and pandas read them), parquet IEEE floats. Every line
of a CSV/JSON-lines file ends with a newline: a last line without one was cut by a killed run.

TensorBoard tags besides ``tb_tag(stat, layer)`` (written by ``tensorboard.sink``)::

    gradlens/by_group/<stat>/<group>/{mean,min,max}   per-step mean/min/max of a statistic over
                    the layers of one dashboard group (LAYER_GROUPS), finite values only; the
                    margin charts of the dashboards read these
    gradlens/spikes/<kind>   one scalar per (step, kind) of spike events: the largest score
    gradlens/spikes          text, one markdown line per spike event (SPIKES_TEXT_TAG)
    gradlens/<hist>/<layer>  raw histograms (``tb_tag`` of the histogram's stat name)

Layer names are the parameter names of the model (``model.layers.0.mlp.up_proj.weight``);
run-level rows use the layer ``"global"`` with role ``"global"``. A parameter named ``global``
itself (an attribute of the root module) is recorded as ``.global`` (:func:`layer_name`): no
qualified parameter name starts with a dot, so no name is ever taken for another. Names are
otherwise kept as they are (newlines, quotes, commas, unicode included).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1

STAT_COLUMNS = ("step", "layer", "role", "stat", "value")
SPIKE_FIELDS = ("step", "layer", "kind", "value", "score", "layers", "family", "reason")
GLOBAL = "global"

RUN_META_FILE = "run.json"
STATS_BASENAME = "stats"  # stats.csv | stats.jsonl | stats-<n>.parquet
SPIKES_FILE = "spikes.jsonl"
TABLE_FORMATS = ("csv", "jsonl", "parquet")


def layer_name(param_name: str) -> str:
    """The layer name a parameter is recorded under: its own, but ``.global`` for a parameter
    named like the reserved run-level row (a qualified parameter name never starts with a dot)."""
    return "." + param_name if param_name == GLOBAL else param_name


def tb_tag(stat: str, layer: str) -> str:
    """TensorBoard tag of a statistic: ``gradlens/<stat>/<layer>`` (``gradlens/global/<stat>``)."""
    if layer == GLOBAL:
        return f"gradlens/global/{stat}"
    return f"gradlens/{stat}/{layer}"


@dataclass(frozen=True)
class StatInfo:
    """A documented statistic: its family, which estimator it is, and what it means."""

    name: str
    family: str  # norms | columns | variance | spikes | global
    doc: str
    estimator: str | None = None  # variance family: the estimator, for the report's verdicts
    size_fair: bool = False  # variance family: comparable across layers of different sizes


_STATS = [
    # norms (every preset)
    StatInfo("grad_norm", "norms", "||g||_2 of the gradient the optimizer consumes"),
    StatInfo("grad_rms", "norms", "||g||_2 / sqrt(numel)"),
    StatInfo("grad_max_abs", "norms", "max |g_i| over finite entries"),
    StatInfo("nonfinite_count", "norms", "number of NaN/Inf entries (excluded from every other stat)"),
    # column-norm spread (standard): 'unit' = SCALE's axis (one RMS per output unit), 'fan' = other
    *[
        StatInfo(f"{axis}_rms_{s}", "columns", f"{desc} of the per-{what} RMS vector")
        for axis, what in (("unit", "output-unit (SCALE's axis)"), ("fan", "input (other axis)"))
        for s, desc in (
            ("cv", "coefficient of variation std/mean"),
            ("max_min", "max/min ratio"),
            ("p99_p50", "99th/50th percentile ratio"),
            ("gini", "Gini coefficient"),
        )
    ],
    # variance estimators (McCandlish et al., arXiv 1812.06162)
    StatInfo("twobatch_trace", "variance", "tr(Sigma) from micro-batch (or rank-local) vs full-batch "
             "squared norms (McCandlish et al.)", "twobatch_trace"),
    StatInfo("twobatch_signal", "variance", "|G|^2 estimated by the two-batch estimator", None),
    StatInfo("noise_scale", "variance", "B_simple = EMA tr(Sigma) / EMA |G|^2 (two-batch)",
             "noise_scale", size_fair=True),
    StatInfo("var_per_element", "variance", "two-batch tr(Sigma) / numel", "var_per_element",
             size_fair=True),
    StatInfo("unit_nsr_median", "variance", "median over output units of tr(Sigma_i)/||G_i||^2",
             "unit_nsr_median", size_fair=True),
    StatInfo("unit_nsr_mean", "variance", "mean over output units of tr(Sigma_i)/||G_i||^2",
             "unit_nsr_mean", size_fair=True),
    StatInfo("pe_trace", "variance", "per-example covariance trace B/(B-1)(mean ||g_b||^2 - ||G||^2)",
             "pe_trace"),
    StatInfo("pe_signal", "variance", "per-example unbiased |G|^2 estimate ||G||^2 - pe_trace/B "
             "(the noise scale's denominator; summed over layers for the run's GNS)", None),
    StatInfo("pe_noise_scale", "variance", "per-example tr(Sigma) / unbiased |G|^2",
             "pe_noise_scale", size_fair=True),
    StatInfo("pe_var_per_element", "variance", "per-example tr(Sigma) / numel",
             "pe_var_per_element", size_fair=True),
    StatInfo("temporal_var", "variance", "E||g||^2 - ||E g||^2 across steps (EMA)", "temporal_var"),
    StatInfo("temporal_var_per_element", "variance", "temporal_var / numel",
             "temporal_var_per_element", size_fair=True),
    StatInfo("temporal_noise_scale", "variance", "temporal_var / ||E g||^2",
             "temporal_noise_scale", size_fair=True),
    StatInfo("temporal_var_normalized", "variance", "temporal variance of SCALE's normalized "
             "gradient G/r, per element", "temporal_var_normalized", size_fair=True),
    # spikes (every preset)
    StatInfo("grad_norm_z", "spikes", "z-score of log grad_norm_preclip (the raw norm) against "
             "its forecast"),
    StatInfo("grad_norm_ratio_max", "spikes", "grad_norm_preclip / running maximum of earlier "
             "steps"),
    StatInfo("spam_fraction", "spikes", "fraction of entries with g^2 > theta * v (Adam's v)"),
    # global rows
    StatInfo("loss", "global", "training loss handed to the lens"),
    StatInfo("loss_z", "global", "z-score of the loss against its EMA mean/variance"),
    StatInfo("grad_norm_preclip", "norms", "raw ||g||_2: after the last backward and the "
             "data-parallel reduction, before clipping or any other edit, unscaled (per layer "
             "and global, every preset)"),
    StatInfo("microbatches", "global", "micro-batches (backward passes) in the step"),
    StatInfo("skipped_step", "global", "1 when AMP's GradScaler skipped the step (inf/NaN)"),
    StatInfo("batch_size", "global", "examples per optimizer step (all micro-batches and ranks): "
             "the B the critical batch size is compared with"),
    StatInfo("critical_batch_size", "global", "B_crit ~ B_simple = EMA(sum_l pe_trace) / "
             "EMA(sum_l pe_signal) over all layers, in examples (McCandlish et al.)"),
]

STATS: dict[str, StatInfo] = {s.name: s for s in _STATS}
VARIANCE_ESTIMATORS = tuple(s.name for s in _STATS if s.estimator)

SPIKE_KINDS = ("grad_norm", "grad_norm_global", "loss", "nonfinite", "spam", "skipped_step",
               "guarded_step", "validity")

# Dashboard groups of layers (run.json's layers[].group): where a layer sits in a transformer.
LAYER_GROUPS = ("embedding", "attention", "mlp", "norms", "output", "other")
GROUP_AGGREGATES = ("mean", "min", "max")
SPIKES_TEXT_TAG = "gradlens/spikes"


def tb_group_tag(stat: str, group: str, aggregate: str) -> str:
    """Tag of a per-group aggregate: ``gradlens/by_group/<stat>/<group>/<mean|min|max>``."""
    return f"gradlens/by_group/{stat}/{group}/{aggregate}"


def tb_spike_tag(kind: str) -> str:
    """Tag of the spike-score scalar of one event kind: ``gradlens/spikes/<kind>``."""
    return f"gradlens/spikes/{kind}"


@dataclass(frozen=True)
class SpikeEvent:
    """One instability event.

    ``layer`` is a parameter name or ``"global"``; ``score`` is the detector's value (z-score,
    element fraction, count); ``layers`` lists the layers a global event is attributed to, the
    top ones by their own score. A ``validity`` event (value and score NaN) says that the
    statistic ``family`` wrote NaN for ``layer`` from this step on, and why (``reason``); it is
    recorded once per (family, reason).
    """

    step: int
    layer: str
    kind: str
    value: float
    score: float
    layers: tuple[str, ...] = field(default_factory=tuple)
    family: str = ""
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d
