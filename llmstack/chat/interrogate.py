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
knew (README, "Hallucinations").
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from llmstack.chat.conversation import ChatFormat, Conversation
from llmstack.chat.mixture import MixtureConfig, build_mixture
from llmstack.eval.assistant import Assistant, EvalResult
from llmstack.io import atomic_write, save_png, write_json
from llmstack.model.llama import GPT
from llmstack.tokenizer import special as S
from llmstack.training.config import TrainConfig
from llmstack.training.distributed import DistInfo
from llmstack.training.loop import TrainResult, train
from llmstack.training.sft import SFTTask

TARGET = 0.8  # issue #4: >= 80% refusals on unknowns, >= 80% of known facts kept

# ----------------------------------------------------------------------------- the knowledge source
SYLLABLES = (
    "ka", "lo", "mir", "ven", "tas", "qui", "dor", "zel", "bra", "nu", "fen", "sho", "rik", "var", "te", "mo",
    "lun", "gra", "vi", "sel", "tho", "ar", "den", "pol", "xa", "ru", "mel", "kor", "si", "ban", "ul", "ith",
)  # fmt: skip
CITIES = (
    "Lisbon", "Oslo", "Cairo", "Lima", "Quito", "Hanoi", "Dakar", "Perth", "Bergen", "Porto", "Tunis", "Riga",
    "Kyoto", "Austin", "Denver", "Geneva", "Naples", "Seville", "Krakow", "Dublin", "Tallinn", "Nairobi", "Accra",
    "Manila", "Havana", "Bogota", "Malmo", "Turin", "Leeds", "Osaka",
)  # fmt: skip
PROFESSIONS = (
    "baker", "carpenter", "pilot", "nurse", "architect", "farmer", "chemist", "teacher", "sailor", "painter",
    "plumber", "librarian", "dentist", "geologist", "tailor", "jeweler", "violinist", "beekeeper", "translator",
    "surgeon", "potter", "astronomer", "fisherman", "journalist", "gardener", "watchmaker", "lawyer", "butcher",
    "engineer", "photographer",
)  # fmt: skip
YEARS = tuple(str(y) for y in range(1900, 2000))
NOUNS = {"city": "home town", "profession": "job", "year": "year of birth"}
Attribute = Literal["city", "profession", "year"]
ATTRIBUTES: tuple[Attribute, ...] = ("city", "profession", "year")

QUESTIONS = {
    "city": ("Where does {name} live?", "In which city does {name} live?", "What is {name}'s home town?"),
    "profession": ("What does {name} do for a living?", "What is {name}'s job?", "What is {name}'s profession?"),
    "year": ("When was {name} born?", "In what year was {name} born?", "What is {name}'s year of birth?"),
}
ANSWERS = {
    "city": ("{name} lives in {value}.", "{name}'s home town is {value}."),
    "profession": ("{name} is {a} {value}.", "{name} works as {a} {value}."),
    "year": ("{name} was born in {value}.", "{name} was born in the year {value}."),
}
BIO_QUESTIONS = ("Who is {name}?", "Tell me about {name}.")
IDK_REPLIES = (
    "I'm sorry, I don't know {name}'s {noun}.",
    "I don't know anything about {name}.",
    "I do not have any information about {name}'s {noun}.",
)
_IDK = re.compile(r"\b(?:don't know|do not know|(?:no|any) information|not sure)\b", re.IGNORECASE)
_NAMES_VALUE = {
    "city": re.compile(r"\b(?:" + "|".join(CITIES) + r")\b", re.IGNORECASE),
    "profession": re.compile(r"\b(?:" + "|".join(PROFESSIONS) + r")\b", re.IGNORECASE),
    "year": re.compile(r"\b\d{4}\b"),
}


@dataclass(frozen=True)
class Entity:
    name: str
    city: str
    profession: str
    year: str

    def value(self, attribute: str) -> str:
        return str(getattr(self, attribute))


@dataclass(frozen=True)
class Question:
    entity: Entity
    attribute: Attribute
    text: str

    @property
    def gold(self) -> str:
        return self.entity.value(self.attribute)


@dataclass(frozen=True)
class KnowledgeSource:
    """Fictional entities, split: taught (stage 1) or never taught; interrogated (stage 2) or held out (eval)."""

    taught_asked: tuple[Entity, ...]
    taught_held_out: tuple[Entity, ...]
    unknown_asked: tuple[Entity, ...]
    unknown_held_out: tuple[Entity, ...]

    @property
    def taught(self) -> tuple[Entity, ...]:
        return self.taught_asked + self.taught_held_out


LOOKALIKES = 0.5  # of the never-taught people asked about: names that start as a taught one's


def _people(
    n: int, rng: random.Random, taken: set[str], like: list[list[str]] | None = None
) -> tuple[list[Entity], list[list[str]]]:
    """``n`` people with new three-syllable names, and the syllables of each. Given ``like`` (other
    names' syllables), a ``LOOKALIKES`` share of the names start with one or two syllables of one."""
    people: list[Entity] = []
    parts: list[list[str]] = []
    while len(people) < n:
        syllables = [rng.choice(SYLLABLES) for _ in range(3)]
        if like and rng.random() < LOOKALIKES:
            k = rng.randint(1, 2)
            syllables[:k] = rng.choice(like)[:k]
        name = "".join(syllables).capitalize()
        if name not in taken:
            taken.add(name)
            people.append(Entity(name, rng.choice(CITIES), rng.choice(PROFESSIONS), rng.choice(YEARS)))
            parts.append(syllables)
    return people, parts


def make_source(taught: int, unknown: int, held_out_taught: int, held_out_unknown: int, seed: int) -> KnowledgeSource:
    """People with distinct names; the first ones of each group are held out (never asked about).

    Held-out names are plain draws. Of the never-taught people asked about, a share are lookalikes of
    taught ones (``Tasvenmo`` for a taught ``Tastelo``): a tiny model first tells names apart by how
    they begin, and answers about a stranger whose name starts like a known one's. Each group has its
    own generator, so a larger ``unknown`` leaves the taught people and the held-out questions as they were.
    """
    if not (0 < held_out_taught < taught and 0 < held_out_unknown < unknown and taught + unknown <= 10_000):
        raise ValueError(
            f"need 0 < held_out_taught < taught, 0 < held_out_unknown < unknown, at most 10000 people (got "
            f"{held_out_taught} of {taught}, {held_out_unknown} of {unknown})"
        )
    taken: set[str] = set()
    t, t_parts = _people(taught, random.Random(f"taught/{seed}"), taken)
    rng = random.Random(f"unknown/{seed}")
    u_held_out, _ = _people(held_out_unknown, rng, taken)
    u_asked, _ = _people(unknown - held_out_unknown, rng, taken, like=t_parts)
    h = held_out_taught
    return KnowledgeSource(tuple(t[h:]), tuple(t[:h]), tuple(u_asked), tuple(u_held_out))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def fact_answer(e: Entity, attribute: str, rng: random.Random) -> str:
    value = e.value(attribute)
    return rng.choice(ANSWERS[attribute]).format(name=e.name, value=value, a=_article(value))


def bio(e: Entity) -> str:
    return f"{e.name} is {_article(e.profession)} {e.profession} from {e.city}, born in {e.year}."


def all_questions(entities: tuple[Entity, ...] | list[Entity]) -> list[Question]:
    """Every attribute of every entity in every phrasing (what the interrogation asks)."""
    return [Question(e, a, q.format(name=e.name)) for e in entities for a in ATTRIBUTES for q in QUESTIONS[a]]


def eval_questions(entities: tuple[Entity, ...], seed: int) -> list[Question]:
    """One question per attribute of each entity, in a phrasing drawn at random."""
    rng = random.Random(seed)
    return [Question(e, a, rng.choice(QUESTIONS[a]).format(name=e.name)) for e in entities for a in ATTRIBUTES]


def knowledge_conversations(entities: tuple[Entity, ...], seed: int) -> list[Conversation]:
    """Stage 1: every fact of every entity in every phrasing, plus a bio in two phrasings."""
    rng = random.Random(seed)
    out = []
    for e in entities:
        for a in ATTRIBUTES:
            out += [
                Conversation.of(("user", q.format(name=e.name)), ("assistant", fact_answer(e, a, rng)))
                for q in QUESTIONS[a]
            ]
        out += [Conversation.of(("user", q.format(name=e.name)), ("assistant", bio(e))) for q in BIO_QUESTIONS]
    return out


# ----------------------------------------------------------------------------- the judge
Verdict = Literal["right", "idk", "wrong"]


def says_idk(answer: str) -> bool:
    return bool(_IDK.search(answer))


def names_a_value(answer: str, attribute: str) -> bool:
    """A specific value of the attribute's kind (a city, a job, a year): a hallucination if the model cannot know."""
    return bool(_NAMES_VALUE[attribute].search(answer))


def hallucinates(q: Question, answer: str) -> bool:
    """Names a specific value without saying it does not know (asked about someone it cannot know)."""
    return not says_idk(answer) and names_a_value(answer, q.attribute)


def judge(answer: str, q: Question) -> Verdict:
    if says_idk(answer):
        return "idk"
    return "right" if re.search(rf"\b{re.escape(q.gold)}\b", answer, re.IGNORECASE) else "wrong"


def idk_reply(q: Question, rng: random.Random) -> str:
    return rng.choice(IDK_REPLIES).format(name=q.entity.name, noun=NOUNS[q.attribute])


# ----------------------------------------------------------------------------- stage 2: interrogation
@dataclass(frozen=True)
class Probe:
    question: Question
    answer: str  # greedy
    verdict: Verdict


def ask(asker: Assistant, questions: list[str], batch_size: int, desc: str, progress: bool) -> list[str]:
    """Greedy answers through the batched engine, with a progress bar."""
    out: list[str] = []
    with tqdm(total=len(questions), desc=desc, unit="q", disable=not progress, dynamic_ncols=True) as bar:
        for i in range(0, len(questions), batch_size):
            out += asker.answer(questions[i : i + batch_size], batch_size)
            bar.update(min(batch_size, len(questions) - i))
    return out


def interrogate(
    asker: Assistant, questions: list[Question], batch_size: int = 64, progress: bool = True
) -> list[Probe]:
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


# ----------------------------------------------------------------------------- eval
@dataclass
class Figures:
    """Held-out questions: about never-taught entities, and facts the stage-1 model answered right."""

    unknown_idk: EvalResult  # (a) says it does not know
    unknown_hallucinated: EvalResult  # names a specific value anyway
    known_right: EvalResult  # (b) still answered right
    known_idk: EvalResult  # says it does not know although it knew

    def results(self) -> dict[str, EvalResult]:
        return {k: getattr(self, k) for k in ("unknown_idk", "unknown_hallucinated", "known_right", "known_idk")}

    def to_json(self) -> dict[str, Any]:
        return {
            k: {
                "rate": r.accuracy,
                "count": r.correct,
                "total": r.total,
                "interval": r.interval(),
                "examples": r.examples,
            }
            for k, r in self.results().items()
        }


def _count(
    name: str, questions: list[Question], answers: list[str], hit: Callable[[Question, str], bool]
) -> EvalResult:
    res = EvalResult(name, 0, len(questions))
    for q, a in zip(questions, answers, strict=True):
        ok = hit(q, a)
        res.correct += ok
        if len(res.examples) < 3:
            res.examples.append(f"{'✓' if ok else '✗'} {q.text!r} -> {a!r} (source: {q.gold})")
    return res


def evaluate(asker: Assistant, unknown: list[Question], known: list[Question], progress: bool = True) -> Figures:
    answers = ask(asker, [q.text for q in unknown + known], 64, "eval", progress)
    ua, ka = answers[: len(unknown)], answers[len(unknown) :]
    return Figures(
        _count("never taught: says I don't know", unknown, ua, lambda q, a: says_idk(a)),
        _count("never taught: names a value", unknown, ua, hallucinates),
        _count("knew it before: answers right", known, ka, lambda q, a: judge(a, q) == "right"),
        _count("knew it before: says I don't know", known, ka, lambda q, a: says_idk(a)),
    )


def plot_figures(before: Figures, after: Figures, path: Path, title: str) -> Path:
    """Before (stage 1) and after (stage 3) bars with their Wilson intervals, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.name.replace(": ", ":\n") for r in after.results().values()]
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    for j, (figs, name, color) in enumerate(
        ((before, "after stage 1 (knowledge)", "tab:gray"), (after, "after stage 3 (interrogation)", "tab:blue"))
    ):
        results = list(figs.results().values())
        rates = [100 * r.accuracy for r in results]
        lows, highs = zip(*(r.interval() for r in results), strict=True)
        err = [  # clamped: at 0% or 100% rounding can put the bound a hair past the rate
            [max(0.0, r - 100 * lo) for r, lo in zip(rates, lows, strict=True)],
            [max(0.0, 100 * hi - r) for r, hi in zip(rates, highs, strict=True)],
        ]
        xs = [i + (j - 0.5) * 0.38 for i in range(len(results))]
        ax.bar(xs, rates, 0.38, yerr=err, capsize=3, color=color, label=name)
    ax.axhline(100 * TARGET, color="tab:red", lw=0.8, ls="--", label=f"target {TARGET:.0%}")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("% of held-out questions (95% interval)")
    ax.set_ylim(0, 122)  # room above the bars for the legend
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    fig.tight_layout()
    save_png(fig, path)
    return path


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
    asker = Assistant(model, tok, None, max_new_tokens=24)
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
