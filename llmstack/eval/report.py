"""A run's report card: one markdown page with plots, from the files the run left behind.

    llmstack report                        # runs/tiny -> runs/tiny/report/report.md (+ PNGs)

Sections: the machine; the run's headline figures and stage timings (``summary.json``); the data
(the pipeline's ``stats.json``, the corpus, the token shards); tokenizer compression against GPT-2's
ranks; training curves per stage (every ``metrics.jsonl``: train loss and the val metric for base and
sft; mean reward and held-out pass@1 for an RL stage, whose loss stays near zero); evaluations per stage
(every ``eval*.json`` in the run, and ``runs/eval/*.json`` for other models); the arena leaderboard
(``data/arena/battles.jsonl``); scaling laws (``runs/scaling/*/scaling.json``).

A section whose input is missing or unreadable says "not available: <why>" and the rest goes on.
What is not covered: the machine a run was trained on (the environment is this machine's, now);
running anything that needs a model (this only reads results and tokenizers).
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmstack.data.report import stage_table
from llmstack.data.shards import ShardIndex
from llmstack.eval import arena as arena_mod
from llmstack.eval.scaling import summary_lines
from llmstack.io import atomic_write, pyplot, read_json, save_png
from llmstack.paths import data_dir, runs_dir
from llmstack.tokenizer import Tokenizer
from llmstack.training.config import cpu_has_fast_bf16
from llmstack.training.metrics import read_metrics


class Unavailable(Exception):
    """A piece of the report whose input is not there; the message says why and how to get it."""


def _rel(path: Path, out: Path) -> str:
    """A link target: ``path`` relative to the report's directory."""
    return os.path.relpath(path, out)


def _show(path: Path) -> str:
    """A path to read: relative to the working directory when under it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


_NUMBER = re.compile(r"^[-+]?[\d,.]+%?$")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def numeric(v: Any) -> bool:
        return isinstance(v, int | float) or bool(_NUMBER.match(str(v)))

    align = ["---:" if rows and all(numeric(r[i]) for r in rows) else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(f"{v:,}" if isinstance(v, int) else str(v) for v in r) + " |" for r in rows]
    return lines


def _stage_name(path: Path, run: Path) -> str:
    """``run/x.json`` -> base; ``run/sft/x.json`` -> sft; ``run/rl/ppo/x.json`` -> rl/ppo."""
    rel = path.parent.relative_to(run)
    return "base" if rel == Path(".") else rel.as_posix()


# ----------------------------------------------------------------------------- sections
def environment(run: Path, out: Path) -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line)
        memory = f"{kb / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError, IndexError):
        memory = "not available"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if torch.cuda.is_available():
        gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        gpu = f"{gpus} (CUDA {torch.version.cuda})"
    else:
        gpu = "none"
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "not available (not a git checkout)"
    versions = []
    for pkg in ("numpy", "tokenizers", "tiktoken", "safetensors", "matplotlib", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{pkg} {metadata.version(pkg)}")
    rows = [
        ["python", f"{platform.python_version()} ({platform.python_implementation()})"],
        ["torch", f"{torch.__version__} (intra-op threads: {torch.get_num_threads()})"],
        ["CPU", f"{cpu}; bf16 matmuls {'fast (AMX / AVX512-BF16)' if cpu_has_fast_bf16() else 'slow'}"],
        ["cores", f"{os.cpu_count()} ({usable} usable by this process)"],
        ["memory", memory],
        ["GPU", gpu],
        ["OS", platform.platform()],
        ["llmstack", commit],
        ["libraries", ", ".join(versions)],
    ]
    return ["The machine writing this report (a run does not record the machine it trained on).", ""] + _table(
        ["", ""], rows
    )


def timings(run: Path, out: Path) -> list[str]:
    path = run / "summary.json"
    if not path.exists():
        raise Unavailable(f"{path} is missing (the main job writes it at its end: `llmstack run`)")
    s = read_json(path)
    lines = []
    heads = [
        ("preset", s.get("preset")),
        ("parameters", f"{s['params']:,}" if s.get("params") else None),
        ("documents", s.get("documents")),
        ("train tokens", f"{s['train_tokens']:,}" if s.get("train_tokens") else None),
        ("pretraining steps", s.get("steps")),
    ]
    if s.get("val_bpb_initial") is not None and s.get("val_bpb_final") is not None:
        heads.append(("val bits/byte", f"{s['val_bpb_initial']:.3f} -> {s['val_bpb_final']:.3f}"))
    if s.get("train_loss_first") is not None and s.get("train_loss_last") is not None:
        heads.append(("train loss (nats/token)", f"{s['train_loss_first']:.3f} -> {s['train_loss_last']:.3f}"))
    for task, acc in (s.get("assistant") or {}).items():
        heads.append((f"assistant: {task}", f"{acc:.1%}"))
    lines += _table(["", ""], [[k, v] for k, v in heads if v is not None])
    seconds = s.get("seconds") or {}
    if not seconds:
        return lines + ["", "Stage timings: not available: summary.json has no 'seconds'"]
    order = ("data", "tokenizer", "tokenize", "pretrain", "sample", "sft", "rl", "eval")
    seconds = dict(sorted(seconds.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    total = sum(seconds.values())
    rows = [[k, f"{v:.1f}", f"{v / total:.0%}"] for k, v in seconds.items()]
    lines += ["", *_table(["stage", "seconds", "share"], rows + [["total", f"{total:.1f}", "100%"]])]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.4 * len(seconds)), dpi=110)
    names = list(seconds)[::-1]
    ax.barh(names, [seconds[k] for k in names], color="tab:blue")
    for i, k in enumerate(names):
        ax.text(seconds[k], i, f" {seconds[k]:.0f}s", va="center", fontsize=9)
    ax.set_xlabel("seconds")
    ax.set_xlim(0, max(seconds.values()) * 1.15)
    ax.set_title(f"main job stages, {total:.0f}s in all")
    fig.tight_layout()
    save_png(fig, out / "timings.png")
    return lines + ["", "![stage timings](timings.png)"]


def data(run: Path, out: Path) -> list[str]:
    lines: list[str] = []
    stats_files = sorted((data_dir() / "pipeline").glob("*/stats.json"))
    for path in stats_files:
        lines += [f"**Pipeline `{path.parent.name}`** ([full report]({_rel(path.parent / 'report.md', out)}))", ""]
        try:
            lines += [stage_table(read_json(path)), ""]
        except (ValueError, KeyError) as e:
            lines += [f"not available: {path} is not a pipeline's stats ({e})", ""]
        if (path.parent / "funnel.png").exists():
            lines += [f"![documents after each stage]({_rel(path.parent / 'funnel.png', out)})", ""]
    if not stats_files:
        where = data_dir() / "pipeline"
        lines += [f"Pipeline: not available: no {where}/*/stats.json (run `llmstack data pipeline`)", ""]
    corpora = sorted((data_dir() / "corpus").glob("*.jsonl"))
    rows = []
    for c in corpora:
        with c.open("rb") as f:
            n = sum(1 for line in f if line.strip())
        rows.append([f"`{_show(c)}`", n, f"{c.stat().st_size / 1e6:.1f}"])
    lines += _table(["corpus", "documents", "MB"], rows) if rows else ["Corpus: not available: no data/corpus/*.jsonl"]
    index = run / "shards" / "index.json"
    if index.exists():
        idx = read_json(index)
        rows = [
            [split, sum(s["n_docs"] for s in shards), sum(s["n_tokens"] for s in shards)]
            for split, shards in idx["splits"].items()
        ]
        lines += ["", f"Token shards ({idx['dtype']}, vocabulary {idx['vocab_size']:,}):", ""]
        lines += _table(["split", "documents", "tokens"], rows)
    else:
        lines += ["", f"Token shards: not available: {index} is missing (`llmstack tokenize`)"]
    return lines


def _val_text(run: Path, tok: Any) -> str:
    """The val split's documents as text (decoded from the shards: the BPE is lossless)."""
    idx = ShardIndex.load(run / "shards")
    docs = []
    for arr in idx.arrays("val"):
        ids = np.asarray(arr)
        for piece in np.split(ids, np.flatnonzero(ids == idx.bos_id)):
            if len(piece) > 1 or (len(piece) == 1 and piece[0] != idx.bos_id):
                docs.append(tok.decode([int(t) for t in piece if t != idx.bos_id]))
    return "\n".join(docs)


def tokenizer(run: Path, out: Path) -> list[str]:
    gpt2_path = data_dir() / "assets" / "gpt2.tiktoken"
    missing = [
        f"{path} is missing ({how})"
        for path, how in (
            (run / "tokenizer" / "tokenizer.json", "`llmstack tokenizer train`"),
            (gpt2_path, "fetch it with `llmstack data fetch --assets-only`"),
        )
        if not path.exists()
    ]
    if missing:
        raise Unavailable("; ".join(missing))
    ours = Tokenizer.load(run / "tokenizer")
    gpt2 = Tokenizer.from_tiktoken_file(gpt2_path, special_tokens={"<|endoftext|>": 50256})
    texts = []
    try:
        texts.append(("val split of the corpus (held out from the model; the tokenizer saw it)", _val_text(run, ours)))
    except (FileNotFoundError, ValueError) as e:
        texts.append((f"val split: not available ({e})", ""))
    readme = Path(__file__).resolve().parents[2] / "README.md"
    if readme.exists():
        texts.append(("this project's README (held out from both)", readme.read_text(encoding="utf-8")))
    rows: list[list[Any]] = []
    for name, text in texts:
        if not text:
            rows.append([name, "-", "-", "-", "-", "-", "-"])
            continue
        n_bytes, a, b = len(text.encode("utf-8")), len(ours.encode_ordinary(text)), len(gpt2.encode_ordinary(text))
        rows.append([name, n_bytes, a, f"{n_bytes / a:.2f}", b, f"{n_bytes / b:.2f}", f"{b / a:.2f}"])
    head = [
        "text",
        "bytes",
        f"tokens, ours ({ours.vocab_size:,})",
        "bytes/token",
        f"tokens, GPT-2 ({gpt2.vocab_size:,})",
        "bytes/token",
        "GPT-2 / ours",
    ]
    return [
        f"Bytes per token (higher compresses better) of `{_show(run / 'tokenizer')}` against GPT-2's ranks, "
        "both without special tokens.",
        "",
        *_table(head, rows),
    ]


VAL_LABELS = {"val_bpb": "val bits/byte", "val_loss": "val loss (nats/token)"}
REWARD_LABEL = "mean reward (train rollouts)"
PASS1_LABEL = "held-out pass@1 (greedy)"


def _ema(values: list[float], decay: float = 0.9) -> list[float]:
    out, avg = [], values[0]
    for v in values:
        avg = decay * avg + (1 - decay) * v
        out.append(avg)
    return out


def _loss_panel(ax: Any, stage: str, train: list[dict[str, Any]], evals: list[dict[str, Any]], key: str | None) -> None:
    """Train loss (raw, faint; and an exponential moving average) and the val metric, one legend."""
    handles = []
    if train:
        steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.8)
        handles += ax.plot(steps, _ema(losses), color="tab:blue", lw=1.6, label="train loss, EMA 0.9 (nats/token)")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)")
    ax.grid(alpha=0.3)
    vals = [(r["step"], r[key]) for r in evals if key and key in r]
    if vals:
        same_unit = key == "val_loss"  # nats/token like the train loss: one axis
        vax = ax if same_unit else ax.twinx()
        handles += vax.plot(*zip(*vals, strict=True), "o-", color="tab:red", label=VAL_LABELS.get(key or "", key))
        if not same_unit:
            vax.set_ylabel(VAL_LABELS.get(key or "", key), color="tab:red")
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    ax.set_title(stage)


def _rl_panel(ax: Any, stage: str, rl: list[dict[str, Any]], evals: list[dict[str, Any]]) -> None:
    """An RL stage (GRPO's ``kind: rl`` and ``kind: eval`` records): the mean reward of each step's rollouts
    (raw, faint; and an EMA) and held-out pass@1 at each evaluation, both fractions on one axis. Not its
    loss: advantages are centred within each group, so the policy loss stays near zero while it learns."""
    steps, rewards = [r["step"] for r in rl], [r["reward"] for r in rl]
    ax.plot(steps, rewards, color="tab:green", alpha=0.25, lw=0.8, label=REWARD_LABEL)
    ax.plot(steps, _ema(rewards), color="tab:green", lw=1.6, label="mean reward, EMA 0.9")
    passes = [(r["step"], r["pass@1"]) for r in evals if "pass@1" in r]
    if passes:
        ax.plot(*zip(*passes, strict=True), "o-", color="tab:red", label=PASS1_LABEL)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("step")
    ax.set_ylabel("reward / pass@1")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(stage)


def loss_curves(run: Path, out: Path) -> list[str]:
    # base first, then the stages in pipeline order (sft before rl), anything else after them
    pipeline = {"sft": 0, "rl": 1}
    paths = sorted(
        run.glob("**/metrics.jsonl"), key=lambda p: (len(p.parts), pipeline.get(p.parent.name, len(pipeline)), p)
    )
    paths = [p for p in paths if out not in p.parents]
    if not paths:
        raise Unavailable(f"no metrics.jsonl under {run} (training writes one per stage)")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(paths), figsize=(6.5 * len(paths), 4.2), dpi=100, squeeze=False)
    rows = []
    for ax, path in zip(axes[0], paths, strict=True):
        stage = _stage_name(path, run)
        recs = read_metrics(path)
        train = [r for r in recs if r.get("kind") == "train" and "loss" in r]
        evals = [r for r in recs if r.get("kind") == "eval"]
        rl = [r for r in recs if r.get("kind") == "rl" and "reward" in r]
        speeds = sorted(r["tok_per_s"] for r in train if "tok_per_s" in r)
        if rl:
            passes = [r["pass@1"] for r in evals if "pass@1" in r]
            steps = rl[-1]["step"]
            trained = f"mean reward {rl[0]['reward']:.3f} -> {rl[-1]['reward']:.3f}"
            held_out = f"pass@1: {passes[0]:.1%} -> {passes[-1]:.1%}" if passes else "-"
            _rl_panel(ax, stage, rl, evals)
        else:
            key = next((k for k in VAL_LABELS if any(k in r for r in evals)), None)
            vals = [r[key] for r in evals if key and key in r]
            steps = train[-1]["step"] if train else 0
            trained = f"loss {train[0]['loss']:.3f} -> {train[-1]['loss']:.3f}" if train else "-"
            held_out = f"{VAL_LABELS[key]}: {vals[0]:.3f} -> {vals[-1]:.3f}" if key and vals else "-"
            _loss_panel(ax, stage, train, evals, key)
        rows.append(
            [
                stage,
                steps,
                trained,
                held_out,
                f"{speeds[len(speeds) // 2]:,.0f}" if speeds else "-",
                f"{sum(r.get('dt', 0.0) for r in train):.0f}",
            ]
        )
    fig.tight_layout()
    save_png(fig, out / "loss_curves.png")
    head = ["stage", "steps", "train", "held-out", "tokens/s (median)", "train seconds"]
    return [*_table(head, rows), "", "![training curves per stage](loss_curves.png)"]


def _eval_rows(obj: Any) -> list[tuple[str, str, float, Any, Any]]:
    """(task, metric, score, interval, n) from the two formats we write: ``llmstack eval``'s
    {task: {accuracy, interval, total}} and ``llmstack eval --tasks``' {"results": [rows]}."""
    if isinstance(obj, dict) and isinstance(obj.get("results"), list):
        return [
            (r["task"], r.get("metric", ""), r["score"], r.get("interval"), r.get("n"))
            for r in obj["results"]
            if isinstance(r, dict) and "task" in r and isinstance(r.get("score"), int | float)
        ]
    if isinstance(obj, dict) and obj and all(isinstance(v, dict) and "accuracy" in v for v in obj.values()):
        return [(k, "accuracy", v["accuracy"], v.get("interval"), v.get("total")) for k, v in obj.items()]
    raise ValueError("not a format this report reads (expected llmstack eval's JSON)")


def _cell(metric: str, score: float, interval: Any, n: Any) -> str:
    bits = any(k in metric for k in ("bpb", "bits", "loss"))
    fmt = (lambda v: f"{v:.3f}") if bits else (lambda v: f"{v:.1%}")
    ci = ""
    if isinstance(interval, list | tuple) and len(interval) == 2:
        ci = f" [{fmt(interval[0])}, {fmt(interval[1])}]"
    return f"{fmt(score)}{ci}" + (f" of {n}" if n else "")


def evaluations(run: Path, out: Path) -> list[str]:
    sources = [(_stage_name(p, run), p) for p in sorted(run.glob("**/eval*.json")) if out not in p.parents]
    sources += [(f"runs/eval: {p.stem}", p) for p in sorted((runs_dir() / "eval").glob("*.json"))]
    if not sources:
        raise Unavailable(f"no eval*.json under {run} (`llmstack eval --model {run}/sft`, `--tasks all`)")
    table: dict[tuple[str, str], dict[str, str]] = {}
    columns: list[str] = []
    notes = []
    for stage, path in sources:
        try:
            rows = _eval_rows(read_json(path))
        except (ValueError, KeyError, TypeError) as e:
            notes.append(f"- `{_show(path)}`: not available: {e}")
            continue
        column = stage if path.name == "eval.json" else f"{stage} ({path.stem})"
        columns.append(column)
        for task, metric, score, interval, n in rows:
            table.setdefault((task, metric), {})[column] = _cell(metric, score, interval, n)
    lines = []
    if columns:
        rows_out = [[t, m, *(cells.get(c, "") for c in columns)] for (t, m), cells in table.items()]
        lines += ["Scores with 95% intervals, one column per stage and file.", ""]
        lines += _table(["task", "metric", *columns], rows_out)
    return lines + ([""] if lines and notes else []) + notes


def arena(run: Path, out: Path) -> list[str]:
    log = data_dir() / "arena" / "battles.jsonl"
    if not log.exists():
        raise Unavailable(f"{log} is missing (`llmstack arena battle`)")

    read = arena_mod.read_battles(log)
    board = arena_mod.leaderboard(read.battles, rounds=200)
    png = board.plot(out / "arena.png")
    skipped = [f"{len(read.problems)} log lines skipped as unreadable", ""] if read.problems else []
    return [*skipped, "```", board.table(), "```", "", f"![arena ratings]({png.name})"]


def scaling(run: Path, out: Path) -> list[str]:
    paths = sorted(runs_dir().glob("scaling/*/scaling.json"))
    if not paths:
        raise Unavailable(f"no {runs_dir()}/scaling/*/scaling.json (`llmstack scaling --preset quick`)")
    lines = []
    for path in paths:
        state = read_json(path)
        lines += [f"**Sweep `{path.parent.name}`**", "", "```", *summary_lines(state), "```", ""]
        lines += [f"![{Path(p).stem}]({_rel(Path(p), out)})" for p in state.get("plots", []) if Path(p).exists()]
        lines.append("")
    return lines


SECTIONS: list[tuple[str, Callable[[Path, Path], list[str]]]] = [
    ("Environment", environment),
    ("The run", timings),
    ("Data", data),
    ("Tokenizer", tokenizer),
    ("Training", loss_curves),
    ("Evaluation", evaluations),
    ("Arena", arena),
    ("Scaling laws", scaling),
]


def write_report_card(run: str | Path, out: str | Path) -> Path:
    """Write ``out/report.md`` and its PNGs for ``run``; returns the markdown's path."""
    run, out = Path(run).resolve(), Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Report card: `{run.name}`", "", f"`{run}`, written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.", ""]
    for title, section in SECTIONS:
        lines += [f"## {title}", ""]
        try:
            lines += section(run, out)
        except Unavailable as e:
            lines.append(f"not available: {e}")
        except Exception as e:  # noqa: BLE001 - one unreadable input never costs the rest of the card
            lines.append(f"not available: {type(e).__name__}: {e}")
        lines.append("")
    path = out / "report.md"
    with atomic_write(path) as f:
        f.write("\n".join(lines))
    return path
