"""The report as one document model, rendered twice: to self-contained HTML (figures as base64
PNG, inline CSS, no script, no external reference) and to Markdown (figures linked).

A document is a title and a list of blocks: :class:`Heading`, :class:`Para`, :class:`Table`,
:class:`Bullets`, :class:`VerdictBlock`, :class:`Details` (a collapsed group of blocks) and
:class:`Figures`. The builder (:mod:`gradlens.report.build`) and the verdict kinds
(:mod:`gradlens.report.verdicts.registry`) produce blocks; nothing else writes HTML or Markdown.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from gradlens.report.verdicts.base import ANSWERS, Verdict
from gradlens.report.verdicts.registry import FigureSpec

__all__ = ["Bullets", "Details", "Figures", "Heading", "Para", "Table", "VerdictBlock",
           "render_html", "render_markdown"]


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    """A paragraph; ``bold`` for a lead-in line, ``cls`` ``"sub"`` (muted) or ``"problem"``."""

    text: str
    bold: bool = False
    cls: str = ""


@dataclass
class Table:
    """A DataFrame as a table; ``badges``: cells holding an answer are drawn as badges."""

    df: pd.DataFrame
    badges: bool = False


@dataclass
class Bullets:
    items: Sequence[str]
    problems: Sequence[str] = ()  # drawn in red in HTML


@dataclass
class VerdictBlock:
    verdict: Verdict


@dataclass
class Details:
    summary: str
    blocks: list[Any] = field(default_factory=list)


@dataclass
class Figures:
    figs: Sequence[FigureSpec]


CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1180px;color:#1c2833;line-height:1.45;padding:0 16px}
h1{margin-bottom:4px}h2{border-bottom:2px solid #d5d8dc;padding-bottom:4px;margin-top:36px}
.sub{color:#566573;margin-top:0}
table.tbl{border-collapse:collapse;font-size:13px;margin:8px 0 16px}
table.tbl th,table.tbl td{border:1px solid #d5d8dc;padding:3px 8px;text-align:left;
vertical-align:top}
table.tbl th{background:#eaf2f8}
.badge{display:inline-block;padding:1px 8px;border-radius:9px;font-size:12px;font-weight:600}
.yes{background:#d4efdf;color:#145a32}.no{background:#d6eaf8;color:#1b4f72}
.maybe{background:#fcf3cf;color:#7d6608}.na{background:#e5e7e9;color:#4d5656}
figure{margin:14px 0 26px}figure img{max-width:100%;border:1px solid #eaecee}
figcaption{font-size:13px;color:#566573}
.verdict{border-left:4px solid #aeb6bf;padding:4px 12px;margin:10px 0;background:#fbfcfc}
.verdict p{margin:4px 0}.nums{font-size:12px;color:#566573;font-family:monospace}
.problem{color:#922b21}
"""


def fmt_cell(x: Any) -> str:
    """A table cell: floats to four significant digits, NaN and None empty."""
    if isinstance(x, float):
        return "" if pd.isna(x) else f"{x:.4g}"
    return "" if x is None else str(x)


def _numbers(v: Verdict) -> str:
    return ", ".join(f"{k}={fmt_cell(x) if isinstance(x, float) else x}"
                     for k, x in v.numbers.items())


# --------------------------------------------------------------------------- HTML

_e = html.escape


def _badge(answer: str) -> str:
    cls = {"yes": "yes", "no": "no", "cannot tell": "maybe"}.get(answer, "na")
    return f'<span class="badge {cls}">{_e(answer)}</span>'


def _html_table(t: Table) -> str:
    def cell(v: Any) -> str:
        text = fmt_cell(v)
        return _badge(text) if t.badges and text in ANSWERS else _e(text)

    head = "".join(f"<th>{_e(str(c))}</th>" for c in t.df.columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>"
                   for row in t.df.itertuples(index=False))
    return f'<table class="tbl"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _html(b: Any) -> str:
    if isinstance(b, Heading):
        return f"<h{b.level}>{_e(b.text)}</h{b.level}>"
    if isinstance(b, Para):
        text = f"<b>{_e(b.text)}</b>" if b.bold else _e(b.text)
        return f'<p class="{b.cls}">{text}</p>' if b.cls else f"<p>{text}</p>"
    if isinstance(b, Table):
        return _html_table(b)
    if isinstance(b, Bullets):
        return ("<ul>" + "".join(f"<li>{_e(x)}</li>" for x in b.items)
                + "".join(f'<li class="problem">{_e(x)}</li>' for x in b.problems) + "</ul>")
    if isinstance(b, VerdictBlock):
        v = b.verdict
        return (f'<div class="verdict"><p><b>{_e(str(v.run))}</b>: {_e(v.question)} '
                f"{_badge(v.answer)}</p><p>{_e(v.reason)}</p>"
                f'<p class="nums">{_e(_numbers(v))}</p></div>')
    if isinstance(b, Details):
        return (f"<details><summary>{_e(b.summary)}</summary>"
                + "".join(_html(x) for x in b.blocks) + "</details>")
    if isinstance(b, Figures):
        return "".join(
            f'<figure><img alt="{_e(f.caption)}" src="data:image/png;base64,{f.b64}">'
            f"<figcaption>{_e(f.caption)}</figcaption></figure>"
            for f in b.figs if f.path is not None)
    raise TypeError(f"not a document block: {type(b).__name__}")


def render_html(title: str, blocks: Sequence[Any]) -> str:
    """The self-contained HTML page."""
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>", *(_html(b) for b in blocks), "</body></html>"])


# --------------------------------------------------------------------------- Markdown


def _md_table(df: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        return fmt_cell(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in df.columns) + " |",
             "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |"
              for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _md(b: Any, out: Path) -> str:
    if isinstance(b, Heading):
        return f"{'#' * b.level} {b.text}\n"
    if isinstance(b, Para):
        return (f"**{b.text}**" if b.bold else b.text) + "\n"
    if isinstance(b, Table):
        return _md_table(b.df) + "\n"
    if isinstance(b, Bullets):
        return "\n".join(f"- {x}" for x in [*b.items, *b.problems]) + "\n"
    if isinstance(b, VerdictBlock):
        v = b.verdict
        return f"- **{v.run}**: {v.question} **{v.answer}**. {v.reason}\n  `{_numbers(v)}`"
    if isinstance(b, Details):
        return f"\n{b.summary}:\n\n" + "\n".join(_md(x, out) for x in b.blocks) + "\n"
    if isinstance(b, Figures):
        return "\n\n".join(f"![{f.caption}]({f.path.relative_to(out).as_posix()})\n\n"
                           f"*{f.caption}*" for f in b.figs if f.path is not None) + "\n"
    raise TypeError(f"not a document block: {type(b).__name__}")


def render_markdown(title: str, blocks: Sequence[Any], out: Path) -> str:
    """The Markdown page; figure links relative to the report directory ``out``."""
    parts = [f"# {title}"]
    for b in blocks:
        text = _md(b, out).strip("\n")
        if not text:  # e.g. a section without figures
            continue
        # consecutive verdicts form one list; every other block is a paragraph of its own
        glue = "\n" if isinstance(b, VerdictBlock) and parts[-1].startswith("- **") else "\n\n"
        parts.append(glue + text)
    return "".join(parts).rstrip("\n") + "\n"
