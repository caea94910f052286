"""The default "crawl": Debian's HTML manuals, fetched with ``apt-get download`` + ``dpkg-deb -x``.

Real web-style pages (Sphinx and DocBook output with navigation bars, sidebars, indexes and
search pages) for the pipeline to clean up, each given the URL it has on the web. Two sets:

- ``run`` (what ``make run`` uses): the Python manual only, ~80 s of pipeline on 2 cores (the
  main job has ~2 minutes for its data; the Debian handbook alone takes another ~2 minutes);
- ``full``: all five manuals (~8,900 pages, ~190 MB of HTML; the handbook's 26 languages give
  the language filter and the deduplication real work), ``llmstack data pipeline --crawl full``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llmstack.data import fetch
from llmstack.data.filters import URLFilter
from llmstack.data.langid import LanguageFilter
from llmstack.data.refine import PROFILES, RunResult, run
from llmstack.data.report import write_report
from llmstack.data.sources import HtmlTree, make_tasks
from llmstack.io import read_json, write_json

Log = Callable[[str], Any]


@dataclass(frozen=True)
class Manual:
    package: str
    html_dir: str  # inside the package
    base_url: str  # where the same pages are served on the web


MANUALS = {
    "python3.11-doc": Manual("python3.11-doc", "usr/share/doc/python3.11/html", "https://docs.python.org/3.11/"),
    "debian-handbook": Manual(
        "debian-handbook", "usr/share/doc/debian-handbook/html", "https://debian-handbook.info/browse/"
    ),
    "postgresql-doc-15": Manual(
        "postgresql-doc-15", "usr/share/doc/postgresql-doc-15/html", "https://www.postgresql.org/docs/15/"
    ),
    "python-django-doc": Manual(
        "python-django-doc", "usr/share/doc/python-django-doc/html", "https://docs.djangoproject.com/en/3.2/"
    ),
    "linux-doc-6.1": Manual(
        "linux-doc-6.1", "usr/share/doc/linux-doc-6.1/html", "https://www.kernel.org/doc/html/v6.1/"
    ),
}
CRAWLS = {
    "run": ("python3.11-doc", "debian-handbook"),
    "full": ("python3.11-doc", "debian-handbook", "postgresql-doc-15", "python-django-doc", "linux-doc-6.1"),
}
# Generated navigation pages of Sphinx and DocBook builds: lists of links, no prose. A crawler's
# URL filter would know them; dropping them before extraction saves ~10% of the time (the Python
# manual's contents.html alone is 2.5 MB of links).
NAVIGATION_PATHS = (r"(^|/)(genindex(-\w+)?|py-modindex|search|contents|ix\d+|bookindex)\.html$",)


def crawl_url_filter() -> URLFilter:
    return URLFilter(blocked_paths=NAVIGATION_PATHS)


def fetch_manual(manual: Manual, raw: Path, log: Log = print) -> Path:
    """The manual's HTML root under ``raw/<package>/html``, downloaded once (a marker is written last)."""
    if manual.package == fetch.PYTHON_DOC_PACKAGE:  # the corpus fetch's own layout: reuse any copy it made
        return fetch.fetch_python_docs(raw, log)
    out = raw / manual.package
    marker = out / fetch.MARKER
    if marker.exists():
        return out / read_json(marker)["html_root"]
    reason = fetch.apt_unusable_reason()
    if reason is not None:
        raise fetch.FetchError(f"cannot fetch {manual.package} with apt: {reason}")
    raw.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=raw) as tmp_s:
        tmp = Path(tmp_s)
        log(f"downloading Debian package {manual.package} (apt-get download)")
        deb = fetch._apt_download(manual.package, tmp, log)
        fetch._run(["dpkg-deb", "-x", str(deb), str(tmp / "x")])
        html = tmp / "x" / manual.html_dir
        if not html.is_dir():
            raise fetch.FetchError(f"{deb.name} has no {manual.html_dir}")
        staged = tmp / "staged"
        staged.mkdir()
        shutil.move(str(html), staged / "html")
        if out.exists():  # an earlier attempt without a marker: nothing in it is trusted
            shutil.rmtree(out)
        staged.rename(out)
    write_json(marker, {"package": deb.name, "html_root": "html"})
    return out / "html"


def fetch_crawl(name: str, raw: Path, log: Log = print) -> list[HtmlTree]:
    """Fetch every manual of crawl ``name`` ("run" or "full"); the trees with their base URLs."""
    if name not in CRAWLS:
        raise ValueError(f"unknown crawl {name!r}; choose one of {sorted(CRAWLS)}")
    return [HtmlTree(fetch_manual(MANUALS[p], raw, log), MANUALS[p].base_url) for p in CRAWLS[name]]


def run_pipeline(
    trees: list[HtmlTree],
    out: Path,
    files: tuple[Path, ...] = (),
    profile: str = "fineweb",
    language: LanguageFilter | None = None,
    output_format: str = "jsonl",
    workers: int | None = None,
    progress: bool = True,
    log: Log = print,
) -> RunResult:
    """HTML trees and WARC/JSONL/Parquet files -> ``out`` (shards, corpus.jsonl, report.md)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    cfg = replace(PROFILES[profile](url_filter=crawl_url_filter(), language=language), output_format=output_format)
    tasks = make_tasks(trees, list(files))
    if not tasks:
        raise ValueError("no input: give HTML directories, WARC, JSONL or Parquet files")
    result = run(tasks, out, cfg, workers=workers, progress=progress, log=log)
    title = f"Data pipeline report ({profile} profile, {len(tasks)} tasks)"
    write_report(result.stats, out, title, result.seconds)
    return result
