#!/usr/bin/env bash
# One GPU session, ~8.5 minutes: (a) the throughput levers at the d12 shape, (b) Muon against AdamW at
# d12 on real text. Everything goes under $OUT; a compact summary is printed at the end.
#
#   bash bench/gpu_session.sh                                 # on the GPU machine; carry data/gpu_bench
#   GPU_SESSION_SMOKE=1 OUT=/tmp/gs PYTHON=.venv/bin/python bash bench/gpu_session.sh   # CPU, tiny, ~3 min
#
# Needs data/gpu_bench (python bench/make_gpu_data.py). Budget: GPU_SESSION_BUDGET_S (default 510 s in
# all); step (a) gets LEVERS_S (150 s) and stops starting combinations that would not fit; step (b) gets
# what is left, its per-run time shrinking to fit (the same for both optimizers). Each step runs under
# `timeout`, and each writes its JSON as it goes, so a step cut short keeps what it finished.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_session}
PY=${PYTHON:-python3}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
start=$(date +%s)
elapsed() { echo $(($(date +%s) - start)); }

if [ "${GPU_SESSION_SMOKE:-0}" = 1 ]; then
    BUDGET=${GPU_SESSION_BUDGET_S:-480}
    LEVERS_S=${LEVERS_S:-240}
    SHAPE=(--device cpu --layers 2 --dim 64 --heads 2 --mlp 192 --seq 64 --batch 4 --vocab 512 --steps 2 --warmup 1)
    MATRIX="eager;eager+chunked;eager+chunked+muon;eager+chunked+ckpt+b8;compile+chunked;compile+chunked+muon;compile+chunked+ckpt+b8"
    RACE=(--smoke --seconds "${RACE_S:-10}")
else
    BUDGET=${GPU_SESSION_BUDGET_S:-510}
    LEVERS_S=${LEVERS_S:-150}
    # the d12 shape (presets.d12: 12 x 768, 6 heads of 128, SwiGLU 2048), vocab of data/gpu_bench's BPE
    SHAPE=(--device cuda --layers 12 --dim 768 --heads 6 --mlp 2048 --seq 2048 --batch 32 --vocab 32768 --dtype bfloat16
        --steps 10 --warmup 3)
    # in order of interest: the loop's current setup first; later ones are skipped when time is short
    MATRIX="compile;compile+chunked;compile+chunked+muon;eager;eager+chunked;compile+chunked+b64;compile+chunked+ckpt+b64"
    RACE=(--device cuda --seconds "${RACE_S:-150}")
fi

echo "== environment ($(elapsed) s)"
"$PY" - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, f"{p.total_memory / 2**30:.0f} GiB", "capability", f"{p.major}.{p.minor}")
for mod in ("matplotlib", "numpy", "tiktoken", "tokenizers", "safetensors", "tqdm"):
    try:
        __import__(mod)
    except ImportError:
        print("missing:", mod)
EOF

[ -f data/gpu_bench/index.json ] || echo "MISSING data/gpu_bench: run python bench/make_gpu_data.py and carry it"

if [ "${GPU_SESSION_SMOKE:-0}" != 1 ] && "$PY" -c "import pytest" 2>/dev/null; then
    echo "== GPU tests: NS in bf16, chunked cross-entropy under CUDA autocast ($(elapsed) s)"
    timeout -k 5 60 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_optim.py tests/test_model.py \
        >"$OUT/gpu_tests.log" 2>&1
    tail -1 "$OUT/gpu_tests.log"
fi

echo "== (a) throughput levers ($(elapsed) s)"
timeout -k 10 "$LEVERS_S" "$PY" bench/train_throughput.py "${SHAPE[@]}" --matrix "$MATRIX" \
    --json "$OUT/levers.json" --budget-s $((LEVERS_S - 20)) >"$OUT/levers.log" 2>&1
echo "levers exit $? ($(elapsed) s)"
grep '^{' "$OUT/levers.log" | cut -c1-220

left=$((BUDGET - $(elapsed)))
echo "== (b) optimizer race, $left s left ($(elapsed) s)"
timeout -k 10 $((left - 5)) "$PY" bench/optimizer_race.py "${RACE[@]}" --deadline-s $((left - 15)) \
    --out "$OUT/race" >"$OUT/race.log" 2>&1
echo "race exit $? ($(elapsed) s)"
grep -v '^  ' "$OUT/race.log" | grep -v -i warn | tail -8 | cut -c1-300

echo "== summary ($(elapsed) s)"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
if (out / "levers.json").exists():
    lv = json.loads((out / "levers.json").read_text())
    print(f"levers on {lv['device']} (torch {lv['torch']}), B={lv['shape']['batch']} T={lv['shape']['seq']}:")
    for r in lv["results"]:
        what = r.get("error") or r.get("skipped") or (
            f"{r['tok_s']:>9,} tok/s {r['step_ms']:8.1f} ms"
            + (f"  MFU {r['mfu']:.1%}" if r.get("mfu") else "")
            + (f"  peak {r['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in r else "")
        )
        print(f"  {r['combo']:<28} B={r['batch']:<3} {what}")
else:
    print("no levers.json")
race = out / "race" / "race.json"
if race.exists():
    rc = json.loads(race.read_text())
    print(f"race: {rc['params_M']:.0f}M params, {rc['seconds_per_run']:.0f} s per run, compile+warm-up {rc['warmup_compile_s']:.0f} s")
    for name, r in rc["runs"].items():
        print(
            f"  {name:<6} val loss {r['final_val_loss']:.4f}  bpb {r['final_val_bpb']:.4f}  {r['steps_done']} steps  "
            f"{r['tokens'] / 1e6:.1f}M tokens  {r['tok_per_s']:,.0f} tok/s  epochs {r['evals'][-1]['epoch']:.1f}"
        )
    print("  plot:", out / "race" / "race.png", "exists" if (out / "race" / "race.png").exists() else "MISSING")
else:
    print("no race.json")
EOF
echo "done in $(elapsed) s"
