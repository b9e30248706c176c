"""Pure tensor -> tensor gradient statistics: norms, column spread, variance, spikes.

Per-example norms of 1-D parameters (norm gains, biases): :mod:`gradlens.stats.per_example_vector`.
Per-unit noise-to-signal with its rounding floor: :mod:`gradlens.stats.unit_noise`.
Host-side (numpy) noise-scale and critical-batch-size readout of logged values:
:mod:`gradlens.stats.noise_scale` (not re-exported here: it works on arrays, not tensors).

Every function takes tensors and returns tensors on the same device, accumulating in float32
(float64 for float64 inputs), with no host synchronization and static output shapes, so a
collector can stack results into one device buffer and transfer them once per flush.
Non-finite gradient entries are excluded from every statistic and counted separately.
"""

from gradlens.stats.columns import (
    HISTOGRAM_MOMENT_FIELDS,
    SPREAD_FIELDS,
    fan_rms,
    fan_sq_norms,
    grad_summaries_with_axes,
    histogram_moments,
    histograms_moments,
    log_histogram,
    log_histograms,
    sorted_quantile,
    spread,
    spread_batched,
    summary_and_axis_sq_norms,
    unit_rms,
    unit_sq_norms,
    unit_sq_norms_propagating,
)
from gradlens.stats.norms import (
    SUMMARY_FIELDS,
    accumulation_dtype,
    finite_copy,
    finite_max_abs,
    finite_sq_norm,
    finite_sum,
    grad_summaries,
    grad_summary,
    nonfinite_count,
    sq_norms,
)
from gradlens.stats.per_example import (
    DEFAULT_CHUNK_ELEMS,
    choose_per_example_method,
    per_example_cross_linear,
    per_example_sq_norms_bias,
    per_example_sq_norms_embedding,
    per_example_sq_norms_linear,
    token_grams,
    within_batch_trace,
)
from gradlens.stats.per_example_vector import (
    NORM_KINDS,
    norm_kind,
    normalized_input,
    per_example_grads_norm_gain,
    per_example_sq_norms_norm_gain,
)
from gradlens.stats.spikes import (
    SpikeConfig,
    attribute_spike,
    max_ratio_init,
    max_ratio_update,
    spam_fraction,
    spam_fractions,
    zscore_init,
    zscore_update,
)
from gradlens.stats.unit_noise import (
    FLOOR,
    noise_to_signal_summary,
    signal_floor,
    two_batch_unit_estimates,
    unit_noise_to_signal,
    unit_noise_to_signal_ratios,
)
from gradlens.stats.variance import (
    ema_debiased,
    ema_ratio_update,
    ema_update,
    sketch_apply,
    temporal_init,
    temporal_readout,
    temporal_step,
    temporal_update_,
    two_batch_estimates,
)

__all__ = [
    "DEFAULT_CHUNK_ELEMS",
    "FLOOR",
    "HISTOGRAM_MOMENT_FIELDS",
    "NORM_KINDS",
    "SPREAD_FIELDS",
    "SUMMARY_FIELDS",
    "SpikeConfig",
    "accumulation_dtype",
    "attribute_spike",
    "choose_per_example_method",
    "ema_debiased",
    "ema_ratio_update",
    "ema_update",
    "fan_rms",
    "fan_sq_norms",
    "finite_copy",
    "finite_max_abs",
    "finite_sq_norm",
    "finite_sum",
    "grad_summaries",
    "grad_summaries_with_axes",
    "grad_summary",
    "histogram_moments",
    "histograms_moments",
    "log_histogram",
    "log_histograms",
    "max_ratio_init",
    "max_ratio_update",
    "noise_to_signal_summary",
    "nonfinite_count",
    "norm_kind",
    "normalized_input",
    "per_example_cross_linear",
    "per_example_grads_norm_gain",
    "per_example_sq_norms_bias",
    "per_example_sq_norms_embedding",
    "per_example_sq_norms_linear",
    "per_example_sq_norms_norm_gain",
    "signal_floor",
    "sketch_apply",
    "sorted_quantile",
    "spam_fraction",
    "spam_fractions",
    "spread",
    "spread_batched",
    "sq_norms",
    "summary_and_axis_sq_norms",
    "temporal_init",
    "temporal_readout",
    "temporal_step",
    "temporal_update_",
    "token_grams",
    "two_batch_estimates",
    "two_batch_unit_estimates",
    "unit_noise_to_signal",
    "unit_noise_to_signal_ratios",
    "unit_rms",
    "unit_sq_norms",
    "unit_sq_norms_propagating",
    "within_batch_trace",
    "zscore_init",
    "zscore_update",
]
