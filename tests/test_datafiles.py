"""Conversation data files (``llmstack/chat/datafiles.py``): every format to the same OpenAI messages,
every bad row skipped and counted under its reason with its line, hostile sizes bounded."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmstack.chat.conversation import Conversation
from llmstack.chat.datafiles import conversation, load_conversations, read_data_file
from llmstack.data.sources import InputLimits

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_openai_messages_with_tool_calls_in_both_argument_forms(tmp_path: Path) -> None:
    row = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "12*34 and the weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "calculator", "arguments": "12*34"}},
                    {"id": "b", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}},
                    {"id": "c", "type": "function", "function": {"name": "weather", "arguments": {"city": "Rome"}}},
                ],
            },
            {"role": "tool", "tool_call_id": "a", "content": "408"},
            {"role": "tool", "tool_call_id": "b", "content": "rain"},
            {"role": "tool", "tool_call_id": "c", "name": "weather", "content": "sun"},
            {"role": "assistant", "content": [{"type": "text", "text": "408; "}, {"type": "text", "text": "rain"}]},
        ]
    }
    got = read_data_file(write_jsonl(tmp_path / "tools.jsonl", [row]))
    assert got.name == "tools" and not got.skipped
    (msgs,) = got.conversations
    assert msgs[0] == {"role": "system", "content": "be brief"}
    calls = msgs[2]["tool_calls"]
    assert msgs[2]["content"] == ""
    assert [c["function"]["arguments"] for c in calls] == ["12*34", {"city": "Oslo"}, {"city": "Rome"}]
    assert [c["id"] for c in calls] == ["a", "b", "c"] and all(c["type"] == "function" for c in calls)
    assert msgs[5] == {"role": "tool", "tool_call_id": "c", "name": "weather", "content": "sun"}
    assert msgs[6] == {"role": "assistant", "content": "408; rain"}
    conv = Conversation.from_openai(msgs)  # what the SFT stage renders for our models
    assert [p.kind for p in conv.messages[-1].parts][:4] == ["tool_call", "tool_call", "tool_call", "tool_result"]


def test_sharegpt_roles_map_to_openai(tmp_path: Path) -> None:
    row = {
        "conversations": [
            {"from": "system", "value": "sys"},
            {"from": "human", "value": "weather in Oslo?"},
            {"from": "gpt", "value": "Let me look."},
            {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
            {"from": "observation", "value": "rain"},
            {"from": "gpt", "value": "Rain."},
        ]
    }
    (msgs,) = read_data_file(write_jsonl(tmp_path / "share.jsonl", [row])).conversations
    assert msgs == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "weather in Oslo?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}],
        },
        {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "Rain."},
    ]
    Conversation.from_openai(msgs)


def test_prompt_completion_and_alpaca_rows_are_one_exchange(tmp_path: Path) -> None:
    rows = [
        {"prompt": "2+2?", "completion": "4"},
        {"prompt": "capital of France?", "response": "Paris", "system": "terse"},
        {"instruction": "Translate to French", "input": "cat", "output": "chat"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
    ]
    got = read_data_file(write_jsonl(tmp_path / "pairs.jsonl", rows)).conversations
    assert got == [
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        [
            {"role": "system", "content": "terse"},
            {"role": "user", "content": "capital of France?"},
            {"role": "assistant", "content": "Paris"},
        ],
        [{"role": "user", "content": "Translate to French\n\ncat"}, {"role": "assistant", "content": "chat"}],
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
    ]


def test_format_override_reads_only_that_format() -> None:
    assert conversation({"prompt": "a", "completion": "b"}, fmt="prompt")[1]["content"] == "b"
    with pytest.raises(ValueError, match="no messages"):
        conversation({"prompt": "a", "completion": "b"}, fmt="openai")


def test_parquet_messages_and_pairs(tmp_path: Path) -> None:
    path = tmp_path / "mine.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": CHAT}, {"messages": CHAT[:1]}]), path)
    got = read_data_file(path)
    assert got.name == "mine" and got.conversations == [CHAT]
    assert got.skipped == {"assistant never speaks": 1} and got.first_seen["assistant never speaks"] == "row 2"
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": ["q1", "q2"], "completion": ["a1", "a2"]}), pairs)
    assert read_data_file(pairs).conversations[1] == [
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]


def test_json_array_and_gzipped_jsonl(tmp_path: Path) -> None:
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"messages": CHAT}, {"messages": [{"role": "bot", "content": "x"}]}]))
    got = read_data_file(arr)
    assert got.conversations == [CHAT] and got.first_seen == {"unknown role 'bot'": "row 2"}
    gz = tmp_path / "g.jsonl.gz"
    gz.write_bytes(gzip.compress((json.dumps({"messages": CHAT}) + "\n").encode()))
    got = read_data_file(gz)
    assert got.name == "g" and got.conversations == [CHAT]


def test_each_bad_row_is_counted_under_its_reason_with_its_first_line(tmp_path: Path) -> None:
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "calc", "arguments": "1+1"}}]}
    bad = {
        "not JSON": "{not json",
        "not an object": "[1, 2]",
        "JSON nested too deep": "[" * 150 + "]" * 150,
        "no messages": {"text": "plain pretraining text"},
        "message not an object": {"messages": ["hi", "hello"]},
        "unknown role 'bot'": {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]},
        "content not a string": {"messages": [{"role": "user", "content": 7}, CHAT[1]]},
        "malformed tool call": {"messages": [CHAT[0], {"role": "assistant", "tool_calls": [{"function": {}}]}]},
        "system message not first": {"messages": [*CHAT, {"role": "system", "content": "s"}, CHAT[1]]},
        "tool result without a call": {"messages": [CHAT[0], {"role": "tool", "content": "2"}, CHAT[1]]},
        "empty assistant message": {"messages": [CHAT[0], {"role": "assistant", "content": "  "}]},
        "assistant never speaks": {"messages": [CHAT[0]]},
    }
    good = {"messages": [CHAT[0], call, {"role": "tool", "content": "2"}, CHAT[1]]}
    lines: list[object] = [good]
    for row in bad.values():
        lines += [row, good]
    lines.insert(3, "")  # blank lines are not rows
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    path.write_bytes(path.read_bytes() + b'{"messages": "\xff"}\n')
    got = read_data_file(path)
    assert len(got.conversations) == len(bad) + 1
    expected = {reason: 1 for reason in bad} | {"not UTF-8": 1}
    assert dict(got.skipped) == expected
    line_of = {reason: f"line {2 + 2 * i + (i >= 1)}" for i, reason in enumerate(bad)}
    assert got.first_seen == line_of | {"not UTF-8": f"line {len(lines) + 1}"}
    assert got.summary().startswith(f"{path}: {len(bad) + 1} conversations, {len(bad) + 1} skipped (1 ")
    assert "1 unknown role 'bot' (line 13)" in got.summary() and "5 more for 5 other reasons)" in got.summary()


def test_json_inside_strings_is_depth_checked_too() -> None:
    deep = "[" * 5000 + "]" * 5000  # json.loads would raise RecursionError
    call = {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": deep}}]}
    with pytest.raises(ValueError, match="JSON nested too deep"):
        conversation({"messages": [CHAT[0], call]})
    with pytest.raises(ValueError, match="JSON nested too deep"):
        conversation({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": deep}]})


def test_summary_puts_the_commonest_reason_first(tmp_path: Path) -> None:
    rows: list[object] = ["nope"] + [{"messages": [{"role": "bot", "content": "x"}]}] * 2 + [{"messages": CHAT}]
    got = read_data_file(write_jsonl(tmp_path / "my.jsonl", rows))
    assert (
        got.summary()
        == f"{tmp_path / 'my.jsonl'}: 1 conversation, 3 skipped (2 unknown role 'bot' (line 2), 1 not JSON (line 1))"
    )


def test_nothing_usable_raises_naming_file_and_reasons(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "junk.jsonl", ["nope", {"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(
        ValueError, match=r"junk.jsonl: no usable conversations \(1 not JSON \(line 1\), 1 unknown role"
    ):
        read_data_file(path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no usable conversations"):
        read_data_file(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_data_file(tmp_path / "missing.jsonl")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown data file type"):
        read_data_file(tmp_path / "notes.txt")


def test_a_line_over_the_cap_is_skipped_without_being_held(tmp_path: Path) -> None:
    import tracemalloc

    path = tmp_path / "big.jsonl"
    with path.open("w") as f:
        f.write(json.dumps({"messages": CHAT}) + "\n")
        f.write('{"messages": [{"role": "user", "content": "' + "x" * (20 << 20) + '"}]}\n')
        f.write(json.dumps({"messages": CHAT}) + "\n")
    tracemalloc.start()
    got = read_data_file(path, limits=InputLimits(max_record_bytes=1 << 20))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got.conversations == [CHAT, CHAT] and got.first_seen == {"over the size cap": "line 2"}
    assert peak < 8 << 20  # the 20 MB line went by in blocks


def test_a_truncated_gzip_keeps_the_rows_before(tmp_path: Path) -> None:
    data = gzip.compress(b"".join((json.dumps({"messages": CHAT}) + "\n").encode() for _ in range(2000)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    got = read_data_file(path)
    assert got.conversations and len(got.conversations) < 2000
    assert list(got.skipped) == ["unreadable file (EOFError)"]


def test_named_datasets_one_per_file(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "alpha.jsonl", [{"messages": CHAT}])
    b = tmp_path / "beta.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "completion": "c"}]), b)
    assert [d.name for d in load_conversations([a, b])] == ["alpha", "beta"]
    (tmp_path / "sub").mkdir()
    a2 = write_jsonl(tmp_path / "sub" / "alpha.jsonl", [{"messages": CHAT}])
    with pytest.raises(ValueError, match="both be the dataset 'alpha'"):
        load_conversations([a, a2])
