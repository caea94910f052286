"""Hostile inputs to the data pipeline: each is counted under its reason, the run goes on, memory stays bounded.

The folder is the one ``bench/hostile_data.py`` builds (at small sizes here); the bench runs it at
1 GiB and records the figures in bench/RESULTS.md.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from llmstack.data.refine import run
from llmstack.data.refine_config import fineweb_config
from llmstack.data.sources import HtmlTree, InputLimits, make_tasks, read_task
from llmstack.io import OversizedInput, bounded_lines, json_deeper_than, jsonl_objects, open_capped

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
SMALL = InputLimits(max_record_bytes=MIB, max_input_bytes=64 * MIB, max_json_depth=100)


def _bench():
    spec = importlib.util.spec_from_file_location("hostile_data", ROOT / "bench" / "hostile_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _bench()


def reasons(path: Path, limits: InputLimits = SMALL) -> Counter[str]:
    """What reading one input gives: "ok" per good record, else each Bad's reason."""
    (task,) = make_tasks([], [path])
    return Counter(getattr(item, "reason", "ok") for item in read_task(task, limits))


def _run(files: list[Path], out: Path, limits: InputLimits = SMALL):
    cfg = replace(fineweb_config(), limits=limits)
    return run(make_tasks([], files), out, cfg, workers=1, progress=False, log=lambda _: None)


# ------------------------------------------------------------------------------------- JSON depth


@pytest.mark.parametrize(
    "line, deeper",
    [
        ("[" * 200_000, True),
        ('{"a":' * 100_000 + "1" + "}" * 100_000, True),
        ("[" * 100 + "]" * 100, False),  # exactly the limit parses
        ("[" * 101 + "]" * 101, True),
        ('{"text": "' + "[" * 5000 + '"}', False),  # brackets inside a string do not nest
        ('{"text": "\\"' + "{" * 5000 + '"}', False),  # nor after an escaped quote
        ('[[["\\\\"' + ",[" * 200 + "]" * 203, True),  # an escaped backslash ends the string
        ('"' + '\\"[' * 200_000, False),  # an endless string of escaped quotes: one pass, not quadratic
    ],
)
def test_json_depth_is_checked_before_parsing(line: str, deeper: bool) -> None:
    t0 = time.perf_counter()
    assert json_deeper_than(line, 100) is deeper
    assert time.perf_counter() - t0 < 1
    if not deeper and line.endswith(("]", "}")):
        json.loads(line)  # what passes the check, Python's parser takes


def test_other_jsonl_readers_refuse_deep_lines_by_name(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"messages": []}\n' + '{"a":' * 100_000 + "1" + "}" * 100_000 + "\n")
    with pytest.raises(ValueError, match=r"c\.jsonl:2: JSON nested more than 100 deep"):
        list(jsonl_objects(path, "{...}"))


def test_a_deeply_nested_jsonl_line_is_counted_and_the_run_goes_on(tmp_path: Path) -> None:
    """Such a line killed the whole run with RecursionError, and again on every rerun."""
    good = {"text": bench.prose(1), "url": "https://good.example/1"}
    path = tmp_path / "deep.jsonl"
    path.write_text("[" * 200_000 + "\n" + '{"a":' * 100_000 + "1" + "}" * 100_000 + "\n" + json.dumps(good) + "\n")
    for _ in range(2):  # the rerun resumes from what the first run wrote
        r = _run([path], tmp_path / "out")
        assert r.stats["drops"]["read"] == {"oversized_nesting": 2}
        assert [json.loads(x)["url"] for x in r.corpus.read_text().splitlines()] == [good["url"]]


# ------------------------------------------------------------------------------------- caps on bytes


def test_long_lines_are_skipped_without_holding_them(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(b"short\n" + b"x" * (3 * MIB) + b"\nafter\n" + b"y" * 10)
    with open_capped(str(path), 1 << 30) as f:
        assert list(bounded_lines(f, MIB)) == [b"short\n", None, b"after\n", b"y" * 10]


def test_an_input_is_cut_at_its_expanded_size_and_what_came_before_kept(tmp_path: Path) -> None:
    record = json.dumps({"text": bench.prose(2)}).encode() + b"\n"
    path = tmp_path / "many.jsonl.gz"
    path.write_bytes(bench.gzip_repeat(b" " * MIB + b"\n", 8, head=record))  # 8 MiB of blank lines after it
    assert reasons(path, replace(SMALL, max_input_bytes=4 * MIB)) == {"ok": 1, "oversized_input": 1}
    assert reasons(path) == {"ok": 1}
    with pytest.raises(OversizedInput), open_capped(str(path), 4 * MIB) as f:
        f.read()


def test_a_gzip_error_keeps_the_records_before_it(tmp_path: Path) -> None:
    path = tmp_path / "two.warc.gz"
    path.write_bytes(bench.warc_record("https://a.example/", b"<p>a</p>") + b"\x1f\x8b\x08 not a gzip member")
    assert reasons(path) == {"ok": 1, "corrupt_warc": 1}


def test_pages_and_parquet_texts_over_the_cap_are_counted(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    site = tmp_path / "site"
    site.mkdir()
    (site / "big.html").write_bytes(b"<p>" + b"word " * MIB + b"</p>")
    (site / "small.html").write_text("<p>a page</p>")
    (task,) = make_tasks([HtmlTree(site, "https://site.example/")], [])
    assert Counter(getattr(x, "reason", "ok") for x in read_task(task, SMALL)) == {"ok": 1, "oversized_record": 1}
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["short", "x" * (2 * MIB), "short too"]}), path)
    assert reasons(path) == {"ok": 2, "oversized_record": 1}
    assert reasons(path, replace(SMALL, max_input_bytes=MIB)) == {"oversized_input": 1}


def test_each_hostile_input_is_counted(tmp_path: Path) -> None:
    expected = bench.build(tmp_path, bomb_mib=8, line_mib=2)
    for name, why in expected.items():
        got = reasons(tmp_path / name)
        assert got and set(got) <= {*why, "ok"}, (name, got)
    assert reasons(tmp_path / "good.warc.gz") == {"ok": 3} and reasons(tmp_path / "good.jsonl") == {"ok": 3}
    # a WARC record whose HTTP body is a gzip bomb (Content-Encoding) stops at the cap once decoded
    body = bench.gzip_repeat(bytes(MIB), 16)
    head = bench.warc_head("https://enc.example/", len(body), b"Content-Encoding: gzip\r\n")
    (tmp_path / "encoded.warc.gz").write_bytes(gzip.compress(head + body + b"\r\n\r\n"))
    assert reasons(tmp_path / "encoded.warc.gz") == {"oversized_record": 1}


def test_the_hostile_folder_runs_to_the_end_with_every_input_counted(tmp_path: Path) -> None:
    expected = bench.build(tmp_path / "in", bomb_mib=8, line_mib=2)
    r = _run(sorted((tmp_path / "in").iterdir()), tmp_path / "out")
    read = r.stats["drops"]["read"]
    assert read["corrupt_warc"] == 4 and read["corrupt_gzip"] == 1 and read["corrupt_parquet"] == 1
    assert read["oversized_record"] == 4 and read["oversized_nesting"] == 2 and read["empty_file"] == 1
    assert read["undecodable"] >= 2  # invalid-utf8.jsonl and random.jsonl's "lines"
    assert set(read) == {r for why in expected.values() for r in why}
    assert len(r.corpus.read_text().splitlines()) == 7  # every good document kept


# ------------------------------------------------------------------------------------- memory


def test_a_gzip_bomb_costs_no_memory(tmp_path: Path) -> None:
    """A 128 MiB-expanded bomb in three forms; before, peak memory was ~13x the expanded size.

    The child's own high-water mark (VmHWM): ``ru_maxrss`` would count the pytest process it was forked from.
    """
    bomb_mib = 128
    bench.build(tmp_path, bomb_mib=bomb_mib, line_mib=1)
    files = [str(tmp_path / n) for n in ("bomb.warc.gz", "huge-page.warc.gz", "huge-line.jsonl.gz")]
    child = (
        "import json, sys\n"
        "from collections import Counter\n"
        "from pathlib import Path\n"
        "from llmstack.data.sources import HtmlTree, InputLimits, make_tasks, read_task\n"
        "tasks = make_tasks([], [Path(p) for p in sys.argv[1:]])\n"
        "got = [dict(Counter(getattr(x, 'reason', 'ok') for x in read_task(t, InputLimits()))) for t in tasks]\n"
        "hwm = next(x for x in open('/proc/self/status') if x.startswith('VmHWM:')).split()[1]\n"
        "print(json.dumps({'reasons': got, 'rss': int(hwm)}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", child, *files], capture_output=True, text=True, env=env, check=True)
    out = json.loads(proc.stdout)
    assert out["reasons"] == [{"corrupt_warc": 1}, {"oversized_record": 1}, {"oversized_record": 1}]
    assert out["rss"] * 1024 < bomb_mib * MIB / 2, f"peak RSS {out['rss'] / 1024:.0f} MiB"
