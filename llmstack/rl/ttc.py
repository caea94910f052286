"""Test-time compute: sample n answers to a question, then pick one.

* self-consistency (Wang et al., 2022): the most common final answer among the n samples;
* best-of-n: the sample a scorer ranks highest. A scorer is any ``(prompt, completion) -> float``:
  a reward model plugs in as is; built in are ``oracle`` (the verifier itself: best-of-n with it is
  pass@n, the ceiling) and ``logprob`` (the policy's mean log-probability of its own sampled tokens,
  a confidence score that needs no second model).

Accuracy against n is measured on N samples per problem: for each n dividing N the samples are cut
into N/n disjoint blocks of n and the accuracies averaged, so small n are not estimated from one draw.

    llmstack ttc --model runs/tiny/sft --tasks multiply --n 16 --problems 50
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmstack.chat.conversation import ChatFormat, Conversation
from llmstack.inference.sample import SamplingConfig
from llmstack.interop.load import load_ours
from llmstack.io import pyplot, save_png, write_json
from llmstack.rl.grpo import Sampler
from llmstack.rl.verifiers import HELDOUT_SEED, Problem, final_answer, make_splits, reward, reward_of_answer
from llmstack.tokenizer import special as S
from llmstack.tools.registry import default_toolbox

Scorer = Callable[[str, str], float]  # (prompt, completion) -> higher is better


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most common answer (``None``, no answer, never wins); ties go to the one seen first."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def best_of_n(scores: Sequence[float]) -> int:
    """Index of the highest score; ties go to the first."""
    return int(np.argmax(np.asarray(scores, dtype=np.float64)))


def oracle_scorer(problems: Sequence[Problem]) -> Scorer:
    """The verifier as a scorer (it knows the answer): best-of-n with it is pass@n."""
    by_question = {p.question: p for p in problems}
    return lambda prompt, completion: reward(by_question[prompt], completion)[0]


class MeanLogprobScorer:
    """Mean log-probability the model gives the completion's own tokens after the chat prompt.

    The completion text is re-encoded (special tokens allowed), so BPE may split it differently from
    how it was sampled; tool results are left out (the model did not choose them).
    """

    def __init__(self, model: torch.nn.Module, tok: Any) -> None:
        self.model, self.tok, self.fmt = model, tok, ChatFormat(tok)
        self.result = (tok.special_id(S.TOOL_RESULT_START), tok.special_id(S.TOOL_RESULT_END))

    @torch.no_grad()
    def __call__(self, prompt: str, completion: str) -> float:
        p = self.fmt.prompt(Conversation.of(("user", prompt)))
        c = self.tok.encode(completion, allowed_special="all")
        if not c:
            return float("-inf")
        ids = (p + c)[: self.model.config.max_seq_len]  # type: ignore[union-attr]
        device = next(self.model.parameters()).device
        self.model.eval()
        logp = self.model(torch.tensor([ids], device=device))[0, :-1].float().log_softmax(-1)  # (T-1, V)
        chosen = logp.gather(1, torch.tensor(ids[1:], device=device).view(-1, 1)).squeeze(1)[len(p) - 1 :]
        keep, inside = [], False
        for t in ids[len(p) :]:
            if t == self.result[0]:
                inside = True
            keep.append(not inside)
            if t == self.result[1]:
                inside = False
        mask = torch.tensor(keep, device=device)
        return float(chosen[mask].mean()) if mask.any() else float("-inf")


@dataclass
class TTCResult:
    ns: list[int]
    curves: dict[str, list[float]]  # method -> accuracy at each n
    greedy: float  # pass@1 of greedy decoding, for reference
    n_problems: int
    samples: int  # N, samples per problem
    seconds: float = 0.0
    tok_per_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _correct(problem: Problem, answer: str | None) -> bool:
    return reward_of_answer(problem, answer)[0] >= 1


def curves(
    problems: Sequence[Problem], samples: Sequence[Sequence[str]], scores: Mapping[str, Sequence[Sequence[float]]]
) -> tuple[list[int], dict[str, list[float]]]:
    """Accuracy against n (powers of two up to N) for majority vote and best-of-n with each scorer's
    precomputed ``scores[name][problem][sample]``; disjoint blocks of n samples are averaged."""
    N = min(len(s) for s in samples)
    ns = [1 << i for i in range(N.bit_length()) if (1 << i) <= N]
    out: dict[str, list[float]] = {"majority vote": [], **{f"best-of-n ({k})": [] for k in scores}}
    for n in ns:
        blocks = [range(b * n, (b + 1) * n) for b in range(N // n)]
        maj, best = [], {k: [] for k in scores}  # type: ignore[var-annotated]
        for i, p in enumerate(problems):
            for blk in blocks:
                texts = [samples[i][j] for j in blk]
                maj.append(_correct(p, majority_vote([final_answer(t) for t in texts])))
                for k, sc in scores.items():
                    pick = blk[best_of_n([sc[i][j] for j in blk])]
                    best[k].append(_correct(p, final_answer(samples[i][pick])))
        out["majority vote"].append(float(np.mean(maj)))
        for k in scores:
            out[f"best-of-n ({k})"].append(float(np.mean(best[k])))
    return ns, out


def plot_ttc(result: TTCResult, png: str | Path, title: str = "") -> Path:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name, ys in result.curves.items():
        ax.plot(result.ns, ys, "o-", label=name)
    ax.axhline(result.greedy, color="gray", ls="--", label="greedy (n = 1)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("n samples per problem")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or f"test-time compute: {result.n_problems} problems, {result.samples} samples each")
    fig.tight_layout()
    png = Path(png)
    save_png(fig, png)
    return png


def run_ttc(
    model_dir: str | Path,
    out_dir: str | Path,
    tasks: Sequence[str] = ("multiply",),
    *,
    n: int = 16,
    n_problems: int = 50,
    temperature: float = 1.0,
    max_new_tokens: int = 40,
    scorers: Sequence[str] = ("oracle", "logprob"),
    extra_scorers: dict[str, Scorer] | None = None,
    seed: int = HELDOUT_SEED,
    device: str | None = None,
) -> TTCResult:
    """Sample ``n`` completions of ``n_problems`` held-out problems from the model in ``model_dir``; write
    ``ttc.json`` and ``ttc.png`` (accuracy against n) into ``out_dir``. ``extra_scorers`` (a reward
    model, say) join the built-in ``oracle`` / ``logprob``."""
    model, tok, bundle = load_ours(model_dir, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _, problems = make_splits(list(tasks), 1, n_problems, heldout_seed=seed, train_seed=seed + 1)
    sampler = Sampler(model, tok, default_toolbox())
    t0 = time.perf_counter()
    greedy = sampler.sample([p.question for p in problems], 1, SamplingConfig(max_new_tokens, 0.0, None))
    greedy_acc = float(
        np.mean([reward(p, cs[0].text)[0] >= 1 for p, cs in zip(problems, greedy.completions, strict=True)])
    )
    seeds = [[seed * 1000 + i * n + j for j in range(n)] for i in range(len(problems))]
    roll = sampler.sample([p.question for p in problems], n, SamplingConfig(max_new_tokens, temperature, None), seeds)
    samples = [[c.text for c in cs] for cs in roll.completions]
    table: dict[str, Scorer] = {}
    for name in scorers:
        if name == "oracle":
            table[name] = oracle_scorer(problems)
        elif name == "logprob":
            table[name] = MeanLogprobScorer(model, tok)
        else:
            raise ValueError(f"unknown scorer {name!r}: built in are oracle and logprob")
    table.update(extra_scorers or {})
    scores = {
        k: [[sc(p.question, t) for t in s] for p, s in zip(problems, samples, strict=True)] for k, sc in table.items()
    }
    ns, accs = curves(problems, samples, scores)
    result = TTCResult(ns, accs, greedy_acc, len(problems), n, time.perf_counter() - t0, roll.tok_per_s)
    out = Path(out_dir)
    write_json(
        out / "ttc.json",
        {
            "model": str(bundle.checkpoint.path if bundle.checkpoint else model_dir),
            "tasks": list(tasks),
            "temperature": temperature,
            **result.__dict__,
        },
    )
    plot_ttc(result, out / "ttc.png", f"{', '.join(tasks)}: {Path(model_dir).name}, T={temperature}")
    return result


def ttc_table(result: TTCResult) -> str:
    head = f"{'method':<24}" + "".join(f"{f'n={n}':>8}" for n in result.ns)
    rows = [f"{name:<24}" + "".join(f"{v:8.1%}" for v in ys) for name, ys in result.curves.items()]
    return "\n".join([head, *rows, f"{'greedy':<24}{result.greedy:8.1%}"])
