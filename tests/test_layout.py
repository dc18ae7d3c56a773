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


def test_no_private_ray_modules_in_the_package():
    """Ray's `_private` modules change without notice between releases: the package uses
    public API only (the pool watch's registry, `ray.nodes()`; checks.py counts CPUs itself)."""
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in PKG.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"\bray\._private\b|from ray import _private|\bray\.(_raylet|experimental)\b", line)]
    assert not hits, hits


@pytest.mark.parametrize("module", ["depthray/job/ray_graph.py", "depthray/job/pool_watch.py"])
def test_the_ray_graph_and_pool_watch_name_no_stage(module):
    """The executor applies each stage's hints and the pool reports itself: neither knows a
    stage (or its class) by name, so a new stage touches stages.py only."""
    from depthray.job.stages import STAGE_NAMES, job_stages
    from tests.golden_job import job_config

    functions = {s.fn.__name__ for s in job_stages(job_config("in/x.tar", "out"))}  # DepthPredictor, ...
    tree = ast.parse((ROOT / module).read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    strings = [n.value for n in ast.walk(tree)
               if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]
    # a stage name as a value (`st.name == "infer"`, a dict keyed by it); a stage's function
    # or class anywhere in a string (a lookup by class name)
    named = [s for s in strings if s in STAGE_NAMES or any(f in s for f in functions)]
    assert not named, named
    idents = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not idents & functions, idents & functions
