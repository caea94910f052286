"""Run tasks on a model: one row per (task, metric) with a 95% interval, the chance score and n.

* ``mc``: every choice scored by its log-likelihood given the context (``loglik.py``, batched over the
  whole task); ``acc`` picks the highest sum, ``acc_norm`` the highest sum per character of the
  choice (lm-eval's ``acc_norm``); Wilson intervals. Raw text, never a chat template.
* ``gen``: chat models only, one row per mode (``direct`` and ``cot`` side by side on the same
  problems; ``tools`` for our assistants); Wilson intervals; an empty reply is scored wrong and counted.
* ``bpb``: nats over every token / (ln 2 x bytes), over held-out documents; the interval is a
  bootstrap over documents.

A task that has no data, a malformed row, a one-choice question or a model that says nothing is
reported on its row (skipped rows are counted by reason); one task failing outright is reported on its
row and the others still run.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmstack.chat.answer import ChatModel
from llmstack.eval.assistant import EvalResult
from llmstack.eval.loglik import LoglikScorer
from llmstack.eval.tasks import Document, Problem, Question, Task, chance, select
from llmstack.interop.bundle import Bundle
from llmstack.interop.load import load_model
from llmstack.io import write_json
from llmstack.paths import data_dir, runs_dir
from llmstack.tools.registry import default_toolbox
from llmstack.training.checkpoint import load_meta

PROMPTS = {
    "direct": "{q}\nAnswer with just the number.",
    "cot": '{q}\nThink step by step, then write the final answer on the last line as "Answer: <number>".',
    "tools": "{q}",
    "plain": "{q}",
}
MAX_NEW_TOKENS = {"direct": 24, "cot": 256, "tools": 64, "plain": 64}


@dataclass
class Row:
    task: str
    metric: str
    score: float | None
    interval: tuple[float, float] | None
    chance: float | None
    n: int
    skipped: dict[str, int] = field(default_factory=dict)
    note: str | None = None
    seconds: float = 0.0
    examples: list[str] = field(default_factory=list)
    details: list[dict[str, Any]] = field(default_factory=list)


def wilson(correct: int, n: int) -> tuple[float, float]:
    return EvalResult("", correct, n).interval()


def _skip(task: Task, why: str, metric: str = "-", skipped: dict[str, int] | None = None) -> Row:
    return Row(task.name, metric, None, None, None, 0, skipped or {}, note=why)


# ----------------------------------------------------------------------------- multiple choice
def score_questions(scorer: LoglikScorer, questions: Sequence[Question]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Per question: each choice's log-likelihood, the ``acc`` and ``acc_norm`` picks; and the
    questions left out by reason (a choice that does not fit the model's context)."""
    requests: list[tuple[list[int], list[int]]] = []
    owners: list[tuple[Question, int, int]] = []
    skipped = Counter[str]()
    for q in questions:
        pairs = [scorer.encode_pair(q.context, q.continuation(i)) for i in range(len(q.choices))]
        if not all(scorer.fits(cont) for _, cont in pairs):
            skipped["a choice longer than the model's context"] += 1
            continue
        owners.append((q, len(requests), len(pairs)))
        requests += pairs
    scored = scorer.loglikelihood_tokens(requests)
    out = []
    for q, start, k in owners:
        lls = [s.logprob for s in scored[start : start + k]]
        per_char = [ll / max(1, len(c)) for ll, c in zip(lls, q.choices, strict=True)]
        out.append(
            {
                "id": q.id,
                "logprobs": lls,
                "pred": max(range(k), key=lambda i: lls[i]),
                "pred_norm": max(range(k), key=lambda i: per_char[i]),
                "gold": list(q.gold),
            }
        )
    return out, dict(skipped)


def constant_baseline(questions: Sequence[Question]) -> tuple[str, float]:
    """The best score of always giving the same answer text (``No`` on a set where most answers are no):
    where the classes are unbalanced, a model can beat uniform chance by knowing only that."""
    offered = Counter(c for q in questions for c in q.choices)
    right = Counter(q.choices[g] for q in questions for g in q.gold)
    best = max(offered, key=lambda c: (right[c], c))
    return best, right[best] / max(1, len(questions))


def _mc_rows(task: Task, questions: list[Question], scorer: LoglikScorer) -> list[Row]:
    details, skipped = score_questions(scorer, questions)
    by_id = {q.id: q for q in questions}
    scored = [by_id[d["id"]] for d in details]
    base = chance(task, scored)
    answer, constant = constant_baseline(scored) if scored else ("", 0.0)
    note = f"always {answer!r} would score {constant:.1%}" if base is not None and constant > base + 0.05 else None
    rows = []
    for metric, key in (("acc", "pred"), ("acc_norm", "pred_norm")):
        right = [d[key] in d["gold"] for d in details]
        examples = []
        for d, ok in list(zip(details, right, strict=True))[:3]:
            q = by_id[d["id"]]
            tail, pick, gold = q.context[-80:].replace("\n", " "), q.choices[d[key]], q.choices[d["gold"][0]]
            examples.append(f"{'✓' if ok else '✗'} ...{tail!r} -> {pick!r} (gold {gold!r})")
        score = sum(right) / len(right) if right else None
        rows.append(
            Row(
                task.name,
                metric,
                score,
                wilson(sum(right), len(right)) if right else None,
                base,
                len(right),
                skipped,
                note=note,
                examples=examples,
                details=details if metric == "acc" else [],
            )
        )
    return rows


# ----------------------------------------------------------------------------- generative
def _gen_rows(task: Task, problems: list[Problem], responder: ChatModel | None) -> list[Row]:
    if responder is None:
        return [_skip(task, "skipped: a base model (generative tasks need a chat model)")]
    if getattr(task, "ours_only", False) and not responder.ours:
        return [_skip(task, "skipped: needs an llmstack assistant (our chat format)")]
    # every mode asks the same problems: those whose longest prompt leaves room for an answer
    fit = [
        p for p in problems if all(responder.fits(responder.ask(PROMPTS[m].format(q=p.question))) for m in task.modes)
    ]
    skipped = {"prompt too long for the model's context": len(problems) - len(fit)} if len(fit) < len(problems) else {}
    if not fit:
        return [_skip(task, "skipped: no problem fits the model's context", skipped=skipped)]
    problems = fit
    rows = []
    for mode in task.modes:
        metric = f"acc ({mode})"
        if mode == "tools" and not responder.ours:
            rows.append(_skip(task, "skipped: this model has no tools", metric))
            continue
        t0 = time.perf_counter()
        qs = [PROMPTS[mode].format(q=p.question) for p in problems]
        tools = default_toolbox().call if mode == "tools" else None
        replies = responder.answer_questions(qs, MAX_NEW_TOKENS[mode], tools)
        right = [p.correct(r) for p, r in zip(problems, replies, strict=True)]
        empty = sum(not r.strip() for r in replies)
        shown = list(zip(qs, replies, right, strict=True))[:3]
        examples = [f"{'✓' if ok else '✗'} {q!r} -> {r!r}" for q, r, ok in shown]
        rows.append(
            Row(
                task.name,
                metric,
                sum(right) / len(right),
                wilson(sum(right), len(right)),
                getattr(task, "chance_level", None) or chance(task, problems),
                len(right),
                skipped,
                note=f"{empty} empty replies (scored wrong)" if empty else None,
                seconds=time.perf_counter() - t0,
                examples=examples,
            )
        )
    return rows


# ----------------------------------------------------------------------------- bits per byte
def _bpb_rows(task: Task, docs: list[Document], scorer: LoglikScorer, seed: int) -> list[Row]:
    scored = scorer.rolling([d.text for d in docs])
    nats = [-s.logprob for s in scored]
    n_bytes = [len(d.text.encode("utf-8")) for d in docs]

    def bpb(idx: Sequence[int]) -> float:
        return sum(nats[i] for i in idx) / (math.log(2) * max(1, sum(n_bytes[i] for i in idx)))

    rng = random.Random(seed)
    boot = sorted(bpb([rng.randrange(len(docs)) for _ in docs]) for _ in range(1000))
    tokens = sum(s.n_tokens for s in scored)
    note = f"{sum(n_bytes):,} bytes, {tokens:,} tokens ({sum(n_bytes) / max(1, tokens):.2f} bytes/token)"
    score = bpb(range(len(docs)))
    return [Row(task.name, "bits/byte", score, (boot[25], boot[974]), chance(task, docs), len(docs), note=note)]


# ----------------------------------------------------------------------------- the suite
def run_task(
    task: Task,
    scorer: LoglikScorer,
    responder: ChatModel | None,
    limit: int | None,
    seed: int,
) -> list[Row]:
    t0 = time.perf_counter()
    if task.kind == "gen" and responder is None:
        return _gen_rows(task, [], None)
    found = task.examples(limit, seed)
    skipped = dict(found.skipped)
    if not found.items:
        why = found.note or ("no usable rows" if skipped else "no examples")
        return [_skip(task, f"skipped: {why}", skipped=skipped)]
    if task.kind == "mc":
        rows = _mc_rows(task, found.items, scorer)
    elif task.kind == "gen":
        rows = _gen_rows(task, found.items, responder)
    else:
        rows = _bpb_rows(task, found.items, scorer, seed)
    for r in rows:
        r.skipped = {**skipped, **r.skipped}
        r.seconds = r.seconds or time.perf_counter() - t0
    return rows


def evaluate(
    bundle: Bundle,
    tasks: Sequence[Task],
    limit: int | None = 200,
    seed: int = 0,
    chat: bool = True,
    log: Callable[[str], Any] = print,
    max_batch_tokens: int = 2048,
) -> list[Row]:
    """Every task on one model. ``chat``: the model answers generative problems (else they are skipped)."""
    scorer = LoglikScorer.for_bundle(bundle, max_batch_tokens)
    responder = ChatModel(bundle) if chat and bundle.chat_template else None
    rows: list[Row] = []
    for task in tasks:
        t0 = time.perf_counter()
        try:
            got = run_task(task, scorer, responder, limit, seed)
        except Exception as e:  # one broken task is reported on its row; the others still run
            got = [_skip(task, f"failed: {type(e).__name__}: {e}")]
        log(f"  {task.name}: {', '.join(_cell(r) for r in got)} ({time.perf_counter() - t0:.1f}s)")
        rows += got
    return rows


def is_chat_model(path: str | Path, bundle: Bundle) -> bool:
    """A model that answers chat turns: it has a chat template and is not one of our pretraining runs
    (their tokenizer has the chat specials, so only the checkpoint's stage tells them apart)."""
    if bundle.chat_template is None:
        return False
    p = Path(path)
    if p.is_dir() and not (p / "config.json").exists():
        return load_meta(p).meta.get("stage") != "pretrain"
    return True


def evaluate_model(
    spec: str,
    tasks_spec: str,
    limit: int | None = 200,
    seed: int = 0,
    device: str = "cpu",
    out: str | Path | None = None,
    log: Callable[[str], Any] = print,
) -> Path:
    """``llmstack eval --tasks``: load the model, run the tasks, print the table, write the JSON (returned).

    JSON goes to ``out``, else ``<run>/eval_tasks.json`` for a directory, else ``runs/eval/<name>.json``.
    """
    if limit is not None and limit < 1:
        raise ValueError("--limit must be at least 1")
    tasks = select(tasks_spec, data_dir())
    t0 = time.perf_counter()
    bundle = load_model(spec)
    bundle.model.to(device)
    chat = is_chat_model(spec, bundle)
    kind = "chat model" if chat else "base model: multiple choice and bits/byte only"
    log(f"{spec} ({kind}), loaded in {time.perf_counter() - t0:.1f}s; {len(tasks)} tasks, limit {limit}")
    rows = evaluate(bundle, tasks, limit=limit, seed=seed, chat=chat, log=log)
    log(table(rows))
    path = Path(out) if out else Path(spec) / "eval_tasks.json" if Path(spec).is_dir() else None
    path = path or runs_dir() / "eval" / f"{Path(spec).stem}.json"
    meta = {"model": spec, "chat": chat, "tasks": tasks_spec, "limit": limit, "seed": seed}
    write_json(path, to_json(rows, **meta, seconds=round(time.perf_counter() - t0, 1)))
    log(f"results: {path} ({time.perf_counter() - t0:.0f}s)")
    return path


# ----------------------------------------------------------------------------- output
def _fmt(value: float | None, bits: bool) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if bits else f"{value:.1%}"


def _cell(r: Row) -> str:
    bits = r.metric == "bits/byte"
    return f"{r.metric} {_fmt(r.score, bits)}" if r.score is not None else (r.note or "-")


def table(rows: Sequence[Row]) -> str:
    """The results as a text table, then the notes (skipped rows, failures, empty replies)."""
    head = f"{'task':<20} {'metric':<14} {'score':>7}  {'95% interval':<17} {'chance':>7} {'n':>5}"
    lines = [head, "-" * len(head)]
    notes = []
    for r in rows:
        bits = r.metric == "bits/byte"
        ci = f"[{_fmt(r.interval[0], bits)}, {_fmt(r.interval[1], bits)}]" if r.interval else "-"
        score, base = _fmt(r.score, bits), _fmt(r.chance, bits)
        lines.append(f"{r.task:<20} {r.metric:<14} {score:>7}  {ci:<17} {base:>7} {r.n:>5}")
        extra = [r.note] if r.note else []
        if r.skipped:
            extra.append("left out " + ", ".join(f"{v} ({k})" for k, v in sorted(r.skipped.items())))
        if extra and (r.task, *extra) not in notes:
            notes.append((r.task, *extra))
    lines += [f"  {task}: {'; '.join(extra)}" for task, *extra in notes]
    return "\n".join(lines)


def to_json(rows: Sequence[Row], **meta: Any) -> dict[str, Any]:
    return {**meta, "results": [asdict(r) for r in rows]}
