"""lm-evaluation-harness on our models, offline: a local task YAML over a local JSONL file.

Our own multiple-choice scoring of the file (``llmstack eval --tasks FILE.jsonl``) and lm-eval's, with
our model behind the ``LLMStackLM`` adapter, must agree question by question: the same per-choice
log-likelihoods, the same picks, the same ``acc`` and ``acc_norm``.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import WORDS, tiny_model_config

lm_eval = pytest.importorskip("lm_eval")

from llmstack.eval.lm_eval_adapter import LLMStackLM  # noqa: E402
from llmstack.eval.suite import score_questions  # noqa: E402
from llmstack.eval.tasks.files import JsonlTask  # noqa: E402
from llmstack.interop.bundle import llmstack_bundle  # noqa: E402
from llmstack.model.llama import GPT  # noqa: E402

TASK_YAML = """task: llmstack_toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def lm(tok):
    torch.manual_seed(1)
    model = GPT(tiny_model_config(tok.vocab_size, max_seq_len=64)).eval()
    return LLMStackLM(llmstack_bundle(model, tok), max_batch_tokens=128)


def test_multiple_choice_scores_equal_lm_evals(tmp_path, lm):
    rng = random.Random(0)
    rows = []
    for i in range(24):  # 2 to 5 choices of 1 to 6 words: sum and per-character picks often differ
        choices = [" ".join(rng.choices(WORDS, k=rng.randint(1, 6))) for _ in range(rng.randint(2, 5))]
        choices = list(dict.fromkeys(choices))
        if len(choices) < 2:
            choices.append("python code")
        question = " ".join(rng.choices(WORDS, k=rng.randint(3, 12))) + "?"
        rows.append({"id": i, "question": question, "choices": choices, "answer": rng.randrange(len(choices))})
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "toy.yaml").write_text(TASK_YAML.format(data=data))

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    res = simple_evaluate(
        model=lm,
        tasks=["llmstack_toy_mc"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
        bootstrap_iters=0,
    )
    theirs = res["results"]["llmstack_toy_mc"]
    samples = {s["doc_id"]: s for s in res["samples"]["llmstack_toy_mc"]}

    questions = JsonlTask("toy", data).examples(None, 0).items
    ours, skipped = score_questions(lm.scorer, questions)
    assert len(ours) == len(samples) == 24 and not skipped
    for d in ours:
        sample = samples[int(d["id"])]
        their_lls = [float(r[0]) for r in sample["filtered_resps"]]
        assert d["logprobs"] == pytest.approx(their_lls, abs=1e-6)
        assert sample["acc"] == float(d["pred"] in d["gold"]) and sample["acc_norm"] == float(
            d["pred_norm"] in d["gold"]
        )
    acc = sum(d["pred"] in d["gold"] for d in ours) / len(ours)
    acc_norm = sum(d["pred_norm"] in d["gold"] for d in ours) / len(ours)
    assert theirs["acc,none"] == pytest.approx(acc) and theirs["acc_norm,none"] == pytest.approx(acc_norm)
    assert any(d["pred"] != d["pred_norm"] for d in ours)  # the two metrics were really put to the test


def test_rolling_and_generation_requests(lm, tok):
    from lm_eval.api.instance import Instance

    text = " ".join(WORDS * 6)  # longer than the model's 64 tokens: several windows
    (rolled,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert rolled == pytest.approx(lm.scorer.rolling([text])[0].logprob) and rolled < 0

    gens = lm.generate_until(
        [
            Instance("generate_until", {}, ("the model", {"until": ["\n"], "max_gen_toks": 8}), 0),
            Instance("generate_until", {}, ("a list holds", {"until": "zzz", "max_gen_toks": 5}), 1),
        ]
    )
    assert len(gens) == 2 and all(isinstance(g, str) and "\n" not in g for g in gens[:1])
    assert len(tok.encode_ordinary(gens[1])) <= 5
