"""The commands docs/*.md shows in its code blocks parse their shown arguments: benchmark and
example scripts (run up to their argument parsing), `torchrun` launches and `gradlens`
subcommands. (`[--flag]` marks an optional flag: it is parsed too.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from gradlens.cli import build_parser
from tests.test_readme_commands import _parse_script_args

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[tuple[str, str]]:
    out = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #", 1)[0].strip()
                if line and "-m pytest" not in line:  # the test command: CI's (README test)
                    out.append((page.name, re.sub(r"\[(--[\w-]+)\]", r"\1", line)))
    return out


def test_docs_show_benchmark_and_launch_commands() -> None:
    pages = {page for page, _ in _commands()}
    assert {"benchmarks.md", "distributed.md"} <= pages


@pytest.mark.parametrize(("page", "command"), _commands())
def test_docs_command_parses(page: str, command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = shlex.split(command)
    if argv[0] == "gradlens":
        build_parser().parse_args(argv[1:])
        return
    if argv[0] == "torchrun":
        at = next(i for i, a in enumerate(argv) if a.endswith(".py"))
    elif argv[0] == "python":
        at = 1
    else:
        raise AssertionError(f"{page}: {command!r}: a command this test does not know; teach it")
    assert (ROOT / argv[at]).is_file(), f"{page}: {argv[at]}"
    _parse_script_args(argv[at], argv[at + 1:], monkeypatch)
