"""The README stays short and true: its length, its tree of the package, its links, no issue numbers.

The tree is the fenced code block right under the heading ``## The tree``. Each line is a path
relative to the repository root (folders end with ``/``), two or more spaces, then an annotation::

    llmstack/                      the package
    llmstack/data/corpus.py        one-line description

Its file paths under ``llmstack/`` must be exactly the package's files: every file except
``__init__.py`` and ``__pycache__`` contents (``.py`` modules and data such as prompts, YAML, the web UI).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_LINES = 250
TREE_LINE = re.compile(r"^(?P<path>\S+)\s{2,}(?P<note>\S.*)$")
ISSUE_REFS = (re.compile(r"(?i)\bissues?\s*#\s*\d+"), re.compile(r"\(#\d+\)"), re.compile(r"(?<![\w&/])#\d+\b"))


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _tree_lines() -> list[str]:
    """The lines of the fenced block that follows the ``## The tree`` heading."""
    lines = _readme().splitlines()
    try:
        start = lines.index("## The tree")
    except ValueError:
        raise AssertionError("README.md has no '## The tree' heading") from None
    for i in range(start + 1, len(lines)):
        if lines[i].startswith("## "):
            break
        if lines[i].startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            assert end is not None, "the tree's code block is not closed"
            return [line for line in lines[i + 1 : end] if line.strip()]
    raise AssertionError("no fenced code block under '## The tree'")


def _tree_paths() -> list[str]:
    paths, bad = [], []
    for line in _tree_lines():
        m = TREE_LINE.match(line)
        if m is None:
            bad.append(line)
        else:
            paths.append(m["path"])
    assert not bad, "tree lines not of the form 'PATH  annotation':\n" + "\n".join(bad)
    return paths


def _package_files() -> set[str]:
    return {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "llmstack").rglob("*")
        if p.is_file() and p.name != "__init__.py" and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def _doc_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def test_readme_is_short() -> None:
    n = len(_readme().splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines (at most {MAX_LINES}); move detail into docs/"


def test_tree_lists_every_package_file_and_nothing_else() -> None:
    paths = _tree_paths()
    listed_files = {p for p in paths if p.startswith("llmstack/") and not p.endswith("/")}
    files = _package_files()
    missing = sorted(files - listed_files)
    absent = sorted(p for p in paths if not (ROOT / p.rstrip("/")).exists())
    wrong_kind = sorted(
        p for p in paths if (ROOT / p.rstrip("/")).exists() and (ROOT / p.rstrip("/")).is_dir() != p.endswith("/")
    )
    duplicates = sorted({p for p in paths if paths.count(p) > 1})
    problems = []
    if missing:
        problems.append("files missing from the README tree:\n  " + "\n  ".join(missing))
    if absent:
        problems.append("listed in the README tree but do not exist:\n  " + "\n  ".join(absent))
    if wrong_kind:
        problems.append("folders must end with '/', files must not:\n  " + "\n  ".join(wrong_kind))
    if duplicates:
        problems.append("listed more than once:\n  " + "\n  ".join(duplicates))
    assert not problems, "\n".join(problems)


def test_tree_names_the_top_level_folders() -> None:
    paths = set(_tree_paths())
    for folder in ("llmstack/", "bench/", "docs/", "scripts/", "tests/"):
        assert folder in paths, f"the README tree has no line for {folder}"


def test_readme_links_to_docs_exist() -> None:
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#[^)]*)?\)", _readme())
    assert links, "README.md links no docs/ page"
    missing = sorted({link for link in links if not (ROOT / link).is_file()})
    assert not missing, f"README.md links pages that do not exist: {missing}"


def test_docs_links_between_pages_exist() -> None:
    missing = []
    for page in _doc_pages():
        for target in re.findall(r"\]\(([^)#\s:]+\.md)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not (page.parent / target).resolve().is_file():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, "links to pages that do not exist:\n  " + "\n  ".join(missing)


def test_no_issue_numbers_in_readme_or_docs() -> None:
    found = []
    for path in [README, *_doc_pages()]:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if any(rx.search(line) for rx in ISSUE_REFS):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "say what the thing is instead of an issue number:\n  " + "\n  ".join(found)
