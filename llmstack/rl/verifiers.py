"""Problems with checkable answers, and the verifiers that turn a completion into a reward.

* ``multiply`` / ``add``: the SFT mixture's 3-digit x 3-digit questions ("What is 686 times 849?"),
  meant to be answered through the calculator; with the held-out seed they are exactly the problems
  of ``llmstack eval``'s "multiply 3x3" rows.
* reasoning-gym ``basic_arithmetic`` and ``chain_sum`` at small settings (two terms of one or two
  digits), scored by the dataset's own ``score_answer``.

Train and held-out problems come from different seeds; a training problem whose question is also a
held-out question is dropped (small settings repeat questions across seeds).

A reward is the verifier's score of the completion's final answer: the last number of the text the
user sees (tool calls and tool results left out, so copying the calculator's result is the model's
job). A verifier that raises scores 0 and the error is logged; it never ends a run.

Not covered: answers that are not numbers (reasoning-gym tasks with words or lists as answers need
their own ``extract``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmstack.chat.mixture import (
    HELDOUT_SEED,
    REASONING_GYM_3D,
    REASONING_GYM_SMALL,
    arithmetic_question,
)  # the same held-out problems as `llmstack eval`

log = logging.getLogger(__name__)

TRAIN_SEED = 1

_TOOL_SPANS = (
    re.compile(r"<\|tool_call_start\|>.*?(<\|tool_call_end\|>|$)", re.S),
    re.compile(r"<\|tool_result_start\|>.*?(<\|tool_result_end\|>|$)", re.S),
)
_TOOL_RESULT = re.compile(r"<\|tool_result_start\|>(.*?)<\|tool_result_end\|>", re.S)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class Problem:
    question: str
    answer: str  # the reference answer, as text
    source: str  # the problem set's name
    check: Callable[[str | None], float] = field(repr=False)  # extracted answer -> reward in [0, 1]


def final_answer(completion: str) -> str | None:
    """The last number the user sees: tool calls and results are removed first, commas ignored."""
    visible = completion
    for span in _TOOL_SPANS:
        visible = span.sub(" ", visible)
    nums = _NUMBER.findall(visible.replace(",", ""))
    if not nums:
        return None
    x = nums[-1]
    return x[: -len(".0")] if x.endswith(".0") else x


def reward_of_answer(problem: Problem, answer: str | None) -> tuple[float, str | None]:
    """(reward, error) of an extracted answer: a verifier that raises or returns a non-finite score
    gives 0 and the error (logged)."""
    try:
        r = float(problem.check(answer))
    except Exception as e:  # a broken verifier must not end the run
        msg = f"{problem.source}: verifier raised {type(e).__name__}: {e}"
        log.warning(msg)
        return 0.0, msg
    if not math.isfinite(r):
        msg = f"{problem.source}: verifier returned {r}"
        log.warning(msg)
        return 0.0, msg
    return r, None


def tool_found_answer(problem: Problem, completion: str) -> bool:
    """Whether a tool result in the completion is the reference answer (the right calculator call)."""
    results = _TOOL_RESULT.findall(completion)
    return any(final_answer(r.replace(",", "")) == problem.answer for r in results)


def reward(problem: Problem, completion: str, tool_credit: float = 0.0) -> tuple[float, str | None]:
    """(reward, error) of a completion: its final answer, scored by the problem's verifier.

    ``tool_credit`` > 0 shapes the reward (like R1's format reward): a completion whose final answer
    is wrong but whose tool results hold the right answer earns that much. Held-out metrics use 0.
    """
    r, err = reward_of_answer(problem, final_answer(completion))
    if r < tool_credit and tool_found_answer(problem, completion):
        r = tool_credit
    return r, err


def load_reward_function(spec: str) -> Callable[[str, str, str], float]:
    """A reward given as ``module:function`` (a module on the path, or ``path/to/file.py:function``), called as
    ``function(question, completion, answer) -> float`` (the answer is the problem's reference, as text)."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ValueError(f"reward function {spec!r}: expected module:function or path/to/file.py:function")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise FileNotFoundError(f"reward function {spec!r}: {path} is not a file")
        loaded = importlib.util.spec_from_file_location(path.stem, path)
        if loaded is None or loaded.loader is None:
            raise ValueError(f"reward function {spec!r}: cannot import {path}")
        module = importlib.util.module_from_spec(loaded)
        try:
            loaded.loader.exec_module(module)
        except Exception as e:
            raise ValueError(f"reward function {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"reward function {spec!r}: cannot import module {where!r} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {where} has no function {name!r}")
    return fn


def custom_reward(fn: Callable[[str, str, str], float], problem: Problem, completion: str) -> tuple[float, str | None]:
    """(reward, error) from a user's reward function; one that raises or returns a non-number gives 0 and the
    error (logged), as a verifier does."""
    return reward_of_answer(replace(problem, check=lambda _: fn(problem.question, completion, problem.answer)), None)


def _exact(answer: str) -> Callable[[str | None], float]:
    return lambda got: float(got is not None and got == answer)


@dataclass
class Arithmetic:
    """The SFT mixture's 3-digit questions (``chat/mixture.py``), to be answered with the calculator."""

    name: str = "multiply"
    op: str = "*"

    def problems(self, n: int, seed: int) -> list[Problem]:
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            q, a, b = arithmetic_question(rng, self.op)
            value = str(a * b if self.op == "*" else a + b)
            out.append(Problem(q, value, self.name, _exact(value)))
        return out


@dataclass
class ReasoningGym:
    """A reasoning-gym dataset, scored by its ``score_answer``."""

    name: str
    dataset: str
    config: dict[str, Any] = field(default_factory=dict)

    def problems(self, n: int, seed: int) -> list[Problem]:
        import reasoning_gym  # heavy: ~0.9 s to import

        ds = reasoning_gym.create_dataset(self.dataset, size=n, seed=seed, **self.config)
        out = []
        for entry in ds:

            def check(got: str | None, entry: dict[str, Any] = entry) -> float:
                return float(ds.score_answer(got, entry))

            out.append(Problem(entry["question"], str(entry["answer"]), self.name, check))
        return out


PROBLEM_SETS: dict[str, Callable[[], Any]] = {
    "multiply": lambda: Arithmetic("multiply", "*"),
    "add": lambda: Arithmetic("add", "+"),
    "basic_arithmetic": lambda: ReasoningGym(
        "basic_arithmetic", "basic_arithmetic", dict(REASONING_GYM_SMALL["basic_arithmetic"])
    ),
    "chain_sum": lambda: ReasoningGym("chain_sum", "chain_sum", dict(REASONING_GYM_SMALL["chain_sum"])),
    "basic_arithmetic_3d": lambda: ReasoningGym(
        "basic_arithmetic_3d", "basic_arithmetic", dict(REASONING_GYM_3D["basic_arithmetic"])
    ),
}


def problem_set(name: str) -> Any:
    if name not in PROBLEM_SETS:
        raise ValueError(f"unknown problem set {name!r}; choose from {', '.join(PROBLEM_SETS)}")
    return PROBLEM_SETS[name]()


def interleave(groups: Sequence[list[Problem]]) -> list[Problem]:
    out: list[Problem] = []
    for i in range(max((len(g) for g in groups), default=0)):
        out += [g[i] for g in groups if i < len(g)]
    return out


def heldout_problems(names: Sequence[str], n: int, seed: int = HELDOUT_SEED) -> list[Problem]:
    """The held-out problems of ``make_splits``, without drawing training ones (evaluation only)."""
    sets = [problem_set(name) for name in names]
    return interleave([s.problems(-(-n // len(sets)), seed) for s in sets])[:n]


def make_splits(
    names: Sequence[str], n_train: int, n_heldout: int, train_seed: int = TRAIN_SEED, heldout_seed: int = HELDOUT_SEED
) -> tuple[list[Problem], list[Problem]]:
    """Train and held-out problems, interleaved over ``names``; held-out questions never appear in train."""
    if train_seed == heldout_seed:
        raise ValueError("the train and held-out seeds must differ")
    sets = [problem_set(n) for n in names]
    per_train = -(-n_train // len(sets))
    held = heldout_problems(names, n_heldout, heldout_seed)
    seen = {p.question for p in held}
    train = [p for p in interleave([s.problems(per_train, train_seed) for s in sets]) if p.question not in seen]
    if not train:
        raise ValueError(f"no training problems left for {', '.join(names)} after removing held-out questions")
    return train[:n_train], held
