"""agent run | eval | traces | redteam: a model as an agent over tools (workspace files, local web, memory, sandbox)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from llmstack.agent import measure
from llmstack.agent.loop import Agent, AgentConfig, Budget, transcript
from llmstack.agent.tasks import KINDS, build
from llmstack.agent.toolkit import ALL, search_index
from llmstack.agent.traces import TRACE_KINDS, TRACE_SEED, traces
from llmstack.agent.workspace import Memory, Workspace
from llmstack.chat.answer import ChatModel
from llmstack.cli.common import FMT
from llmstack.data.corpus import read_jsonl
from llmstack.interop.load import load_model
from llmstack.io import atomic_write, write_json
from llmstack.paths import runs_dir
from llmstack.security.output_filter import DEFAULT_ALLOWED_HOSTS


def _config(args: argparse.Namespace, defended: bool = True) -> AgentConfig:
    return AgentConfig(
        Budget(args.max_steps, args.max_tokens, args.step_tokens),
        spotlight=defended and not getattr(args, "no_spotlight", False),
        output_filter=defended and not getattr(args, "no_output_filter", False),
        allowed_hosts=tuple(args.allow_host) if getattr(args, "allow_host", None) else DEFAULT_ALLOWED_HOSTS,
        structured=not args.free_text,
    )


def _chat(args: argparse.Namespace) -> ChatModel:
    return ChatModel(load_model(args.model, args.device))


def cmd_agent(args: argparse.Namespace) -> int:
    if args.agent_command == "traces":
        kinds = tuple(k.strip() for k in args.kinds.split(",")) if args.kinds else TRACE_KINDS
        episodes = traces(args.n, args.seed, not args.no_spotlight, kinds)
        with atomic_write(args.out) as f:
            for e in episodes:
                f.write(json.dumps(e, ensure_ascii=False) + "\n")
        print(f"{len(episodes)} worked episodes ({args.n} per kind: {', '.join(kinds)}) -> {args.out}")
        print(f"train on them: llmstack sft --model MODEL --data {args.out}")
        return 0
    if args.agent_command == "run":
        workspace = Workspace(args.workspace)
        memory = Memory(args.memory or workspace.root / "memory.md")
        index = search_index(read_jsonl(Path(args.corpus))) if args.corpus else None
        tools = [t.strip() for t in args.tools.split(",")] if args.tools else list(ALL)
        episode = Agent(_chat(args), _config(args)).run(args.task, workspace, memory, index, tools)
        print(json.dumps(episode.to_json(), indent=1, ensure_ascii=False) if args.json else transcript(episode))
        return 0
    kinds = tuple(k.strip() for k in args.kinds.split(",")) if getattr(args, "kinds", None) else KINDS
    out = Path(args.out) if args.out else runs_dir() / "agent" / Path(args.model).name
    meta = {"model": args.model, "budget": vars(_config(args).budget), "structured": not args.free_text}
    with tempfile.TemporaryDirectory(prefix="llmstack-agent-") as tmp:
        log = lambda m: print(m, file=sys.stderr)  # noqa: E731
        if args.agent_command == "eval":
            tasks = build(args.n, args.seed, kinds)
            result = measure.evaluate(_chat(args), tasks, _config(args), Path(tmp), args.seed, log)
            print(f"model: {args.model}; {args.n} tasks per kind; success with 95% intervals")
            print(measure.eval_table(result))
            path = out / "agent_eval.json"
        else:
            result = measure.redteam(_chat(args), _config(args), Path(tmp), args.limit, log)
            print(f"model: {args.model}; indirect injection through a web page and a workspace file")
            print(measure.redteam_table(result))
            path = out / "agent_redteam.json"
    write_json(
        path, measure.to_json(result, meta | {"n": getattr(args, "n", None), "limit": getattr(args, "limit", None)})
    )
    print(f"results: {path}")
    return 0


def _common(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--model", required=True, help="run dir, checkpoint, HF dir, .gguf or smollm2")
    sp.add_argument("--max-steps", type=int, default=6, help="model turns per task (default 6)")
    sp.add_argument("--max-tokens", type=int, default=512, help="new tokens per task, all turns (default 512)")
    sp.add_argument("--step-tokens", type=int, default=160, help="new tokens per turn (default 160)")
    sp.add_argument(
        "--free-text",
        action="store_true",
        help="models without tool tokens: free replies with Hermes calls in them, instead of grammar-forced calls",
    )
    sp.add_argument("--device", default="cpu")


def register(sub) -> None:
    ag = sub.add_parser(
        "agent",
        help="a model as an agent: plan -> tool call -> observation -> answer, over files, local web, memory",
        formatter_class=FMT,
        description="""An agent loop over tools: calculator, python (the jailed sandbox), search / browse (a local
corpus), list / read / write (only inside the workspace folder), remember / recall (a memory file).
Every tool result is spotlit as untrusted data and the answer passes the output filter; a step and a
token budget stop the loop, with the reason printed.

  llmstack agent run --model smollm2 --workspace ws "Multiply the numbers in numbers.txt; write it to answer.txt"
  llmstack agent run --model runs/tiny/sft --workspace ws "What is 347 times 829?"
  llmstack agent run --model smollm2 --workspace ws --corpus data/corpus/web.jsonl "What is a list? Give the source."
  OMP_NUM_THREADS=1 llmstack agent eval --model smollm2 --n 8        # success with / without tools, per kind
  OMP_NUM_THREADS=1 llmstack agent redteam --model smollm2 --limit 8  # injection ASR, undefended / defended""",
    )
    asub = ag.add_subparsers(dest="agent_command", required=True, metavar="ACTION")
    run = asub.add_parser("run", help="run one task and print the steps", formatter_class=FMT)
    run.add_argument("task", help="what the agent should do")
    run.add_argument("--workspace", required=True, help="the folder the agent may list, read and write")
    run.add_argument("--memory", help="the memory file (default: WORKSPACE/memory.md)")
    run.add_argument("--corpus", help="JSONL documents (id, url, text) for search / browse (default: none)")
    run.add_argument("--tools", help=f"comma-separated subset of {','.join(ALL)} (default: all that can run)")
    run.add_argument("--no-spotlight", action="store_true", help="tool results unmarked (for experiments)")
    run.add_argument("--no-output-filter", action="store_true", help="answer links and images left in")
    run.add_argument("--allow-host", action="append", help="output filter allow-list (repeatable)")
    run.add_argument("--json", action="store_true", help="the episode as JSON")
    _common(run)
    ev = asub.add_parser(
        "eval",
        help="task success with tools vs without, 95%% intervals",
        formatter_class=FMT,
        description=f"""Every task run by the agent and by the same model without tools; success per kind
({", ".join(KINDS)}) with 95%% Wilson intervals. Writes agent_eval.json (default runs/agent/<model>/).

  OMP_NUM_THREADS=1 llmstack agent eval --model smollm2 --n 8
  llmstack agent eval --model runs/tiny/sft --kinds product,file-product --n 20""",
    )
    ev.add_argument("--n", type=int, default=8, help="tasks per kind (default 8)")
    ev.add_argument("--kinds", help=f"comma-separated kinds (default: {','.join(KINDS)})")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", help="output folder (default: runs/agent/<model>)")
    _common(ev)
    tr = asub.add_parser(
        "traces",
        help="worked episodes of every task kind (the tools really run) as SFT data",
        formatter_class=FMT,
        description=f"""A scripted solver does each kind of task ({", ".join(KINDS)}) with the real tools, on
tasks of other seeds than `agent eval` uses (other numbers, facts and memories); the episodes are written as
OpenAI messages with tool calls, for `llmstack sft --data`.

  llmstack agent traces --n 400 --out data/agent/traces.jsonl
  llmstack sft --model runs/tiny/sft --data data/agent/traces.jsonl --out runs/tiny/agent --max-steps 400
  llmstack agent eval --model runs/tiny/agent --n 20""",
    )
    tr.add_argument("--n", type=int, default=400, help="episodes per kind (default 400)")
    tr.add_argument("--seed", type=int, default=TRACE_SEED, help=f"task seed, at least {TRACE_SEED}")
    tr.add_argument("--out", required=True, help="the JSONL file to write")
    tr.add_argument("--kinds", help=f"comma-separated kinds (default: {','.join(TRACE_KINDS)})")
    tr.add_argument("--no-spotlight", action="store_true", help="tool results unmarked (train for --no-spotlight)")
    rt = asub.add_parser(
        "redteam",
        help="indirect prompt injection through a web page and a workspace file: ASR without / with defenses",
        formatter_class=FMT,
        description="""The web-page injections of `llmstack redteam` reach the agent through a page it browses and a
file it reads; success = the canary in the answer or in a write / remember call. Printed undefended and with
spotlighting + output filter, next to clean accuracy on the same pages without payload.

  OMP_NUM_THREADS=1 llmstack agent redteam --model smollm2 --limit 8""",
    )
    rt.add_argument("--limit", type=int, default=8, help="cases per channel (default 8)")
    rt.add_argument("--out", help="output folder (default: runs/agent/<model>)")
    _common(rt)
    ag.set_defaults(func=cmd_agent)
