"""The task suite: the log-likelihood scorer against a direct log-softmax, task files in the BIG-bench and
OpenAI evals formats (written here, never downloaded), bad input reported per task, the table, the CLI."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import WORDS, bigram_model, tiny_model_config

from llmstack.eval.loglik import LoglikScorer, Scored
from llmstack.eval.suite import constant_baseline, evaluate, score_questions, table, to_json
from llmstack.eval.tasks import select
from llmstack.eval.tasks.base import Problem, Question, final_number
from llmstack.eval.tasks.bigbench import BigBenchTask
from llmstack.eval.tasks.files import JsonlTask
from llmstack.eval.tasks.problems import BiggerDecimal
from llmstack.eval.tasks.text import HeldOutText
from llmstack.interop.bundle import llmstack_bundle, save_run
from llmstack.model.llama import GPT
from llmstack.tokenizer import special as S


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return GPT(tiny_model_config(tok.vocab_size, max_seq_len=64)).eval()


@pytest.fixture(scope="module")
def scorer(model, tok):
    return LoglikScorer.for_bundle(llmstack_bundle(model, tok), max_batch_tokens=96)


def direct(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """Sum of log p(cont | ctx) from one plain forward over the whole sequence."""
    ids = ctx + cont
    with torch.no_grad():
        logp = model(torch.tensor([ids[:-1]]))[0].float().log_softmax(-1)
    pos = range(len(ctx) - 1, len(ids) - 1)
    total = sum(float(logp[p, ids[p + 1]]) for p in pos)
    return total, all(int(logp[p].argmax()) == ids[p + 1] for p in pos)


def test_scorer_matches_direct_log_softmax(model, tok, scorer):
    words = WORDS[:14]  # the model reads tokens and predicts the next one ; a list holds items
    pairs = [("the model", " reads"), ("the model", " reads tokens and"), ("a list", " holds"), ("", "python code")]
    pairs += [(" ".join(words[: 3 + i]), " " + words[i]) for i in range(8)]  # contexts of different lengths
    pairs.append((" ".join(words * 8), " the next one"))  # longer than the model's 64 tokens: cut from the left
    got = scorer.loglikelihood(pairs)
    for (c, x), s in zip(pairs, got, strict=True):
        ctx, cont = scorer.encode_pair(c, x)
        assert ctx[0] == tok.bos_id and s.n_tokens == len(cont)
        want, greedy = direct(model, ctx[-(64 + 1 - len(cont)) :], cont)
        assert s.logprob == pytest.approx(want, abs=1e-4) and s.greedy == greedy


def test_rolling_scores_every_token_once_in_windows(model, tok, scorer):
    text = " ".join(["the model reads tokens and predicts the next one ."] * 12)
    ids = [tok.bos_id, *tok.encode_ordinary(text)]
    assert len(ids) > 2 * 64
    # lm-eval's windows: the first predicts 64 tokens from <|bos|>, later ones the next 64 after one
    # token of overlap, the last the remaining ones with a full context
    want, done, n = 0.0, 0, len(ids) - 1
    while done < n:
        end = min(done + 64, n)
        lo = max(0, end - 64)
        want += direct(model, ids[lo : done + 1], ids[done + 1 : end + 1])[0]
        done = end
    (s,) = scorer.rolling([text])
    assert s.n_tokens == n and s.logprob == pytest.approx(want, abs=1e-3)


def test_encode_pair_moves_the_context_space_to_the_continuation(scorer, tok):
    ctx, cont = scorer.encode_pair("Question: a list?\nAnswer: ", "items")
    assert tok.decode(ctx[1:]) == "Question: a list?\nAnswer:" and tok.decode(cont) == " items"


class FixedScores:
    """A scorer stand-in: each continuation's log-likelihood is given."""

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores = scores

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return [0], [ord(ch) for ch in continuation]

    def fits(self, cont: list[int]) -> bool:
        return len(cont) <= 25

    def loglikelihood_tokens(self, requests):
        return [Scored(self.scores["".join(map(chr, cont))], False, len(cont)) for _, cont in requests]


def test_length_normalisation_picks_per_character():
    q = Question("q", "Pick:", ("no", "a much longer answer"), (1,))
    scores = {" no": -3.0, " a much longer answer": -10.0}  # per character: -1.5 against -0.5
    (d,), skipped = score_questions(FixedScores(scores), [q])  # type: ignore[arg-type]
    assert d["pred"] == 0 and d["pred_norm"] == 1 and d["logprobs"] == [-3.0, -10.0] and not skipped
    too_long = Question("t", "Pick:", ("x", "y" * 30), (0,))
    details, skipped = score_questions(FixedScores(scores), [too_long])  # type: ignore[arg-type]
    assert details == [] and skipped == {"a choice longer than the model's context": 1}


def test_constant_baseline_counts_the_majority_answer():
    qs = [Question(str(i), "Is it?", ("Yes", "No"), (1 if i < 7 else 0,)) for i in range(10)]
    assert constant_baseline(qs) == ("No", 0.7)


def write_bigbench(root: Path) -> Path:
    """A BIG-bench task with two subtasks: good rows, malformed rows, one-choice and no-answer rows."""
    good = {"input": "Is a list ordered?", "target_scores": {"Yes": 1, "No": 0}}
    sub_a = {
        "name": "a",
        "examples": [
            good,
            {"input": "Which is a mapping?", "target_scores": {"dict": 1, "list": 0, "tuple": 0}},
            {"input": "only one", "target_scores": {"Yes": 1}},
            {"input": "nothing right", "target_scores": {"Yes": 0, "No": 0}},
            {"input": "no scores"},
            "not an object",
            {"input": "bad score", "target_scores": {"Yes": "high", "No": 0}},
        ],
    }
    sub_b = {
        "name": "b",
        "task_prefix": "Decide.\n",
        "example_input_prefix": "",
        "example_output_prefix": " So the answer is ",
        "append_choices_to_input": False,
        "examples": [{"input": "Two plus two is four.", "target_scores": {"true": 1, "false": 0}}],
    }
    (root / "toy" / "a").mkdir(parents=True)
    (root / "toy" / "b").mkdir()
    (root / "toy" / "task.json").write_text(json.dumps({"name": "toy", "subtasks": []}))
    (root / "toy" / "a" / "task.json").write_text(json.dumps(sub_a))
    (root / "toy" / "b" / "task.json").write_text(json.dumps(sub_b))
    (root / "toy" / "broken").mkdir()
    (root / "toy" / "broken" / "task.json").write_text("{not json")
    return root


def test_bigbench_task_formats_and_counts_bad_rows(tmp_path):
    task = BigBenchTask("toy", write_bigbench(tmp_path))
    ex = task.examples(None, 0)
    assert [q.id for q in ex.items] == ["a/0", "a/1", "b/0"]
    yes_no, mapping, decide = ex.items
    assert yes_no.context == "\nQ: Is a list ordered?\nA: " and yes_no.gold == (0,)  # cloze: choices not listed
    listed = BigBenchTask("toy", tmp_path, list_choices=True).examples(None, 0).items[0]
    assert listed.context.startswith("\nQ: Is a list ordered?\n  choice: ") and listed.context.endswith("\nA: ")
    assert sorted(listed.context[:-4].split("\n  choice: ")[1:]) == ["No", "Yes"]
    assert mapping.choices == ("dict", "list", "tuple") and mapping.gold == (0,) and mapping.delimiter == ""
    assert decide.context == "Decide.\nTwo plus two is four. So the answer is " and decide.choices == ("true", "false")
    assert dict(ex.skipped) == {
        "fewer than two choices": 1,
        "no correct choice": 1,
        "malformed row (KeyError)": 1,
        "malformed row (TypeError)": 1,
        "malformed row (ValueError)": 1,
        "unreadable task.json": 1,
    }
    assert len(task.examples(2, seed=1).items) == 2
    missing = BigBenchTask("winowhy", tmp_path / "nowhere").examples(10, 0)
    assert missing.items == [] and "llmstack data fetch" in str(missing.note)


def write_quartz(path: Path) -> Path:
    system = {"role": "system", "content": "Answer with the letter."}
    rows = [
        {
            "input": [
                system,
                {"role": "user", "content": "More resistors, the resistance\n\n A: increases\n B: decreases"},
            ]
        },
        {"input": [system, {"role": "user", "content": "Closer to a speaker it is\n\n A: louder\n B: quieter"}]},
    ]
    rows[0]["ideal"], rows[1]["ideal"] = "A", "C"
    lines = [json.dumps(r) for r in rows] + ["{truncated", json.dumps({"input": [system], "ideal": "A"})]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_evals_chat_format_becomes_question_and_options(tmp_path):
    ex = JsonlTask("quartz", write_quartz(tmp_path / "quartz" / "samples.jsonl"), source="evals").examples(None, 0)
    (q,) = ex.items
    assert q.context == "Question: More resistors, the resistance\nAnswer:" and q.choices == ("increases", "decreases")
    assert q.gold == (0,) and q.continuation(1) == " decreases"
    assert dict(ex.skipped) == {
        "not valid JSON": 1,
        "no user message": 1,
        "the ideal answer is not one of the options": 1,
    }


def write_jsonl(path: Path) -> Path:
    rows = [
        {"question": "What does a dict map?", "choices": ["keys to values", "numbers"], "answer": 0},
        {"question": "What holds items?", "choices": ["a list", "a tokens", "one"], "answer": "a list"},
        {"question": "One option", "choices": ["only"], "answer": 0},
        {"question": "Out of range", "choices": ["a", "b"], "answer": 5},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_final_number_reads_the_answer_not_the_tool_call():
    assert final_number("so 3 + 4\nAnswer: 7.") == 7.0
    assert final_number("<|tool_call_start|>calculator: 2*3<|tool_call_end|><|tool_result_start|>6") is None
    assert final_number("It is 1,234 or maybe -5.5") == -5.5
    assert final_number("nothing") is None


def test_suite_reports_bad_input_per_task_and_writes_table_and_json(tmp_path, model, tok):
    data = write_bigbench(tmp_path / "bb")
    text = tmp_path / "held.txt"
    text.write_text("the model reads tokens.\n\n" * 600)
    tasks = [
        BigBenchTask("toy", data),
        JsonlTask("mine", write_jsonl(tmp_path / "mine.jsonl")),
        HeldOutText("text_bpb", text, max_chars=300),
        BiggerDecimal(),
        BigBenchTask("winowhy", tmp_path / "missing"),
    ]
    logs: list[str] = []
    rows = evaluate(llmstack_bundle(model, tok), tasks, limit=5, seed=0, chat=False, log=logs.append)
    by = {(r.task, r.metric): r for r in rows}
    toy = by[("toy", "acc")]
    assert (
        toy.n == 3
        and toy.skipped["fewer than two choices"] == 1
        and toy.chance == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    )
    assert toy.interval is not None and toy.interval[0] <= toy.score <= toy.interval[1]
    assert len(toy.details) == 3 and by[("toy", "acc_norm")].details == []
    mine = by[("mine", "acc")]
    assert mine.n == 2 and mine.skipped == {"fewer than two choices": 1, "answer index out of range": 1}
    bpb = by[("text_bpb", "bits/byte")]
    assert bpb.n == 5 and bpb.chance == 8.0 and 0 < bpb.score < 20 and bpb.interval[0] <= bpb.score <= bpb.interval[1]
    assert "base model" in str(by[("bigger_decimal", "-")].note)
    assert "llmstack data fetch" in str(by[("winowhy", "-")].note)
    out = table(rows)
    assert out.splitlines()[0].split() == ["task", "metric", "score", "95%", "interval", "chance", "n"]
    assert "toy: left out 1 (fewer than two choices)" in out and len(logs) == len(tasks)
    back = json.loads(json.dumps(to_json(rows, model="tiny")))
    assert back["model"] == "tiny" and {r["task"] for r in back["results"]} == {t.name for t in tasks}


def test_one_failing_task_does_not_stop_the_others(model, tok):
    class Broken:
        name, kind, about, modes = "broken", "mc", "raises", ()

        def examples(self, limit, seed):
            raise RuntimeError("disk on fire")

    rows = evaluate(llmstack_bundle(model, tok), [Broken(), BiggerDecimal()], limit=2, chat=False, log=lambda _: None)
    assert rows[0].note == "failed: RuntimeError: disk on fire" and rows[1].task == "bigger_decimal"


def test_generative_modes_and_a_model_that_says_nothing(tok):
    silent = bigram_model(tok, {tok.special_id(S.ASSISTANT_START): tok.special_id(S.ASSISTANT_END)})
    rows = evaluate(llmstack_bundle(silent, tok), [BiggerDecimal()], limit=4, seed=3, log=lambda _: None)
    assert [r.metric for r in rows] == ["acc (direct)", "acc (cot)"]
    assert all(r.score == 0 and r.n == 4 and r.note == "4 empty replies (scored wrong)" for r in rows)
    assert rows[0].chance == 0.5

    class Long(BiggerDecimal):
        def examples(self, limit, seed):
            found = super().examples(limit, seed)
            found.items.append(Problem("long", "the model reads tokens " * 60, "1"))  # past a 128-token context
            return found

    (direct, cot) = evaluate(llmstack_bundle(silent, tok), [Long(name="long")], limit=2, log=lambda _: None)
    assert direct.n == cot.n == 2 and direct.skipped == {"prompt too long for the model's context": 1}
    problems = BiggerDecimal().examples(200, 0).items
    longer_bigger = [p for p in problems if len(p.answer.split(".")[1]) == 2]
    assert len(longer_bigger) == 100 and all(p.correct(f"Answer: {p.answer}") for p in problems)


def test_select_names_groups_and_files(tmp_path):
    names = [t.name for t in select("winowhy,quartz,winowhy", tmp_path)]
    assert names == ["winowhy", "quartz"]
    assert {t.kind for t in select("mc", tmp_path)} == {"mc"} and len(select("all", tmp_path)) >= 13
    assert select(str(tmp_path / "mine.jsonl"), tmp_path)[0].name == "mine"
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        select("nope", tmp_path)


def test_cli_eval_tasks_on_a_saved_run(tmp_path, tok, model, capsys, monkeypatch):
    from llmstack.cli import main

    monkeypatch.setenv("LLMSTACK_DATA", str(tmp_path / "data"))
    run = tmp_path / "run"
    save_run(llmstack_bundle(model, tok), run, "test: tiny random model")
    meta = run / "checkpoints" / "step_000000" / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "stage": "pretrain"}))  # a base model
    mine = write_jsonl(tmp_path / "mine.jsonl")
    rc = main(["eval", "--model", str(run), "--tasks", f"{mine},bigger_decimal,winowhy", "--limit", "3"])
    out = capsys.readouterr().out
    assert rc == 0 and "base model" in out and "mine" in out and "left out" in out
    results = json.loads((run / "eval_tasks.json").read_text())
    assert results["chat"] is False and [r["task"] for r in results["results"]][:2] == ["mine", "mine"]
    assert main(["eval", "--model", str(run), "--tasks", "nope"]) == 2


def fake_archives(tmp: Path) -> dict[str, Path]:
    """A BIG-bench sdist and an evals wheel with the layout of the real ones, plus files not wanted."""
    sdist = tmp / "bigbench-1.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        from llmstack.data.fetch import BIGBENCH_TASKS, PREFERENCE_TASKS

        tasks = BIGBENCH_TASKS + PREFERENCE_TASKS
        names = [f"bigbench-1.0.0/bigbench/benchmark_tasks/{t}/task.json" for t in tasks]
        names += ["bigbench-1.0.0/bigbench/benchmark_tasks/logical_deduction/three_objects/task.json"]
        names += ["bigbench-1.0.0/bigbench/benchmark_tasks/date_understanding/task.json", "bigbench-1.0.0/setup.py"]
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    wheel = tmp / "evals-3.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("evals/registry/data/quartz/samples.jsonl", "{}\n")
        zf.writestr("evals/registry/data/logiqa/samples.jsonl", "{}\n")
        zf.writestr("evals/api.py", "")
    return {"bigbench": sdist, "evals": wheel}


def test_fetch_eval_data_keeps_only_the_task_files(tmp_path, monkeypatch):
    from llmstack.data import fetch

    archives = fake_archives(tmp_path)
    calls: list[str] = []

    def fake_download(package: str, tmp: Path, binary_flag: str, pattern: str) -> Path:
        calls.append(package)
        return archives[package]

    monkeypatch.setattr(fetch, "_pip_download", fake_download)
    dest = fetch.fetch_eval_data(tmp_path / "eval", log=lambda _: None)
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert "bigbench/logical_deduction/three_objects/task.json" in files and "evals/quartz/samples.jsonl" in files
    assert not any("date_understanding" in f or "logiqa" in f or "setup.py" in f for f in files)
    assert calls == ["bigbench", "evals"]
    fetch.fetch_eval_data(tmp_path / "eval", log=lambda _: None)  # present: nothing downloaded again
    assert calls == ["bigbench", "evals"]


def test_an_eval_package_without_its_files_does_not_stop_the_other(tmp_path, monkeypatch):
    """A registry serving a placeholder ``bigbench`` (no task files): the evals part still arrives, and the
    error names the part that failed and why."""
    from llmstack.data import fetch

    archives = fake_archives(tmp_path)
    empty = tmp_path / "bigbench-0.0.1.tar.gz"
    with tarfile.open(empty, "w:gz") as tar:
        info = tarfile.TarInfo("bigbench-0.0.1/setup.py")
        tar.addfile(info, io.BytesIO(b""))
    archives["bigbench"] = empty
    monkeypatch.setattr(fetch, "_pip_download", lambda package, *_: archives[package])
    with pytest.raises(fetch.FetchError, match=r"bigbench: bigbench-0.0.1.tar.gz .* holds no files for \['arithmetic'"):
        fetch.fetch_eval_data(tmp_path / "eval", log=lambda _: None)
    assert (tmp_path / "eval" / "evals" / "quartz" / "samples.jsonl").is_file()
    assert not (tmp_path / "eval" / "bigbench").exists()
