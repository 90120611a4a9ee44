"""
The import graph of the drcl2 package, read with ``ast`` (nothing is imported):

* no import circle among drcl2's modules. Every import counts, at module level or inside a function:
  an import put inside a function only to break a circle still ties the two modules together, and
  hides it. Lazy imports that are *not* part of a circle (heavy or optional dependencies, the
  command lines' ``import drcl2``) need no entry anywhere: they make no circle. A circle that must
  stay goes on ``ALLOWED_CIRCLE_EDGES`` with its reason, and an entry that no longer closes a circle
  fails the test, so the list cannot rot.
* a module calls (or otherwise reads) another drcl2 module's function or class through that module's
  namespace only where it is defined: ``from . import mod; mod.name(...)`` needs ``name`` defined in
  ``mod`` itself, not imported into it (then it would be a re-export, and the reader looking in
  ``mod`` for ``name`` would not find it). A package's ``__init__`` is its public face and may
  re-export; reaching a name through a package's namespace is not checked.

Edges: ``import drcl2.a.b`` and ``from drcl2.a import b`` (b a module) give an edge to
``drcl2.a.b``; ``from drcl2.a import name`` (name not a module) gives an edge to ``drcl2.a``. Parent
packages that Python runs first (``drcl2/__init__.py`` before ``drcl2.a``) are not edges: every
package has them.
"""

from typing import Dict, Tuple

import pytest
from helpers import REPO_ROOT
from helpers.package import (
    _write,
    describe_cycle,
    find_cycles,
    import_edges,
    package_modules,
    reexport_uses,
)

# (importer, imported): an import that may close a circle, with the reason. Empty: drcl2 has none.
ALLOWED_CIRCLE_EDGES: Dict[Tuple[str, str], str] = {}


@pytest.fixture(scope="module")
def drcl2_modules():
    modules = package_modules(REPO_ROOT, "drcl2")
    assert "drcl2.modeling.meta_arch" in modules and "drcl2.data.generated.toy_lvis" in modules
    return modules


def test_drcl2_has_no_import_circle(drcl2_modules):
    graph = import_edges(drcl2_modules)
    cycles = find_cycles(graph, ALLOWED_CIRCLE_EDGES)
    assert not cycles, "import circles among drcl2's modules:\n" + "\n".join(
        describe_cycle(c, graph) for c in cycles
    )


def test_every_allowed_circle_edge_still_closes_a_circle(drcl2_modules):
    graph = import_edges(drcl2_modules)
    for edge, reason in ALLOWED_CIRCLE_EDGES.items():
        a, b = edge
        assert b in graph.get(a, {}), (
            f"ALLOWED_CIRCLE_EDGES: {a} no longer imports {b}; remove the entry"
        )
        others = {e: r for e, r in ALLOWED_CIRCLE_EDGES.items() if e != edge}
        assert find_cycles(graph, others), (
            f"ALLOWED_CIRCLE_EDGES: {edge} closes no circle; remove it"
        )


def test_no_module_reaches_a_name_through_a_module_that_only_imports_it(drcl2_modules):
    found = reexport_uses(drcl2_modules)
    assert not found, "\n".join(found)


def test_data_path_does_not_import_the_generators_except_to_register_them(drcl2_modules):
    """drcl2.data's data path stays free of the generators; only the registrations reach them."""
    graph = import_edges(drcl2_modules)
    for module, targets in graph.items():
        if module.startswith("drcl2.data.") and not module.startswith("drcl2.data.generated"):
            generated = sorted(t for t in targets if t.startswith("drcl2.data.generated"))
            if module != "drcl2.data.datasets":
                assert not generated, (
                    f"{module} imports {generated}: the data path needs no generator"
                )


def test_the_checker_finds_a_circle_and_a_reexport(tmp_path):
    """The checks above can fail: a synthetic package with a circle (one side inside a function)."""
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from . import a\n",
            "pkg/a.py": "from .b import helper\n\ndef f():\n    return helper()\n",
            "pkg/b.py": (
                "def helper():\n    from . import a  # lazy, to break the circle\n    return a\n"
            ),
            "pkg/c.py": "from .losses import loss\n",
            "pkg/losses.py": "def loss():\n    return 0\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/d.py": (
                "from .. import c, losses\n\ndef g():\n    return c.loss() + losses.loss()\n"
            ),
            "pkg/sub/e.py": (
                "import pkg.sub.d as D\nfrom ..losses import loss\n\n"
                "def h():\n    return D.g() + loss()\n"
            ),
        },
    )
    modules = package_modules(str(tmp_path), "pkg")
    assert set(modules) == {
        "pkg",
        "pkg.a",
        "pkg.b",
        "pkg.c",
        "pkg.losses",
        "pkg.sub",
        "pkg.sub.d",
        "pkg.sub.e",
    }
    graph = import_edges(modules)
    assert graph["pkg.sub.d"] == {
        "pkg.c": [(1, "module level")],
        "pkg.losses": [(1, "module level")],
    }
    assert set(graph["pkg.sub.e"]) == {"pkg.sub.d", "pkg.losses"}
    assert graph["pkg.b"] == {"pkg.a": [(2, "in a function")]}
    cycles = find_cycles(graph)
    assert cycles == [["pkg.a", "pkg.b", "pkg.a"]]
    assert "pkg.b imports pkg.a (line 2, in a function)" in describe_cycle(cycles[0], graph)
    assert find_cycles(graph, {("pkg.b", "pkg.a"): "allowed"}) == []
    # c.loss is c's import of losses.loss: flagged; losses.loss and D.g are defined where they are
    # read
    found = reexport_uses(modules)
    assert len(found) == 1 and found[0].startswith(
        "pkg.sub.d (line 4) reads c.loss, which pkg.c imports"
    )
