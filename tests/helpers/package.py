"""
The import graph of a package, read with ``ast`` (nothing is imported): its modules, the imports
between them and the names each defines, for the import and reference tests.
"""

import ast
import os
from typing import Dict, List, Optional, Set, Tuple


def package_modules(root: str, package: str) -> Dict[str, str]:
    """Every module of ``package`` (a folder under ``root``): dotted name -> file path."""
    modules = {}
    for folder, dirs, files in os.walk(os.path.join(root, package)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(folder, f), root)[: -len(".py")].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            modules[".".join(rel)] = os.path.join(folder, f)
    return modules


def _is_package(path: str) -> bool:
    return os.path.basename(path) == "__init__.py"


def _from_base(module: str, path: str, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from <base> import ...`` written in ``module``."""
    if not node.level:
        return node.module or ""
    package = module if _is_package(path) else module.rpartition(".")[0]
    parts = package.split(".")
    if node.level > 1:
        parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _deepest(name: str, modules) -> Optional[str]:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _function_lines(tree: ast.AST) -> Set[int]:
    """Line numbers of the imports inside a function or method."""
    lines = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    lines.add(node.lineno)
    return lines


def import_edges(modules: Dict[str, str]):
    """
    The intra-package imports: {module: {imported module: [(line, "module level" | "in a
    function")]}}.
    """
    graph = {}
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        local = _function_lines(tree)
        edges = graph.setdefault(module, {})

        def add(target, node):
            if target and target != module:
                where = "in a function" if node.lineno in local else "module level"
                edges.setdefault(target, []).append((node.lineno, where))

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(_deepest(alias.name, modules), node)
            elif isinstance(node, ast.ImportFrom):
                base = _from_base(module, path, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    add(sub if sub in modules else _deepest(base, modules), node)
    return graph


def find_cycles(graph, allowed=()) -> List[List[str]]:
    """
    One circle per strongly connected component of the graph (edges in ``allowed`` left out), each
    as the path ``[a, b, ..., a]``.
    """
    allowed = set(allowed)
    succ = {
        m: sorted(t for t in targets if t in graph and (m, t) not in allowed)
        for m, targets in graph.items()
    }
    # Tarjan's strongly connected components, iteratively
    index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], [0]
    for start in sorted(succ):
        if start in index:
            continue
        work = [(start, iter(succ[start]))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        component.append(m)
                        if m == node:
                            break
                    if len(component) > 1:
                        components.append(set(component))
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(succ[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    cycles = []
    for component in components:  # a shortest way back to the first module, inside the component
        first = min(component)
        paths = {first: [first]}
        frontier = [first]
        cycle = None
        while frontier and cycle is None:
            nxt = []
            for m in frontier:
                for t in succ[m]:
                    if t == first:
                        cycle = paths[m] + [first]
                        break
                    if t in component and t not in paths:
                        paths[t] = paths[m] + [t]
                        nxt.append(t)
                if cycle:
                    break
            frontier = nxt
        cycles.append(cycle)
    return sorted(cycles)


def describe_cycle(cycle, graph) -> str:
    steps = []
    for a, b in zip(cycle, cycle[1:]):
        line, where = graph[a][b][0]
        steps.append(f"  {a} imports {b} (line {line}, {where})")
    return " -> ".join(cycle) + "\n" + "\n".join(steps)


def _defined_names(tree: ast.Module) -> Tuple[Set[str], Set[str]]:
    """(names a module defines at top level, names it binds by importing them)."""
    defined, imported = set(), set()

    def targets(t):
        if isinstance(t, ast.Name):
            defined.add(t.id)
        elif isinstance(t, (ast.Tuple, ast.List)):
            for e in t.elts:
                targets(e)

    def visit(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    targets(t)
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                targets(node.target)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    imported.add(alias.asname or alias.name.split(".")[0])
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For)):  # module-level blocks
                visit(node.body)
                visit(getattr(node, "orelse", []))
                visit(getattr(node, "finalbody", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return defined, imported - defined


def reexport_uses(modules: Dict[str, str]) -> List[str]:
    """
    ``mod.name`` read in one drcl2 module where ``mod`` is another drcl2 module (not a package) that
    imports ``name`` rather than defines it.
    """
    trees = {}
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            trees[module] = ast.parse(f.read(), path)
    names = {m: _defined_names(t) for m, t in trees.items()}
    found = []
    for module, tree in trees.items():
        path = modules[module]
        aliases = {}  # local name -> drcl2 module (plain modules only)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _from_base(module, path, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules and not _is_package(modules[sub]):
                        aliases[alias.asname or alias.name] = sub
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if (
                        alias.asname
                        and alias.name in modules
                        and not _is_package(modules[alias.name])
                    ):
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Load)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
            ):
                target = aliases[node.value.id]
                defined, imported = names[target]
                if node.attr in imported:
                    found.append(
                        f"{module} (line {node.lineno}) reads {node.value.id}.{node.attr}, which "
                        f"{target} imports from elsewhere: import {node.attr} from the module that "
                        "defines it"
                    )
    return found


def _write(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
