"""The verdict registry: one :class:`VerdictKind` per question, iterated by the report (its
summary table, its plain-words first section, one section per kind with the kind's figures) and
by the TensorBoard plugin (the summary cells the report stores in ``verdicts.json``).

A kind declares what it reads from the table (``needs``: the statistics; the report hands it
only those rows), how it computes its verdicts from one run (``compute``), the numbers of its
summary cells (``figures``), the figures of its section (``plots``), its section's heading and
text, and its answer in plain words with what to do next (``answer``). Registering a kind is
the whole of adding a question::

    register_verdict(VerdictKind(name="loss_falls", title="Does the loss fall?",
                                 needs=("loss",), compute=my_compute))

The built-in kinds register themselves when :mod:`gradlens.report.verdicts` is imported; the
report's order is each kind's ``order`` (built-ins 10 to 50, a user's 100 by default), then
the order of registration. The registry lives in the process that builds the report; the
plugin shows what the report stored, and words an older report's rows with the kinds
registered in its own process (:func:`gradlens.report.summary.row_summary`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from gradlens.report.verdicts.base import Verdict

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Answer", "FigureSpec", "ReportContext", "RunData", "SummaryFigures", "VerdictKind",
           "kinds", "register_verdict", "unregister_verdict", "verdict_kind"]


@dataclass
class RunData:
    """One run as the verdicts see it.

    Attributes:
        df: the long table (``step, layer, role, stat, value``, and ``run``); a kind's
            ``compute`` gets it restricted to the statistics it ``needs``.
        spikes: the spike events (``step, layer, kind, value, score, layers``); None: no
            spike log.
        meta: run.json's content (``{}`` when unreadable).
        label: the run's label in the report.
        steps: the logged steps of the whole table (sorted).
        options: ``alpha``, ``n_boot``, ``seed``, ``min_steps`` of the report.
        path, slug: the run directory and the label as a file-name part.
    """

    df: pd.DataFrame
    spikes: pd.DataFrame | None
    meta: dict[str, Any]
    label: str | None = None
    steps: Sequence[int] = ()
    options: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    slug: str = ""

    def only(self, needs: Sequence[str] | None) -> RunData:
        """The same run with the table restricted to the statistics ``needs`` (all: None)."""
        if needs is None:
            return self
        return RunData(self.df[self.df["stat"].isin(needs)], self.spikes, self.meta, self.label,
                       self.steps, self.options, self.path, self.slug)


@dataclass
class FigureSpec:
    """A figure of the report: ``key`` (file name), the section it belongs to (a kind's name,
    or ``overview`` / ``heatmaps``), its caption and how to draw it."""

    key: str
    section: str
    caption: str
    draw: Callable[[], Figure]
    path: Path | None = None
    b64: str = ""


@dataclass
class ReportContext:
    """What a kind's ``plots`` and ``blocks`` may use: every run, their concatenated table,
    the report's tables (``rankings``, ``role_spread``, ``spikes``...), the rankings per
    ``(run, stat)``, the bootstrap replicates and every verdict of the report."""

    runs: list[RunData]
    all_df: pd.DataFrame
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    rankings: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict)
    n_boot: int = 1000
    verdicts: list[Verdict] = field(default_factory=list)


@dataclass(frozen=True)
class SummaryFigures:
    """The numbers of a verdict's summary cells; None where the question has no such number."""

    effect_size: str | None = None  # the effect's name
    effect: float | None = None
    p_value: float | None = None
    fraction_steps: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"effect_size": self.effect_size, "effect": self.effect,
                "p_value": self.p_value, "fraction_steps": self.fraction_steps}


@dataclass(frozen=True)
class Answer:
    """A kind's answer for one run in plain words, with its numbers, and what to do next."""

    text: str
    next_step: str | None = None


@dataclass(frozen=True)
class VerdictKind:
    """One question of the report.

    Attributes:
        name: the ``kind`` of its verdicts (unique).
        title: its section's heading.
        compute: ``RunData -> list[Verdict]`` for one run (the table restricted to ``needs``).
        needs: the statistics it reads (None: the whole table).
        intro: its section's text.
        figures: ``Verdict -> SummaryFigures``: the numbers of the summary cells.
        plots: ``ReportContext -> list[FigureSpec]``: the figures of its section.
        blocks: ``(verdicts, ReportContext) -> list`` of document blocks shown in its section
            before the verdicts (:mod:`gradlens.report.document`).
        answer: ``(verdicts of one run) -> Answer | None``: the plain-words first section.
        order: the report's order of the kinds (ties: the order of registration); the
            built-ins have 10 to 50, a user's kind comes after them by default.
    """

    name: str
    title: str
    compute: Callable[[RunData], list[Verdict]]
    needs: tuple[str, ...] | None = None
    intro: str = ""
    figures: Callable[[Verdict], SummaryFigures] | None = None
    plots: Callable[[ReportContext], list[FigureSpec]] | None = None
    blocks: Callable[[list[Verdict], ReportContext], list[Any]] | None = None
    answer: Callable[[list[Verdict]], Answer | None] | None = None
    order: float = 100.0

    def run(self, data: RunData) -> list[Verdict]:
        """The verdicts of one run, labelled with the run and this kind."""
        out = self.compute(data.only(self.needs))
        for v in out:
            if not isinstance(v, Verdict):
                raise TypeError(f"verdict kind {self.name!r}: compute must return Verdict "
                                f"objects, got {type(v).__name__}")
            v.run, v.kind = data.label, self.name
        return out


_KINDS: dict[str, VerdictKind] = {}


def register_verdict(kind: VerdictKind, *, replace: bool = False) -> VerdictKind:
    """Add ``kind`` to the report's questions (after those registered before it). A name
    already registered is an error unless ``replace``."""
    if not isinstance(kind, VerdictKind):
        raise TypeError(f"register_verdict expects a VerdictKind, got {type(kind).__name__}")
    if not kind.name or not isinstance(kind.name, str):
        raise ValueError(f"a verdict kind needs a non-empty name, got {kind.name!r}")
    if kind.name in _KINDS and not replace:
        raise ValueError(f"verdict kind {kind.name!r} is already registered; pass replace=True "
                         "to replace it")
    _KINDS[kind.name] = kind
    return kind


def unregister_verdict(name: str) -> None:
    """Remove a registered kind (``KeyError`` if there is none of that name)."""
    del _KINDS[name]


def kinds() -> list[VerdictKind]:
    """The registered kinds in report order (the built-ins are registered on importing
    :mod:`gradlens.report.verdicts`)."""
    return sorted(_KINDS.values(), key=lambda k: k.order)  # stable: registration order on ties


def verdict_kind(name: str) -> VerdictKind | None:
    """The registered kind of that name, or None."""
    return _KINDS.get(name)
