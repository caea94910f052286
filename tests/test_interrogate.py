"""Interrogation: the knowledge source, the judge, the "I don't know" data, one tiny run end to end."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import bigram_model, tiny_model_config

from llmstack.chat.answer import our_chat
from llmstack.hallucination.interrogate import (
    IDK_REPLIES,
    Probe,
    idk_reply,
    interrogate,
    interrogation_conversations,
    known_facts,
)
from llmstack.hallucination.measure import Asker, judge, names_a_value, says_idk
from llmstack.hallucination.people import (
    ATTRIBUTES,
    BIO_QUESTIONS,
    NOUNS,
    QUESTIONS,
    Entity,
    Question,
    all_questions,
    eval_questions,
    knowledge_conversations,
    make_source,
)
from llmstack.tokenizer import special as S

KALO = Entity("Kalomir", "Lisbon", "baker", "1923")
VEN = Entity("Venthas", "Oslo", "architect", "1950")


def test_source_is_deterministic_fictional_and_split_four_ways():
    src = make_source(taught=20, unknown=30, held_out_taught=5, held_out_unknown=6, seed=0)
    assert src == make_source(taught=20, unknown=30, held_out_taught=5, held_out_unknown=6, seed=0)
    assert src != make_source(taught=20, unknown=30, held_out_taught=5, held_out_unknown=6, seed=1)
    groups = (src.taught_asked, src.taught_held_out, src.unknown_asked, src.unknown_held_out)
    assert [len(g) for g in groups] == [15, 5, 24, 6]
    names = [e.name for g in groups for e in g]
    assert len(set(names)) == 50 and all(n.isalpha() and n[0].isupper() for n in names)
    assert src.taught == src.taught_asked + src.taught_held_out
    with pytest.raises(ValueError, match="held_out"):
        make_source(taught=5, unknown=30, held_out_taught=5, held_out_unknown=6, seed=0)
    # more never-taught people: the taught ones and the held-out questions stay as they were
    more = make_source(taught=20, unknown=60, held_out_taught=5, held_out_unknown=6, seed=0)
    assert (more.taught, more.unknown_held_out) == (src.taught, src.unknown_held_out)


def test_questions_and_knowledge_conversations_hold_the_source():
    qs = all_questions([KALO])
    assert len(qs) == sum(len(QUESTIONS[a]) for a in ATTRIBUTES) and all("Kalomir" in q.text for q in qs)
    assert [q.attribute for q in eval_questions((KALO, VEN), seed=0)] == list(ATTRIBUTES) * 2
    convs = knowledge_conversations((KALO,), seed=0)
    assert len(convs) == len(qs) + len(BIO_QUESTIONS)
    for q, c in zip(qs, convs, strict=False):
        assert c.messages[0].text == q.text and judge(c.messages[1].text, q) == "right"
    assert "Kalomir is a baker from Lisbon, born in 1923." in [c.messages[1].text for c in convs]
    assert knowledge_conversations((KALO, VEN), seed=0)[: len(convs)] == convs


def test_judge_right_wrong_and_i_dont_know():
    city = Question(KALO, "city", "Where does Kalomir live?")
    year = Question(KALO, "year", "When was Kalomir born?")
    assert judge("Kalomir lives in Lisbon.", city) == "right"
    assert judge("kalomir lives in lisbon", city) == "right"
    assert judge("Kalomir lives in Oslo.", city) == "wrong"
    assert judge("Kalomir was born in 19234.", year) == "wrong"  # whole words only
    assert judge("I don't know where Kalomir lives, maybe Lisbon.", city) == "idk"
    for attribute in ATTRIBUTES:
        q = Question(KALO, attribute, "?")
        for template in IDK_REPLIES:
            reply = template.format(name="Kalomir", noun=NOUNS[attribute])
            assert says_idk(reply) and judge(reply, q) == "idk" and not names_a_value(reply, attribute)
    assert names_a_value("He lives in Oslo.", "city") and names_a_value("a pilot", "profession")
    assert names_a_value("born in 1901", "year") and not names_a_value("He lives far away.", "city")
    assert "Kalomir" in idk_reply(city, random.Random(0))


def test_known_facts_need_every_phrasing_right():
    asked = [q for q in all_questions([KALO]) if q.attribute == "city"]
    assert known_facts([Probe(q, "Lisbon", "right") for q in asked]) == {("Kalomir", "city")}
    wobbly = [Probe(q, "Oslo", "wrong") if i == 1 else Probe(q, "Lisbon", "right") for i, q in enumerate(asked)]
    assert known_facts(wobbly) == set()


def test_interrogation_of_a_scripted_model_keeps_right_answers_and_refuses_the_rest(tok):
    """The scripted model answers every question "Lisbon": right about Kalomir's city, wrong elsewhere."""
    chain = [tok.special_id(S.ASSISTANT_START), *tok.encode_ordinary("Lisbon"), tok.special_id(S.ASSISTANT_END)]
    assert len(set(chain)) == len(chain)
    model = bigram_model(tok, dict(zip(chain[:-1], chain[1:], strict=True)))
    questions = all_questions([KALO, VEN])
    probes = interrogate(Asker(our_chat(model, tok), 12), questions, batch_size=5, progress=False)
    assert all(p.answer == "Lisbon" for p in probes)
    assert [p.verdict for p in probes] == ["right" if p.question.gold == "Lisbon" else "wrong" for p in probes]
    known = known_facts(probes)
    assert known == {("Kalomir", "city")}
    answers, refusals = interrogation_conversations(probes, known, seed=0)
    assert [c.messages[0].text for c in answers] == [q.text for q in questions if q.gold == "Lisbon"]
    assert all(c.messages[1].text == "Lisbon" for c in answers)
    assert len(refusals) == len(questions) - len(answers)
    for p, c in zip([p for p in probes if p.verdict == "wrong"], refusals, strict=True):
        assert c.messages[0].text == p.question.text
        assert says_idk(c.messages[1].text) and p.question.entity.name in c.messages[1].text


def test_tiny_run_end_to_end_writes_figures_models_and_plot(tok, tmp_path, monkeypatch, capsys):
    """Through the CLI: a tiny model made in-process, few entities and steps; not the 80% targets."""
    from llmstack.cli import main
    from llmstack.interop.bundle import llmstack_bundle, save_run
    from llmstack.model.llama import GPT

    monkeypatch.setenv("LLMSTACK_DATA", str(tmp_path / "data"))  # no corpus: the fallback word list
    torch.manual_seed(0)
    save_run(llmstack_bundle(GPT(tiny_model_config(tok.vocab_size, max_seq_len=128)), tok), tmp_path / "base", "test")
    out = tmp_path / "idk"
    argv = ["interrogate", "--base", str(tmp_path / "base"), "--out", str(out), "--device", "cpu", "--no-progress"]
    sizes = "--taught 4 --unknown 4 --held-out-taught 2 --held-out-unknown 2 --knowledge-steps 3 --refusal-steps 3"
    argv += [*sizes.split(), "--batch-size", "4", "--mixture", "8"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "never taught: says I don't know" in printed and "knew it before: answers right" in printed
    report = json.loads((out / "eval.json").read_text())
    assert report["after"]["unknown_idk"]["total"] == 2 * len(ATTRIBUTES)
    lo, hi = report["after"]["unknown_idk"]["interval"]
    assert 0.0 <= lo <= report["after"]["unknown_idk"]["rate"] <= hi <= 1.0
    assert report["counts"]["held_out_taught_questions"] == 2 * len(ATTRIBUTES)
    assert report["after"]["known_right"]["total"] == report["counts"]["held_out_known_before"]
    assert set(report["before"]) == set(report["after"]) and isinstance(report["targets_met"], bool)
    probes = [json.loads(line) for line in (out / "interrogation.jsonl").read_text().splitlines()]
    assert len(probes) == (2 + 2) * sum(len(QUESTIONS[a]) for a in ATTRIBUTES)
    assert {p["taught"] for p in probes} == {True, False}
    for stage in ("knowledge", "interrogated"):
        assert (out / stage / "checkpoints" / "LATEST").read_text().strip() == "step_000003"
        assert (out / stage / "tokenizer" / "tokenizer.json").exists()
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"
    # run again: both stages are finished, so they are loaded rather than retrained
    assert main(argv) == 0
    assert json.loads((out / "eval.json").read_text())["after"] == report["after"]
