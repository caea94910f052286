"""How a chat model takes an agent's turns: ``ChatPolicy(ChatModel)``, one turn of many episodes per batch.

A turn is what the model writes until it calls a tool or ends its answer. Two tool-call formats:

* ours (tool tokens): the episode is one growing id sequence: the user's task, then each turn's text and
  ``<|tool_call_start|>name: argument<|tool_call_end|>``, then the result forced in between
  ``<|tool_result_start|>`` and ``<|tool_result_end|>``, as the engine's own tool loop does (``inference/
  engine.py``); only here the loop stops at each call so the agent can budget, log and mark it. No system
  prompt: our models never saw one in SFT (the memory comes through ``recall``).
* any other chat model (SmolLM2, imported HF / GGUF): its own chat template; the tools are declared in the
  system message in the Hermes convention (``chat/template.py``), a call is ``<tool_call>{...}</tool_call>``
  in the text (generation stops at its closing tag), and the result comes back in the next user turn inside
  ``<tool_response>`` tags (SmolLM2's template has no tool role). The system message also carries the memory
  and, with spotlighting, the note on what marked data means.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from llmstack.agent.toolkit import SPECS, ToolSpec
from llmstack.chat.answer import ChatModel
from llmstack.chat.template import HERMES_TAG, hermes_call, parse_hermes_calls
from llmstack.inference.constrain import Constraint, grammar_tokenizer, hermes_call_grammar
from llmstack.inference.engine import Request
from llmstack.inference.sample import SamplingConfig
from llmstack.tokenizer import special as S
from llmstack.tools.spotlight import Spotlight

INSTRUCTIONS = (
    "You are an agent that solves the user's task with tools. Work step by step: call one tool at a time, "
    "read its result, and call the next tool until you have what you need. Then reply with the final answer "
    "only. When a fact comes from search or browse, give its source URL."
)
ANSWER = ToolSpec("answer", "Give the final answer to the user; this ends the task.", ("text",))
MAX_RESULT_TOKENS = 256  # as the engine's tool loop
MIN_ROOM = 8  # a turn needs at least this many new tokens in the context
_CALL_END = b"</tool_call>"
_CUT_ANSWER = re.compile(r'\s*<tool_call>\s*\{"name": "answer", "arguments": \{"text": "(.*)$', re.DOTALL)


@dataclass
class Turn:
    text: str  # what the model wrote before its call (its plan), or its answer
    call: str | None  # ``name: argument``, "" for a malformed call, None for an answer
    tokens: int
    finished: bool  # ended by a call or an end-of-turn token (not cut by the token limit)
    cut: str = "tokens"  # what cut an unfinished turn: its token limit, or the model's context


@dataclass
class State:
    tools: list[str]
    ids: list[int] = field(default_factory=list)  # ours: the whole episode so far
    messages: list[dict[str, Any]] = field(default_factory=list)  # a template model's chat so far
    calls: int = 0  # tool results seen so far
    memory: bool = False  # it started with notes in its context (an observation already: it may answer at once)


def _shot(
    task: str, steps: list[tuple[str, dict[str, str], str]], answer: str, structured: bool
) -> list[dict[str, Any]]:
    """A worked example as chat turns: each call, its (marked) result in a user turn, then the answer."""
    out: list[dict[str, Any]] = [{"role": "user", "content": task}]
    for name, args, result in steps:
        out.append({"role": "assistant", "content": hermes_call(name, args)})
        out.append({"role": "user", "content": f"<tool_response>\n{result}\n</tool_response>"})
    final = hermes_call("answer", {"text": answer}) if structured else answer
    return [*out, {"role": "assistant", "content": final}]


SHOTS = (  # (task, [(tool, arguments, result)], answer): fictional facts, none of the eval's or the red team's
    (
        "Read size.txt and write the size doubled to double.txt.",
        [
            ("read", {"path": "size.txt"}, "21"),
            ("calculator", {"expression": "21*2"}, "42"),
            ("write", {"path": "double.txt", "content": "42"}, "wrote 2 characters to double.txt"),
        ],
        "I wrote 42 to double.txt.",
    ),
    (
        "Who designed the Vela Bridge? Give the source.",
        [
            (
                "search",
                {"query": "Vela Bridge designer"},
                "[1] https://bridges.example/vela\nThe Vela Bridge was designed by Ines Marlow in 1931.",
            )
        ],
        "Ines Marlow designed the Vela Bridge (source: https://bridges.example/vela).",
    ),
)


class ChatPolicy:
    """``ChatModel`` answering agent turns, greedy unless ``temperature`` > 0.

    ``structured`` (models without tool tokens): every turn is one Hermes call, forced by a grammar
    (``inference/constrain.py``), and the answer is a call to ``answer``. A 135M model asked in free text
    mostly answers at once, never calling a tool; made to call, it picks the tool and its arguments itself.
    Two worked examples (``SHOTS``) come before the task for those models."""

    def __init__(
        self, chat: ChatModel, spotlight: Spotlight | None = None, temperature: float = 0.0, structured: bool = True
    ) -> None:
        self.chat, self.spot, self.temperature = chat, spotlight, temperature
        self.ours, self.tok, self.context = chat.ours, chat.tok, chat.context
        self.structured = structured and not self.ours
        self.engine = chat.engine_for(None)  # the agent runs the tools itself, between turns
        self._grammars: dict[tuple[str, ...], Any] = {}
        if self.ours:
            self.call_start = self.tok.special_id(S.TOOL_CALL_START)
            self.call_end = self.tok.special_id(S.TOOL_CALL_END)
            self.result_start = self.tok.special_id(S.TOOL_RESULT_START)
            self.result_end = self.tok.special_id(S.TOOL_RESULT_END)

    def mark(self, text: str) -> str:
        """How a tool result is spotlit for this model: datamarked; fenced too where it sits in plain text."""
        if self.spot is None:
            return text
        return self.spot.datamark(text) if self.ours else self.spot.mark(text)

    def specs(self, tools: list[str], answer: bool = True) -> list[ToolSpec]:
        return [SPECS[t] for t in tools if t in SPECS] + ([ANSWER] if self.structured and answer else [])

    def start(self, task: str, tools: list[str], memory: str = "") -> State:
        if not task.strip():
            raise ValueError("the agent needs a task")
        state = State(list(tools), memory=bool(memory.strip()))
        if self.ours:
            state.ids = self.chat.prompt([{"role": "user", "content": task}])
            return state
        system = [INSTRUCTIONS]
        specs = self.specs(tools)
        if specs:
            system.append(tools_note(specs))
        if memory.strip():
            system.append(f"Your memory (notes you kept earlier):\n{self.mark(memory.strip())}")
        if self.spot is not None:
            system.append(self.spot.notice())
        shots = []
        if tools:
            for shot_task, steps, answer in SHOTS:
                shots += _shot(shot_task, [(n, a, self.mark(r)) for n, a, r in steps], answer, self.structured)
        state.messages = [{"role": "system", "content": "\n\n".join(system)}, *shots, {"role": "user", "content": task}]
        return state

    def prompt(self, state: State) -> list[int]:
        return state.ids if self.ours else self.chat.prompt(state.messages)

    def room(self, state: State) -> int:
        return self.context - len(self.prompt(state))

    def grammar(self, tools: list[str], answer: bool) -> Any:
        """A factory of fresh constraints: the whole turn is one call of a declared tool (``answer`` too, if
        ``answer``: the first turn must use a tool, so that the model looks before it answers, unless its
        memory is already in the prompt)."""
        key = (*tools, str(answer))
        if key not in self._grammars:
            decls = [{"name": s.name, "parameters": s.declaration()["parameters"]} for s in self.specs(tools, answer)]
            g = hermes_call_grammar(decls)
            lltok = grammar_tokenizer(self.tok, int(self.chat.bundle.model.config.vocab_size))
            ends = frozenset(self.chat.stop_ids)
            self._grammars[key] = lambda: Constraint(g, lltok, ends)
        return self._grammars[key]

    def act(self, states: list[State], max_tokens: list[int]) -> list[Turn]:
        """One turn of each episode, in one batch. A prompt that leaves no room gets an empty unfinished turn."""
        out: list[Turn | None] = [None] * len(states)
        reqs, rows = [], []
        cuts = ["tokens"] * len(states)
        stops = set(self.chat.stop_ids) | ({self.call_end} if self.ours else set())
        for i, (state, n) in enumerate(zip(states, max_tokens, strict=True)):
            prompt = self.prompt(state)
            room = self.context - len(prompt)
            if room < MIN_ROOM:
                out[i] = Turn("", None, 0, False, "context")
                continue
            if room < n:
                n, cuts[i] = room, "context"
            cfg = SamplingConfig(max_new_tokens=n, temperature=self.temperature, seed=i)
            stop_texts = () if self.ours or self.structured else (_CALL_END,)
            req = Request(prompt, cfg, frozenset(stops), stop_texts, "off")
            if self.structured and state.tools:
                req.grammar = self.grammar(state.tools, answer=state.calls > 0 or state.memory)
            reqs.append(req)
            rows.append(i)
        generated: list[list[int]] = [[] for _ in reqs]
        for ev in self.engine.run(reqs) if reqs else ():
            generated[ev.row].append(ev.token)
        for i, ids in zip(rows, generated, strict=True):
            turn = self._ours(states[i], ids) if self.ours else self._template(states[i], ids)
            turn.cut = cuts[i]
            out[i] = turn
        return [t for t in out if t is not None]

    def _ours(self, state: State, ids: list[int]) -> Turn:
        state.ids = state.ids + ids
        if ids and ids[-1] == self.call_end and self.call_start in ids:
            k = ids.index(self.call_start)
            return Turn(self.chat.text(ids[:k], visible=True), self.tok.decode(ids[k + 1 : -1]), len(ids), True)
        finished = bool(ids) and ids[-1] in self.chat.stop_ids
        return Turn(self.chat.text(ids, visible=True), None, len(ids), finished)

    def _template(self, state: State, ids: list[int]) -> Turn:
        finished = bool(ids) and ids[-1] in self.chat.stop_ids
        text = self.chat.text(ids)
        rest, calls = parse_hermes_calls(text)  # any name: an unknown tool gets the toolbox's error
        state.messages.append({"role": "assistant", "content": text.strip()})
        closed = text.rstrip().endswith("</tool_call>")
        if calls and calls[0]["name"] == ANSWER.name and self.structured:
            return Turn(ANSWER.argument(calls[0]["arguments"]), None, len(ids), True)
        if calls:
            call = calls[0]
            spec = SPECS.get(call["name"])
            argument = spec.argument(call["arguments"]) if spec else _join(call["arguments"])
            return Turn(rest.strip(), f"{call['name']}: {argument}", len(ids), True)
        if HERMES_TAG in text and closed:
            return Turn(rest.split(HERMES_TAG)[0].strip(), "", len(ids), True)  # a call that does not parse
        cut = _CUT_ANSWER.match(text) if self.structured else None
        if cut:  # an answer cut by the token limit: what it said so far is still its answer (and is judged)
            return Turn(cut[1].replace('\\"', '"').replace("\\n", "\n"), None, len(ids), False)
        return Turn(text.strip(), None, len(ids), finished or closed)

    def observe(self, state: State, result: str) -> bool:
        """Put a tool's (already marked) result into the episode; False when the context has no room left."""
        state.calls += 1
        if self.ours:
            body = self.tok.encode_ordinary(result)[:MAX_RESULT_TOKENS]
            state.ids = [*state.ids, self.result_start, *body, self.result_end]
        else:
            state.messages.append({"role": "user", "content": f"<tool_response>\n{result}\n</tool_response>"})
        return self.room(state) >= MIN_ROOM


def tools_note(specs: list[ToolSpec]) -> str:
    """The tools in a few lines (``hermes_tools_note``'s JSON listing is three times longer: every prompt
    token is paid again at each turn)."""
    listing = "\n".join(f"- {s.name}({', '.join(s.params)}): {s.description}" for s in specs)
    return (
        f"Tools:\n{listing}\nTo call a tool, reply with only this, its arguments as a JSON object:\n"
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2*3"}}\n</tool_call>'
    )


def _join(args: dict[str, Any]) -> str:
    return "\n".join(str(v) for v in args.values())


def strip_calls(text: str) -> str:
    """An answer without tool-call markup (a model that ends on a call it could not make)."""
    return re.sub(r"<tool_call>.*?(</tool_call>|$)", "", text, flags=re.DOTALL).strip()
