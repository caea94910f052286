"""Token shards small enough to carry to a GPU machine for ``bench/optimizer_race.py``.

Real text, our tokenizer, our shard format: the documents of the full Debian crawl (five HTML manuals
through the FineWeb-style pipeline, ``docs`` profile, English), a byte-level BPE trained on their train
split (32,768 tokens by default: the vocabulary of the throughput bench's d12 shape), and train/val
shards (``llmstack.data.shards``: uint16, ``index.json``). The output folder is all the race reads.

    llmstack data pipeline --crawl full --profile docs     # once: -> data/pipeline/full/corpus.jsonl
    python bench/make_gpu_data.py                            # -> data/gpu_bench/ (~15 MB, ~30 s)
    python bench/make_gpu_data.py --tokenizer runs/tiny/tokenizer --out data/gpu_bench_4k   # an existing BPE

``data/`` is git-ignored; carry ``data/gpu_bench`` to the GPU machine (bench/gpu_session.sh).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

from llmstack.data.corpus import read_jsonl
from llmstack.data.shards import split_of, write_shards
from llmstack.io import write_json
from llmstack.tokenizer import Tokenizer

CORPUS = Path("data/pipeline/full/corpus.jsonl")
VAL_FRACTION = 0.05


def make_gpu_data(
    corpus: Path, out: Path, vocab_size: int, tokenizer: Path | None, max_mib: float, max_docs: int | None = None
) -> dict:
    if not corpus.exists():
        raise FileNotFoundError(f"{corpus}: no corpus; run `llmstack data pipeline --crawl full --profile docs` first")

    def docs() -> Iterator[tuple[str, str]]:
        for i, doc in enumerate(read_jsonl(corpus)):
            if max_docs is not None and i >= max_docs:
                return
            yield doc.id, doc.text

    t0 = time.perf_counter()
    if tokenizer is not None:
        tok = Tokenizer.load(tokenizer)
    else:  # trained on the train split only, so validation text is unseen by the tokenizer too
        tok = Tokenizer.train((t for d, t in docs() if split_of(d, VAL_FRACTION) == "train"), vocab_size)
    tok.save(out / "tokenizer")
    t_tok = time.perf_counter() - t0
    index = write_shards(docs(), tok, out, val_fraction=VAL_FRACTION)
    size_mib = sum((out / s["file"]).stat().st_size for split in index.splits.values() for s in split) / 2**20
    if size_mib > max_mib:
        raise ValueError(f"{out}: shards are {size_mib:.1f} MiB, over --max-mib {max_mib}; use --max-docs")
    summary = {
        "corpus": str(corpus),
        "vocab_size": tok.vocab_size,
        "tokenizer_fingerprint": tok.fingerprint,
        "train_tokens": index.n_tokens("train"),
        "val_tokens": index.n_tokens("val"),
        "shard_mib": round(size_mib, 2),
        "tokenizer_seconds": round(t_tok, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(out / "source.json", summary)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=CORPUS, help="documents, one JSON object a line")
    ap.add_argument("--out", type=Path, default=Path("data/gpu_bench"))
    ap.add_argument("--vocab-size", type=int, default=32768, help="train a BPE of this size (with 16 specials)")
    ap.add_argument("--tokenizer", type=Path, default=None, help="use this tokenizer directory instead")
    ap.add_argument("--max-mib", type=float, default=40.0, help="refuse shards larger than this (carry limit)")
    ap.add_argument("--max-docs", type=int, default=None, help="only the first N documents")
    args = ap.parse_args()
    summary = make_gpu_data(args.corpus, args.out, args.vocab_size, args.tokenizer, args.max_mib, args.max_docs)
    print(summary)


if __name__ == "__main__":
    main()
