"""The README's and docs/*.md's imports work: their code blocks' import lines, their dotted
names, and the calls each API section shows for its module."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
TEXT = "\n".join(p.read_text(encoding="utf-8") for p in PAGES)


def _import_lines() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
    return [line.strip() for b in blocks for line in b.splitlines()
            if re.match(r"\s*(from gradlens[\w.]* import |import gradlens)", line)]


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:k]))
        except ModuleNotFoundError:
            continue
        for attr in parts[k:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


# calls the README shows of other libraries' objects (HF models)
FOREIGN = {"get_input_embeddings", "get_output_embeddings"}


def _section_calls() -> list[tuple[str, str]]:
    """(module, name) for every `name(` call shown in a section headed by `gradlens.module`
    (or by a class, `gradlens.GradLens`: its methods)."""
    out = []
    for m in re.finditer(r"^##+[^\n]*\(`(gradlens(?:\.\w+)*)`[^\n]*\n(.*?)(?=^#|\Z)", TEXT,
                         flags=re.S | re.M):
        module, body = m.group(1), m.group(2)
        out += [(module, name) for name in re.findall(r"`([A-Za-z_]\w*)\(", body)
                if name not in FOREIGN and name != module.rsplit(".", 1)[-1]]
    return sorted(set(out))


def test_the_readme_shows_imports() -> None:
    lines = _import_lines()
    assert "from gradlens import SCALE, GradLens, scale_param_groups" in lines
    assert any(line.startswith("from gradlens.report import build_report, compute_verdicts")
               for line in lines)


@pytest.mark.parametrize("line", _import_lines())
def test_readme_import_line_runs(line: str) -> None:
    exec(compile(line, str(README), "exec"), {})


@pytest.mark.parametrize("dotted", sorted(set(re.findall(r"`(gradlens(?:\.\w+)+)", TEXT))))
def test_readme_dotted_name_resolves(dotted: str) -> None:
    assert _resolve(dotted) is not None


@pytest.mark.parametrize(("module", "name"), _section_calls())
def test_readme_section_call_is_in_its_module(module: str, name: str) -> None:
    assert hasattr(_resolve(module), name), f"{module}.{name}"
