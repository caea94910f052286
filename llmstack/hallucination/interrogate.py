"""Hallucination mitigation by interrogation: teaching a model to say it does not know.

Llama 3's factuality recipe: ask the model questions whose answers a knowledge source holds; where
it answers wrong, train it to say it does not know; keep the questions it answers right as they are.
Here the source is synthetic, so which facts the model was taught is known exactly::

    stage 1  knowledge      SFT on questions about the *taught* people (three phrasings a fact, a bio)
    stage 2  interrogation  ask every interrogation question greedily through the engine and judge
                            the answer against the source; a fact is known when every phrasing of it
                            is answered right (one lucky guess is not knowledge)
    stage 3  refusal        SFT again on the stage-1 data + the interrogation data: "I don't know ..."
                            where it failed, its own answer where it knew, the two sides balanced
    eval     on people never interrogated: (a) never taught: how often it says it does not know,
             and how often it names a value anyway; (b) taught and answered right by the stage-1
             model: how often still answered right. Wilson 95% intervals.

People are fictional, with syllable-built names and three attributes (home town, job, year of
birth), split four ways: taught or never taught, interrogated or held out. Never-taught people are
many (they cost no stage-1 training), so that what the model learns to refuse on is a name it holds
no facts about, not a list of names.

What is not covered: real-world knowledge and free-form answers (the judge is a whole-word match of
one-word gold values); lookalike names; questions without any answer. The held-out taught facts are
in the stage-1 data that stage 3 trains on again: (b) asks whether refusing spreads to facts the
model still trains on, not whether knowledge it never rehearses survives. Without that rehearsal
the tiny model learns "answer only about the people interrogated" and refuses on 80-90% of what it
knew (docs/hallucination.md).

The people and their questions are in ``people.py``; the judge and the evaluation in ``measure.py``.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmstack.chat.answer import our_chat
from llmstack.chat.conversation import ChatFormat, Conversation
from llmstack.chat.mixture import MixtureConfig, build_mixture
from llmstack.hallucination.measure import TARGET, Asker, Figures, Verdict, ask, evaluate, judge, plot_figures
from llmstack.hallucination.people import (
    ATTRIBUTES,
    NOUNS,
    Question,
    all_questions,
    eval_questions,
    knowledge_conversations,
    make_source,
)
from llmstack.io import atomic_write, write_json
from llmstack.model.llama import GPT
from llmstack.tokenizer import special as S
from llmstack.training.config import TrainConfig
from llmstack.training.distributed import DistInfo
from llmstack.training.loop import TrainResult, train
from llmstack.training.sft import SFTTask

# ----------------------------------------------------------------------------- stage 3's refusals
IDK_REPLIES = (
    "I'm sorry, I don't know {name}'s {noun}.",
    "I don't know anything about {name}.",
    "I do not have any information about {name}'s {noun}.",
)


def idk_reply(q: Question, rng: random.Random) -> str:
    return rng.choice(IDK_REPLIES).format(name=q.entity.name, noun=NOUNS[q.attribute])


# ----------------------------------------------------------------------------- stage 2: interrogation
@dataclass(frozen=True)
class Probe:
    question: Question
    answer: str  # greedy
    verdict: Verdict


def interrogate(asker: Asker, questions: list[Question], batch_size: int = 64, progress: bool = True) -> list[Probe]:
    answers = ask(asker, [q.text for q in questions], batch_size, "interrogate", progress)
    return [Probe(q, a, judge(a, q)) for q, a in zip(questions, answers, strict=True)]


def known_facts(probes: list[Probe]) -> set[tuple[str, str]]:
    """(name, attribute) facts answered right in every phrasing asked: consistently, not by a lucky guess."""
    facts: dict[tuple[str, str], bool] = {}
    for p in probes:
        key = (p.question.entity.name, p.question.attribute)
        facts[key] = facts.get(key, True) and p.verdict == "right"
    return {k for k, ok in facts.items() if ok}


def interrogation_conversations(
    probes: list[Probe], known: set[tuple[str, str]], seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """(answers, refusals): a known fact keeps the model's own right answer; anything else gets "I don't know"."""
    rng = random.Random(seed)
    answers, refusals = [], []
    for p in probes:
        q = p.question
        if (q.entity.name, q.attribute) in known:
            answers.append(Conversation.of(("user", q.text), ("assistant", p.answer)))
        else:
            refusals.append(Conversation.of(("user", q.text), ("assistant", idk_reply(q, rng))))
    return answers, refusals


# ----------------------------------------------------------------------------- the three stages
@dataclass(frozen=True)
class InterrogateConfig:
    taught: int = 60  # entities whose facts stage 1 teaches
    unknown: int = 400  # entities never taught: only their names appear, in refusals
    held_out_taught: int = 30  # never interrogated: the evaluation's people (they cost stage-1 training)
    held_out_unknown: int = 100  # never interrogated either (cheap: 300 questions, a tighter interval)
    knowledge_steps: int = 400
    refusal_steps: int = 500
    batch_size: int = 32
    lr: float = 3e-3  # stage 1
    refusal_lr: float = 1e-3  # stage 3: gentler, the facts nobody asked about are not trained again
    mixture: int = 200  # assistant-mixture conversations in each stage, so it stays an assistant
    seed: int = 0


@dataclass
class InterrogationReport:
    before: Figures  # the stage-1 model
    after: Figures  # the stage-3 model
    counts: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def targets_met(self) -> bool:
        return self.after.unknown_idk.accuracy >= TARGET and self.after.known_right.accuracy >= TARGET

    def to_json(self, cfg: InterrogateConfig) -> dict[str, Any]:
        return {
            "config": asdict(cfg),
            "counts": self.counts,
            "before": self.before.to_json(),
            "after": self.after.to_json(),
            "targets_met": self.targets_met,
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
        }


def finetune(
    model: GPT,
    tok: Any,
    convs: list[Conversation],
    cfg: TrainConfig,
    run_dir: Path,
    dist: DistInfo,
    meta: dict[str, Any],
    progress: bool,
) -> TrainResult:
    """SFT through the one training loop; a finished stage in ``run_dir`` is loaded instead of retrained."""
    val = convs[: 2 * cfg.batch_size]  # the first training rows: how far it has memorised, not held-out
    task = SFTTask(convs, val, ChatFormat(tok), tok.special_id(S.PAD), cfg, dist)
    tok.save(run_dir / "tokenizer")  # the stage is a run that `llmstack chat --model` opens
    meta = {**meta, "tokenizer_fingerprint": tok.fingerprint}
    return train(model, task, cfg, run_dir, dist, meta=meta, progress=progress)


def stage_config(steps: int, lr: float, batch_size: int, seq_len: int, seed: int) -> TrainConfig:
    """Short conversations, cosine decay, no weight decay (it would pull memorised facts away)."""
    return TrainConfig(
        max_steps=steps,
        batch_size=batch_size,
        seq_len=min(128, seq_len),
        lr=lr,
        warmup_steps=min(20, steps // 10),
        schedule="cosine",
        min_lr_ratio=0.05,
        eval_every=0,
        eval_batches=2,
        ckpt_every=0,
        keep_checkpoints=1,
        weight_decay=0.0,
        seed=seed,
    )


def _mixture(n: int, seed: int, words: list[str]) -> list[Conversation]:
    parts = MixtureConfig(
        arithmetic=n // 2, identity=n // 4, spelling=n - n // 2 - n // 4, gsm=0, chitchat=0, reasoning=0
    )
    return build_mixture(parts, seed, words) if n > 0 else []


def _write_probes(path: Path, probes: list[Probe], known: set[tuple[str, str]], taught: set[str]) -> None:
    with atomic_write(path) as f:
        for p in probes:
            q = p.question
            row: dict[str, Any] = {"question": q.text, "entity": q.entity.name, "attribute": q.attribute}
            row |= {"gold": q.gold, "taught": q.entity.name in taught, "answer": p.answer, "verdict": p.verdict}
            f.write(json.dumps(row | {"known": (q.entity.name, q.attribute) in known}) + "\n")


def run_interrogation(
    model: GPT,
    tok: Any,
    cfg: InterrogateConfig,
    out: str | Path,
    dist: DistInfo,
    words: list[str],
    meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> InterrogationReport:
    """The three stages and the eval. Writes under ``out``: knowledge/ and interrogated/ (runs with
    checkpoints), interrogation.jsonl (every probe and its verdict), eval.json, eval.png."""
    out, meta = Path(out), dict(meta or {})
    say = print if progress else (lambda *a: None)
    src = make_source(cfg.taught, cfg.unknown, cfg.held_out_taught, cfg.held_out_unknown, cfg.seed)
    asker = Asker(our_chat(model, tok), max_new_tokens=24)
    mix = _mixture(cfg.mixture, cfg.seed, words)
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    knowledge = knowledge_conversations(src.taught, cfg.seed)
    say(f"stage 1: {len(knowledge)} conversations about {len(src.taught)} entities (+{len(mix)} assistant mixture)")
    stage1 = stage_config(cfg.knowledge_steps, cfg.lr, cfg.batch_size, model.config.max_seq_len, cfg.seed)
    finetune(model, tok, knowledge + mix, stage1, out / "knowledge", dist, meta | {"stage": "knowledge"}, progress)
    seconds["knowledge"] = time.perf_counter() - t

    t = time.perf_counter()
    unknown_eval = eval_questions(src.unknown_held_out, cfg.seed + 1)
    taught_eval = eval_questions(src.taught_held_out, cfg.seed + 2)
    replies = ask(asker, [q.text for q in taught_eval], 64, "stage-1 answers", progress)
    known_eval = [q for q, a in zip(taught_eval, replies, strict=True) if judge(a, q) == "right"]
    before = evaluate(asker, unknown_eval, known_eval, progress)
    probes = interrogate(asker, all_questions(src.taught_asked + src.unknown_asked), progress=progress)
    known = known_facts(probes)
    taught_facts = {(e.name, a) for e in src.taught_asked for a in ATTRIBUTES}
    _write_probes(out / "interrogation.jsonl", probes, known, {e.name for e in src.taught})
    counts = {
        "taught_facts": len(taught_facts),
        "taught_known": len(known & taught_facts),
        "unknown_facts": len(src.unknown_asked) * len(ATTRIBUTES),
        "unknown_known_by_luck": len(known - taught_facts),
        "held_out_taught_questions": len(taught_eval),
        "held_out_known_before": len(known_eval),
        "held_out_unknown_questions": len(unknown_eval),
    }
    say(
        f"interrogation: {len(probes)} questions; it knows {counts['taught_known']} of {len(taught_facts)} taught "
        f"facts and {counts['unknown_known_by_luck']} of {counts['unknown_facts']} never-taught ones (lucky guesses)"
    )
    seconds["interrogate"] = time.perf_counter() - t

    t = time.perf_counter()
    answers, refusals = interrogation_conversations(probes, known, cfg.seed)
    refused = {c.messages[0].text for c in refusals}
    # stage-1 data again (facts it failed left out, their refusal must not be contradicted), so that
    # what it knows is not forgotten; answers repeated to balance the refusals, which outnumber them
    # (many unknown entities), or refusing becomes the safe bet
    answers += [c for c in knowledge if c.messages[0].text not in refused]
    repeat = max(1, round(len(refusals) / max(1, len(answers))))
    say(f"stage 3: {len(refusals)} refusals, {len(answers)} answers (x{repeat}), +{len(mix)} assistant mixture")
    stage3 = stage_config(cfg.refusal_steps, cfg.refusal_lr, cfg.batch_size, model.config.max_seq_len, cfg.seed)
    data = refusals + answers * repeat + mix
    finetune(model, tok, data, stage3, out / "interrogated", dist, meta | {"stage": "interrogated"}, progress)
    seconds["refusal"] = time.perf_counter() - t

    t = time.perf_counter()
    after = evaluate(asker, unknown_eval, known_eval, progress)
    seconds["eval"] = time.perf_counter() - t
    seconds["total"] = sum(seconds.values())
    report = InterrogationReport(before, after, counts, seconds)
    write_json(out / "eval.json", report.to_json(cfg))
    plot_figures(before, after, out / "eval.png", f"interrogation, seed {cfg.seed}: questions about held-out people")
    return report
