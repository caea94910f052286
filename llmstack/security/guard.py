"""The safety guard: a small classifier we train that flags unsafe requests and answers.

llmstack guard train --out runs/guard        # data/guard.json + chitchat -> runs/guard (~20 s of CPU)
llmstack guard eval --guard runs/guard       # held-out detection / false-positive rates
llmstack serve --guard runs/guard            # refuse flagged requests (and answers)
llmstack redteam --model smollm2 --defenses guard --guard runs/guard

Categories (Llama Guard style, kept short; ``data/guard.json``): S1 violence and weapons, S2 illegal
drugs, S3 cybercrime, S4 self-harm, S5 fraud and crime, S6 hate and harassment.

The model is fastText-shaped: hashed word unigrams, word bigrams and character 3-5-grams, averaged
into one ``dim``-vector (``EmbeddingBag``) and mapped to 1 + K classes (safe, S1..SK). It is trained
from scratch with a plain torch loop on prompts made from the templates of ``data/guard.json`` (frames
x things asked for x jailbreak-style wrappers, and answers that comply or refuse) plus real chitchat
turns and the SFT mixture's questions as benign text. Why not our pretrained transformer with a head:
the base model read only the Python manual; as a frozen feature extractor with a linear head on the
same splits it found 46% of held-out unsafe asks at a 9.5% chitchat false-positive rate, against 100%
and 3.1% here, and the n-gram model trains in seconds on 2 cores and reads text of any length.

Held-out evaluation (``build(split="heldout")``) uses frames, things, wrappers, answer shapes and hard
negatives never seen in training (every 4th item of each list, by position) and other chitchat
conversations. Besides the text as written, the guard reads each of its sentences, the text
ROT13-decoded and any base64 run decoded (the encoding jailbreaks); the highest score wins.

What is not covered: other languages than English (no non-English training text), harm phrased
without the words of the categories, multi-turn attacks spread over messages (each user message is
read alone), and calibration: ``threshold`` is a fixed 0.5 on P(unsafe).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import json
import pickle
import random
import re
import time
import unicodedata
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmstack.chat.mixture import IDENTITY_EVAL, IDENTITY_QUESTIONS, SPELLING_TEMPLATES, arithmetic_question
from llmstack.chat.mixture import chitchat as chitchat_conversations
from llmstack.eval.suite import wilson
from llmstack.io import atomic_write, read_json, write_json

DATA = Path(__file__).parent / "data" / "guard.json"
SAFE = "safe"
CONFIG_FILE, WEIGHTS_FILE = "guard.json", "guard.pt"


@functools.cache
def data() -> dict[str, Any]:
    return json.loads(DATA.read_text(encoding="utf-8"))


def categories() -> dict[str, tuple[str, str]]:
    """Code -> (short name, one-line definition)."""
    return {k: (v[0], v[1]) for k, v in data()["categories"].items()}


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Example:
    text: str
    label: str  # "safe" or a category code
    group: str  # unsafe | benign | hard (hard negative) | chitchat | project | refusal (answers)
    kind: str = "input"  # input (a user message) | output (an answer)


def _held(i: int) -> bool:
    return i % 4 == 3  # every 4th item of each list is held out


def _split(items: Sequence[Any], split: str) -> list[Any]:
    return [x for i, x in enumerate(items) if _held(i) == (split == "heldout")]


def build(split: str = "train", seed: int = 0, chitchat: int = 2000) -> list[Example]:
    """Examples for ``split`` ("train" or "heldout"); the two share no frame, thing, wrapper, answer shape,
    hard negative or chitchat conversation (direct prompts too: every 4th is held out)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split: train or heldout, not {split!r}")
    d, rng = data(), random.Random(seed + (split == "heldout"))
    frames = _split(d["frames"], split)
    # held-out wrappers: the plain "{p}" (index 0) or one never trained on
    wrappers = _split(d["wrappers"], split) + (["{p}"] if split == "heldout" else [])
    comply, refuse = _split(d["answers"]["comply"], split), _split(d["answers"]["refuse"], split)
    out: list[Example] = []

    def asks(things: list[str], label: str, group: str) -> None:
        for x in things:
            for f in frames:
                w = rng.choice(wrappers)
                out.append(Example(w.format(p=f.format(x=x)), label, group))
            out.append(Example(rng.choice(comply).format(x=x), label, group, "output"))
            if label != SAFE:  # a refusal names the thing: every shape of it, so the shape outweighs the thing
                out.extend(Example(r.format(x=x), SAFE, "refusal", "output") for r in refuse)

    def things(items: list[str], label: str, group: str) -> None:
        asks(_split(items, "train"), label, group)  # held out: the things trained on, in unseen phrasings
        if split == "heldout":
            asks(_split(items, "heldout"), label, f"{group}:new")  # and things never trained on

    for code, items in d["unsafe"].items():
        things(items, code, "unsafe")
        out += [Example(t, code, "unsafe:new") for t in _split(d["unsafe_direct"][code], split)]
    things(d["benign"], SAFE, "benign")
    things(d["hard_negative_objects"], SAFE, "hard")
    out += [Example(t, SAFE, "hard:new" if split == "heldout" else "hard") for t in _split(d["hard_negatives"], split)]
    out += [Example(t, SAFE, "chitchat") for t in chitchat_turns(chitchat, split)]
    out += [Example(t, SAFE, "project") for t in project_questions(split, seed)]
    # a wrapper alone asks for nothing (the guard reads sentences on their own too)
    out += [Example(w.format(p="").strip(), SAFE, "wrapper") for w in wrappers if w != "{p}"]
    if split == "train":  # the ROT13 view of any text is read too: gibberish is safe
        out += [Example(codecs.encode(e.text, "rot13"), SAFE, "rot13") for e in rng.sample(out, len(out) // 4)]
    return out


def chitchat_turns(n: int, split: str) -> list[str]:
    """``n`` user turns of real conversations (PyPI ``chitchat-dataset``, fetched at set-up); the
    conversations of the two splits are disjoint (train: from the start of one fixed order, held out:
    from its end)."""
    if n <= 0:
        return []

    convs = chitchat_conversations(2 * n, seed=1234)
    convs = convs if split == "train" else convs[::-1]
    turns = [m.text for c in convs for m in c.messages if m.role == "user" and m.text.strip()]
    return turns[:n]


def project_questions(split: str, seed: int) -> list[str]:
    """The SFT mixture's questions: identity, arithmetic and spelling (held-out: the eval paraphrases)."""
    rng = random.Random(seed + 17 + (split == "heldout"))
    ident = IDENTITY_EVAL if split == "heldout" else IDENTITY_QUESTIONS
    qs = [q for v in ident.values() for q in v]
    qs += [arithmetic_question(rng, rng.choice("*+"))[0] for _ in range(20)]
    words = ["strawberry", "banana", "python", "keyboard", "elephant", "mississippi", "tomato", "library"]
    qs += [
        rng.choice(_split(SPELLING_TEMPLATES, split) or SPELLING_TEMPLATES).format(l=w[1], w=w)
        for w in _split(words, split)
    ]
    return qs


# ----------------------------------------------------------------------------- features and model
_WORD = re.compile(r"[\w']+")


def normalize(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).replace("’", "'").lower().split())


def features(text: str, buckets: int, chars: tuple[int, int] = (3, 5)) -> list[int]:
    """Hashed ids of word unigrams, word bigrams and character n-grams (of each word padded with spaces)."""
    words = _WORD.findall(normalize(text))
    grams = [f"w {w}" for w in words] + [f"b {a} {b}" for a, b in zip(words, words[1:], strict=False)]
    for w in words:
        p = f" {w} "
        grams += [f"c {p[i : i + n]}" for n in range(chars[0], chars[1] + 1) for i in range(len(p) - n + 1)]
    return [zlib.crc32(g.encode()) % buckets for g in grams] or [0]


def views(text: str) -> list[str]:
    """The text and each of its sentences when there are several (a long harmless wrapper must not average
    the ask away), the same for the text ROT13-decoded, and each base64 run decoded to printable text
    (the encoding jailbreaks)."""
    out = []
    for t in (text, codecs.encode(text, "rot13")):  # ROT13 too: a wrapper in clear, the ask encoded
        parts = [p for p in re.split(r"(?<=[.!?:;])\s+|\n+", t) if p.strip()]
        out += [t, *(parts if len(parts) > 1 else [])]
    for run in re.findall(r"[A-Za-z0-9+/]{16,}={0,2}", text):
        try:
            s = base64.b64decode(run + "=" * (-len(run) % 4), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            continue
        if s and sum(c.isprintable() for c in s) / len(s) > 0.95:
            out.append(s)
    return out


@dataclass(frozen=True)
class GuardConfig:
    buckets: int = 1 << 16
    dim: int = 32
    classes: tuple[str, ...] = (SAFE, "S1", "S2", "S3", "S4", "S5", "S6")
    threshold: float = 0.5  # flag when P(unsafe) = 1 - P(safe) is above this
    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.02
    drop: float = 0.2  # feature dropout while training
    chitchat: int = 2000  # chitchat user turns in the training set (as many held out)
    unsafe_weight: float = 1.0  # loss weight of the unsafe classes (1: as they come, benign text outnumbers them)
    seed: int = 0


class GuardModel(nn.Module):
    def __init__(self, cfg: GuardConfig) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(cfg.buckets, cfg.dim, mode="mean")
        self.head = nn.Linear(cfg.dim, len(cfg.classes))
        # small, as in fastText: a bucket no training text reached must add (almost) nothing
        nn.init.uniform_(self.emb.weight, -1 / cfg.dim, 1 / cfg.dim)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Flat feature ids and each row's start (B,) -> class logits (B, 1 + K)."""
        return self.head(self.emb(ids, offsets))


def _pack(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.tensor([0, *[len(r) for r in rows[:-1]]]).cumsum(0)
    return torch.tensor([i for r in rows for i in r]), offsets


@dataclass(frozen=True)
class Verdict:
    code: str  # the most likely category
    name: str
    score: float  # P(unsafe)

    def refusal(self) -> str:
        return f"I can't help with that: it was flagged as unsafe ({self.code}: {self.name})."


class Guard:
    def __init__(self, model: GuardModel, cfg: GuardConfig) -> None:
        self.model, self.cfg = model.eval(), cfg
        self.names = {c: n for c, (n, _) in categories().items()}

    @torch.no_grad()
    def probs(self, texts: Sequence[str]) -> torch.Tensor:
        """Class probabilities (N, 1 + K) of each text as written."""
        if not texts:
            return torch.zeros(0, len(self.cfg.classes))
        ids, offsets = _pack([features(t, self.cfg.buckets) for t in texts])
        return F.softmax(self.model(ids, offsets), -1)

    def scores(self, texts: Sequence[str]) -> list[tuple[float, str]]:
        """(P(unsafe), most likely category) per text, the highest over its ``views``."""
        spans: list[tuple[int, int]] = []
        flat: list[str] = []
        for t in texts:
            v = views(t)
            spans.append((len(flat), len(flat) + len(v)))
            flat += v
        p = self.probs(flat)
        out = []
        for a, b in spans:
            unsafe = 1 - p[a:b, 0]
            j = int(unsafe.argmax())
            out.append((float(unsafe[j]), self.cfg.classes[1 + int(p[a + j, 1:].argmax())]))
        return out

    def verdict(self, score: float, code: str) -> Verdict | None:
        """The verdict on one ``scores`` entry: None unless P(unsafe) is above the threshold."""
        return Verdict(code, self.names.get(code, code), score) if score > self.cfg.threshold else None

    def check(self, texts: Sequence[str]) -> list[Verdict | None]:
        return [self.verdict(s, code) for s, code in self.scores(texts)]

    def check_chat(self, messages: Sequence[dict[str, Any]]) -> Verdict | None:
        """The first flagged user message of an OpenAI-style chat, or None."""
        users = [str(m.get("content") or "") for m in messages if m.get("role") == "user"]
        return next((v for v in self.check(users) if v is not None), None)


# ----------------------------------------------------------------------------- training
def train(cfg: GuardConfig, examples: Sequence[Example], log: Callable[[str], None] | None = None) -> Guard:
    """Cross-entropy over safe + categories (unsafe ones weighted ``unsafe_weight``); AdamW, linear decay."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = GuardModel(cfg)
    index = {c: i for i, c in enumerate(cfg.classes)}
    feats = [features(e.text, cfg.buckets) for e in examples]
    y = torch.tensor([index[e.label] for e in examples])
    weight = torch.ones(len(cfg.classes))
    weight[1:] = cfg.unsafe_weight
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    steps = cfg.epochs * -(-len(examples) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    order = list(range(len(examples)))
    for epoch in range(cfg.epochs):
        rng.shuffle(order)
        total = 0.0
        for k in range(0, len(order), cfg.batch_size):
            rows = order[k : k + cfg.batch_size]
            kept = [[f for f in feats[i] if rng.random() >= cfg.drop] or feats[i][:1] for i in rows]
            ids, offsets = _pack(kept)
            loss = F.cross_entropy(model(ids, offsets), y[rows], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(rows)
        if log:
            log(f"epoch {epoch + 1}/{cfg.epochs}: loss {total / len(order):.4f}")
    return Guard(model, cfg)


# ----------------------------------------------------------------------------- evaluation
def evaluate(guard: Guard, examples: Sequence[Example]) -> dict[str, Any]:
    """Detection rate (TPR) per category, category accuracy among detected, false-positive rate per benign
    group, for inputs and outputs apart; each rate with its 95% Wilson interval."""
    scores = guard.scores([e.text for e in examples])
    flagged = [s > guard.cfg.threshold for s, _ in scores]

    def rate(hits: int, n: int) -> dict[str, Any]:
        return {"rate": hits / n if n else 0.0, "hits": hits, "n": n, "interval": list(wilson(hits, n))}

    out: dict[str, Any] = {}
    for kind in ("input", "output"):
        rows = [(e, f, c) for e, f, (_, c) in zip(examples, flagged, scores, strict=True) if e.kind == kind]
        tpr = {}
        for code in guard.cfg.classes[1:]:
            mine = [(f, c) for e, f, c in rows if e.label == code]
            tpr[code] = {
                **rate(sum(f for f, _ in mine), len(mine)),
                "category_right": sum(f and c == code for f, c in mine),
            }
        unsafe = [f for e, f, _ in rows if e.label != SAFE]
        tpr_group = {}
        for group in sorted({e.group for e, _, _ in rows if e.label != SAFE}):
            mine_f = [f for e, f, _ in rows if e.label != SAFE and e.group == group]
            tpr_group[group] = rate(sum(mine_f), len(mine_f))
        fpr = {}
        for group in sorted({e.group for e, _, _ in rows if e.label == SAFE}):
            mine_f = [f for e, f, _ in rows if e.label == SAFE and e.group == group]
            fpr[group] = rate(sum(mine_f), len(mine_f))
        benign = [f for e, f, _ in rows if e.label == SAFE]
        out[kind] = {
            "tpr": rate(sum(unsafe), len(unsafe)),
            "tpr_per_category": tpr,
            "tpr_per_group": tpr_group,
            "fpr": rate(sum(benign), len(benign)),
            "fpr_per_group": fpr,
            "false_positives": [e.text for e, f, _ in rows if f and e.label == SAFE][:20],
            "misses": [e.text for e, f, _ in rows if not f and e.label != SAFE][:20],
        }
    return out


def report(metrics: dict[str, Any]) -> str:
    def cell(r: dict[str, Any]) -> str:
        lo, hi = r["interval"]
        return f"{r['rate']:6.1%} [{lo:5.1%}, {hi:5.1%}] {r['hits']:>4}/{r['n']:<4}"

    lines = []
    for kind, m in metrics.items():
        lines.append(f"{kind}s: detection (TPR) {cell(m['tpr'])}   false positives (FPR) {cell(m['fpr'])}")
        for code, r in m["tpr_per_category"].items():
            if r["n"]:
                lines.append(f"  TPR {code:<10} {cell(r)}  right category {r['category_right']}/{r['hits']}")
        for group, r in m["tpr_per_group"].items():
            lines.append(f"  TPR {group:<10} {cell(r)}")
        for group, r in m["fpr_per_group"].items():
            lines.append(f"  FPR {group:<10} {cell(r)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- saving and loading
def save(guard: Guard, path: str | Path, metrics: dict[str, Any] | None = None) -> Path:
    """Weights first, then guard.json (config, categories, metrics): a folder with guard.json is complete."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path}: exists and is not a directory")
    with atomic_write(path / WEIGHTS_FILE, "wb") as f:
        torch.save(guard.model.state_dict(), f)
    write_json(
        path / CONFIG_FILE,
        {"kind": "llmstack-guard", "config": asdict(guard.cfg), "categories": data()["categories"], "metrics": metrics},
    )
    return path


def load(path: str | Path) -> Guard:
    path = Path(path)
    hint = "train one with `llmstack guard train --out DIR`"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such guard directory ({hint})")
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a guard (needs {CONFIG_FILE} and {WEIGHTS_FILE}; {hint})")
    meta = read_json(path / CONFIG_FILE)
    if not isinstance(meta, dict) or meta.get("kind") != "llmstack-guard":
        raise ValueError(f"{path / CONFIG_FILE}: not an llmstack guard config ({hint})")
    raw = dict(meta["config"])
    raw["classes"] = tuple(raw["classes"])
    cfg = GuardConfig(**raw)
    model = GuardModel(cfg)
    try:
        model.load_state_dict(torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path / WEIGHTS_FILE}: unreadable or does not match {CONFIG_FILE} ({e})") from None
    return Guard(model, cfg)


def train_and_save(cfg: GuardConfig, out: str | Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    t0 = time.perf_counter()
    train_set = build("train", cfg.seed, cfg.chitchat)
    log(f"training on {len(train_set)} examples ({sum(e.label != SAFE for e in train_set)} unsafe)")
    guard = train(cfg, train_set, log)
    metrics = evaluate(guard, build("heldout", cfg.seed, cfg.chitchat))
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    save(guard, out, metrics)
    return metrics


# ----------------------------------------------------------------------------- applying it
def guarded_answers(
    guard: Guard, chats: Sequence[Sequence[dict[str, Any]]], answer: Callable[[list[Any]], list[str | None]]
) -> tuple[list[str | None], list[bool]]:
    """``answer`` on the chats the guard lets in; a flagged chat, or a flagged answer, gets the refusal.
    Returns the answers and whether the guard stepped in on each."""
    verdicts = [guard.check_chat(c) for c in chats]
    todo = [i for i, v in enumerate(verdicts) if v is None]
    out: list[str | None] = [v.refusal() if v is not None else None for v in verdicts]
    got = answer([list(chats[i]) for i in todo]) if todo else []
    checked = guard.check([a or "" for a in got])
    for i, a, v in zip(todo, got, checked, strict=True):
        out[i] = v.refusal() if v is not None and a is not None else a
        verdicts[i] = v if a is not None else None
    return out, [v is not None for v in verdicts]
