"""
Every reference in the repository's code, configs and docs leads to something in the repository, so
that a reader of a fresh clone can follow it:

* paths (``configs/...``, ``docs/...``, ``drcl2/...``, ``datasets/...``, ``tests/...``, the
  top-level files, ``../...`` relative to the file, any ``NAME.md``) name an existing file or
  folder; ``*``, ``<placeholder>``, ``$VAR`` and ``{a,b}`` are patterns that must match at least
  one;
* markdown links ``[text](target#anchor)`` resolve from the page, anchors to one of its headings;
* a section named after a page (``docs/method.md, "DRB"``, ``datasets/README.md, section 'COCO'``,
  ``README, "Long runs"``) is one of that page's headings or bold paragraph labels;
* dotted names under drcl2's packages (``drcl2.data.generated.toy_lvis``,
  ``drcl2.modeling.DRCL2_HEAD_REGISTRY``) name a module, or a name a module defines or imports.

What is created at run time (outputs, the virtual environment, device reports) and names that only
look like paths are on ``ALLOWED``, each with its reason; an entry that matches nothing fails the
test, so the list cannot rot.
"""

import ast
import fnmatch
import os
import re
from typing import Dict, List, Set, Tuple

from helpers import REPO_ROOT
from helpers.package import _defined_names, package_modules

REPO = REPO_ROOT

SCANNED = [  # code, configs and docs (this file is the checker: its patterns are not references)
    "drcl2/**/*.py",
    "tests/**/*.py",
    "datasets/*.py",
    "train_net.py",
    "setup.py",
    "Makefile",
    ".ci/*",
    "configs/**/*.yaml",
    "README.md",
    "datasets/README.md",
    "docs/**/*.md",
]
# Not in a fresh clone: git-ignored, or made at run time.
SKIPPED_DIRS = {".git", ".venv", "output", ".whl", "__pycache__", ".pytest_cache"}

# regular expression on the reference as written -> why it need not exist in the repository
ALLOWED: Dict[str, str] = {
    r"output/": "run outputs (OUTPUT_DIR, studies' runs), made at run time and git-ignored",
    r"\.venv/": "the virtual environment `make install` creates",
    r"docs/device/": (
        "the device check's reports, written on the GPU day (drcl2/tools/device_check.py)"
    ),
    r"drcl2/(momentum|lcl_skipped|views)$": "event-storage scalar and image names, not paths",
    r"configs/toy/no_such\.yaml$": "a test's deliberately missing config",
}

_TOP = r"(?:configs|docs|drcl2|datasets|tests|output|\.ci|\.venv)"
_PART = r"(?:[\w.*<>$()/-]|\{[^}\s]*\})"  # path characters, placeholders, {a,b} alternatives
PATH_RE = re.compile(
    rf"(?<![\w./$-])(?:(?:\.\./)+[\w.<>-]{_PART}*|{_TOP}/{_PART}*|[A-Z][A-Z_]*\.md\b|Makefile\b"
    rf"|train_net\.py\b|setup\.py\b)"
)
LINK_RE = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SECTION_RE = re.compile(
    r"(?<![\w/.-])((?:datasets/|docs/)?(?:README(?:\.md)?|method\.md|[A-Z][A-Z_]+\.md))`?,? "
    r"(?:sections?\(?s?\)? )?"
    r"[\"'“]([^\"'”{]+)[\"'”]"
)
DOTTED_RE = re.compile(r"(?<![\w./-])drcl2(?:\.\w+)+[<*{]?")


def scanned_files() -> List[str]:
    import glob

    files = set()
    for pattern in SCANNED:
        files.update(
            os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, pattern), recursive=True)
        )
    files.discard(os.path.join("tests", "test_references.py"))
    return sorted(f for f in files if os.path.isfile(os.path.join(REPO, f)))


def repository_paths() -> Set[str]:
    """Every file and folder of a fresh clone (relative, '/'-separated), folders also with a '/'."""
    paths = set()
    for folder, dirs, files in os.walk(REPO):
        rel = os.path.relpath(folder, REPO).replace(os.sep, "/")
        rel = "" if rel == "." else rel + "/"
        dirs[:] = [
            d
            for d in dirs
            if d not in SKIPPED_DIRS and not d.endswith(".egg-info") and not (rel == "datasets/")
        ]  # datasets/<set>/: downloaded or generated
        for d in dirs:
            paths.update({rel + d, rel + d + "/"})
        paths.update(rel + f for f in files)
    return paths


def _alternatives(text: str) -> List[str]:
    """``a{b,c}d`` -> ``abd``, ``acd`` (nested braces are not used)."""
    m = re.search(r"\{([^{}]*,[^{}]*)\}", text)
    if not m:
        return [text]
    return [
        alt
        for option in m.group(1).split(",")
        for alt in _alternatives(text[: m.start()] + option + text[m.end() :])
    ]


def _as_glob(path: str) -> str:
    """Placeholders as ``*``: ``<name>``, ``$VAR``, ``$(VAR)``, ``${VAR}``, an f-string's
    ``{arch}``."""
    return re.sub(r"<[^>]*>|\$\(\w+\)|\$?\{[^{},]*\}|\$\w+", "*", path)


def path_exists(ref: str, source: str, paths: Set[str]) -> bool:
    """``ref`` (as written in ``source``) names something in the repository, from its root or from
    ``source``'s folder; every alternative of a ``{a,b}`` must."""
    here = os.path.dirname(source)
    for alt in _alternatives(ref):
        pattern = _as_glob(alt)
        found = False
        for base in ("", here):
            full = os.path.normpath(os.path.join(base, pattern)).replace(os.sep, "/")
            if pattern.endswith("/"):
                full += "/"
            if full in paths or ("*" in full and any(fnmatch.fnmatchcase(p, full) for p in paths)):
                found = True
                break
        if not found:
            return False
    return True


def _clean(ref: str) -> str:
    ref = ref.rstrip(".,:;'\"`")
    if ref.count(")") > ref.count("("):
        ref = ref.rstrip(")")
    return ref


def path_references():
    """(file, line number, reference) for every path-like reference of the scanned files."""
    for source in scanned_files():
        with open(os.path.join(REPO, source), encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                for m in PATH_RE.finditer(line):
                    yield source, i, _clean(m.group(0))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", heading.strip().lower()))


def headings(path: str) -> List[str]:
    out, fenced = [], False
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        for line in f:
            if line.startswith("```"):
                fenced = not fenced
            elif not fenced and re.match(r"#{1,6} ", line):
                out.append(line.lstrip("#").strip())
    return out


def section_labels(path: str) -> List[str]:
    """A page's headings and bold paragraph labels (``**DRB**``), lower case."""
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        bold = re.findall(r"\*\*([^*]+)\*\*", f.read())
    return [h.lower() for h in headings(path)] + [b.strip(" .:").lower() for b in bold]


def test_every_path_reference_exists():
    paths = repository_paths()
    assert "drcl2/data/generated/toy_lvis.py" in paths and "configs/" in paths
    allowed = {pattern: re.compile(pattern) for pattern in ALLOWED}
    missing, used = [], set()
    for source, line, ref in path_references():
        if path_exists(ref, source, paths):
            continue
        hits = [p for p, rx in allowed.items() if rx.match(ref)]
        used.update(hits)
        if not hits:
            missing.append(f"{source}:{line}: {ref}")
    assert not missing, "references to nothing in the repository:\n" + "\n".join(missing)
    unused = sorted(set(ALLOWED) - used)
    assert not unused, f"ALLOWED entries that no reference needs any more (remove them): {unused}"


def test_markdown_links_and_anchors_resolve():
    paths = repository_paths()
    broken = []
    for source in scanned_files():
        if not source.endswith(".md"):
            continue
        with open(os.path.join(REPO, source), encoding="utf-8") as f:
            text = f.read()
        for m in LINK_RE.finditer(text):
            target = m.group(1)
            if re.match(r"[a-z][a-z+.-]*:", target):  # https:, mailto:
                continue
            page, _, anchor = target.partition("#")
            line = text[: m.start()].count("\n") + 1
            if page and not path_exists(page, source, paths):
                broken.append(f"{source}:{line}: {target}")
                continue
            page_path = (
                os.path.normpath(os.path.join(os.path.dirname(source), page)) if page else source
            )
            if (
                anchor
                and page_path.endswith(".md")
                and anchor not in {_slug(h) for h in headings(page_path)}
            ):
                broken.append(f"{source}:{line}: {target} (no such heading)")
    assert not broken, "broken markdown links:\n" + "\n".join(broken)


def test_named_sections_exist():
    pages = {
        "README": "README.md",
        "README.md": "README.md",
        "datasets/README.md": "datasets/README.md",
        "method.md": "docs/method.md",
        "docs/method.md": "docs/method.md",
        "docs/README.md": None,
        "datasets/README": "datasets/README.md",
    }
    for doc in os.listdir(os.path.join(REPO, "docs")):  # docs/GETTING_STARTED.md, ...
        if re.fullmatch(r"[A-Z][A-Z_]+\.md", doc):
            pages[doc] = pages[f"docs/{doc}"] = f"docs/{doc}"
    labels = {page: section_labels(page) for page in set(pages.values()) if page}
    missing, seen = [], 0
    for source in scanned_files():
        with open(os.path.join(REPO, source), encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                for m in SECTION_RE.finditer(line):
                    page = pages.get(m.group(1))
                    assert page, f"{source}:{i}: {m.group(1)} is no page of the repository"
                    name = m.group(2).strip().lower()
                    seen += 1
                    if not any(label.startswith(name) or name in label for label in labels[page]):
                        missing.append(f'{source}:{i}: {page}, "{m.group(2)}"')
    assert seen > 10  # the pattern still finds the references
    assert not missing, "sections that the page does not have:\n" + "\n".join(missing)


def test_dataset_hints_name_sections_of_datasets_readme():
    """check_dataset_files' hint names a datasets/README.md section: each must exist."""
    with open(os.path.join(REPO, "drcl2", "data", "datasets.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    fn = next(
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_readme_section"
    )
    sections = [
        n.value.value
        for n in ast.walk(fn)
        if isinstance(n, ast.Return) and isinstance(n.value, ast.Constant)
    ]
    assert len(sections) >= 7
    titles = headings("datasets/README.md")
    for s in sections:
        assert any(t.startswith(s) for t in titles), f"datasets/README.md has no section '{s}'"


def module_names(modules: Dict[str, str]) -> Dict[str, Set[str]]:
    """Per module: the names it defines or imports, and its direct submodules."""
    names = {}
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            defined, imported = _defined_names(ast.parse(f.read()))
        names[module] = (
            defined
            | imported
            | {n.rpartition(".")[2] for n in modules if n.rpartition(".")[0] == module}
        )
    return names


def dotted_name_resolves(ref: str, names: Dict[str, Set[str]]) -> bool:
    """
    ``drcl2.a.b.name`` (a module, then at most the first attribute checked) names something;
    ``drcl2.tools.bench_<`` (a pattern) must be the start of a module's name. Labels that merely
    start with ``drcl2.`` (the profiler's "drcl2.ema") and dunders are not references.
    """
    parts = ref.rstrip("<*{").split(".")
    if f"drcl2.{parts[1]}" not in names or parts[-1].startswith("__"):
        return True
    if ref[-1] in "<*{":
        return any(n.startswith(".".join(parts)) for n in names)
    k = len(parts)
    while ".".join(parts[:k]) not in names:
        k -= 1
    return k == len(parts) or parts[k] in names[".".join(parts[:k])]


def test_dotted_drcl2_names_resolve():
    """``drcl2.<module>...`` in code and docs (command lines, :mod: / :func: roles, prose)."""
    names = module_names(package_modules(REPO, "drcl2"))
    broken: List[Tuple[str, int, str]] = []
    for source in scanned_files():
        with open(os.path.join(REPO, source), encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                broken.extend(
                    (source, i, m.group(0))
                    for m in DOTTED_RE.finditer(line)
                    if not dotted_name_resolves(m.group(0), names)
                )
    assert not broken, "drcl2 names that do not exist:\n" + "\n".join(
        f"{s}:{i}: {r}" for s, i, r in broken
    )


def test_the_checks_can_fail():
    """The pieces the tests above rest on report what they must."""
    paths = {"configs/", "configs/a.yaml", "configs/b.yaml", "docs/", "docs/method.md"}
    assert path_exists("configs/{a,b}.yaml", "README.md", paths)
    assert not path_exists("configs/{a,c}.yaml", "README.md", paths)
    assert path_exists("configs/<name>.yaml", "README.md", paths)
    assert path_exists("../a.yaml", "configs/sub/x.yaml", paths | {"configs/sub/"})
    assert not path_exists("METHOD.md", "drcl2/x.py", paths)
    assert (
        _slug("Long runs: resume, checkpoints, failures") == "long-runs-resume-checkpoints-failures"
    )
    refs = [
        _clean(m.group(0))
        for m in PATH_RE.finditer(
            "see METHOD.md, (configs/toy/x.yaml), `docs/method.md`, ../shared/notes and "
            "output/run/."
        )
    ]
    assert refs == [
        "METHOD.md",
        "configs/toy/x.yaml",
        "docs/method.md",
        "../shared/notes",
        "output/run/",
    ]
    m = SECTION_RE.search("(docs/method.md, \"DRB\") and datasets/README.md, section 'COCO'")
    assert m.groups() == ("docs/method.md", "DRB")
    assert [
        m.group(0) for m in DOTTED_RE.finditer("`drcl2.data.toy_lvis`, drcl2.tools.bench_<name>")
    ] == ["drcl2.data.toy_lvis", "drcl2.tools.bench_<"]
    names = {
        "drcl2": {"data", "tools"},
        "drcl2.data": {"generated", "register_lvis_format"},
        "drcl2.data.generated": {"toy_lvis"},
        "drcl2.data.generated.toy_lvis": {"ToyLVISSpec"},
        "drcl2.tools": {"bench_step"},
        "drcl2.tools.bench_step": set(),
    }
    for ref in (
        "drcl2.data.generated.toy_lvis.ToyLVISSpec.seed",
        "drcl2.data.register_lvis_format",
        "drcl2.tools.bench_<",
        "drcl2.ema",
        "drcl2.data.__file__",
    ):
        assert dotted_name_resolves(ref, names), ref
    for ref in ("drcl2.data.toy_lvis", "drcl2.data.generated.toy_lvis.Nope", "drcl2.tools.nope_<"):
        assert not dotted_name_resolves(ref, names), ref
