"""Automatic arena battles: contestants answer the same prompts, a judge picks the winner.

Every pair of contestants plays every prompt (a round robin); each model answers each prompt once,
greedily, in batches through the engine. How a contestant is asked depends on what it is:

* our chat models (``runs/tiny/sft``, and the RL stage once it exists): our chat format, with the
  server's tools running (calculator, python), as ``llmstack serve`` runs them;
* other chat models (SmolLM2-135M-Instruct): their own chat template;
* base models (a run whose checkpoint stage is ``pretrain``): they only continue documents, so they
  get the conversation document of ``inference/simulate.py`` (a transcript of an assistant talking
  with a human) and write the assistant's line. That lets them play at all; they are expected to lose.

A tool the model ran shows in its answer as ``⟦calculator: 12*34 → 408⟧``.

Judges:

* ``verifier``: problems with a known answer. The final number of the answer, outside tool calls,
  is checked (reasoning-gym's own ``score_answer`` for its problems); right beats wrong, both right
  is a ``tie``, both wrong ``both_bad``.
* ``llm``: a chat model (SmolLM2-135M-Instruct by default) reads the question and both answers and is
  asked which is better; its reply is begun for it ("The better answer is Answer") and we read its
  probabilities for the letters ``A`` and ``B`` as the next token. It is asked twice, the answers
  swapped; a side wins only when both orders agree, else it is a tie, which cancels the judge's
  position bias. A judge that is also a contestant may favour itself: read such boards with that in
  mind. A 135M judge is weak: on the real run most of its verdicts are position bias (docs/LOG.md).

What is not here: multi-turn battles, sampling several answers per model, judging with a rubric.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from llmstack.chat.answer import ChatModel, is_ours
from llmstack.chat.mixture import ARITH_TEMPLATES, REASONING_GYM_SMALL
from llmstack.eval.arena import Battle
from llmstack.inference.engine import Engine, Request
from llmstack.inference.sample import SamplingConfig
from llmstack.inference.simulate import conversation_prompt, until_stop
from llmstack.interop.bundle import Bundle
from llmstack.interop.load import SMOLLM2, load_model, resolve_model
from llmstack.tokenizer import special as S
from llmstack.tools.registry import default_toolbox

ARENA_SEED = 70_707  # problems disjoint from the training mixtures (small seeds) and the eval (90_210)

STAGES = (("tiny-base", "tiny"), ("tiny-sft", "tiny/sft"), ("tiny-rl", "tiny/rl"))
"""The main job's stages under ``runs/``; a stage plays once its run has checkpoints (RL: not yet)."""

OPEN_PROMPTS = (
    "What does the len() function do in Python?",
    "How do I read a text file in Python?",
    "What is the difference between a list and a tuple?",
    "Explain what a dictionary is in one sentence.",
    "What is the capital of France?",
    "Give me one tip for writing clear code.",
    "What does the import statement do?",
    "Why is the sky blue?",
    "Write a short greeting for a new colleague.",
    "What is a function?",
    "Name three colours of the rainbow.",
    "How do I print Hello in Python?",
    "What is 2 plus 2?",
    "Who are you?",
    "What is an exception in Python?",
    "Suggest a name for a pet cat.",
)
"""Open prompts for the LLM judge: questions a small model trained on Python docs might answer."""


# ----------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str | None = None  # known: a verifier can judge
    source: str = "open"
    check: Callable[[str], bool] | None = field(default=None, compare=False, repr=False)

    def correct(self, reply: str) -> bool:
        if self.answer is None:
            raise ValueError(f"no known answer to {self.prompt!r}: the verifier cannot judge it (use --judge llm)")
        got = final_number(reply)
        if got is None:
            return False
        if self.check is not None:
            return self.check(got)
        try:
            return abs(float(got) - float(self.answer)) < 1e-9
        except ValueError:
            return got == self.answer.strip()


_TOOL_SEGMENT = re.compile(r"⟦.*?(?:⟧|$)", re.S)
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def final_number(reply: str) -> str | None:
    """The last word of the reply outside tool calls that is a number as a whole: ``-12``, ``1,234`` ->
    ``1234``, ``8.0`` -> ``8``. Digits inside other words (``Assl-8``, ``1.0.0.0``) are not answers."""
    visible = _TOOL_SEGMENT.sub(" ", reply).replace("\u2212", "-")  # a typographic minus
    for word in reversed(re.split(r"[\s=]+", visible)):  # "6*7=42" ends in the word "42"
        word = word.strip(".,;:!?()[]{}\"'`*$")
        if _NUMBER.fullmatch(word):
            n = word.replace(",", "")
            return n.split(".")[0] if re.fullmatch(r"-?\d+\.0+", n) else n
    return None


def arithmetic_problems(n: int, seed: int = ARENA_SEED) -> list[Problem]:
    """``n`` problems with known answers, alternating two kinds:

    * reasoning-gym ``basic_arithmetic``: two terms of one or two digits, ``+ - *`` ("Calculate 56 + 33."),
      checked by its ``score_answer``;
    * the SFT mixture's question templates ("What is 47 times 8?") with smaller numbers than it trained on.
    """
    import reasoning_gym  # heavy: ~0.9 s to import

    small = REASONING_GYM_SMALL["basic_arithmetic"]
    gym = reasoning_gym.create_dataset("basic_arithmetic", size=(n + 1) // 2, seed=seed, **small)
    rng = random.Random(seed)
    out: list[Problem] = []
    for i, entry in enumerate(gym):
        out.append(_gym_problem(gym, entry))
        if 2 * i + 1 < n:
            op = rng.choice(["+", "*"])
            a, b = rng.randint(2, 99), rng.randint(2, 9 if op == "*" else 99)
            q = rng.choice(ARITH_TEMPLATES[op]).format(a=a, b=b)
            out.append(Problem(q, str(a * b if op == "*" else a + b), f"template{op}"))
    return out[:n]


def _gym_problem(dataset, entry) -> Problem:
    def check(got: str) -> bool:
        return dataset.score_answer(got, entry) >= 1.0

    return Problem(entry["question"], str(entry["answer"]), "reasoning_gym:basic_arithmetic", check)


def open_problems(n: int) -> list[Problem]:
    return [Problem(OPEN_PROMPTS[i % len(OPEN_PROMPTS)]) for i in range(n)]


def read_problems(path: str | Path) -> list[Problem]:
    """A JSONL file of ``{"prompt": str, "answer": str (optional)}``; errors name the line."""
    path = Path(path)
    lines = enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
    out = [_problem(f"{path}:{n}", line, path.name) for n, line in lines if line.strip()]
    if not out:
        raise ValueError(f"{path}: no problems")
    return out


def pick_problems(judge: str, n: int | None = None, path: str | Path | None = None) -> list[Problem]:
    """A battle's problems: a file's, or built-in ones (arithmetic for the verifier, open questions for an
    LLM judge); the verifier needs a known answer for each."""
    n = n or (60 if judge == "verifier" else 8)
    if path:
        problems = read_problems(path)[:n]
    else:
        problems = arithmetic_problems(n) if judge == "verifier" else open_problems(n)
    if judge == "verifier" and any(p.answer is None for p in problems):
        raise ValueError("--judge verifier needs a known answer for every problem (or use --judge llm)")
    return problems


def _problem(where: str, line: str, source: str) -> Problem:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
        raise ValueError(f'{where}: expected {{"prompt": "...", "answer": "..." (optional)}}')
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, str | int | float):
        raise ValueError(f'{where}: "answer" must be a string or a number')
    return Problem(obj["prompt"], None if answer is None else str(answer), source)


# ----------------------------------------------------------------------------- contestants
def default_contestants(runs: Path) -> list[tuple[str, str]]:
    """The main job's stages that exist under ``runs``, and SmolLM2 when its package is installed."""
    found = [(name, str(runs / sub)) for name, sub in STAGES if (runs / sub / "checkpoints").is_dir()]
    try:
        resolve_model(SMOLLM2)
        found.append((SMOLLM2, SMOLLM2))
    except FileNotFoundError:
        pass
    return found


def parse_models(spec: str) -> list[tuple[str, str]]:
    """``a=PATH,b=PATH,smollm2`` -> [(name, path)]; a bare path is named after its last parts."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, sep, path = item.partition("=")
        if not sep:
            name, path = (item if item == SMOLLM2 else "-".join(Path(item).parts[-2:])), item
        out.append((name, path))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"--models: two contestants share a name ({', '.join(names)}); use NAME=PATH")
    if len(out) < 2:
        raise ValueError("--models: a battle needs at least two models")
    return out


@dataclass
class Contestant:
    """A model and how to ask it: ``chat`` (ours: chat format + tools), ``template`` (its own chat
    template) or ``document`` (a base model continuing a conversation document)."""

    name: str
    bundle: Bundle
    style: str

    @classmethod
    def load(cls, name: str, spec: str, dtype: torch.dtype = torch.float32) -> Contestant:
        bundle = load_model(spec)
        bundle.model.to(dtype).eval()
        if bundle.meta.get("stage") == "pretrain":
            style = "document"
        else:
            style = "chat" if is_ours(bundle) else "template"
            bundle.template()  # no chat template: say so before generating anything
        return cls(name, bundle, style)

    def answer(self, prompts: Sequence[str], max_new_tokens: int = 64, batch_size: int = 32) -> list[str]:
        """Each prompt's answer, greedy; a prompt the context cannot hold gets an empty answer (it loses)."""
        if self.style == "document":
            return self._continue_documents(prompts, max_new_tokens, batch_size)
        chat = ChatModel(self.bundle)
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
        tools = default_toolbox().call if self.style == "chat" else None
        replies = chat.answer([chat.ask(p) for p in prompts], cfg, tools, batch_size)
        return [(readable_tools(r) if self.style == "chat" else r).strip() if r else "" for r in replies]

    def _continue_documents(self, prompts: Sequence[str], max_new_tokens: int, batch_size: int) -> list[str]:
        """A base model writes the assistant's line of the conversation document."""
        tok = self.bundle.tokenizer
        engine = Engine(self.bundle.model, token_bytes=tok.decode_token_bytes)
        stops = frozenset(self.bundle.stop_ids())
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
        ctx = int(self.bundle.model.config.max_seq_len)
        out = [""] * len(prompts)
        rows: list[tuple[int, Request]] = []
        for i, prompt in enumerate(prompts):
            doc = conversation_prompt(prompt)
            bos = self.bundle.bos_token if self.bundle.add_bos else None  # as the model's files say
            ids = ([tok.special_tokens[bos]] if bos and bos in tok.special_tokens else []) + tok.encode_ordinary(
                doc.text
            )
            room = min(max_new_tokens, ctx - len(ids))
            if room >= 1:
                rows.append((i, Request(ids, replace(cfg, max_new_tokens=room), stops, (doc.stop.encode(),), "off")))
        for k in range(0, len(rows), batch_size):
            batch = rows[k : k + batch_size]
            tokens: list[list[int]] = [[] for _ in batch]
            for ev in engine.run([r for _, r in batch]):
                tokens[ev.row].append(ev.token)
            for (i, r), ids in zip(batch, tokens, strict=True):
                text = tok.decode([t for t in ids if t not in stops])
                out[i] = "".join(until_stop([text], r.stop_texts[0].decode())).strip()
        return out


_CALL = re.compile(
    re.escape(S.TOOL_CALL_START)
    + r"(.*?)(?:"
    + re.escape(S.TOOL_CALL_END)
    + r"|$)\s*(?:"
    + re.escape(S.TOOL_RESULT_START)
    + r"(.*?)(?:"
    + re.escape(S.TOOL_RESULT_END)
    + r"|$))?",
    re.S,
)


def readable_tools(text: str) -> str:
    """Our tool tokens as text: ``<|tool_call_start|>calculator: 2*3<|tool_call_end|><|tool_result_start|>6...``
    -> ``⟦calculator: 2*3 → 6⟧``."""
    return _CALL.sub(lambda m: f"⟦{m[1].strip()}" + (f" → {m[2].strip()}⟧ " if m[2] is not None else "⟧ "), text)


# ----------------------------------------------------------------------------- judges
Judge = Callable[[Problem, str, str], tuple[str, str]]
"""(problem, answer a, answer b) -> (winner, a note on why)."""


def verifier(problem: Problem, a: str, b: str) -> tuple[str, str]:
    ok_a, ok_b = problem.correct(a), problem.correct(b)
    note = f"reference {problem.answer}; a said {final_number(a)} ({'right' if ok_a else 'wrong'}), "
    note += f"b said {final_number(b)} ({'right' if ok_b else 'wrong'})"
    if ok_a == ok_b:
        return ("tie" if ok_a else "both_bad"), note
    return ("a" if ok_a else "b"), note


def swapped_verdict(p_first_ab: float, p_first_ba: float) -> str:
    """The judge's P(the first answer is better) with a shown first, and with b shown first.

    ``a`` wins only if preferred in both positions, ``b`` likewise; a judge that just prefers
    whatever comes first (or second) gives a tie.
    """
    a_when_first, a_when_second = p_first_ab > 0.5, p_first_ba < 0.5
    if a_when_first and a_when_second:
        return "a"
    if not a_when_first and not a_when_second:
        return "b"
    return "tie"


JUDGE_PROMPT = """Question: {question}

Answer A: {first}

Answer B: {second}

Which answer is better: more correct, more helpful and clearer, A or B?"""
JUDGE_PREFILL = "The better answer is Answer"
"""The judge's reply is begun for it, so that its next token is the letter. Asked for the letter
first (the instruction before the answers, no prefill), SmolLM2-135M said "A" 84-99% of the time
whatever the answers; this way round 47-73% (measured on 8 battles of the real run)."""


class LLMJudge:
    """A chat model asked which of two answers is better, in both orders (see the module docstring)."""

    def __init__(self, bundle: Bundle, name: str, max_answer_chars: int = 1200) -> None:
        self.bundle, self.name, self.max_chars = bundle, name, max_answer_chars
        enc = bundle.tokenizer.encode_ordinary
        for space in (" ", ""):  # " A" where the tokenizer has it as one token, else "A" after "Answer "
            letters = [enc(space + x) for x in ("A", "B")]
            if all(len(ids) == 1 for ids in letters):
                self.prefill = enc(JUDGE_PREFILL + ("" if space else " "))
                self.letter_ids = [ids[0] for ids in letters]
                break
        else:
            raise ValueError(f"judge {name}: 'A' and 'B' must be one token each to be read as a verdict")
        self.chat = ChatModel(bundle)  # no chat template: say so now

    @torch.no_grad()
    def prefer_first(self, question: str, first: str, second: str) -> float:
        """P(first is better): the judge's next-token probabilities of A and B, renormalised."""
        cut = self.max_chars
        text = JUDGE_PROMPT.format(question=question, first=first[:cut] or "(empty)", second=second[:cut] or "(empty)")
        ids = self.chat.prompt([{"role": "user", "content": text}]) + self.prefill
        model = self.bundle.model.eval()
        ctx = int(model.config.max_seq_len)
        if len(ids) > ctx:
            raise ValueError(f"judge {self.name}: the judging prompt has {len(ids)} tokens; its context is {ctx}")
        device = next(model.parameters()).device
        logits = model(torch.tensor([ids], device=device))[0, -1].float()  # (V,)
        pair = torch.softmax(logits[self.letter_ids], dim=-1)
        return float(pair[0])

    def __call__(self, problem: Problem, a: str, b: str) -> tuple[str, str]:
        p_ab = self.prefer_first(problem.prompt, a, b)
        p_ba = self.prefer_first(problem.prompt, b, a)
        return swapped_verdict(p_ab, p_ba), f"P(first better): a first {p_ab:.3f}, b first {p_ba:.3f}"


# ----------------------------------------------------------------------------- battles
def run_battles(
    contestants: Sequence[Contestant],
    problems: Sequence[Problem],
    judge: Judge,
    judge_name: str,
    max_new_tokens: int = 64,
    seed: int = ARENA_SEED,
    on_answers: Callable[[str, float], None] | None = None,
) -> list[Battle]:
    """Every pair plays every problem; which model is side ``a`` is drawn at random per battle."""
    answers: dict[str, list[str]] = {}
    for c in contestants:
        t0 = time.perf_counter()
        answers[c.name] = c.answer([p.prompt for p in problems], max_new_tokens)
        if on_answers is not None:
            on_answers(c.name, time.perf_counter() - t0)
    rng = random.Random(seed)
    battles = []
    for i, problem in enumerate(problems):
        for x, y in itertools.combinations([c.name for c in contestants], 2):
            a, b = (x, y) if rng.random() < 0.5 else (y, x)
            winner, note = judge(problem, answers[a][i], answers[b][i])
            battles.append(
                Battle(a, b, winner, judge_name, problem.prompt, answers[a][i], answers[b][i], problem.answer, note)
            )
    return battles


def summarize(battles: Sequence[Battle]) -> str:
    """One line per pair: wins, ties (both_bad among them) and losses of the first named."""
    pairs: dict[tuple[str, str], list[int]] = {}
    for b in battles:
        x, y = sorted((b.model_a, b.model_b))
        tally = pairs.setdefault((x, y), [0, 0, 0, 0])  # x won, tie, both_bad, y won
        won = {"a": b.model_a, "b": b.model_b}.get(b.winner)
        tally[0 if won == x else 3 if won == y else 1 if b.winner == "tie" else 2] += 1
    return "\n".join(
        f"{x} vs {y}: {w} wins, {t + bad} ties ({bad} both bad), {lost} losses"
        for (x, y), (w, t, bad, lost) in sorted(pairs.items())
    )
