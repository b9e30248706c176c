"""Every command the README shows works as written after setup: each `gradlens <subcommand>`
parses its shown arguments and answers `--help`, each example script parses its shown
arguments and answers `--help`, the setup and test commands are the ones CI runs, and the
Python Quick start, run as it stands in a fresh directory, writes finite `noise_scale` rows."""

from __future__ import annotations

import argparse
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradlens.cli import build_parser
from gradlens.report import load_run

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "README.md").read_text(encoding="utf-8")
CI = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
VENV = ".venv/bin/"


def _shell_commands() -> list[str]:
    """The command lines of the README's bash blocks (continuations joined, comments cut) and
    its inline `.venv/bin/...` commands."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", TEXT, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    out += [c for c in re.findall(r"`(\.venv/bin/[^`]+)`", TEXT) if c not in out]
    return out


COMMANDS = _shell_commands()


def _quick_start() -> str:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", TEXT, flags=re.S) if "GradLens(" in b]
    assert len(blocks) == 1, "the README shows one Python Quick start using GradLens"
    return blocks[0]


class _Parsed(Exception):
    """Raised right after a script's argparse succeeded: the shown arguments are valid."""


def _parse_script_args(script: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run `script` as __main__ with `args` up to its argument parsing, then stop."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **kw):  # type: ignore[no-untyped-def]
        original(self, *a, **kw)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(_Parsed):
        runpy.run_path(str(ROOT / script), run_name="__main__")


def _help_exits_zero(run: object) -> None:
    with pytest.raises(SystemExit) as exit_:
        run()  # type: ignore[operator]
    assert exit_.value.code == 0


def test_the_readme_shows_the_commands_a_user_needs() -> None:
    heads = {" ".join(shlex.split(c)[:2]) for c in COMMANDS}
    for need in ("bash scripts/setup.sh", ".venv/bin/gradlens demo",
                 ".venv/bin/gradlens dashboard", ".venv/bin/gradlens report"):
        assert need in heads, need


def test_setup_and_test_commands_are_the_ones_ci_runs() -> None:
    assert "bash scripts/setup.sh" in COMMANDS and (ROOT / "scripts" / "setup.sh").is_file()
    test_command = "HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q"
    assert test_command in COMMANDS
    ci_lines = [line.strip() for line in CI.splitlines()]
    assert "bash scripts/setup.sh" in ci_lines and test_command in ci_lines


@pytest.mark.parametrize("command", [c for c in COMMANDS if "scripts/setup.sh" not in c
                                     and "-m pytest" not in c])
def test_readme_command_parses_and_answers_help(command: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    argv = shlex.split(command)
    tool = argv[0]
    assert tool.startswith(VENV), f"{command!r}: run through {VENV} so that it works after setup"
    tool = tool[len(VENV):]
    if tool == "gradlens":
        build_parser().parse_args(argv[1:])  # the shown arguments are valid
        _help_exits_zero(lambda: build_parser().parse_args([argv[1], "--help"]))
        return
    if tool == "torchrun":
        assert (Path(sys.executable).parent / "torchrun").exists(), "torchrun beside python"
        script_at = next(i for i, a in enumerate(argv) if a.endswith(".py"))
    elif tool == "python":
        script_at = 1
    else:
        raise AssertionError(f"{command!r}: a command this test does not know; teach it")
    script, args = argv[script_at], argv[script_at + 1:]
    if script == "quickstart.py":  # the Quick start itself: run by the test below
        return
    assert (ROOT / script).is_file(), script
    _parse_script_args(script, args, monkeypatch)
    monkeypatch.undo()  # argparse as it is
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    _help_exits_zero(lambda: runpy.run_path(str(ROOT / script), run_name="__main__"))


def test_quick_start_writes_noise_scale_rows(tmp_path: Path) -> None:
    (tmp_path / "quickstart.py").write_text(_quick_start(), encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "quickstart.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = load_run(tmp_path / "runs" / "exp1", stats=["noise_scale"])
    finite = rows[np.isfinite(rows["value"])]
    # 2 micro-batches per step: every logged step has a two-batch noise scale, lm_head's too
    assert finite["step"].nunique() >= 15
    assert "lm_head.weight" in set(finite["layer"])
    assert (finite["value"] > 0).mean() > 0.5
    assert "lm_head.weight" in done.stdout
