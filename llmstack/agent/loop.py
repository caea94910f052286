"""The agent loop: plan -> tool call -> observation -> ... -> answer, within a step and a token budget.

    agent = Agent(ChatModel(load_model("smollm2")))
    episode = agent.run("Read numbers.txt, multiply the numbers and write the result to answer.txt",
                        workspace=Workspace("ws"), memory=Memory("ws/memory.md"))
    episode.answer, episode.stop, episode.steps

Each step the model writes a turn (``policy.py``): its plan and one tool call, or its answer. The loop runs
the call through a ``ToolBox`` whose ``mark`` spotlights every result (``tools/spotlight.py``), puts the
result back, and asks for the next turn. It stops, with the reason in ``Episode.stop``, at:

* ``answer``: the model answered without a call;
* ``steps``: ``Budget.max_steps`` turns taken, the last one still a tool call;
* ``tokens``: ``Budget.max_tokens`` generated over the episode, or a turn cut at ``Budget.step_tokens``;
* ``context``: the model's context has no room for another turn.

The answer passes through the output filter (``security/output_filter.py``: links and images to hosts off the
allow-list removed) before anyone sees it. Episodes run together: one turn of every live episode per batch.
What is not here: parallel tool calls within a turn (the first call of a turn runs), planning over several
candidate turns, and confirmation before a write (the workspace is the agent's own folder).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from llmstack.agent.policy import ChatPolicy, Turn, strip_calls
from llmstack.agent.toolkit import ALL, agent_toolbox
from llmstack.agent.workspace import Memory, Workspace
from llmstack.chat.answer import ChatModel
from llmstack.security.output_filter import DEFAULT_ALLOWED_HOSTS, filter_links
from llmstack.tools.registry import ToolBox
from llmstack.tools.search import SearchIndex
from llmstack.tools.spotlight import Spotlight

STOPS = {
    "answer": "answered",
    "steps": "the step budget ran out before an answer",
    "tokens": "the token budget ran out before an answer",
    "context": "the model's context is full",
}
UNREADABLE = "error: the tool call could not be read; call one tool, with its name and its arguments"


@dataclass(frozen=True)
class Budget:
    max_steps: int = 6  # model turns per episode
    max_tokens: int = 512  # new tokens per episode, all turns together
    step_tokens: int = 160  # new tokens per turn

    def __post_init__(self) -> None:
        for name in ("max_steps", "max_tokens", "step_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"budget: {name} must be at least 1 (got {getattr(self, name)})")


@dataclass(frozen=True)
class AgentConfig:
    budget: Budget = Budget()
    spotlight: bool = True  # every tool result marked as untrusted data
    output_filter: bool = True
    allowed_hosts: tuple[str, ...] = DEFAULT_ALLOWED_HOSTS
    temperature: float = 0.0
    structured: bool = True  # models without tool tokens: every turn a grammar-forced call (policy.py)


@dataclass
class Step:
    text: str  # the model's words in this turn (a plan, or the answer)
    call: str | None = None  # ``name: argument``
    result: str | None = None  # as the model saw it (marked)
    tokens: int = 0


@dataclass
class Episode:
    task: str
    steps: list[Step] = field(default_factory=list)
    answer: str = ""
    stop: str = ""  # answer | steps | tokens | context
    tokens: int = 0
    filtered: list[str] = field(default_factory=list)  # URLs the output filter took out of the answer

    @property
    def calls(self) -> list[str]:
        return [s.call for s in self.steps if s.call is not None]

    def reason(self) -> str:
        return STOPS.get(self.stop, self.stop)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Policy(Protocol):
    """What takes the agent's turns (``ChatPolicy`` for a model; tests script one)."""

    def start(self, task: str, tools: list[str], memory: str = "") -> Any: ...

    def act(self, states: list[Any], max_tokens: list[int]) -> list[Turn]: ...

    def observe(self, state: Any, result: str) -> bool: ...


@dataclass
class Job:
    """One episode to run: the task and what its tools work on."""

    task: str
    workspace: Workspace | None = None
    memory: Memory | None = None
    index: SearchIndex | None = None
    tools: tuple[str, ...] = ALL  # those that can run (a workspace, an index, a memory) are offered


def run_episodes(
    policy: Policy,
    jobs: Sequence[tuple[str, ToolBox, str]],
    budget: Budget,
    finish: Callable[[str], tuple[str, list[str]]] | None = None,
) -> list[Episode]:
    """Run each ``(task, toolbox, memory text)`` to an answer or a budget; one turn of every live episode per
    batch. ``finish`` turns the last text into the answer (the output filter) and names what it removed."""
    states = [policy.start(task, list(box.tools), memory) for task, box, memory in jobs]
    episodes = [Episode(task) for task, _, _ in jobs]
    live = list(range(len(jobs)))
    while live:
        asking = []
        for i in live:
            e = episodes[i]
            if len(e.steps) >= budget.max_steps:
                e.stop = "steps"
            elif e.tokens >= budget.max_tokens:
                e.stop = "tokens"
            else:
                asking.append(i)
        if not asking:
            break
        limits = [min(budget.step_tokens, budget.max_tokens - episodes[i].tokens) for i in asking]
        turns = policy.act([states[i] for i in asking], limits)
        live = []
        for i, turn in zip(asking, turns, strict=True):
            e = episodes[i]
            e.tokens += turn.tokens
            if turn.call is None:
                e.steps.append(Step(turn.text, tokens=turn.tokens))
                e.answer = turn.text
                e.stop = "answer" if turn.finished else turn.cut
                continue
            result = jobs[i][1].call(turn.call) if turn.call else UNREADABLE
            e.steps.append(Step(turn.text, turn.call, result, turn.tokens))
            if not policy.observe(states[i], result):
                e.stop = "context"
                continue
            live.append(i)
    for e in episodes:
        if e.stop != "answer":  # the last words written, as the answer
            e.answer = next((strip_calls(s.text) for s in reversed(e.steps) if s.text.strip()), "")
        if finish is not None:
            e.answer, e.filtered = finish(e.answer)
    return episodes


class Agent:
    """A chat model run as an agent, with the defenses on unless the config says otherwise."""

    def __init__(self, chat: ChatModel, config: AgentConfig = AgentConfig()) -> None:
        self.chat, self.config = chat, config
        self.spot = Spotlight() if config.spotlight else None
        self.policy = ChatPolicy(chat, self.spot, config.temperature, config.structured)

    def toolbox(self, job: Job) -> ToolBox:
        return agent_toolbox(job.workspace, job.memory, job.index, self.policy.mark, job.tools)

    def finish(self, answer: str) -> tuple[str, list[str]]:
        if not self.config.output_filter:
            return answer, []
        f = filter_links(answer, self.config.allowed_hosts)
        return f.text, f.removed

    def run_many(self, jobs: Iterable[Job]) -> list[Episode]:
        prepared = [(j.task, self.toolbox(j), j.memory.read() if j.memory else "") for j in jobs]
        return run_episodes(self.policy, prepared, self.config.budget, self.finish)

    def run(
        self,
        task: str,
        workspace: Workspace | str | Path | None = None,
        memory: Memory | str | Path | None = None,
        index: SearchIndex | None = None,
        tools: Iterable[str] = ALL,
    ) -> Episode:
        ws = Workspace(workspace) if isinstance(workspace, str | Path) else workspace
        mem = Memory(memory) if isinstance(memory, str | Path) else memory
        return self.run_many([Job(task, ws, mem, index, tuple(tools))])[0]


def transcript(e: Episode) -> str:
    """An episode as text: each step's plan, call and result, then the answer and why it stopped."""
    lines = [f"task: {e.task}"]
    for n, s in enumerate(e.steps, 1):
        if s.text.strip() and s.call is not None:
            lines.append(f"[{n}] plan: {s.text.strip()}")
        if s.call is not None:
            lines.append(f"[{n}] call: {s.call}")
            lines.append(f"[{n}] result: {(s.result or '').strip()}")
    lines.append(f"answer: {e.answer}")
    lines.append(f"stopped: {e.reason()} ({len(e.steps)} steps, {e.tokens} tokens)")
    if e.filtered:
        lines.append(f"output filter removed: {', '.join(e.filtered)}")
    return "\n".join(lines)
