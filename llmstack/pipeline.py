"""The main job: raw pages -> documents -> tokenizer -> token shards -> base model -> samples -> SFT -> eval -> RL.

Each stage skips work whose output already exists (a finished tokenizer, complete shards, a
checkpoint to resume from), so running it again after an interruption continues where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from llmstack.chat.finetune import run_sft
from llmstack.chat.paraphrase import TeacherFrames, default_path, write_teacher_frames
from llmstack.data.corpus import build_default_corpus, read_jsonl
from llmstack.data.shards import ShardIndex, write_shards
from llmstack.eval.assistant import run_assistant_eval, wording_table
from llmstack.eval.copying import copy_score
from llmstack.eval.report import write_report_card
from llmstack.inference.engine import generate
from llmstack.inference.sample import SamplingConfig
from llmstack.interop.load import load_model
from llmstack.io import write_json
from llmstack.rl.stage import run_rl
from llmstack.security.hierarchy import HIERARCHY_CONVERSATIONS, hierarchy_sets
from llmstack.tokenizer import Tokenizer
from llmstack.training.metrics import read_metrics
from llmstack.training.presets import get_preset
from llmstack.training.pretrain import run_pretrain

DREAM_PROMPTS = ("The ", "import os\n", "In Python, a list")


def _stage(name: str) -> float:
    print(f"\n=== {name} ===", flush=True)
    return time.perf_counter()


def teacher_frames() -> None:
    """The teacher-written wordings the evaluation asks among the unseen ones (``make setup`` writes them once
    per machine; written here when missing). Without the teacher package the held-out families stand alone."""
    if default_path().exists():
        print(f"{TeacherFrames.load(default_path()).summary()} ({default_path()})")
        return
    try:
        frames, path = write_teacher_frames()
    except FileNotFoundError as e:
        print(f"teacher frames: none ({e}); unseen wordings are the held-out families alone")
        return
    print(f"{frames.summary()} -> {path}")


RL_STEPS = 30  # GRPO steps in the main job (the `rl` tiny preset runs 160): it keeps the job under 15 minutes
RL_HELDOUT = {"n_heldout": 200, "eval_k_problems": 50}  # half the preset's held-out problems: two evals in the job


def run_pipeline(
    preset: str,
    run_dir: Path,
    max_steps: int | None = None,
    sft_steps: int | None = None,
    rl_steps: int | None = None,
) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    t = _stage("1/8 pretraining data")
    corpus = build_default_corpus()
    n_docs = sum(1 for _ in read_jsonl(corpus))
    print(f"{n_docs} documents in {corpus}")
    timings["data"] = time.perf_counter() - t

    t = _stage("2/8 tokenizer")
    tok_dir = run_dir / "tokenizer"
    vocab = get_preset(preset, 4096)[0].vocab_size
    if not (tok_dir / "tokenizer.json").exists():
        Tokenizer.train((d.text for d in read_jsonl(corpus)), vocab, show_progress=True).save(tok_dir)
    tok = Tokenizer.load(tok_dir)
    if tok.bos_id is None:
        raise ValueError(f"{tok_dir}: the tokenizer has no <|bos|> token")
    bos: int = tok.bos_id
    print(f"tokenizer: {tok.vocab_size} tokens at {tok_dir}")
    timings["tokenizer"] = time.perf_counter() - t

    t = _stage("3/8 token shards")
    shard_dir = run_dir / "shards"
    try:
        idx = ShardIndex.load(shard_dir)
        idx.check_tokenizer(tok)
    except (FileNotFoundError, ValueError):
        idx = write_shards(((d.id, d.text) for d in read_jsonl(corpus)), tok, shard_dir, val_fraction=0.05)
    print(f"{idx.n_tokens('train'):,} train tokens, {idx.n_tokens('val'):,} val tokens in {shard_dir}")
    timings["tokenize"] = time.perf_counter() - t

    t = _stage("4/8 pretraining")
    run_pretrain(run_dir, tok, idx, preset, {"max_steps": max_steps or None}, device="cpu")
    timings["pretrain"] = time.perf_counter() - t

    t = _stage("5/8 dreams (samples from the base model)")
    base = load_model(run_dir)
    model, ckpt = base.model, base.checkpoint
    assert ckpt is not None
    samples = []
    for i, prompt in enumerate(DREAM_PROMPTS):
        ids = list(
            generate(
                model,
                [bos, *tok.encode_ordinary(prompt)],
                SamplingConfig(max_new_tokens=80, temperature=0.8, top_k=50, seed=i),
                {bos},
            )
        )
        text = prompt + tok.decode([t for t in ids if t != bos])
        samples.append(text)
        print(f"--- {prompt!r}\n{text}\n")
    copying = copy_score(model, tok)  # whether the base copies from its context (eval/copying.py)
    print(f"copying: {copying.line()}")
    timings["sample"] = time.perf_counter() - t

    t = _stage("6/8 supervised finetuning into an assistant")
    sft_dir = run_dir / "sft"
    pages, held_out_pages = hierarchy_sets(HIERARCHY_CONVERSATIONS)
    run_sft(run_dir, sft_dir, {"max_steps": sft_steps or None}, "cpu", pages, held_out_pages)
    timings["sft"] = time.perf_counter() - t

    t = _stage("7/8 evaluation of the assistant (held-out problems)")
    teacher_frames()
    results, _ = run_assistant_eval(sft_dir, n=500)
    print("\n".join(wording_table(results)))
    assistant_eval = sorted(results, key=lambda r: r.name)  # the order eval.json (sorted keys) has
    timings["eval"] = time.perf_counter() - t

    t = _stage("8/8 reinforcement learning (GRPO on reasoning-gym arithmetic, checked by its verifier)")
    rl = run_rl(
        sft_dir, run_dir / "rl", "tiny", max_steps=rl_steps or RL_STEPS, device="cpu", grpo_overrides=RL_HELDOUT
    )
    timings["rl"] = time.perf_counter() - t

    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if r.get("kind") == "eval"]
    trains = [r for r in records if r.get("kind") == "train"]
    outputs = {
        "run": str(run_dir),
        "checkpoint": str(ckpt.path),
        "tokenizer": str(tok_dir),
        "metrics": str(run_dir / "metrics.jsonl"),
        "loss_plot": str(run_dir / "loss.png"),
        "sft_checkpoint": str(sft_dir / "checkpoints"),
        "sft_loss_plot": str(sft_dir / "loss.png"),
        "assistant_eval": str(sft_dir / "eval.json"),
        "rl_checkpoint": str(rl.checkpoint),
        "rl_plot": rl.plot,
        "report": str(run_dir / "report" / "report.md"),
    }
    summary = {
        "preset": preset,
        "documents": n_docs,
        "train_tokens": idx.n_tokens("train"),
        "params": sum(p.numel() for p in model.parameters()),
        "steps": ckpt.step,
        "val_bpb_initial": evals[0]["val_bpb"] if evals else None,
        "val_bpb_final": evals[-1]["val_bpb"] if evals else None,
        "train_loss_first": trains[0]["loss"] if trains else None,
        "train_loss_last": trains[-1]["loss"] if trains else None,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "samples": samples,
        "copying": {"first": round(copying.first, 3), "second": round(copying.second, 3), "copies": copying.copies},
        "assistant": {r.name: round(r.accuracy, 3) for r in assistant_eval},
        "rl": {"steps": rl.steps, "sft": rl.sft, "rl": rl.rl, "rollout_tok_per_s": round(rl.rollout_tok_per_s)},
        "outputs": outputs,
    }
    write_json(run_dir / "summary.json", summary)
    write_report_card(run_dir, run_dir / "report")  # reads summary.json: written last
    total = time.perf_counter() - t_all
    print("=== summary ===")
    if evals:
        print(
            f"validation bits/byte: {summary['val_bpb_initial']:.3f} at step 0 -> {summary['val_bpb_final']:.3f} "
            f"at step {ckpt.step}  (a uniform guess over bytes is 8.0)"
        )
    if trains:
        print(f"train loss: {summary['train_loss_first']:.3f} -> {summary['train_loss_last']:.3f} nats/token")
    print(f"base model, {copying.line()}")
    for line in wording_table(results):  # each skill asked in trained wordings and in held-out ones
        print(f"assistant: {line}")
    for line in rl.lines():
        print(f"rl: {line}")
    print(json.dumps(summary["seconds"]), f"total {total:.0f}s")
    for k, v in outputs.items():
        print(f"{k:>11}: {v}")
    print(f"    summary: {run_dir / 'summary.json'}")
    return 0
