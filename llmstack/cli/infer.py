"""Commands that generate: sample (a base model's dreams, or a simulator), chat, synth (teacher data)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from llmstack.chat.answer import ChatModel, chat_repl, is_ours, repl, write_stream
from llmstack.chat.paraphrase import default_path, write_teacher_frames
from llmstack.chat.session import ChatSession
from llmstack.chat.synth import SYSTEM, TOPICS, SynthConfig, read_lines, synthesize, write_conversations
from llmstack.cli.common import (
    FMT,
    add_run_args,
    load_tokenizer,
    run_dir,
    sampling_config,
)
from llmstack.inference.simulate import conversation_prompt, few_shot_prompt, sample
from llmstack.interop.load import load_model
from llmstack.paths import data_dir
from llmstack.tools.registry import default_toolbox


def cmd_sample(args: argparse.Namespace) -> int:
    source = args.checkpoint or run_dir(args)
    bundle = load_model(source, args.device)  # ours, or an imported HF / GGUF model with its own tokenizer
    tok = bundle.tokenizer
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer, args)
        if bundle.meta.get("tokenizer_fingerprint") not in (None, tok.fingerprint):
            raise ValueError(
                f"{source} was trained with tokenizer {str(bundle.meta.get('tokenizer_fingerprint'))[:12]}, "
                f"but {args.tokenizer} is {tok.fingerprint[:12]}; pass the matching --tokenizer"
            )
    sim = None  # a base model as a simulator: a document whose continuation answers the prompt
    if args.few_shot or args.conversation:
        if not args.prompt.strip():
            raise ValueError("--few-shot and --conversation need a --prompt (the question to answer)")
        sim = few_shot_prompt(args.few_shot, args.prompt) if args.few_shot else conversation_prompt(args.prompt)
    cfg = sampling_config(args)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        seeded = cfg if cfg.seed is None else replace(cfg, seed=cfg.seed + i)
        if sim is None:
            sys.stdout.write(args.prompt)
        for piece in sample(bundle.model, tok, args.prompt, seeded, sim):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def _chat_llmstack(bundle, cfg, args: argparse.Namespace) -> int:
    tools = None if args.no_tools else default_toolbox()
    session = ChatSession(bundle.model, bundle.tokenizer, tools, cfg, system=args.system, show_tokens=args.show_tokens)
    if args.prompt is not None:
        write_stream(session.ask(args.prompt), sys.stdout)
        return 0
    print("chat: /reset, /system TEXT, /tokens, /quit (or an empty line)", file=sys.stderr)
    repl(session.ask, sys.stdout, command=session.handle)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    bundle = load_model(args.model)
    cfg = sampling_config(args)
    if is_ours(bundle):
        return _chat_llmstack(bundle, cfg, args)  # our own assistants: tools, /commands, token view
    chat = ChatModel(bundle, None if args.no_tools else default_toolbox().call)  # its Hermes calls run
    if args.prompt is not None:
        print(chat.reply(chat.ask(args.prompt, args.system), cfg))
        return 0
    print("chat: an empty line or Ctrl-D ends it", file=sys.stderr)
    chat_repl(chat, cfg, args.system, sys.stdout)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:

    questions = read_lines(args.topics or TOPICS)
    system_file = SYSTEM if args.system is None else args.system
    system = "\n".join(read_lines(system_file)) if system_file else None
    out = Path(args.out) if args.out else data_dir() / "synth" / "conversations.jsonl"
    t0 = time.perf_counter()
    teacher = load_model(args.teacher)
    teacher.model.to(args.device or "cpu")
    teacher.template()  # no chat template: fail before generating anything
    sampling = sampling_config(args)
    cfg = SynthConfig(n=args.n, batch_size=args.batch_size, sampling=sampling, min_words=args.min_words)
    n = len(questions) if args.n is None else args.n
    with tqdm(total=n, desc="synth", unit="conv", disable=args.no_progress) as bar:
        result = synthesize(teacher, questions, system, cfg, on_done=bar.update)
    if not result.conversations:  # leave a file from an earlier run as it is
        print(f"{result.summary()}; nothing written", file=sys.stderr)
        return 1
    write_conversations(out, result.conversations)
    print(f"{result.summary()} -> {out} ({time.perf_counter() - t0:.0f}s, teacher {args.teacher})")
    return 0


def cmd_paraphrase(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = Path(args.out) if args.out else None
    if args.if_missing and (out or default_path()).exists():
        print(f"teacher frames: {out or default_path()} exists; kept (delete it to write new ones)")
        return 0
    frames, path = write_teacher_frames(
        args.teacher, out, args.asks, args.seed, args.device or "cpu", not args.no_progress
    )
    print(f"{frames.summary()} -> {path} ({time.perf_counter() - t0:.0f}s, teacher {args.teacher})")
    return 0


def register(sub) -> None:
    sp = sub.add_parser(
        "sample",
        help="sample text from a checkpoint, streaming (or use a base model as a simulator)",
        formatter_class=FMT,
        description="""Continue a prompt with a checkpoint, or make a base model answer through a document.

  llmstack sample --prompt "The os module" --seed 0
  llmstack sample --few-shot examples.jsonl --prompt "def" --seed 0        # Input:/Output: blocks
  llmstack sample --conversation --prompt "What is a list?" --seed 0       # Human:/Assistant: document""",
    )
    add_run_args(sp)
    sp.add_argument(
        "--model",
        "--checkpoint",
        dest="checkpoint",
        help="any model source: run, checkpoint, HF dir, .gguf (default: <run>)",
    )
    sp.add_argument("--tokenizer")
    sp.add_argument("--prompt", default="")
    sp.add_argument("--max-new-tokens", type=int, default=200)
    sp.add_argument("--temperature", type=float, default=0.8)
    sp.add_argument("--top-k", type=int, default=50, help="0 disables")
    sp.add_argument("--top-p", type=float, default=None)
    sp.add_argument("--seed", type=int, default=None, help="same seed, same text")
    sp.add_argument("--num-samples", type=int, default=1)
    sp.add_argument("--device", default=None)
    sim = sp.add_mutually_exclusive_group()
    sim.add_argument(
        "--few-shot",
        metavar="FILE",
        help='examples before --prompt: .jsonl of {"input": ..., "output": ...} (as "Input: ...\\nOutput: ..." '
        "blocks), or any other file as verbatim text; prints only the completion, up to the next blank line",
    )
    sim.add_argument(
        "--conversation",
        action="store_true",
        help="the conversation document: a base model plays a helpful assistant answering --prompt "
        "(llmstack/inference/prompts/conversation.txt); stops at the next 'Human:' line",
    )
    sp.set_defaults(func=cmd_sample)
    ch = sub.add_parser(
        "chat",
        help="chat with a model using its own chat template (REPL, or one --prompt)",
        description="""Chat with any model: our runs (our chat format; tool calls run inside the engine; /reset,
/system, /tokens) or any other chat model (its own template; a <tool_call> it writes runs the calculator
or the python sandbox, and the result comes back as a tool turn, as SFT trained it).

  llmstack chat --model smollm2 --prompt "What is the capital of France?"
  llmstack chat --model runs/smollm2-calculator --prompt "What is 123 times 456?"   # a LoRA-tuned SmolLM2
  llmstack chat --model runs/tiny/sft                                             # a REPL""",
        formatter_class=FMT,
    )
    ch.add_argument("--model", required=True, help="HF directory, .gguf file, or run / checkpoint directory")
    ch.add_argument("--prompt", help="one user message; print the reply and exit (non-interactive)")
    ch.add_argument("--system", help="system message")
    ch.add_argument("--max-new-tokens", type=int, default=256)
    ch.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ch.add_argument("--top-k", type=int, default=50, help="0 disables")
    ch.add_argument("--top-p", type=float, default=None)
    ch.add_argument("--seed", type=int, default=None)
    ch.add_argument("--no-tools", action="store_true", help="leave tool calls unanswered (ours, Hermes <tool_call>s)")
    ch.add_argument("--show-tokens", action="store_true", help="llmstack models: print each token's id after it")
    ch.set_defaults(func=cmd_chat)
    sy = sub.add_parser(
        "synth",
        help="synthetic SFT conversations: a teacher model answers seed questions (OpenAI-format JSONL)",
        formatter_class=FMT,
        description="""A teacher model (default SmolLM2-135M-Instruct) answers the seed questions with its own chat
template; truncated, empty, too short and repetitive replies are dropped and counted. The kept
conversations are written atomically as JSONL ({"messages": [user, assistant]}) for the SFT mixture.

  llmstack synth                                            # 60 seed questions -> data/synth/conversations.jsonl
  llmstack synth --n 240 --batch-size 16                    # 4 answers per question (seed + i)
  llmstack synth --model runs/smollm2 --topics my_questions.txt --out synth.jsonl
  llmstack sft --extra-conversations data/synth/conversations.jsonl""",
    )
    sy.add_argument(
        "--model",
        "--teacher",
        dest="teacher",
        default="smollm2",
        help="the teacher: smollm2, an HF dir, a .gguf, a run",
    )
    sy.add_argument(
        "--topics", help="questions, one a line, # comments (default: llmstack/chat/prompts/synth_topics.txt)"
    )
    sy.add_argument(
        "--system", help="the teacher's system prompt file (default: prompts/synth_system.txt; '' for none)"
    )
    sy.add_argument("--out", help="JSONL to write (default: data/synth/conversations.jsonl)")
    sy.add_argument("--n", type=int, help="conversations to generate (default: one per question; more cycle)")
    sy.add_argument("--batch-size", type=int, default=8, help="rows decoded together")
    sy.add_argument("--max-new-tokens", type=int, default=256, help="longer replies are dropped as truncated")
    sy.add_argument("--temperature", type=float, default=0.7)
    sy.add_argument("--top-k", type=int, default=50, help="0 disables")
    sy.add_argument("--top-p", type=float, default=0.9)
    sy.add_argument("--seed", type=int, default=0, help="conversation i samples with seed + i")
    sy.add_argument("--min-words", type=int, default=4, help="shorter replies are dropped as too_short")
    sy.add_argument("--device", default=None)
    sy.add_argument("--no-progress", action="store_true", help="no progress bar")
    sy.set_defaults(func=cmd_synth)
    pp = sub.add_parser(
        "paraphrase",
        help="wordings for the evaluation only: a teacher rewrites questions of each skill into new frames",
        formatter_class=FMT,
        description="""A teacher model (default SmolLM2-135M-Instruct) rewrites questions of each assistant skill
(products, sums, letter counts, its name, its maker). A rewrite that keeps the values and still asks the
same thing becomes a frame ({a} {b} / {w} {l} in place of the values) that `llmstack eval` and the main
job ask among the unseen wordings, with fresh values. Never trained on. Dropped rewrites are counted
by reason (truncated, answers, values_changed, other_question, known, too_long).

  llmstack paraphrase                          # -> data/paraphrases/teacher.json
  llmstack paraphrase --asks 96 --seed 1       # more rewrites per skill
  llmstack eval --run-dir runs/tiny/sft        # unseen wording now includes the teacher's frames""",
    )
    pp.add_argument("--model", "--teacher", dest="teacher", default="smollm2",
                    help="the teacher: smollm2, an HF dir, a .gguf, a run")  # fmt: skip
    pp.add_argument("--out", help="JSON to write (default: data/paraphrases/teacher.json)")
    pp.add_argument("--asks", type=int, default=32, help="rewrites asked per skill (5 skills)")
    pp.add_argument("--seed", type=int, default=0, help="ask i samples with seed + i")
    pp.add_argument("--device", default=None)
    pp.add_argument("--no-progress", action="store_true", help="no progress bar")
    pp.add_argument("--if-missing", action="store_true", help="do nothing when the file exists (set-up runs this)")
    pp.set_defaults(func=cmd_paraphrase)
