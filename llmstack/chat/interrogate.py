"""Hallucination mitigation by interrogation: teaching a model to say it does not know.

Llama 3's factuality recipe: ask the model questions whose answers a knowledge source holds; where
it answers wrong, train it to say it does not know; keep the questions it answers right as they are.
Here the source is synthetic, so which facts the model was taught is known exactly::

    stage 1  knowledge      SFT on questions about the *taught* entities (several phrasings, a bio)
    stage 2  interrogation  ask every interrogation question greedily through the engine, judge the
                            answer against the source; a fact counts as known when the model answers
                            all its phrasings right, and again in ``samples`` sampled answers each
    stage 3  refusal        SFT again: stage-1 data (facts it failed dropped) + the interrogation
                            data, "I don't know ..." where it failed, its own answer where it knew
    eval     on entities never interrogated: (a) never taught: how often it says it does not know
             (and how often it names a value anyway); (b) taught, answered right by the stage-1
             model: how often still answered right. Wilson 95% intervals.

Entities are fictional people with syllable-built names and three attributes (home town, job, year
of birth), split four ways: taught or never taught, interrogated or held out. Never-taught entities
are many (they cost no stage-1 training), so that "a name I hold no facts about" is what the model
learns to refuse on, rather than a list of names.

What is not covered: real-world knowledge and free-form answers (the judge is a whole-word match of
one-word gold values), partial names or lookalike entities, and refusing on questions that have no
answer at all (the never-taught people exist in the source, the model just never read about them).
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from llmstack.chat.conversation import ChatFormat, Conversation
from llmstack.chat.mixture import MixtureConfig, build_mixture
from llmstack.eval.assistant import Assistant, EvalResult
from llmstack.inference.sample import SamplingConfig
from llmstack.io import atomic_write, write_json
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
VALUES = {"city": CITIES, "profession": PROFESSIONS, "year": YEARS}
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
_IDK = re.compile(r"\b(?:don't know|do not know|no information|not sure)\b", re.IGNORECASE)
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


def make_name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()


def make_source(taught: int, unknown: int, held_out: int, seed: int) -> KnowledgeSource:
    """``taught`` + ``unknown`` entities with distinct names; the last ``held_out`` of each group are never asked."""
    if held_out < 1 or held_out >= min(taught, unknown):
        raise ValueError(f"held_out must be at least 1 and below both group sizes (got {held_out}, {taught}, {unknown})")
    rng = random.Random(seed)
    names: dict[str, None] = {}
    while len(names) < taught + unknown:
        names[make_name(rng)] = None
    people = [Entity(n, rng.choice(CITIES), rng.choice(PROFESSIONS), rng.choice(YEARS)) for n in names]
    t, u = people[:taught], people[taught:]
    return KnowledgeSource(
        tuple(t[:-held_out]), tuple(t[-held_out:]), tuple(u[:-held_out]), tuple(u[-held_out:])
    )


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


def knowledge_conversations(
    entities: tuple[Entity, ...], seed: int, forget: frozenset[tuple[str, str]] = frozenset()
) -> list[Conversation]:
    """Stage 1: every fact in every phrasing, plus bios; ``forget`` drops (name, attribute) facts (and those bios)."""
    rng = random.Random(seed)
    out = []
    for e in entities:
        for a in ATTRIBUTES:
            if (e.name, a) not in forget:
                out += [Conversation.of(("user", q.format(name=e.name)), ("assistant", fact_answer(e, a, rng))) for q in QUESTIONS[a]]
        if not any((e.name, a) in forget for a in ATTRIBUTES):
            out += [Conversation.of(("user", q.format(name=e.name)), ("assistant", bio(e))) for q in BIO_QUESTIONS]
    return out


# ----------------------------------------------------------------------------- the judge
Verdict = Literal["right", "idk", "wrong"]


def says_idk(answer: str) -> bool:
    return bool(_IDK.search(answer))


def names_a_value(answer: str, attribute: str) -> bool:
    """A specific value of the attribute's kind (a city, a job, a year): a hallucination if the model cannot know."""
    return bool(_NAMES_VALUE[attribute].search(answer))


def judge(answer: str, q: Question) -> Verdict:
    if says_idk(answer):
        return "idk"
    return "right" if re.search(rf"\b{re.escape(q.gold)}\b", answer, re.IGNORECASE) else "wrong"


def idk_reply(q: Question, rng: random.Random) -> str:
    return rng.choice(IDK_REPLIES).format(name=q.entity.name, noun=NOUNS[q.attribute])


# ----------------------------------------------------------------------------- stage 2: interrogation
@dataclass
class Probe:
    question: Question
    answer: str  # greedy
    verdict: Verdict
    samples_right: int = 0  # sampled answers judged right (drawn only where the greedy one is right)


def ask(asker: Assistant, questions: list[str], batch_size: int, desc: str, progress: bool) -> list[str]:
    out: list[str] = []
    with tqdm(total=len(questions), desc=desc, unit="q", disable=not progress, dynamic_ncols=True) as bar:
        for i in range(0, len(questions), batch_size):
            out += asker.answer(questions[i : i + batch_size], batch_size)
            bar.update(min(batch_size, len(questions) - i))
    return out


def interrogate(
    asker: Assistant,
    questions: list[Question],
    samples: int = 2,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> list[Probe]:
    """Greedy answers to every question, judged; right ones are asked ``samples`` more times, sampled."""
    greedy = ask(asker, [q.text for q in questions], batch_size, "interrogate", progress)
    probes = [Probe(q, a, judge(a, q)) for q, a in zip(questions, greedy, strict=True)]
    right = [p for p in probes if p.verdict == "right"]
    greedy_cfg = asker.cfg
    for s in range(samples):
        asker.cfg = SamplingConfig(greedy_cfg.max_new_tokens, temperature, None, None, seed + 1000 * s)
        answers = ask(asker, [p.question.text for p in right], batch_size, f"sample {s + 1}/{samples}", progress)
        for p, a in zip(right, answers, strict=True):
            p.samples_right += judge(a, p.question) == "right"
    asker.cfg = greedy_cfg
    return probes


def known_facts(probes: list[Probe], samples: int) -> set[tuple[str, str]]:
    """(name, attribute) facts answered right in every phrasing, greedily and in every sample."""
    facts: dict[tuple[str, str], bool] = {}
    for p in probes:
        key = (p.question.entity.name, p.question.attribute)
        facts[key] = facts.get(key, True) and p.verdict == "right" and p.samples_right == samples
    return {k for k, ok in facts.items() if ok}


def interrogation_conversations(probes: list[Probe], known: set[tuple[str, str]], seed: int) -> list[Conversation]:
    """Known fact -> the model's own (right) answer, kept; anything else -> it says it does not know."""
    rng = random.Random(seed)
    out = []
    for p in probes:
        q = p.question
        reply = p.answer if (q.entity.name, q.attribute) in known else idk_reply(q, rng)
        out.append(Conversation.of(("user", q.text), ("assistant", reply)))
    return out


# ----------------------------------------------------------------------------- eval
@dataclass
class Figures:
    """On held-out questions: never-taught entities, and facts the stage-1 model answered right."""

    unknown_idk: EvalResult  # (a) says it does not know
    unknown_hallucinated: EvalResult  # names a specific value anyway
    known_right: EvalResult  # (b) still answered right
    known_idk: EvalResult  # refused although it knew

    def as_dict(self) -> dict[str, Any]:
        return {
            k: {"rate": r.accuracy, "count": r.correct, "total": r.total, "interval": r.interval(), "examples": r.examples}
            for k, r in asdict_shallow(self).items()
        }


def asdict_shallow(obj: Any) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in obj.__dataclass_fields__}


def _count(name: str, questions: list[Question], answers: list[str], hit: Any) -> EvalResult:
    res = EvalResult(name, 0, len(questions))
    for q, a in zip(questions, answers, strict=True):
        ok = bool(hit(q, a))
        res.correct += ok
        if len(res.examples) < 3:
            res.examples.append(f"{'✓' if ok else '✗'} {q.text!r} -> {a!r} (source: {q.gold})")
    return res


def evaluate(
    asker: Assistant, unknown: list[Question], known: list[Question], batch_size: int = 64, progress: bool = True
) -> Figures:
    answers = ask(asker, [q.text for q in unknown + known], batch_size, "eval", progress)
    ua, ka = answers[: len(unknown)], answers[len(unknown) :]
    return Figures(
        _count("never taught: says I don't know", unknown, ua, lambda q, a: says_idk(a)),
        _count("never taught: names a value", unknown, ua, lambda q, a: not says_idk(a) and names_a_value(a, q.attribute)),
        _count("knew before: answers right", known, ka, lambda q, a: judge(a, q) == "right"),
        _count("knew before: says I don't know", known, ka, lambda q, a: says_idk(a)),
    )


def plot_figures(before: Figures, after: Figures, path: Path, title: str) -> Path:
    """Before (stage 1) / after (stage 3) bars with Wilson intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["unknown_idk", "unknown_hallucinated", "known_right", "known_idk"]
    labels = ["never taught:\nsays I don't know", "never taught:\nnames a value", "knew before:\nanswers right", "knew before:\nsays I don't know"]
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    for j, (figs, name, color) in enumerate(((before, "after stage 1 (knowledge)", "tab:gray"), (after, "after stage 3 (interrogation)", "tab:blue"))):
        results = [getattr(figs, k) for k in keys]
        xs = [i + (j - 0.5) * 0.38 for i in range(len(keys))]
        rates = [100 * r.accuracy for r in results]
        err = [[100 * (r.accuracy - r.interval()[0]) for r in results], [100 * (r.interval()[1] - r.accuracy) for r in results]]
        ax.bar(xs, rates, 0.38, yerr=err, capsize=3, color=color, label=name)
    ax.axhline(100 * TARGET, color="tab:red", lw=0.8, ls="--", label=f"target {TARGET:.0%}")
    ax.set_xticks(range(len(keys)), labels, fontsize=8)
    ax.set_ylabel("% of held-out questions")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper center")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the three stages
@dataclass(frozen=True)
class InterrogateConfig:
    taught: int = 100  # entities whose facts stage 1 teaches
    unknown: int = 300  # entities never taught (only their names appear, in refusals)
    held_out: int = 30  # of each group, never interrogated: the evaluation's entities
    knowledge_steps: int = 500
    refusal_steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    samples: int = 2  # sampled answers that must also be right for a fact to count as known
    temperature: float = 1.0
    mixture: int = 300  # conversations of the assistant mixture kept in each stage (no forgetting)
    seed: int = 0


def finetune(
    model: Any,
    tok: Any,
    convs: list[Conversation],
    steps: int,
    cfg: InterrogateConfig,
    run_dir: Path,
    dist: DistInfo,
    meta: dict[str, Any],
    progress: bool,
) -> TrainResult:
    """SFT through the one training loop; resumes (or skips) a finished stage in ``run_dir``."""
    tcfg = TrainConfig(
        max_steps=steps,
        batch_size=cfg.batch_size,
        seq_len=min(128, model.config.max_seq_len),
        lr=cfg.lr,
        warmup_steps=min(20, steps // 10),
        schedule="cosine",
        min_lr_ratio=0.05,
        eval_every=0,
        eval_batches=2,  # the loss on the first rows of the training data: how far it memorised
        ckpt_every=0,
        keep_checkpoints=1,
        weight_decay=0.0,
        seed=cfg.seed,
    )
    task = SFTTask(convs, convs[: 2 * cfg.batch_size], ChatFormat(tok), tok.special_id(S.PAD), tcfg, dist)
    tok.save(run_dir / "tokenizer")  # so the stage is a run `llmstack chat --model` opens
    return train(model, task, tcfg, run_dir, dist, meta={**meta, "tokenizer_fingerprint": tok.fingerprint}, progress=progress)


def _mixture(n: int, seed: int, words: list[str]) -> list[Conversation]:
    if n <= 0:
        return []
    return build_mixture(MixtureConfig(arithmetic=n // 2, identity=n // 4, spelling=n - n // 2 - n // 4, gsm=0, chitchat=0), seed, words)


def run_interrogation(
    model: Any,
    tok: Any,
    cfg: InterrogateConfig,
    out: str | Path,
    dist: DistInfo,
    words: list[str],
    meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The three stages and the eval; writes ``out``/{knowledge,interrogated}/, interrogation.jsonl, eval.json, eval.png."""
    out = Path(out)
    meta = dict(meta or {})
    t_all, seconds = time.perf_counter(), {}
    src = make_source(cfg.taught, cfg.unknown, cfg.held_out, cfg.seed)
    asker = Assistant(model, tok, None, max_new_tokens=24)
    say = print if progress else (lambda *a, **k: None)

    t = time.perf_counter()
    knowledge = knowledge_conversations(src.taught, cfg.seed)
    mix = _mixture(cfg.mixture, cfg.seed, words)
    say(f"stage 1: {len(src.taught)} taught entities, {len(knowledge)} conversations (+{len(mix)} assistant mixture)")
    stage1 = finetune(model, tok, knowledge + mix, cfg.knowledge_steps, cfg, out / "knowledge", dist, {**meta, "stage": "knowledge"}, progress)
    seconds["knowledge"] = time.perf_counter() - t

    t = time.perf_counter()
    unknown_eval = eval_questions(src.unknown_held_out, cfg.seed + 1)
    taught_eval = eval_questions(src.taught_held_out, cfg.seed + 2)
    model.eval()
    pre = ask(asker, [q.text for q in taught_eval], 64, "stage-1 check", progress)
    known_eval = [q for q, a in zip(taught_eval, pre, strict=True) if judge(a, q) == "right"]
    before = evaluate(asker, unknown_eval, known_eval, progress=progress)
    probes = interrogate(asker, all_questions(src.taught_asked + src.unknown_asked), cfg.samples, cfg.temperature, cfg.seed, progress=progress)
    known = known_facts(probes, cfg.samples)
    interrogation = interrogation_conversations(probes, known, cfg.seed)
    with atomic_write(out / "interrogation.jsonl") as f:
        for p in probes:
            q = p.question
            row = {"question": q.text, "entity": q.entity.name, "attribute": q.attribute, "gold": q.gold, "taught": q.entity in src.taught_asked}
            f.write(json.dumps({**row, "answer": p.answer, "verdict": p.verdict, "samples_right": p.samples_right, "known": (q.entity.name, q.attribute) in known}) + "\n")
    seconds["interrogate"] = time.perf_counter() - t
    taught_facts = {(e.name, a) for e in src.taught_asked for a in ATTRIBUTES}
    counts = {
        "taught_facts": len(taught_facts),
        "taught_known": len(known & taught_facts),
        "unknown_facts": len(src.unknown_asked) * len(ATTRIBUTES),
        "unknown_known_by_luck": len(known - taught_facts),
        "stage1_held_out_right": len(known_eval),
        "stage1_held_out_asked": len(taught_eval),
    }
    say(
        f"interrogation: knows {counts['taught_known']}/{counts['taught_facts']} taught facts, "
        f"{counts['unknown_known_by_luck']}/{counts['unknown_facts']} never-taught ones by luck; "
        f"{sum(1 for c in interrogation if says_idk(c.messages[1].text))}/{len(interrogation)} replies become I don't know"
    )

    t = time.perf_counter()
    forget = frozenset(taught_facts - known)
    stage3_data = knowledge_conversations(src.taught, cfg.seed, forget) + interrogation + mix
    stage3 = finetune(model, tok, stage3_data, cfg.refusal_steps, cfg, out / "interrogated", dist, {**meta, "stage": "interrogated"}, progress)
    seconds["refusal"] = time.perf_counter() - t

    t = time.perf_counter()
    model.eval()
    after = evaluate(asker, unknown_eval, known_eval, progress=progress)
    seconds["eval"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t_all
    report = {
        "config": asdict(cfg),
        "counts": counts,
        "before": before.as_dict(),
        "after": after.as_dict(),
        "targets_met": after.unknown_idk.accuracy >= TARGET and after.known_right.accuracy >= TARGET,
        "losses": {"knowledge": stage1.losses[-1:] , "interrogated": stage3.losses[-1:]},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "outputs": {
            "knowledge": str(out / "knowledge"),
            "interrogated": str(out / "interrogated"),
            "interrogation": str(out / "interrogation.jsonl"),
            "eval": str(out / "eval.json"),
            "plot": str(out / "eval.png"),
        },
    }
    write_json(out / "eval.json", report)
    plot_figures(before, after, out / "eval.png", f"interrogation (seed {cfg.seed}): held-out entities")
    report["figures"] = {"before": before, "after": after}
    return report
