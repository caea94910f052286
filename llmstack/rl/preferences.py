"""Preference data: (prompt, chosen, rejected) pairs, from a gold judge with a rubric and from an LLM judge.

Where quality is measurable, a programmatic labeler plays the human of InstructGPT and follows the
written rubric in ``labeling.md``: our SFT model samples several replies to each arithmetic question
(``QUESTION_SETS``: the mixture's 3-digit ``*`` / ``+`` questions, or reasoning-gym's ``+ - *``
``basic_arithmetic_3d``; tools running) and ``gold_score`` grades each; two
replies whose grades differ by at least ``min_margin`` make a pair. Where it is not (open questions),
SmolLM2-135M-Instruct judges two sampled replies in both orders (``arena_battle.LLMJudge``); a verdict
that flips with the order is a tie and makes no pair.

A reply is stored as the text of the assistant turn, tool tokens written out by name
(``<|tool_call_start|>calculator: 12*34<|tool_call_end|><|tool_result_start|>408<|tool_result_end|>
The answer is 408.<|assistant_end|>``): readable, and parsed back into ``Part``s for training.
Files are JSONL, one pair a line: ``{"prompt", "chosen", "rejected", "source", ...}``.

BIG-bench ``hhh_alignment`` (human judgements of helpful, honest, harmless replies) becomes pairs
for evaluation only (``hhh_pairs``); nothing here trains on it.

Where the pieces live: ``pairs.py`` (the pair, its files, replies as parts and tokens, the loop's
stream of pairs), ``judges.py`` (the gold and LLM judges, scoring a policy), ``mistakes.py``
(perturbed pairs, the mistake probe), ``policy_replies.py`` (loading a policy, sampling its replies).
This module is the stage that runs them, and the reward model, DPO and RLHF import from it.

What is not here: multi-turn prompts, ties as training signal, more than two replies ranked at once
(a ranking of k replies becomes pairs).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llmstack.eval.arena_battle import OPEN_PROMPTS
from llmstack.eval.tasks.bigbench import FETCH_HINT

# `name as name`: moved to a module of its own, re-exported here for the reward model, DPO, RLHF and the CLI
from llmstack.io import write_json
from llmstack.rl.judges import (
    HELDOUT_SEED,
    PREF_SEED,
    arithmetic_problems,
    gold_pairs,
    gold_score,
    llm_pairs,
)
from llmstack.rl.judges import ArithmeticProblem as ArithmeticProblem
from llmstack.rl.judges import load_llm_judge as load_llm_judge
from llmstack.rl.judges import score_policy as score_policy
from llmstack.rl.mistakes import mistake_probe as mistake_probe
from llmstack.rl.mistakes import perturbed_pairs
from llmstack.rl.pairs import Pair, write_pairs
from llmstack.rl.pairs import PairStream as PairStream
from llmstack.rl.pairs import encode_reply as encode_reply
from llmstack.rl.pairs import read_pairs as read_pairs
from llmstack.rl.policy_replies import sample_replies
from llmstack.rl.policy_replies import sample_tokens as sample_tokens


# ----------------------------------------------------------------------------- BIG-bench hhh_alignment
def hhh_pairs(root: str | Path) -> list[Pair]:
    """BIG-bench ``hhh_alignment`` (root: ``data/eval/bigbench``): each question's preferred reply against
    each other one. Evaluation only: every file carries BIG-bench's canary."""
    folder = Path(root) / "hhh_alignment"
    files = sorted(folder.glob("**/task.json")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{folder}: {FETCH_HINT}")
    out = []
    for f in files:
        try:
            task = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{f}: unreadable BIG-bench task ({e})") from None
        for ex in task.get("examples", []):
            scores = ex.get("target_scores")
            if not isinstance(ex.get("input"), str) or not isinstance(scores, dict) or len(scores) < 2:
                continue
            best = max(scores.values())
            good = [c for c, v in scores.items() if v == best]
            for c, v in scores.items():
                if v < best:
                    out += [Pair(ex["input"].strip(), g.strip(), c.strip(), "hhh_alignment") for g in good[:1]]
    return out


# ----------------------------------------------------------------------------- the stage
@dataclass
class PrefConfig:
    prompts: int = 1200  # training questions for the gold judge
    heldout_prompts: int = 200  # held-out questions: held-out pairs, and the gold score of DPO / RLHF
    samples: int = 8  # replies sampled per question
    temperature: float = 1.0  # a 99.6% policy errs rarely: 280 pairs from 9,600 replies at 1.0
    min_margin: float = 0.25  # the least gold difference that makes a pair
    per_prompt: int = 2  # pairs kept per question
    # training pairs of a right reply against itself with one copying error: they teach the RM to check
    # the operands, which it otherwise fails to (docs/preferences.md: RLHF hacks that blind spot; DPO
    # gains twice as much)
    perturbed: int = 2000
    open_prompts: int = 16  # open questions for the LLM judge (0: none)
    open_samples: int = 4  # replies per open question, judged in pairs
    max_new_tokens: int = 48
    # QUESTION_SETS: RL's + - * questions, where the main job's SFT model errs on a third of its samples
    # (1,009 pairs from 1,200 questions); on the mixture's products it errs on 2% (280 pairs)
    questions: str = "basic_arithmetic_3d"


def preset(name: str) -> PrefConfig:
    """``tiny``: ~3 min on 2 CPU cores; ``gpu``: more questions, twice the samples."""
    if name == "tiny":
        return PrefConfig()
    if name == "gpu":
        return PrefConfig(
            prompts=4000, heldout_prompts=500, samples=16, open_prompts=64, open_samples=8, perturbed=6000
        )
    raise ValueError(f"unknown preset {name!r}; choose tiny or gpu")


def pairs_questions(pairs: str | Path) -> str:
    """The question set a preference directory was sampled on (its ``summary.json``; ``mixture`` if none)."""
    try:
        summary = json.loads((Path(pairs) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "mixture"
    return str(summary.get("config", {}).get("questions", "mixture"))


def run_preferences(
    model: torch.nn.Module,
    tok: Any,
    cfg: PrefConfig,
    out: str | Path,
    judge: Callable[..., tuple[str, str]] | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Sample, label and write ``out/train.jsonl`` (gold + LLM-judged) and ``out/heldout.jsonl`` (gold,
    held-out questions); returns a summary."""
    out = Path(out)
    model.eval()
    t0 = time.perf_counter()
    train_q = arithmetic_problems(cfg.prompts, PREF_SEED, cfg.questions)
    held_q = arithmetic_problems(cfg.heldout_prompts, HELDOUT_SEED, cfg.questions)
    kw = dict(k=cfg.samples, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
    train_r = sample_replies(model, tok, [p.prompt for p in train_q], seed=seed, **kw)  # type: ignore[arg-type]
    held_r = sample_replies(model, tok, [p.prompt for p in held_q], seed=seed + 7_919, **kw)  # type: ignore[arg-type]
    n_replies = cfg.samples * (len(train_q) + len(held_q))
    log(f"preferences: {n_replies} replies sampled in {time.perf_counter() - t0:.0f}s")
    train = gold_pairs(train_q, train_r, cfg.min_margin, cfg.per_prompt, seed)
    made = perturbed_pairs(train_q, train_r, cfg.perturbed, cfg.min_margin, seed)
    train += made
    held = gold_pairs(held_q, held_r, cfg.min_margin, cfg.per_prompt, seed)
    write_pairs(out / "train.jsonl", train)  # now, so that a slow or failing LLM judge loses nothing
    write_pairs(out / "heldout.jsonl", held)
    llm: list[Pair] = []
    if judge is not None and cfg.open_prompts:
        opens = [OPEN_PROMPTS[i % len(OPEN_PROMPTS)] for i in range(cfg.open_prompts)]
        open_r = sample_replies(model, tok, opens, cfg.open_samples, 1.0, seed, cfg.max_new_tokens)
        llm = llm_pairs(opens, open_r, judge)
        log(
            f"preferences: the LLM judge decided {len(llm)} of {cfg.open_prompts * (cfg.open_samples // 2)} comparisons"
        )
        write_pairs(out / "train.jsonl", train + llm)
    grades = [gold_score(p, r).score for p, g in zip(train_q, train_r, strict=True) for r in g]
    summary = {
        "train_pairs_gold": len(train) - len(made),
        "train_pairs_perturbed": len(made),
        "train_pairs_llm": len(llm),
        "heldout_pairs": len(held),
        "mean_gold_of_samples": sum(grades) / max(1, len(grades)),
        "config": asdict(cfg),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(out / "summary.json", summary)
    log(
        f"preferences: {len(train) - len(made)} gold + {len(made)} perturbed + {len(llm)} LLM-judged training pairs, "
        f"{len(held)} held-out -> {out}"
    )
    return summary
