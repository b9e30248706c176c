"""The package's runtime imports run one way and make no cycle.

Layers (lower first): ``_args`` (argument checks), ``_version``, ``dtensor`` (sharded tensors),
``catalog`` (the statistics' declarations), ``schema``, then ``table_parts`` and
``table_summary`` (the run files' names and the range files' summaries), ``kinds`` (the layer-name vocabulary) and ``sink_api`` (the sink interface and its
records), ``roles`` < ``stats`` < ``families`` < ``actuators`` < ``core`` < ``sinks`` (which hand the collector
its default sinks) < ``integrations`` (which create lenses with them); ``optim`` stands alone
(an optimizer never imports the collector); the file readers (``report``, ``advise``, the
TensorBoard plugin ``tensorboard.plugin``) read what the sinks wrote and import only the
schema, roles, pure statistics and each other. Every ``import`` statement counts (those inside
functions too: they run when called), except under ``if TYPE_CHECKING:``. An import of
``gradlens.a.b`` is an edge to module ``gradlens.a.b``.

``KNOWN`` lists the violations that stand today in modules under reconstruction; an entry that
no longer holds fails the test, so remove it with the fix.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).parents[1] / "gradlens"
RANK = {"_args": 0, "_version": 0, "dtensor": 0, "catalog": 0, "schema": 0.25,
        "table_parts": 0.5, "table_summary": 0.5, "kinds": 0.5, "sink_api": 0.5, "atomic_files": 0, "roles": 0,
        "stats": 1, "families": 2, "actuators": 2.5, "core": 3, "sinks": 4, "integrations": 5}
READERS = {"report", "advise", "tb_plugin"}
READS = {"_args", "dtensor", "atomic_files", "catalog", "schema", "table_parts",
         "table_summary", "kinds", "roles", "stats"} | READERS
OPTIM_READS = {"optim", "dtensor", "roles", "schema"}

# (importer, imported) module edges that break the layering today, in modules being rebuilt
KNOWN: set[tuple[str, str]] = set()
KNOWN_CYCLES: list[set[str]] = []


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """``{module: modules it imports}`` within gradlens."""
    mods = _modules()

    def resolve(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    edges: dict[str, set[str]] = defaultdict(set)
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                edges[mod] |= {resolve(a.name) for a in node.names
                               if a.name.split(".")[0] == "gradlens"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                if base.split(".")[0] != "gradlens":
                    continue
                for a in node.names:  # ``from pkg import module`` imports the module
                    full = f"{base}.{a.name}"
                    edges[mod].add(full if full in mods else resolve(base))
        edges[mod].discard(mod)
    return edges


# The TensorBoard package holds a sink, the plugin (a file reader) and the launcher (an
# application): each of its parts ranks as what it is.
TENSORBOARD = {"plugin": "tb_plugin", "launcher": "launcher"}


def _area(mod: str) -> str:
    parts = mod.split(".")
    if parts[1:2] == ["tensorboard"]:
        return TENSORBOARD.get(parts[2], "sinks") if len(parts) > 2 else "sinks"
    return parts[1] if len(parts) > 1 else "gradlens"


def _allowed(pa: str, pb: str) -> bool:
    """May a module of area ``pa`` import one of area ``pb``?"""
    if pa == pb:
        return True
    if pa in RANK:
        return pb == "optim" or (pb in RANK and RANK[pb] < RANK[pa])
    if pa in READERS:
        return pb in READS
    if pa == "optim":
        return pb in OPTIM_READS
    return True  # the applications: cli, demo, experiment, compare, launcher, data


def violations(edges: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(a, b) for a, targets in edges.items() for b in targets
            if not _allowed(_area(a), _area(b))}


def cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    edges = import_graph()
    assert "gradlens.core.lens" in edges["gradlens"]
    assert "gradlens.report.verdict_base" in edges["gradlens.report.verdicts.critical_batch"]
    assert "gradlens.stats.shards" in edges["gradlens.families.twobatch"]
    assert "gradlens.catalog" in edges["gradlens.schema"]


def test_imports_follow_the_layers():
    bad = violations(import_graph())
    new = sorted(bad - KNOWN)
    assert not new, f"imports against the layering: {new}"
    stale = sorted(KNOWN - bad)
    assert not stale, f"fixed, remove from KNOWN: {stale}"


def test_no_import_cycle():
    found = cycles(import_graph())
    new = [sorted(c) for c in found if c not in KNOWN_CYCLES]
    assert not new, f"import cycles: {new}"
    stale = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert not stale, f"fixed, remove from KNOWN_CYCLES: {stale}"


def area_graph(edges: dict[str, set[str]], areas: set[str]) -> dict[str, set[str]]:
    """``{area: areas it imports}`` among ``areas`` (a module importing its own area is no edge)."""
    out: dict[str, set[str]] = defaultdict(set)
    for a, targets in edges.items():
        for b in targets:
            if _area(a) in areas and _area(b) in areas and _area(a) != _area(b):
                out[_area(a)].add(_area(b))
    return out


def test_the_file_readers_make_no_cycle():
    """``advise`` and ``tb_plugin`` read through ``report``; the report imports neither (the
    momentum advice lives in ``report.advice``, ``gradlens.advise`` is its public name)."""
    graph = area_graph(import_graph(), READERS)
    assert graph["advise"] == {"report"} and "report" in graph["tb_plugin"]
    assert cycles(graph) == [], dict(graph)
    assert cycles(area_graph({"gradlens.report.build": {"gradlens.advise"},
                              "gradlens.advise": {"gradlens.report.load"}}, READERS)) == [
        {"report", "advise"}]  # the check sees the cycle this test guards against


def test_the_checks_can_fail():
    edges = {"gradlens.stats.a": {"gradlens.core.b"}, "gradlens.core.b": {"gradlens.stats.a"},
             "gradlens.report.x": {"gradlens.sinks.y"}, "gradlens.optim.z": {"gradlens.core.b"}}
    assert violations(edges) == {("gradlens.stats.a", "gradlens.core.b"),
                                 ("gradlens.report.x", "gradlens.sinks.y"),
                                 ("gradlens.optim.z", "gradlens.core.b")}
    assert cycles(edges) == [{"gradlens.stats.a", "gradlens.core.b"}]


def test_importing_the_report_does_not_import_the_collector():
    code = ("import sys, gradlens.report\n"
            "sys.exit(1 if 'gradlens.core.lens' in sys.modules else 0)\n")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_the_public_names_load_on_first_use_with_the_default_sinks():
    code = (
        "import sys, gradlens\n"
        "assert 'gradlens.core.lens' not in sys.modules and 'gradlens.sinks' not in sys.modules\n"
        "assert set(gradlens.__all__) <= set(dir(gradlens))\n"
        "from gradlens import GradLens\n"
        "from gradlens.core.lens import GradLens as Core\n"
        "assert GradLens is Core and 'gradlens.sinks' in sys.modules\n"
        "import torch\n"
        "lens = GradLens(torch.nn.Linear(2, 2), preset='minimal', output='')\n"
        "assert lens.memory is not None and lens.sinks == [lens.memory]\n"
        "lens.close()\n"
        "try:\n"
        "    gradlens.NoSuchName\n"
        "except AttributeError as err:\n"
        "    assert 'NoSuchName' in str(err)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], timeout=120, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_the_collector_alone_says_how_to_get_its_default_sinks(tmp_path):
    code = ("import torch\n"
            "from gradlens.core.lens import GradLens\n"
            f"GradLens(torch.nn.Linear(2, 2), logdir={str(tmp_path)!r}, preset='minimal')\n")
    run = subprocess.run([sys.executable, "-c", code], timeout=120, capture_output=True,
                         text=True)
    assert run.returncode != 0
    assert "no default sinks are installed" in run.stderr, run.stderr[-2000:]


def test_each_reader_module_imports_first():
    """Every module of the file readers imports as the first gradlens module of a process: an
    import cycle between modules (not packages) shows only in some import orders."""
    mods = sorted(m for m in _modules() if _area(m) in READERS)
    assert "gradlens.report.ranking" in mods and "gradlens.tensorboard.plugin.data" in mods
    code = (
        "import importlib, sys\n"
        f"bad = []\nfor m in {mods!r}:\n"
        "    for k in [k for k in sys.modules if k == 'gradlens' or k.startswith('gradlens.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n        importlib.import_module(m)\n"
        "    except ImportError as e:\n        bad.append(f'{m}: {e}')\n"
        "print('\\n'.join(bad))\nsys.exit(1 if bad else 0)\n")
    run = subprocess.run([sys.executable, "-c", code], timeout=300, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout + run.stderr
