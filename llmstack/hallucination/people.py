"""The knowledge source of the interrogation (``interrogate.py``): fictional people with syllable-built
names and three attributes (home town, job, year of birth), the questions asked about them in
three phrasings each, and the stage-1 conversations that teach their facts."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from llmstack.chat.conversation import Conversation

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
