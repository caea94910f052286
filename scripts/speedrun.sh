#!/usr/bin/env bash
# The d20 speedrun on one node of 8 GPUs: your web text -> FineWeb-style pipeline -> tokenizer -> d20
# pretraining (10.5B tokens) -> SFT -> evaluation. docs/gpu.md has the time estimate and what it rests on.
#
#   bash scripts/speedrun.sh data/web/*.parquet           # FineWeb parquet, WARC or JSONL files you have
#   NPROC=4 PARALLEL=fsdp bash scripts/speedrun.sh ...      # 4 GPUs, weights and optimizer state sharded
#
# Each stage resumes where it stopped (rerun the script after a crash). Nothing is downloaded here: the
# text is yours (a FineWeb sample is ~1 TB per 250B tokens; d20 reads 10.5B).
set -euo pipefail
if [ "$#" -eq 0 ]; then
    echo "usage: bash scripts/speedrun.sh FILE... (.parquet, .warc[.gz], .jsonl[.gz] web text)" >&2
    exit 2
fi
NPROC="${NPROC:-8}"
PARALLEL="${PARALLEL:-ddp}"
RUN="${RUN:-runs/d20}"
DATA="${DATA:-data/pipeline/speedrun}"
inputs=()
for f in "$@"; do inputs+=(--input "$f"); done

# 1. clean text: URL / language / Gopher / C4 / FineWeb filters, MinHash dedup, PII, on every CPU core
llmstack data pipeline --crawl none "${inputs[@]}" --out "$DATA" --profile fineweb --format jsonl
# 2. a 65,536-token byte-level BPE on the clean text, then token shards (1% held out)
llmstack tokenizer train --preset d20 --run-dir "$RUN" --corpus "$DATA/corpus.jsonl" --vocab-size 65536
llmstack tokenize --preset d20 --run-dir "$RUN" --corpus "$DATA/corpus.jsonl" --val-fraction 0.01
# 3. pretraining: 20,000 steps of 8 x 32 x 2,048 tokens (10.5B), bf16, torch.compile, chunked loss
torchrun --standalone --nproc_per_node "$NPROC" -m llmstack.cli pretrain --preset d20 --run-dir "$RUN" \
    --device cuda --parallel "$PARALLEL"
# 4. the assistant: the SFT mixture (chat format, tools, identity), then its evaluations
torchrun --standalone --nproc_per_node "$NPROC" -m llmstack.cli sft --run-dir "$RUN" --device cuda
llmstack eval --model "$RUN/sft"
llmstack eval --model "$RUN/sft" --tasks all --limit 500
llmstack report --run "$RUN"
