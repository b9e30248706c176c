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

from gradlens import catalog
from gradlens.catalog import StatSpec

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


# The documented statistics (name -> catalog.StatSpec: doc, category, scope, reduction,
# estimator, heatmap), owned by the families' declarations in gradlens.catalog; a user family
# adds its own when registered.
STATS: dict[str, StatSpec] = catalog.STATS
VARIANCE_ESTIMATORS = catalog.variance_estimators()

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
