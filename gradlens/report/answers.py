"""The report's first section: the few answers in plain words, with their numbers, and what to
do next. Each registered verdict kind words its own answer
(:attr:`gradlens.report.verdicts.registry.VerdictKind.answer`); this module gathers them per
run, in the registry's order."""

from __future__ import annotations

from typing import Any

from gradlens.report.document import Bullets, Heading, Para
from gradlens.report.verdicts import Answer, Verdict, kinds

__all__ = ["answers", "answers_blocks"]

HEADING = "In short"


def answers(verdicts: list[Verdict], run: str | None) -> list[Answer]:
    """The plain-words answers of one run, one per kind that has one."""
    mine = [v for v in verdicts if v.run == run]
    out = []
    for k in kinds():
        if k.answer is None:
            continue
        a = k.answer([v for v in mine if v.kind == k.name])
        if a is not None:
            out.append(a)
    return out


def answers_blocks(verdicts: list[Verdict], runs: list[str | None]) -> list[Any]:
    """The first section: per run, what the verdicts say and what to do next."""
    blocks: list[Any] = [Heading(HEADING)]
    for run in runs:
        found = answers(verdicts, run)
        if len(runs) > 1:
            blocks.append(Para(str(run), bold=True))
        if not found:
            blocks.append(Para("No question could be answered from this run: see why below."))
            continue
        blocks.append(Bullets([a.text for a in found]))
        steps = [a.next_step for a in found if a.next_step]
        if steps:
            blocks += [Para("What to do next:"), Bullets(steps)]
    return blocks
