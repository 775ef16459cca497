"""The package's import structure: no import circle anywhere in ``qcompile`` (imports read from the
source, function-level ones included, as grimp reads them for import-linter), and the layer
contract in pyproject.toml holds (``lint-imports``, which ``make test`` also runs first)."""
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def import_circles(package: str = "qcompile") -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), smallest module name first."""
    graph = grimp.build_graph(package)
    edges = {m: {i for i in graph.find_modules_directly_imported_by(m) if i != m} for m in graph.modules}
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def test_no_import_circle():
    assert import_circles() == []


def test_circle_finder_finds_a_circle(tmp_path, monkeypatch):
    """The negative case: a package whose two modules import each other is reported."""
    pkg = tmp_path / "circ"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from . import a  # a function-level import counts\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_circles("circ") == [["circ.a", "circ.b"]]


@pytest.mark.skipif(shutil.which("lint-imports", path=str(Path(sys.executable).parent)) is None,
                    reason="import-linter is not installed (pip install 'qcompile[dev]')")
def test_layer_contract_holds():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    done = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:]
