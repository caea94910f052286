"""The FineWeb-style pipeline: each filter on crafted documents, dedup, PII, inputs, restart, determinism."""

from __future__ import annotations

import gzip
import io
import json
import random
from pathlib import Path

import pytest

from llmstack.data import filters
from llmstack.data.dedup import MinHasher, near_duplicate_clusters
from llmstack.data.langid import LanguageFilter
from llmstack.data.pii import scrub
from llmstack.data.refine import run
from llmstack.data.refine_config import docs_config, fineweb_config
from llmstack.data.sources import HtmlTree, decode_html, make_tasks

NOUNS = [
    "river",
    "garden",
    "teacher",
    "window",
    "market",
    "engine",
    "letter",
    "forest",
    "village",
    "doctor",
    "bridge",
    "summer",
    "farmer",
    "pencil",
    "harbor",
    "island",
    "mountain",
    "castle",
    "kitchen",
    "library",
    "painter",
    "sailor",
    "student",
    "station",
    "theater",
    "valley",
    "winter",
    "basket",
    "candle",
    "desert",
    "flower",
    "hammer",
    "ladder",
    "mirror",
    "needle",
    "orange",
    "pillow",
    "rocket",
    "shadow",
    "tunnel",
    "wagon",
]
VERBS = [
    "opens",
    "carries",
    "watches",
    "builds",
    "follows",
    "remembers",
    "finds",
    "paints",
    "visits",
    "answers",
    "cleans",
    "moves",
    "sells",
]
ADJS = [
    "quiet",
    "bright",
    "old",
    "careful",
    "distant",
    "gentle",
    "busy",
    "simple",
    "modern",
    "narrow",
    "heavy",
    "little",
    "golden",
    "hidden",
]
TAILS = ("with care", "to the end", "before dinner", "and is happy", "that morning", "to be sure", "for them")


def prose(seed: int, n_sentences: int = 12) -> str:
    """English-looking lines of two sentences with stop words and punctuation: passes every filter."""
    rng = random.Random(seed)
    sentences = [
        f"The {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)} of "
        f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(TAILS)}, {rng.choice(NOUNS)} {seed}{i}."
        for i in range(n_sentences)
    ]
    return "\n".join(" ".join(sentences[i : i + 2]) for i in range(0, len(sentences), 2))


def page(text: str, title: str = "A page") -> str:
    paras = "".join(f"<p>{line}</p>" for line in text.split("\n"))
    return (
        f"<html><head><title>{title}</title></head><body><nav><a href='/'>Home</a> <a href='/x'>About</a></nav>"
        f"<article><h1>{title}</h1>{paras}</article><footer>Copyright footer text</footer></body></html>"
    )


# ------------------------------------------------------------------------------------- filters


def test_prose_passes_every_filter() -> None:
    text = prose(1)
    assert filters.GopherRepetition()(text) is None
    assert filters.GopherQuality()(text) is None
    verdict, kept = filters.C4Quality()(text)
    assert verdict is None and kept == text
    assert filters.FineWebQuality()(kept) is None
    assert LanguageFilter()(text)[:2] == (None, "en")


def test_url_filter() -> None:
    f = filters.URLFilter(blocked_domains=frozenset({"bad.example"}), blocked_paths=(r"genindex\.html$",))
    assert f("https://docs.example.org/library/os.html") is None
    assert f("https://www.bad.example/page") == "domain_blocklist"
    assert f("https://example.org/free-casino-bonus") == "banned_word"
    assert f("https://example.org/genindex.html") == "blocked_path"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("\n\n".join(["Same paragraph here, again and again."] * 6 + [prose(2)]), "dup_para_frac"),
        ("Buy now cheap. " * 60 + prose(3), "top_2_gram"),
        (prose(4) + " " + " ".join(["alpha beta gamma delta epsilon zeta eta theta"] * 8), "duplicated_5_n_grams"),
    ],
)
def test_gopher_repetition_drops(text: str, reason: str) -> None:
    assert filters.GopherRepetition()(text) == reason


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("The cat is on the mat.", "gopher_short_doc"),
        (" ".join(["a b c d e f to of"] * 20), "gopher_below_avg_threshold"),
        (" ".join(["supercalifragilistic extraordinarily"] * 40) + " the of", "gopher_above_avg_threshold"),
        (prose(5) + " #tag" * 40, "gopher_too_many_hashes"),
        ("\n".join(f"- item {i} of the list with things" for i in range(60)), "gopher_too_many_bullets"),
        (" ".join(["1234 5678 +++ === ---"] * 30) + " " + prose(6, 2), "gopher_below_alpha_threshold"),
        (" ".join(["river garden teacher window market engine letter"] * 10), "gopher_enough_stop_words"),
    ],
)
def test_gopher_quality_drops(text: str, reason: str) -> None:
    assert filters.GopherQuality()(text) == reason


def test_c4_removes_lines_and_drops_documents() -> None:
    text = prose(7) + "\nPlease enable JavaScript to view this page.\nMenu\nRead our privacy policy and terms of use."
    verdict, kept = filters.C4Quality()(text)
    assert verdict is None
    assert "JavaScript" not in kept and "Menu" not in kept and "privacy" not in kept and kept.startswith("The ")
    assert filters.C4Quality()(prose(8) + "\nLorem ipsum dolor sit amet, consectetur.")[0] == "lorem_ipsum"
    assert filters.C4Quality()(prose(9) + "\nfunction f() { return 1; } is a bit of code")[0] == "curly_bracket"
    assert filters.C4Quality()("Only one sentence here in this line.\nAnd another one here.")[0] == "too_few_sentences"
    assert filters.C4Quality(filter_curly_bracket=False)(prose(9) + "\nx = {1: 2} is a dict of things")[0] is None


def test_fineweb_quality_drops() -> None:
    no_punct = "\n".join(f"Section heading number {i} about the river and the garden" for i in range(20))
    assert filters.FineWebQuality()(no_punct) == "line_punct_ratio"
    short = "\n".join(["Short line one.", "Another short."] * 5 + [f"Item {i}." for i in range(20)])
    assert filters.FineWebQuality()(short) == "short_line_ratio"
    dup = prose(10) + "\n" + "\n".join(["This exact line is repeated on the page many times."] * 3)
    assert filters.FineWebQuality()(dup) == "char_dup_ratio"
    assert filters.FineWebQuality()("") == "empty"


def test_language_filter() -> None:
    german = "Der Fluss fließt durch das stille Dorf, und die Kinder spielen am Ufer bis zum Abend."
    assert LanguageFilter()(german)[:2] == ("other_language", "de")
    assert LanguageFilter(languages=("de",))(german)[0] is None
    assert LanguageFilter(threshold=1.01)(prose(11))[0] == "low_language_score"


# ------------------------------------------------------------------------------------- dedup, PII


def test_minhash_finds_planted_near_duplicates_and_keeps_distinct() -> None:
    mh = MinHasher()
    base = [prose(i, 20) for i in range(6)]
    near = base[0].replace("river", "stream", 1).replace("garden", "yard", 1)  # two words changed
    docs = [*base, near, base[3] + " One more closing sentence was added here."]
    sigs = __import__("numpy").stack([mh.signature(d) for d in docs])
    roots = near_duplicate_clusters(sigs).tolist()
    assert roots == [0, 1, 2, 3, 4, 5, 0, 3]


def test_pii_scrubbed() -> None:
    text = "Mail jane.doe@corp.com or ask 8.8.8.8; the router 192.168.1.1 and 127.0.0.1 stay; v1.2.3 too."
    out, n_email, n_ip = scrub(text)
    assert "jane.doe" not in out and "8.8.8.8" not in out
    assert "192.168.1.1" in out and "127.0.0.1" in out and "v1.2.3" in out
    assert (n_email, n_ip) == (1, 1)
    assert scrub(text)[0] == out  # deterministic replacements


def test_decode_html_charsets_and_bad_bytes() -> None:
    latin = "<html><body><p>café naïve</p></body></html>".encode("latin-1")
    assert decode_html(latin)[0] is not None and "caf" in (decode_html(latin)[0] or "")
    declared = b"<meta charset='iso-8859-1'>" + latin
    assert "café" in (decode_html(declared)[0] or "")
    wrong = b"<meta charset='utf-8'>" + latin  # says utf-8, is latin-1
    assert decode_html(wrong)[1] == "fallback"
    assert decode_html(b"   \n") == (None, "empty_file")
    assert decode_html(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 20) == (None, "binary_file")


# ------------------------------------------------------------------------------------- whole runs


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A small site: good pages, a duplicate, a near duplicate, a German page and bad files."""
    root = tmp_path / "site"
    (root / "docs").mkdir(parents=True)
    for i in range(8):
        (root / "docs" / f"p{i}.html").write_text(page(prose(100 + i, 16), f"Page {i}"))
    (root / "docs" / "copy.html").write_text(page(prose(100, 16), "Page 0"))
    near = prose(101, 16).replace("river", "stream", 1)
    (root / "docs" / "near.html").write_text(page(near + "\nWrite to admin@site.example.com today.", "Page 1"))
    german = " ".join(["Der Fluss fließt durch das stille Dorf, und die Kinder spielen am Ufer."] * 3)
    (root / "docs" / "de.html").write_text(page("\n".join(f"{german} {i}" for i in range(8))))
    (root / "docs" / "empty.html").write_text("")
    (root / "docs" / "image.html").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" * 100)
    (root / "docs" / "truncated.html").write_text(page(prose(120, 16))[:300])
    (root / "docs" / "latin.html").write_bytes(page(prose(121, 16)).replace("The", "Thé").encode("latin-1"))
    (root / "genindex.html").write_text(page(prose(122)))
    return root


def _run(site: Path, out: Path, workers: int = 1, files: tuple[Path, ...] = (), fmt: str = "jsonl"):
    from dataclasses import replace

    cfg = replace(fineweb_config(filters.URLFilter(blocked_paths=(r"genindex\.html$",))), output_format=fmt)
    tasks = make_tasks([HtmlTree(site, "https://site.example/")], list(files), pages_per_task=5)
    return run(tasks, out, cfg, workers=workers, progress=False, log=lambda _: None)


def test_pipeline_on_a_site_counts_every_drop(site: Path, tmp_path: Path) -> None:
    r = _run(site, tmp_path / "out")
    docs = [json.loads(line) for line in r.corpus.read_text().splitlines()]
    urls = {d["url"].rsplit("/", 1)[-1] for d in docs}
    # the first of a duplicate cluster in path order wins: copy.html over p0.html, near.html over p1.html
    assert urls == {f"p{i}.html" for i in range(2, 8)} | {"copy.html", "near.html", "latin.html"}
    drops = r.stats["drops"]
    assert drops["url_filter"] == {"blocked_path": 1}
    assert drops["extract"]["empty_file"] == 1 and drops["extract"]["binary_file"] == 1
    assert drops["language"] == {"other_language": 1}
    assert drops["exact_dedup"] == {"exact_duplicate": 1} and drops["near_dedup"] == {"near_duplicate": 1}
    assert r.stats["stages"]["read"]["docs_in"] == 16
    assert sum(sum(d.values()) for d in drops.values()) + len(docs) == 16
    assert r.stats["languages"]["de"] == 1 and r.dedup["cluster_sizes"] == [2]
    assert "Thé" in next(d["text"] for d in docs if d["url"].endswith("latin.html"))


def test_warc_parquet_jsonl_inputs_and_corrupt_files(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    def write_warc(path: Path, n: int) -> None:
        with path.open("wb") as f:
            w = WARCWriter(f, gzip=True)
            for i in range(n):
                body = page(prose(200 + i, 16)).encode("utf-8")
                headers = StatusAndHeaders(
                    "200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1"
                )
                rec = w.create_warc_record(
                    f"https://w.example/{i}", "response", payload=io.BytesIO(body), http_headers=headers
                )
                w.write_record(rec)

    write_warc(tmp_path / "crawl.warc.gz", 3)
    broken = tmp_path / "broken.warc.gz"
    write_warc(broken, 1)
    broken.write_bytes(broken.read_bytes() + b"\x1f\x8b\x08garbage, not a gzip member" * 4)  # a corrupt record
    pq.write_table(
        pa.table({"text": [prose(300), prose(301)], "id": ["a", "b"], "url": ["https://p/a", "https://p/b"]}),
        tmp_path / "fw.parquet",
    )
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with gzip.open(tmp_path / "t.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": prose(400), "id": "j", "url": "https://j/1"}) + "\n{not json\n")
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 50)[:40])
    empty = tmp_path / "empty"
    empty.mkdir()
    files = tuple(
        tmp_path / n
        for n in ("crawl.warc.gz", "broken.warc.gz", "fw.parquet", "bad.parquet", "t.jsonl.gz", "cut.jsonl.gz")
    )
    r = _run(empty, tmp_path / "out", files=files, fmt="parquet")
    urls = sorted(json.loads(x)["url"] for x in r.corpus.read_text().splitlines())
    assert urls == [
        "https://j/1",
        "https://p/a",
        "https://p/b",
        "https://w.example/0",
        "https://w.example/1",
        "https://w.example/2",
    ]
    read = r.stats["drops"]["read"]
    assert read["corrupt_warc"] == 1 and read["corrupt_parquet"] == 1 and read["corrupt_gzip"] == 1
    assert read["malformed_jsonl_line"] == 1
    assert r.stats["drops"]["exact_dedup"] == {"exact_duplicate": 1}  # broken.warc's first records repeat crawl.warc's
    assert len(list((tmp_path / "out" / "output").glob("*.parquet"))) == len(files)


def test_restart_skips_finished_tasks_and_output_is_deterministic(site: Path, tmp_path: Path, monkeypatch) -> None:
    from llmstack.data import refine

    first = _run(site, tmp_path / "a")
    corpus = first.corpus.read_bytes()
    # a crash after task 1 of phase 1 and before phase 3: only the rest is redone
    for p in (tmp_path / "a" / "work" / "filtered").glob("0000[2-9].*"):
        p.unlink()
    for p in [*(tmp_path / "a" / "work" / "final").glob("*"), tmp_path / "a" / "work" / "dedup.json"]:
        p.unlink()
    done = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a" / "work" / "filtered").glob("*")}
    seen: list[int] = []
    real = refine.filter_task
    monkeypatch.setattr(refine, "filter_task", lambda t, *a: (seen.append(t.index), real(t, *a))[1])
    again = _run(site, tmp_path / "a")
    assert again.corpus.read_bytes() == corpus
    assert {
        p.name: p.stat().st_mtime_ns for p in (tmp_path / "a" / "work" / "filtered").glob("*") if p.name in done
    } == done
    assert seen == [0, 1, 2, 3] and len(done) == 6  # tasks 0 and 1 returned their stored stats, no work
    monkeypatch.undo()
    other = _run(site, tmp_path / "b", workers=2)  # other process count, same bytes
    assert other.corpus.read_bytes() == corpus
    with pytest.raises(ValueError, match="other settings"):
        run(make_tasks([HtmlTree(site, "https://site.example/")], []), tmp_path / "a", docs_config(), progress=False)
