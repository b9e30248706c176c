"""What the lens collects: presets and their stated cost.

=========  ==================================================================  =====================
preset     statistics                                                          cost
=========  ==================================================================  =====================
minimal    grad_norm/rms/max_abs, non-finite counts, spike detectors            one pass over grads
standard   + column-norm spread (both axes), two-batch variance, noise scale,   + one pass over grads
           per-element variance, per-unit noise-to-signal (when a step has     per micro-batch on
           >= 2 micro-batches or >= 2 ranks)                                   logged steps; no
                                                                               memory beyond O(units)
full       + per-example variance (Linear, Conv1D, Embedding, output layer),    per-example Gram
           temporal variance buffers (EMA, within ``temporal_budget_bytes``),  matrices; temporal
           log-binned column-norm histograms, SPAM element fraction            buffers (2x the
                                                                               matrices' bytes by
                                                                               default); a pass
                                                                               over g and Adam's v
=========  ==================================================================  =====================
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gradlens import _args as A
from gradlens import catalog
from gradlens.stats.spikes import SpikeConfig

PRESETS = tuple(catalog.PRESETS)  # lists of families: gradlens.catalog


@dataclass
class LensConfig:
    """Settings of a :class:`~gradlens.GradLens`; ``LensConfig.from_preset`` fills the flags.

    Attributes:
        preset: ``minimal``, ``standard`` or ``full``.
        log_every: record (and flush) the statistics every this many optimizer steps; the norm,
            non-finite and spike detectors run at every step and their events are never lost.
        columns: column-norm spread on 2-D gradients.
        microbatch: two-batch variance from micro-batches / data-parallel ranks.
        per_example: per-example variance from layer inputs and output gradients.
        temporal: temporal variance across steps (EMA buffers).
        histograms: log-binned histograms of the per-unit RMS vector.
        spam: SPAM's element fraction ``mean(g^2 > theta v)`` against the optimizer's Adam
            second moment (when it has one): a full pass over the gradient and ``v``.
        temporal_beta: EMA factor of the temporal buffers.
        temporal_budget_bytes: memory the temporal buffers may use (two float32 buffers per
            tracked matrix: the EMAs of ``g`` and of SCALE's ``G/r``; output and embedding come
            first); layers beyond it are tracked through a count sketch of ``sketch_dim``
            entries, which costs no memory but a hash per gradient entry at every step.
            ``None``: every tracked matrix exactly (2x their parameter bytes).
        sketch_dim: size of the count sketch used past the budget.
        noise_ema: EMA factor of the two-batch numerator and denominator.
        histogram_bins: bins of the log-binned histograms.
        loss_reduction: ``mean`` (each micro-batch's loss is averaged over its examples and
            divided by the number of micro-batches, as most loops do), ``global_mean`` (summed
            over the micro-batch and divided by the step's total number of examples, as HF's
            Trainer does with ``num_items_in_batch``) or ``sum``. With equal micro-batches only
            the absolute scale of the variance estimators depends on it; with unequal ones the
            estimators need the right convention.
        batch_size: examples per micro-batch, when the inputs' shapes do not tell (``None``:
            read from the tracked layers' inputs).
        batch_dim: the batch dimension of the layers' inputs (1 for sequence-first models).
        per_example_scope: ``all`` (Linear / Conv1D / Embedding weights, norm gains, biases)
            or ``norms`` (norm gains only: a gradient noise scale for a small cost, after
            Gray et al. 2024; the ``gns`` preset).
        per_example_check: on logged steps, check that each layer's per-example factors sum
            to the gradient autograd computes, along fixed random probe directions
            (``u^T G v`` against ``sum_b (D_b u)^T (A_b v)``); a mismatch beyond rounding makes
            the layer's per-example statistics NaN with a reason.
        per_example_sample: read only this many examples of each micro-batch, drawn at random,
            and scale their sum up: unbiased ``pe_trace`` / ``pe_signal`` at ``m/b`` of the
            per-example cost, with the extra variance stated in
            :mod:`gradlens.families.per_example_sample`. 0 (default): every example.
        spikes: detector settings (z threshold, EMA factor, warm-up, SPAM theta, how many
            layers a global spike is attributed to): :class:`gradlens.stats.SpikeConfig`.
        background_io: the file sinks (table, TensorBoard) write on a writer thread
            (:mod:`gradlens.core.writer`: ``close()`` waits for it; the training never waits
            for a slow disk, later flushes are coalesced; a SIGKILL loses the flushes still
            queued). False: every flush is on disk when ``step()`` returns.
    """

    preset: str = "standard"
    log_every: int = 1
    columns: bool = True
    microbatch: bool = True
    per_example: bool = False
    temporal: bool = False
    histograms: bool = False
    spam: bool = False
    temporal_beta: float = 0.9
    temporal_budget_bytes: int | None = None
    sketch_dim: int = 4096
    noise_ema: float = 0.9
    histogram_bins: int = 32
    loss_reduction: str = "mean"
    batch_size: int | None = None
    per_example_scope: str = "all"
    per_example_check: bool = True
    per_example_sample: int = 0
    batch_dim: int = 0
    spikes: SpikeConfig = field(default_factory=SpikeConfig)
    background_io: bool = True

    @classmethod
    def from_preset(cls, preset: str = "standard", **overrides: object) -> LensConfig:
        """The preset's flags, then ``overrides``: an option given explicitly wins over the
        preset (``preset="minimal", per_example=True`` is ``minimal`` plus the per-example
        estimators)."""
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
        flags = catalog.preset_flags(preset)
        unknown = set(overrides) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown lens option(s) {sorted(unknown)}")
        cfg = cls(preset=preset, **{**flags, **overrides})  # type: ignore[arg-type]
        cfg.validate()
        return cfg

    def stat_names(self) -> list[str]:
        """Names of the statistics this configuration's built-in families can write
        (:func:`gradlens.catalog.stat_names`)."""
        return catalog.stat_names(catalog.enabled(vars(self)))

    def validate(self) -> None:
        """Every field's type and range: a clear error naming the field (gradlens._args)."""
        A.check_int("log_every", self.log_every, 1)
        for flag in (*catalog.flags(), "background_io"):
            A.check_bool(flag, getattr(self, flag))
        for name in ("temporal_beta", "noise_ema"):
            A.check_real(name, getattr(self, name), 0.0, 1.0, high_open=True)
        A.check_int("temporal_budget_bytes", self.temporal_budget_bytes, 0, none_ok=True)
        A.check_int("sketch_dim", self.sketch_dim, 1)
        A.check_int("histogram_bins", self.histogram_bins, 2)
        A.check_choice("loss_reduction", self.loss_reduction, ("mean", "global_mean", "sum"))
        A.check_int("batch_size", self.batch_size, 1, none_ok=True)
        A.check_choice("per_example_scope", self.per_example_scope, ("all", "norms"))
        A.check_int("per_example_sample", self.per_example_sample, 0)
        A.check_int("batch_dim", self.batch_dim, 0)
        A.check_type("spikes", self.spikes, SpikeConfig, "a gradlens.stats.SpikeConfig")
