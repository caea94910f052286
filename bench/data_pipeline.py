"""Data pipeline benchmark: our FineWeb-style chain against datatrove's, in the same run.

Usage::

    python bench/data_pipeline.py [--max-pages 200] [--workers 2] [--profile fineweb]
                                  [--datatrove-python data/bench/datatrove-venv/bin/python]

What it measures, on the same input pages and the same number of worker processes:

1. the filter chain, raw HTML -> kept documents:
   - ours: ``llmstack.data.refine.run`` (url filter, trafilatura, language ID, Gopher repetition,
     Gopher quality, C4, FineWeb, exact + MinHash dedup, PII) with the chosen profile;
   - datatrove 0.10 (the library that produced FineWeb), in its own virtualenv via a subprocess,
     with ``LocalPipelineExecutor``: JsonlReader -> Trafilatura -> GopherRepetitionFilter ->
     GopherQualityFilter -> C4QualityFilter(filter_no_terminal_punct=False) -> FineWebQualityFilter
     -> JsonlWriter. Its LanguageFilter is left out (it downloads its fastText model; offline it
     fails), so our language stage has no datatrove counterpart. Trafilatura gets the options our
     extractor uses (favour_precision=False, deduplicate=False, no_fallback=True -- trafilatura
     1.11's name for our 2.x ``fast=True``) and a 10 s timeout, so both extract the same way.
   Per stage: documents/s and MB/s per core (stage CPU-seconds summed over workers, as each side
   reports them), and for the whole chain: documents/s and MB/s of input HTML per core of wall time.
2. MinHash near-dedup (5-grams, 14 buckets x 8 hashes) on the same documents: ours (signatures on
   ``--workers`` processes + one clustering pass) against datatrove's four-stage MinHash
   (signatures, buckets, cluster, filter), wall time for each.
3. Tokenizing the pipeline's output: ``llmstack.tokenizer.Tokenizer.encode`` against a plain
   ``tiktoken.Encoding`` built from the same ranks and pattern, on the same text, one core; the
   token ids are checked to be identical.

The text for 2 and 3 is ``--text`` (default: ``data/corpus/python-docs.jsonl``, the pipeline's
output for the whole Python manual made by ``make run``; else this run's own output).

``--max-pages`` takes an evenly spaced sample of the manual's content pages (navigation pages such
as genindex/contents are removed first for both sides, as our crawl's URL filter does) so that the
whole bench stays within ~5 minutes on 2 cores. ``--max-pages 0`` uses every page (~500).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmstack.data.crawl import MANUALS, crawl_url_filter  # noqa: E402
from llmstack.data.dedup import MinHasher, exact_key, near_duplicate_clusters  # noqa: E402
from llmstack.data.refine import PROFILES, STAGES, run  # noqa: E402
from llmstack.data.sources import HtmlTree, Task, decode_html, html_pages  # noqa: E402
from llmstack.paths import data_dir, runs_dir  # noqa: E402

MB = 1e6

# The datatrove side, run with the datatrove venv's python: ``python SCRIPT CONFIG.json``.
DATATROVE_SCRIPT = r"""
import json, sys, time
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter


def step_stats(logging_dir):
    path = Path(logging_dir) / "stats.json"
    return json.loads(path.read_text()) if path.exists() else []


def filter_chain(cfg):
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import (
        C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter,
    )

    pipeline = [
        JsonlReader(cfg["inputs"]),
        Trafilatura(favour_precision=False, deduplicate=False, no_fallback=True, timeout=cfg["timeout"]),
        GopherRepetitionFilter(),
        GopherQualityFilter(),
        C4QualityFilter(filter_no_terminal_punct=False),
        FineWebQualityFilter(),
        JsonlWriter(cfg["work"] + "/output"),
    ]
    t = time.perf_counter()
    LocalPipelineExecutor(pipeline, tasks=cfg["tasks"], workers=cfg["workers"],
                          logging_dir=cfg["work"] + "/logs", skip_completed=False).run()
    return {"wall": time.perf_counter() - t, "steps": step_stats(cfg["work"] + "/logs")}


def minhash(cfg):
    from datatrove.pipeline.dedup import (
        MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature,
    )

    mh = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    w = cfg["work"]
    stages = [
        ("signatures", [JsonlReader(cfg["inputs"]), MinhashDedupSignature(output_folder=w + "/sigs", config=mh)],
         cfg["tasks"]),
        ("buckets", [MinhashDedupBuckets(input_folder=w + "/sigs", output_folder=w + "/buckets", config=mh)],
         mh.num_buckets),
        ("cluster", [MinhashDedupCluster(input_folder=w + "/buckets", output_folder=w + "/remove", config=mh)], 1),
        ("filter", [JsonlReader(cfg["inputs"]), MinhashDedupFilter(input_folder=w + "/remove"),
                    JsonlWriter(w + "/deduped")], cfg["tasks"]),
    ]
    out = {}
    t0 = time.perf_counter()
    for name, pipeline, tasks in stages:
        t = time.perf_counter()
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=cfg["workers"], logging_dir=f"{w}/logs_{name}",
                              skip_completed=False).run()
        out[name] = {"wall": time.perf_counter() - t, "steps": step_stats(f"{w}/logs_{name}")}
    return {"wall": time.perf_counter() - t0, "stages": out}


if __name__ == "__main__":  # LocalPipelineExecutor's worker processes re-import this file
    cfg = json.loads(Path(sys.argv[1]).read_text())
    result = filter_chain(cfg) if cfg["mode"] == "filter" else minhash(cfg)
    Path(cfg["result"]).write_text(json.dumps(result))
"""

# datatrove step name (its emoji-prefixed ``name``) -> our stage name
DT_STAGE = {
    "Trafilatura": "extract",
    "Gopher Repetition": "gopher_repetition",
    "Gopher Quality": "gopher_quality",
    "C4 Quality": "c4",
    "FineWeb Quality": "fineweb",
}


def sample_pages(max_pages: int) -> list[tuple[str, str]]:
    """(path, url) of content pages of the Python manual, evenly spaced, navigation pages removed."""
    manual = MANUALS["python3.11-doc"]
    root = data_dir() / "raw" / manual.package / "html"
    if not root.is_dir():
        sys.exit(f"error: {root} is missing; run `llmstack data fetch` first (it downloads the Python manual)")
    url_filter = crawl_url_filter()
    pages = [(p, u) for p, u in html_pages(HtmlTree(root, manual.base_url)) if url_filter(u) is None]
    if max_pages and len(pages) > max_pages:
        step = len(pages) / max_pages
        pages = [pages[int(i * step)] for i in range(max_pages)]
    return pages


def split(items: list[Any], n: int) -> list[list[Any]]:
    size = math.ceil(len(items) / n)
    return [items[i : i + size] for i in range(0, len(items), size)]


def rate(docs: float, n_bytes: float, seconds: float) -> tuple[float, float]:
    return (docs / seconds, n_bytes / MB / seconds) if seconds > 0 else (float("nan"), float("nan"))


def run_datatrove(python: str, cfg: dict[str, Any], tmp: Path) -> dict[str, Any]:
    script = tmp / "datatrove_bench.py"
    script.write_text(DATATROVE_SCRIPT)
    cfg = {**cfg, "result": str(tmp / f"dt_{cfg['mode']}.json")}
    cfg_path = tmp / f"dt_{cfg['mode']}_cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([python, str(script), str(cfg_path)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"datatrove run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(Path(cfg["result"]).read_text())


def dt_stage(steps: list[dict[str, Any]], ours: str) -> dict[str, Any] | None:
    for s in steps:
        if any(key in s["name"] and DT_STAGE[key] == ours for key in DT_STAGE):
            st = s.get("stats", {})
            docs_in = sum(_num(st.get(k)) for k in ("forwarded", "dropped"))
            # datatrove counts dropped docs per reason too; "forwarded" + "dropped" = documents in
            return {"seconds": s["time_stats"].get("total", 0.0), "docs_in": docs_in, "out": _num(st.get("forwarded"))}
    return None


def _num(v: Any) -> float:
    if isinstance(v, dict):
        return float(v.get("total", 0))
    return float(v or 0)


# ---------------------------------------------------------------------------------------------


def bench_filter(args: argparse.Namespace, tmp: Path) -> tuple[Path, dict[str, Any]]:
    pages = sample_pages(args.max_pages)
    n_tasks = max(args.workers, math.ceil(len(pages) / 50))
    chunks = split(pages, n_tasks)
    html_bytes = sum(Path(p).stat().st_size for p, _ in pages)
    print(
        f"input: {len(pages)} pages of the Python 3.11 manual ({html_bytes / MB:.1f} MB of HTML)"
        f"{f', an evenly spaced sample (--max-pages {args.max_pages})' if args.max_pages else ''}; "
        f"{len(chunks)} tasks on {args.workers} worker processes for both pipelines; profile {args.profile}"
    )

    # ours
    tasks = [Task(i, "html", tuple(c)) for i, c in enumerate(chunks)]
    cfg = replace(PROFILES[args.profile](url_filter=crawl_url_filter()))
    t = time.perf_counter()
    result = run(tasks, tmp / "ours", cfg, workers=args.workers, progress=False, log=lambda s: None)
    ours_wall = time.perf_counter() - t
    st = result.stats["stages"]
    n_out = st["pii"]["docs_out"]

    # datatrove, same pages (decoded the same way) as JSONL, one file per task
    dt_in = tmp / "dt_in"
    dt_in.mkdir()
    for i, chunk in enumerate(chunks):
        with (dt_in / f"{i:05d}.jsonl").open("w", encoding="utf-8") as f:
            for path, url in chunk:
                html, _ = decode_html(Path(path).read_bytes())
                f.write(json.dumps({"id": url, "text": html or "", "metadata": {"url": url}}) + "\n")
    dt = None
    if not args.skip_datatrove:
        dt = run_datatrove(
            args.datatrove_python,
            {
                "mode": "filter",
                "inputs": str(dt_in),
                "work": str(tmp / "dt_filter"),
                "tasks": len(chunks),
                "workers": args.workers,
                "timeout": 10.0,
            },
            tmp,
        )

    w = args.workers
    print("\n## Filter chain (raw HTML -> kept documents), per core")
    head = f"{'stage':>18} | {'docs in':>7} {'out':>5} {'docs/s':>8} {'MB/s':>7} |"
    if dt:
        head += f" {'dt in':>6} {'out':>5} {'docs/s':>8} {'MB/s':>7} | {'ours/dt':>7}"
    print(head)
    rows = []
    for stage in STAGES[1:]:
        s = st[stage]
        d, mb = rate(s["docs_in"], s["bytes_in"], s["seconds"])
        line = f"{stage:>18} | {s['docs_in']:>7} {s['docs_out']:>5} {d:>8.1f} {mb:>7.2f} |"
        row = {"stage": stage, "docs_in": s["docs_in"], "docs_out": s["docs_out"], "docs_s": d, "mb_s": mb}
        ds = dt_stage(dt["steps"], stage) if dt else None
        if ds and ds["seconds"] > 0:
            dd = ds["docs_in"] / ds["seconds"]
            # bytes: datatrove does not report them per step; use ours per document for the same stage
            dmb = dd * (s["bytes_in"] / max(1, s["docs_in"])) / MB
            line += f" {ds['docs_in']:>6.0f} {ds['out']:>5.0f} {dd:>8.1f} {dmb:>7.2f} | {d / dd:>6.2f}x"
            row.update(dt_docs_in=ds["docs_in"], dt_docs_out=ds["out"], dt_docs_s=dd, ratio=d / dd)
        elif dt:
            line += f" {'-':>6} {'-':>5} {'-':>8} {'-':>7} | {'-':>7}"
        print(line)
        rows.append(row)
    if dt:
        print(
            "(per stage: CPU-seconds inside the stage, summed over workers; datatrove's MB/s uses our mean document"
            " size for the stage, as it does not count bytes per step; its first spaCy/trafilatura use and its"
            " extraction sandbox (a subprocess per worker) are inside its stage times)"
        )
    print("(our near_dedup is the clustering only: signatures are made in phase 1 and timed in the MinHash part)")
    lang_s = st["language"]["seconds"]
    d_ours, mb_ours = rate(len(pages), html_bytes, ours_wall * w)
    print(
        f"\nwhole chain, ours:      {ours_wall:6.1f} s wall, {d_ours:6.2f} docs/s/core, {mb_ours:5.2f} MB/s/core "
        f"({len(pages)} pages -> {n_out} documents; incl. language ID {lang_s:.1f} core-s, dedup, PII, shards)"
    )
    summary = {
        "pages": len(pages),
        "html_mb": html_bytes / MB,
        "ours_wall": ours_wall,
        "ours_out": n_out,
        "ours_docs_s_core": d_ours,
        "ours_mb_s_core": mb_ours,
        "stages": rows,
    }
    if dt:
        dt_out = dt_stage(dt["steps"], "fineweb")
        d_dt, mb_dt = rate(len(pages), html_bytes, dt["wall"] * w)
        no_lid = ours_wall - lang_s / w
        print(
            f"whole chain, datatrove: {dt['wall']:6.1f} s wall, {d_dt:6.2f} docs/s/core, {mb_dt:5.2f} MB/s/core "
            f"({len(pages)} pages -> {dt_out['out'] if dt_out else '?':.0f} documents; no language ID, no dedup/PII)"
        )
        print(
            f"ratio ours/datatrove (throughput): {dt['wall'] / ours_wall:.2f}x as measured; "
            f"{dt['wall'] / no_lid:.2f}x with our language-ID time taken out (same stages on both sides)"
        )
        summary.update(
            dt_wall=dt["wall"],
            dt_docs_s_core=d_dt,
            dt_mb_s_core=mb_dt,
            dt_out=dt_out["out"] if dt_out else None,
            ratio=dt["wall"] / ours_wall,
            ratio_no_lid=dt["wall"] / no_lid,
        )
    return result.corpus, summary


def _sig_chunk(texts: list[str]) -> list[Any]:
    mh = MinHasher()
    return [mh.signature(t) for t in texts]


def bench_minhash(args: argparse.Namespace, texts: list[str], tmp: Path) -> dict[str, Any]:
    import numpy as np

    n_bytes = sum(len(t.encode()) for t in texts)
    print(
        f"\n## MinHash near-dedup (5-grams, 14x8), {len(texts)} documents, {n_bytes / MB:.1f} MB, "
        f"{args.workers} workers, wall time"
    )
    t = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        sigs = [s for part in pool.map(_sig_chunk, split(texts, args.workers)) for s in part]
    t_sig = time.perf_counter() - t
    keys = [exact_key(x) for x in texts]
    roots = near_duplicate_clusters(np.stack(sigs))
    ours = time.perf_counter() - t
    n_exact = len(keys) - len(set(keys))
    n_near = int(sum(int(r) != i for i, r in enumerate(roots)))
    d, mb = rate(len(texts), n_bytes, ours * args.workers)
    print(
        f"  ours:      {ours:6.2f} s ({t_sig:.2f} s signatures), {d:7.1f} docs/s/core, {mb:5.2f} MB/s/core; "
        f"{n_near} near-duplicates ({n_exact} exact)"
    )
    out: dict[str, Any] = {"docs": len(texts), "mb": n_bytes / MB, "ours": ours, "ours_near": n_near}
    if args.skip_datatrove:
        return out
    dt_in = tmp / "mh_in"
    dt_in.mkdir()
    for i, part in enumerate(split(texts, args.workers)):
        with (dt_in / f"{i:05d}.jsonl").open("w", encoding="utf-8") as f:
            for j, x in enumerate(part):
                f.write(json.dumps({"id": f"{i}-{j}", "text": x}) + "\n")
    dt = run_datatrove(
        args.datatrove_python,
        {
            "mode": "minhash",
            "inputs": str(dt_in),
            "work": str(tmp / "dt_mh"),
            "tasks": len(list(dt_in.iterdir())),
            "workers": args.workers,
        },
        tmp,
    )
    kept = sum(1 for f in (tmp / "dt_mh" / "deduped").glob("*") for _ in _lines(f))
    parts = ", ".join(f"{k} {v['wall']:.2f}" for k, v in dt["stages"].items())
    d2, mb2 = rate(len(texts), n_bytes, dt["wall"] * args.workers)
    print(
        f"  datatrove: {dt['wall']:6.2f} s ({parts}), {d2:7.1f} docs/s/core, {mb2:5.2f} MB/s/core; "
        f"{len(texts) - kept} removed"
    )
    print(f"  ratio ours/datatrove (throughput): {dt['wall'] / ours:.2f}x")
    out.update(dt=dt["wall"], dt_removed=len(texts) - kept, ratio=dt["wall"] / ours)
    return out


def _lines(path: Path) -> list[str]:
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line for line in f if line.strip()]


def bench_tokenize(args: argparse.Namespace, texts: list[str]) -> dict[str, Any]:
    import tiktoken

    from llmstack.tokenizer.bpe import Tokenizer

    tok_dir = Path(args.tokenizer)
    if (tok_dir / "tokenizer.tiktoken").exists():
        tok, how = Tokenizer.load(tok_dir), str(tok_dir)
    else:
        t = time.perf_counter()
        tok = Tokenizer.train(texts, 4096)
        how = f"trained here on the same text (vocab 4096, {time.perf_counter() - t:.1f} s)"
    plain = tiktoken.Encoding(
        name="plain", pat_str=tok._pattern, mergeable_ranks=tok.mergeable_ranks, special_tokens={}
    )
    n_bytes = sum(len(x.encode()) for x in texts)

    def best(fn: Any) -> tuple[float, int]:
        times, n = [], 0
        for _ in range(args.repeats):
            t = time.perf_counter()
            n = sum(len(fn(x)) for x in texts)
            times.append(time.perf_counter() - t)
        return min(times), n

    assert all(tok.encode(x) == plain.encode_ordinary(x) for x in texts[:200]), "token ids differ"
    t_ours, n_tok = best(tok.encode)
    t_plain, _ = best(plain.encode_ordinary)
    print(
        f"\n## Tokenizing the output ({len(texts)} documents, {n_bytes / MB:.1f} MB, tokenizer {how}; "
        f"one core, best of {args.repeats})"
    )
    print(
        f"  llmstack Tokenizer.encode: {n_bytes / MB / t_ours:6.2f} MB/s ({n_tok / t_ours / 1e6:.2f} M tokens/s, "
        f"{n_bytes / n_tok:.2f} bytes/token)"
    )
    print(f"  plain tiktoken.Encoding:   {n_bytes / MB / t_plain:6.2f} MB/s (same ranks and pattern, identical ids)")
    print(f"  ratio ours/tiktoken: {t_plain / t_ours:.3f}x")
    return {"ours_mb_s": n_bytes / MB / t_ours, "plain_mb_s": n_bytes / MB / t_plain, "ratio": t_plain / t_ours}


def load_texts(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-pages", type=int, default=200, help="evenly spaced sample of content pages (0: all)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes, both pipelines")
    p.add_argument(
        "--profile", default="fineweb", choices=sorted(PROFILES), help="our thresholds (fineweb = datatrove's)"
    )
    p.add_argument(
        "--datatrove-python",
        default=str(data_dir() / "bench" / "datatrove-venv" / "bin" / "python"),
        help="python of a venv with datatrove[processing,io] 0.10 + spacy + lxml_html_clean",
    )
    p.add_argument("--skip-datatrove", action="store_true", help="only our side (no ratios)")
    p.add_argument(
        "--text",
        default=str(data_dir() / "corpus" / "python-docs.jsonl"),
        help="JSONL documents for the MinHash and tokenizer parts (default: make run's output)",
    )
    p.add_argument("--tokenizer", default=str(runs_dir() / "tiny" / "tokenizer"), help="tokenizer dir (else trained)")
    p.add_argument("--repeats", type=int, default=3, help="tokenizer timing repeats (best kept)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()
    if not args.skip_datatrove and not Path(args.datatrove_python).exists():
        sys.exit(f"error: {args.datatrove_python} not found; give --datatrove-python or --skip-datatrove")
    print(
        f"# bench/data_pipeline.py  {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, Python {platform.python_version()}"
    )
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="llmstack-bench-data-"))
    try:
        corpus, filt = bench_filter(args, tmp)
        text_path = Path(args.text) if Path(args.text).exists() else corpus
        texts = [x for x in load_texts(text_path) if x]
        print(f"\n(text for the MinHash and tokenizer parts: {text_path})")
        mh = bench_minhash(args, texts, tmp)
        tk = bench_tokenize(args, texts)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nbench total: {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"filter": filt, "minhash": mh, "tokenize": tk}, indent=2))


if __name__ == "__main__":
    main()
