"""The layout a newcomer can live in: short modules, no import cycles, one stage chain,
a read-only `status` that never loads the Ray graph, docs that name real paths."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "depthray"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _imports(path: Path, name: str) -> set[str]:
    """Every depthray module `path` imports, function-level imports included."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_no_import_cycle_counting_function_level_imports():
    mods = _modules()
    graph = {m: {t for t in _imports(p, m) if t in mods and t != m and not (m.startswith(t + ".") and
                                                                        mods[t].name == "__init__.py")}
             for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(u: str, stack: list[str]) -> list[str] | None:
        state[u] = 1
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if not state.get(v) and (cycle := visit(v, stack + [v])):
                return cycle
        state[u] = 2
        return None

    for m in sorted(graph):
        if not state.get(m):
            assert (cycle := visit(m, [m])) is None, " -> ".join(cycle)


def test_status_never_loads_the_ray_graph():
    code = ("import sys, depthray.status, depthray.cli; "
            "bad = [m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'depthray.job.ray_graph', "
            "'depthray.job.driver'))]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("folder", ["benchmarks", "pipelines"])
def test_benchmarks_and_pipelines_reuse_the_stage_chain(folder):
    """The chain is written once (depthray/job/stages.py): nothing outside the package wires
    io stages by hand."""
    hits = [str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*.py")
            if any(t.startswith("depthray.io") for t in _imports(p, "x." + p.stem))]
    assert not hits, hits


def test_docs_name_only_paths_that_exist():
    docs = list(ROOT.glob("*.md")) + list((ROOT / "docs").glob("*.md"))
    missing = []
    pattern = (r"`([A-Za-z0-9_./-]+\.(?:py|md|yaml|sh|json)|"
               r"(?:depthray|docs|configs|benchmarks|tests)/[A-Za-z0-9_./-]*)`")
    for doc in docs:
        text = doc.read_text()
        for ref in re.findall(pattern, text):
            ref = ref.rstrip("/")
            if "/" not in ref and not ref.endswith(".md"):
                continue  # a bare file name (a checkpoint's model_index.json) is not a repo path
            places = [ROOT / ref, PKG / ref, doc.parent / ref, ROOT / "docs" / ref]
            if not any(p.exists() or p.with_suffix(p.suffix + ".py").exists() for p in places):
                missing.append(f"{doc.name}: {ref}")
        if re.search(r"\bDESIGN\.md\b", text):
            missing.append(f"{doc.name}: DESIGN.md (not in this repository)")
    assert not missing, missing
