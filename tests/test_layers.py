"""Layers point one way: the import graph of crossrec_dist, read with ``ast`` from the source.

Every ``import``/``from ... import`` in every file counts -- at module top, inside functions, under
``if TYPE_CHECKING:`` -- with relative imports resolved, and ``from pkg import name`` counted as
importing ``pkg.name`` when that is a module (else ``pkg``). Checked:

(a) no import cycles between crossrec_dist modules (a cycle hidden by an import inside a function is
    still a cycle: the two modules cannot be understood, tested or moved apart);
(b) the *light layer* -- what ``crossrec --help``, config loading and checking, the method registry
    and the experiment runner import -- imports no heavy library at module top (measured on the
    2-core CI machine: ``import torch`` 2.6 s, peft 5.9 s, accelerate 2.5 s, deepspeed 2.0 s,
    datasets 1.3 s, matplotlib.pyplot 1.1 s, transformers 0.9 s, onnx 0.7 s). A light module may import
    heavy code inside the functions that need it, and only heavy code (anything else belongs at the
    top), with a comment saying why;
(c) every other module (the *heavy layer*) imports at module top; a function-level import there
    needs an entry in :data:`ALLOWED_IN_FUNCTIONS` with its measured reason;
(d) in a fresh interpreter, importing the light entry points leaves the heavy libraries unloaded, and
    ``python -m crossrec_dist --help`` works.

``python tests/test_layers.py [--rev REV]`` prints the counts (function-level imports by layer,
cycles) of the working tree or of a commit, for before/after comparisons.
"""
from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = "crossrec_dist"

# Heavy libraries, with the seconds they take to import on the 2-core CI machine (wall, cold; torch to
# matplotlib.pyplot), or of CPU here for the rest: never at the top of a light module. A name covers its
# submodules; safetensors.torch imports torch.
HEAVY_LIBS = {"torch": 2.6, "peft": 5.9, "accelerate": 2.5, "deepspeed": 2.0, "datasets": 1.3,
              "matplotlib": 1.1, "transformers": 0.9, "onnxscript": 1.0, "onnx": 0.5, "pandas": 0.3,
              "onnxruntime": 0.2, "pyarrow": 0.1, "safetensors.torch": 2.6}
# Also fine to import lazily in a light module (the report's intervals): numpy (0.1 s).
LAZY_OK_LIBS = set(HEAVY_LIBS) | {"numpy"}


def _is_lib(name: str, libs) -> str | None:
    """The entry of ``libs`` that ``name`` is, or is a submodule of."""
    return next((lib for lib in libs if name == lib or name.startswith(lib + ".")), None)

# The light layer's entry points; the layer is everything they import at module top (transitively).
# Every public module of crossrec_dist.methods is an entry too: the registry imports them all.
LIGHT_ENTRIES = [f"{PKG}", f"{PKG}.__main__", f"{PKG}.cli", f"{PKG}.commands", f"{PKG}.config",
                 f"{PKG}.errors", f"{PKG}.paths", f"{PKG}.jsonfile", f"{PKG}.methods",
                 f"{PKG}.stages.configs", f"{PKG}.models.presets", f"{PKG}.engine.config",
                 f"{PKG}.experiment.recipe", f"{PKG}.experiment.records", f"{PKG}.experiment.runner",
                 f"{PKG}.experiment.layout", f"{PKG}.experiment.report"]

# Function-level imports allowed in the heavy layer: (importing module, imported module or library)
# -> the measured reason. Anything else is imported at module top.
ALLOWED_IN_FUNCTIONS: dict[tuple[str, str], str] = {
    (f"{PKG}.export.onnx", "onnxruntime"): "the optional [onnx] extra, not installed by default",
    (f"{PKG}.export.bench", "onnxruntime"): "the optional [onnx] extra, only with --onnx",
    **{(f"{PKG}.evaluation.command", m): "the model path only: transformers' Llama + peft cost 2.1 s of CPU "
       "that `crossrec evaluate --model popularity` does not need"
       for m in (f"{PKG}.export.loading", f"{PKG}.export.vocab", f"{PKG}.models.sizing")},
}


@dataclass(frozen=True)
class Import:
    module: str          # the importing module
    line: int
    target: str          # a crossrec_dist module, or the dotted name of an outside module
    text: str            # the statement, as written
    in_function: bool
    type_checking: bool  # under ``if TYPE_CHECKING:`` (never executed)

    @property
    def internal(self) -> bool:
        return self.target == PKG or self.target.startswith(PKG + ".")

    def __str__(self) -> str:
        where = "in a function" if self.in_function else "at module top"
        where += ", under TYPE_CHECKING" if self.type_checking else ""
        return f"{self.module}:{self.line}: {self.text}  ({where})"


# ---------------------------------------------------------------------------------------- reading

def sources_in_tree(root: Path = REPO) -> dict[str, tuple[str, str]]:
    """Module name -> (path, source) for every .py file of the package in the working tree."""
    out = {}
    for path in sorted((root / PKG).rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        out[module_name(rel)] = (rel, path.read_text(encoding="utf-8"))
    return out


def sources_at(rev: str, root: Path = REPO) -> dict[str, tuple[str, str]]:
    """The same for a commit (``git show REV:path``)."""
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, PKG], cwd=root, check=True,
                           capture_output=True, text=True).stdout.split()
    return {module_name(rel): (rel, subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=root, check=True,
                                                  capture_output=True, text=True).stdout)
            for rel in names if rel.endswith(".py")}


def module_name(rel: str) -> str:
    parts = rel[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str, path: str, source: str, modules: set[str]) -> list[Import]:
    is_pkg = path.endswith("__init__.py")
    tree = ast.parse(source, filename=path)
    found: list[Import] = []

    def add(node, target, in_function, type_checking):
        imp = Import(module, node.lineno, target, ast.unparse(node), in_function, type_checking)
        if imp not in found:    # ``from .x import a, b``: one import of .x
            found.append(imp)

    def visit(node, in_function: bool, type_checking: bool):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, alias.name, in_function, type_checking)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = module.split(".") if is_pkg else module.split(".")[:-1]
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module
            if base == "__future__":
                return
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(node, sub if sub in modules else base, in_function, type_checking)
        for child in ast.iter_child_nodes(node):
            if isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body:
                visit(child, in_function, True)
            else:
                visit(child, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)),
                      type_checking)

    visit(tree, False, False)
    return found


@dataclass
class Graph:
    sources: dict[str, tuple[str, str]]
    imports: list[Import]

    @classmethod
    def build(cls, sources: dict[str, tuple[str, str]]) -> "Graph":
        modules = set(sources)
        imports = [imp for m, (path, src) in sources.items() for imp in imports_of(m, path, src, modules)]
        return cls(sources, imports)

    def edges(self, *, module_top_only: bool = False) -> dict[str, list[Import]]:
        out: dict[str, list[Import]] = {m: [] for m in self.sources}
        for imp in self.imports:
            if not imp.internal or imp.target == imp.module or imp.target not in self.sources:
                continue
            if module_top_only and (imp.in_function or imp.type_checking):
                continue
            out[imp.module].append(imp)
        return out

    # ------------------------------------------------------------------------------ cycles

    def cycles(self) -> list[list[Import]]:
        """One shortest cycle per strongly connected component of more than one module."""
        edges = self.edges()
        result = []
        for component in _strongly_connected(edges):
            if len(component) < 2:
                continue
            start = min(component)
            result.append(_shortest_cycle(start, edges, component))
        return sorted(result, key=lambda c: c[0].module)

    # ------------------------------------------------------------------------------ layers

    def light(self) -> dict[str, list[str]]:
        """The light layer: module -> the chain of module-top imports it is reached by from an entry."""
        entries = [m for m in LIGHT_ENTRIES if m in self.sources]
        entries += sorted(m for m in self.sources if m.startswith(f"{PKG}.methods.")
                          and not m.rsplit(".", 1)[1].startswith("_") and m != f"{PKG}.methods.base")
        edges = self.edges(module_top_only=True)
        chain: dict[str, list[str]] = {}
        queue = deque()
        for e in entries:
            if e not in chain:
                chain[e] = [e]
                queue.append(e)
        while queue:
            m = queue.popleft()
            # importing a module runs its parent packages' __init__ first
            nexts = [imp.target for imp in edges[m]]
            parts = m.split(".")
            nexts += [".".join(parts[:i]) for i in range(1, len(parts))]
            for n in nexts:
                if n in self.sources and n not in chain:
                    chain[n] = chain[m] + [n]
                    queue.append(n)
        return chain

    def function_level(self) -> list[Import]:
        return [i for i in self.imports if i.in_function]


def _strongly_connected(edges: dict[str, list[Import]]) -> list[set[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []
    counter = [0]

    def strong(v):   # Tarjan's algorithm (recursion depth is bounded by the ~100 modules)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for imp in edges[v]:
            w = imp.target
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            out.append(comp)

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def _shortest_cycle(start: str, edges: dict[str, list[Import]], component: set[str]) -> list[Import]:
    prev: dict[str, Import] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        m = queue.popleft()
        for imp in sorted(edges[m], key=lambda i: (i.target, i.line)):
            if imp.target not in component:
                continue
            if imp.target == start:
                path = [imp]
                while path[0].module != start:
                    path.insert(0, prev[path[0].module])
                return path
            if imp.target not in seen:
                seen.add(imp.target)
                prev[imp.target] = imp
                queue.append(imp.target)
    raise AssertionError(f"no cycle through {start}")


def describe_cycle(cycle: list[Import]) -> str:
    return " -> ".join(i.module for i in cycle) + f" -> {cycle[0].module}\n" + \
        "\n".join(f"      {i}" for i in cycle)


# ----------------------------------------------------------------------------------- violations

def _explained(source: str, imp: Import) -> bool:
    """A light module's function-level import says why: a comment on its line or the line above, or a
    comment or docstring of the module about its imports inside functions."""
    lines = source.splitlines()
    if "#" in lines[imp.line - 1] or (imp.line > 1 and lines[imp.line - 2].lstrip().startswith("#")):
        return True
    return bool(re.search(r"\bimport\w*\b[^\n]*\b(inside|in)\b[^\n]*\bfunctions?\b", source, re.IGNORECASE))


def light_violations(graph: Graph) -> list[str]:
    light = graph.light()
    out = []
    for imp in graph.imports:
        if imp.module not in light or imp.type_checking:
            continue
        heavy_lib = _is_lib(imp.target, HEAVY_LIBS)
        heavy_module = imp.internal and imp.target not in light
        if not imp.in_function:
            if heavy_lib:
                out.append(f"{imp}: a heavy library ({HEAVY_LIBS[heavy_lib]} s) at the top of a light "
                           f"module (light via {' -> '.join(light[imp.module])})")
        elif not (_is_lib(imp.target, LAZY_OK_LIBS) or heavy_module):
            out.append(f"{imp}: only heavy code is imported inside functions; move this to the module top")
        elif not _explained(graph.sources[imp.module][1], imp):
            out.append(f"{imp}: a function-level import without a comment saying why")
    return out


def _allowed(imp: Import, entries=ALLOWED_IN_FUNCTIONS) -> bool:
    return any(imp.module == m and _is_lib(imp.target, [t]) for m, t in entries)


def heavy_violations(graph: Graph) -> list[str]:
    light = graph.light()
    out = []
    for imp in graph.function_level():
        if imp.module not in light and not _allowed(imp):
                out.append(f"{imp}: heavy-layer module, import at module top (or add a measured reason to "
                       f"ALLOWED_IN_FUNCTIONS)")
    return out


def summary(graph: Graph) -> str:
    light = graph.light()
    statements = {(i.module, i.line) for i in graph.imports}
    fl = {(i.module, i.line) for i in graph.function_level()}
    in_light = {s for s in fl if s[0] in light}
    in_heavy = fl - in_light
    bad_heavy = {(i.module, i.line) for i in graph.function_level() if i.module not in light} - \
        {(i.module, i.line) for i in graph.function_level() if _allowed(i)}
    cycles = graph.cycles()
    lines = [f"{len(graph.sources)} modules, {len(statements)} import statements, {len(fl)} of them inside "
             f"functions: {len(in_light)} in the {len(light)} light modules, {len(in_heavy)} in the "
             f"heavy layer ({len(in_heavy) - len(bad_heavy)} allowed with a reason)",
             f"{len(cycles)} import cycles" + (":" if cycles else "")]
    lines += [f"  {' -> '.join(i.module for i in c)} -> {c[0].module}" for c in cycles]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- tests

def _graph() -> Graph:
    return Graph.build(sources_in_tree())


def test_no_import_cycles():
    """No two modules import each other, directly or through others, at any level."""
    cycles = _graph().cycles()
    assert not cycles, "import cycles (counting imports inside functions):\n" + \
        "\n".join(f"  {describe_cycle(c)}" for c in cycles)


def test_light_layer_imports_no_heavy_library_at_top():
    bad = light_violations(_graph())
    assert not bad, f"{len(bad)} light-layer violations:\n" + "\n".join(f"  {b}" for b in bad)


def test_heavy_layer_imports_at_module_top():
    bad = heavy_violations(_graph())
    assert not bad, f"{len(bad)} function-level imports in the heavy layer:\n" + "\n".join(f"  {b}" for b in bad)


def test_allowlist_entries_are_used():
    graph = _graph()
    stale = [entry for entry in ALLOWED_IN_FUNCTIONS
             if not any(_allowed(i, [entry]) for i in graph.function_level())]
    assert not stale, f"ALLOWED_IN_FUNCTIONS entries no longer needed: {stale}"


_LIGHT_PROBE = f"""
import contextlib, io, sys
import {PKG}.cli, {PKG}.methods, {PKG}.stages.configs, {PKG}.experiment.runner, {PKG}.experiment.recipe
heavy = lambda: ",".join(sorted(m for m in {sorted(HEAVY_LIBS)!r} if m in sys.modules))
print("import:", heavy())
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    {PKG}.cli.main(["--help"])
print("help:", heavy())
"""


def test_light_entry_points_load_no_heavy_library():
    """Importing the light entry points, then running ``crossrec --help``, loads no heavy library."""
    done = subprocess.run([sys.executable, "-c", _LIGHT_PROBE], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = {k: v.strip() for k, v in (line.split(":", 1) for line in done.stdout.strip().splitlines())}
    assert loaded == {"import": "", "help": ""}, \
        f"heavy libraries loaded by the light layer: {loaded} (python -X importtime says by whom)"


def test_help_runs():
    done = subprocess.run([sys.executable, "-m", PKG, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "COMMAND" in done.stdout


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default=None, help="a commit (default: the working tree)")
    parser.add_argument("--list", action="store_true", help="also list every violation")
    args = parser.parse_args()
    g = Graph.build(sources_at(args.rev) if args.rev else sources_in_tree())
    print(summary(g))
    if args.list:
        for c in g.cycles():
            print("cycle:", describe_cycle(c))
        for v in light_violations(g) + heavy_violations(g):
            print(v)
