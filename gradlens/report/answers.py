"""The report's first section: the few answers in plain words, with their numbers, and what to
do next. Each registered verdict kind words its own answer
(:attr:`gradlens.report.verdicts.registry.VerdictKind.answer`); this module gathers them per
run, in the registry's order."""

from __future__ import annotations

from typing import Any

from gradlens.report.document import Bullets, Heading, Para
from gradlens.report.verdicts import Answer, Verdict, kinds

__all__ = ["answers", "answers_blocks", "with_answers"]

HEADING = "In short"


def answers(verdicts: list[Verdict], run: str | None) -> dict[str, Answer]:
    """The plain-words answers of one run: ``{kind: answer}`` for each kind that has one, in
    report order."""
    mine = [v for v in verdicts if v.run == run]
    out = {}
    for k in kinds():
        if k.answer is None:
            continue
        a = k.answer([v for v in mine if v.kind == k.name])
        if a is not None:
            out[k.name] = a
    return out


def with_answers(rows: list[dict[str, Any]], verdicts: list[Verdict]) -> list[dict[str, Any]]:
    """``verdicts.json``'s rows (one per verdict, in order) with the plain-words answer of each
    (run, kind) on the first row of that kind: ``"plain": {"text", "next_step"}`` (the
    dashboard's Verdicts view shows them as the report's first section does)."""
    done: set[tuple[str | None, str]] = set()
    by_run = {run: answers(verdicts, run) for run in dict.fromkeys(v.run for v in verdicts)}
    for row, v in zip(rows, verdicts, strict=True):
        a = by_run[v.run].get(v.kind)
        if a is not None and (v.run, v.kind) not in done:
            done.add((v.run, v.kind))
            row["plain"] = {"text": a.text, "next_step": a.next_step}
    return rows


def answers_blocks(verdicts: list[Verdict], runs: list[str | None]) -> list[Any]:
    """The first section: per run, what the verdicts say and what to do next."""
    blocks: list[Any] = [Heading(HEADING)]
    for run in runs:
        found = list(answers(verdicts, run).values())
        if len(runs) > 1:
            blocks.append(Para(str(run), bold=True))
        if not found:
            blocks.append(Para("No question could be answered from this run: see why below."))
            continue
        blocks.append(Bullets([a.text for a in found]))
        steps = [a.next_step for a in found if a.next_step]
        if steps:
            blocks += [Para("What to do next:", bold=True), Bullets(steps)]
    return blocks
