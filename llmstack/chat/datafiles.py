"""Your conversation files as OpenAI-style message lists, for SFT on your own data (``llmstack sft --data``).

Each file is a named dataset (its name is the file's stem). Rows, detected one by one (or all read as
``fmt``):

* ``openai``: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...]}``, the
  assistant's ``tool_calls`` (``{"function": {"name", "arguments"}}``, arguments a JSON string or an
  object) and the ``tool`` results that answer them;
* ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system"|"tool"|"function_call"|
  "observation", "value": ...}]}``; a ``function_call`` value is ``{"name", "arguments"}`` in JSON,
  an ``observation`` its result;
* ``prompt``: ``{"prompt": ..., "completion" | "response": ...}``, and ``alpaca``: ``{"instruction",
  "input", "output"}``: one user turn and one assistant turn (an optional ``system`` first).

Files: ``.jsonl`` (gzipped or not, by content), ``.json`` (JSON lines or one array of rows) and
``.parquet`` (columns named as the keys above; nested lists of structs for messages).

The messages come out normalized: ``content`` a string (OpenAI's text parts joined), ``tool_calls`` as
``{"id"?, "type": "function", "function": {"name", "arguments"}}`` with arguments an object when the
JSON string holds one (``transformers``' convention, what chat templates expect), else the string;
``tool_call_id`` and ``name`` kept when they are strings; ShareGPT's roles as OpenAI's.

A bad row never stops a run: it is skipped and counted under a named reason (``REASONS``), with the
first place it was seen. Reading is bounded as the pretraining inputs are (``data/sources.py``'s
``InputLimits``, ``io.open_capped``): a line over the record cap is skipped without being held, JSON
nested too deep is refused before parsing. A file with no usable row raises ValueError naming it and
the reasons; a missing one FileNotFoundError.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmstack.data.sources import InputLimits
from llmstack.io import MAX_JSON_DEPTH, OversizedInput, bounded_lines, json_deeper_than, open_capped

Format = Literal["openai", "sharegpt", "prompt", "alpaca"]
Message = dict[str, Any]
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
ARRAY_MAX_BYTES = 256 << 20  # a .json array is parsed whole (Python objects ~10x the text); bigger: use JSONL
PARQUET_BATCH_ROWS = 64

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function_call": "function_call",  # an assistant tool call, its value JSON: made into tool_calls below
}
REASONS = (
    "not JSON",
    "not UTF-8",
    "not an object",
    "JSON nested too deep",
    "over the size cap",
    "no messages",
    "message not an object",
    "unknown role '...'",
    "content not a string",
    "malformed tool call",
    "system message not first",
    "tool result without a call",
    "empty assistant message",
    "assistant never speaks",
    "unreadable file (...)",
)
"""Why rows are skipped (``unknown role`` names the role, ``unreadable file`` the error that ended the file)."""


class BadRow(ValueError):
    """A row that cannot be a conversation; the message is the reason it is counted under."""


@dataclass
class DataFile:
    """One file read: its conversations (OpenAI-style message lists) and what was skipped, by reason."""

    name: str
    path: Path
    conversations: list[list[Message]] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    first_seen: dict[str, str] = field(default_factory=dict)  # reason -> "line 7" / "row 3"

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.first_seen.setdefault(reason, where)

    def reasons(self, most: int = 8) -> str:
        """``12 unknown role 'bot' (line 7), 8 not JSON (line 3)``: the most common first."""
        top = self.skipped.most_common()
        parts = [f"{n} {reason} ({self.first_seen[reason]})" for reason, n in top[:most]]
        if len(top) > most:
            parts.append(f"{sum(n for _, n in top[most:])} more for {len(top) - most} other reasons")
        return ", ".join(parts)

    def summary(self) -> str:
        """``data/my.jsonl: 980 conversations, 20 skipped (12 unknown role 'bot' (line 7), ...)``."""
        n_conv = len(self.conversations)
        line = f"{self.path}: {n_conv} conversation{'' if n_conv == 1 else 's'}"
        n = sum(self.skipped.values())
        return line + (f", {n} skipped ({self.reasons()})" if n else "")


# ----------------------------------------------------------------------------- rows -> messages
def _text(content: Any) -> str:
    """A message's content as text: a string, None (nothing), or OpenAI's list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        texts = [p.get("text") for p in content]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)
    raise BadRow("content not a string")


def _tool_call(call: Any) -> dict[str, Any]:
    """One call as ``{"id"?, "type": "function", "function": {"name", "arguments"}}``."""
    if not isinstance(call, dict):
        raise BadRow("malformed tool call")
    fn = call.get("function", call)  # OpenAI nests it; ShareGPT's function_call value is the function itself
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise BadRow("malformed tool call")
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):
        try:
            parsed = _inner_json(args) if args.strip() else {}
        except BadRow:
            raise
        except ValueError:
            parsed = None
        args = parsed if isinstance(parsed, dict) else args  # a plain string argument stays a string
    elif not isinstance(args, dict):
        raise BadRow("malformed tool call")
    out: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _inner_json(text: str) -> Any:
    """JSON inside a JSON string (tool arguments, a ShareGPT call): the row's depth check never saw its brackets."""
    if json_deeper_than(text, MAX_JSON_DEPTH):
        raise BadRow("JSON nested too deep")
    return json.loads(text)


def _function_call(value: str) -> dict[str, Any]:
    """ShareGPT's ``function_call`` turn: its value is ``{"name": ..., "arguments": ...}`` in JSON."""
    try:
        call = _inner_json(value)
    except BadRow:
        raise
    except ValueError:
        raise BadRow("malformed tool call") from None
    return _tool_call(call)


def _role(m: dict[str, Any]) -> str:
    role = m["role"] if "role" in m else m.get("from")
    known = ("system", "user", "assistant", "tool") if "role" in m else tuple(SHAREGPT_ROLES)
    if role not in known:
        shown = role if isinstance(role, str) else type(role).__name__
        raise BadRow(f"unknown role {shown[:30]!r}")
    return SHAREGPT_ROLES.get(role, role)


def messages_of(raw: Any) -> list[Message]:
    """OpenAI or ShareGPT messages (a row's ``messages`` / ``conversations``) -> checked OpenAI messages."""
    if not isinstance(raw, list) or not raw:
        raise BadRow("no messages")
    out: list[Message] = []
    open_calls: list[dict[str, Any]] = []  # the last assistant turn's calls not yet answered
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise BadRow("message not an object")
        role = _role(m)
        content = _text(m.get("content") if "content" in m else m.get("value"))
        if role == "system" and i != 0:
            raise BadRow("system message not first")
        if role == "function_call":
            call = _function_call(content)
            if out and out[-1]["role"] == "assistant" and "tool_calls" not in out[-1]:
                out[-1]["tool_calls"] = [call]  # the calls of the assistant turn just written
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
            open_calls = [call]
            continue
        msg: Message = {"role": role, "content": content}
        if role == "assistant":
            calls = m.get("tool_calls")
            if calls is not None and not isinstance(calls, list):
                raise BadRow("malformed tool call")
            if calls:
                msg["tool_calls"] = [_tool_call(c) for c in calls]
            if not content.strip() and not msg.get("tool_calls"):
                raise BadRow("empty assistant message")
            open_calls = list(msg.get("tool_calls") or [])
        elif role == "tool":
            call_id = m.get("tool_call_id")
            ids = [c.get("id") for c in open_calls]
            if not open_calls or (isinstance(call_id, str) and any(ids) and call_id not in ids):
                raise BadRow("tool result without a call")
            if isinstance(call_id, str):
                msg["tool_call_id"] = call_id
            answered = ids.index(call_id) if call_id in ids else 0
            open_calls = open_calls[:answered] + open_calls[answered + 1 :]
        else:
            open_calls = []
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    if not any(m["role"] == "assistant" for m in out):
        raise BadRow("assistant never speaks")
    return out


def _pair(row: dict[str, Any], user: str, reply: str) -> list[Message]:
    system = _text(row.get("system")) if row.get("system") else ""
    if not reply.strip():
        raise BadRow("empty assistant message")
    turns = [{"role": "system", "content": system}] if system else []
    return [*turns, {"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def detect(row: dict[str, Any]) -> Format | None:
    """Which format a row is in, by its keys."""
    if "messages" in row:
        return "openai"
    if "conversations" in row:
        return "sharegpt"
    if "prompt" in row and ("completion" in row or "response" in row):
        return "prompt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    return None


def conversation(row: Any, fmt: Format | None = None) -> list[Message]:
    """One row (a parsed JSON object, or a Parquet row) as checked OpenAI messages; BadRow says why not."""
    if not isinstance(row, dict):
        raise BadRow("not an object")
    fmt = fmt or detect(row)
    if fmt == "openai":
        return messages_of(row.get("messages"))
    if fmt == "sharegpt":
        return messages_of(row.get("conversations"))
    if fmt == "prompt" and "prompt" in row:
        return _pair(row, _text(row["prompt"]), _text(row.get("completion", row.get("response"))))
    if fmt == "alpaca" and "instruction" in row:
        extra = _text(row.get("input"))
        user = _text(row["instruction"]) + (f"\n\n{extra}" if extra.strip() else "")
        return _pair(row, user, _text(row.get("output")))
    raise BadRow("no messages")


# ----------------------------------------------------------------------------- files -> rows
Row = tuple[str, Any]  # (where, the parsed row) or (where, BadRow) for a row already known bad


def _parse(text: str, limits: InputLimits) -> Any:
    if json_deeper_than(text, limits.max_json_depth):
        raise BadRow("JSON nested too deep")
    try:
        return json.loads(text)
    except ValueError:
        raise BadRow("not JSON") from None


def _json_rows(path: Path, limits: InputLimits) -> Iterator[Row]:
    """JSON lines, or (a ``.json`` file that starts with ``[``) one JSON array of rows; gzipped or not."""
    with open_capped(path, limits.max_input_bytes) as f:
        head = f.peek(64).lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
        if head == b"[" and path.name.lower().endswith((".json", ".json.gz")):
            data = f.read(ARRAY_MAX_BYTES + 1)
            if len(data) > ARRAY_MAX_BYTES:
                raise OversizedInput(f"a JSON array over {ARRAY_MAX_BYTES:,} bytes (write it as JSON lines)")
            try:
                rows = _parse(data.decode("utf-8-sig"), InputLimits(max_json_depth=limits.max_json_depth + 1))
            except UnicodeDecodeError:
                raise BadRow("not UTF-8") from None
            if not isinstance(rows, list):
                raise BadRow("not JSON")
            for i, row in enumerate(rows, 1):
                yield f"row {i}", row
            return
        for n, line in enumerate(bounded_lines(f, limits.max_record_bytes), 1):
            where = f"line {n}"
            if line is None:
                yield where, BadRow("over the size cap")
                continue
            try:
                text = line.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError:
                yield where, BadRow("not UTF-8")
                continue
            if text.strip():
                try:
                    yield where, _parse(text, limits)
                except BadRow as e:
                    yield where, e


def _parquet_rows(path: Path, limits: InputLimits) -> Iterator[Row]:
    """Parquet rows one small batch at a time; row groups' declared sizes count against the input cap."""
    import pyarrow.parquet as pq  # heavy: ~0.1 s to import; only Parquet files need it

    pf = pq.ParquetFile(path, buffer_size=1 << 20)
    expanded, n = 0, 0
    for g in range(pf.num_row_groups):
        group = pf.metadata.row_group(g)
        expanded += sum(group.column(j).total_uncompressed_size for j in range(group.num_columns))
        if expanded > limits.max_input_bytes:
            raise OversizedInput(f"row groups over {limits.max_input_bytes:,} bytes")
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[g]):
            for row in batch.to_pylist():
                n += 1
                size = len(json.dumps(row, default=str))
                yield f"row {n}", BadRow("over the size cap") if size > limits.max_record_bytes else row


def _stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_data_file(path: str | Path, fmt: Format | None = None, limits: InputLimits | None = None) -> DataFile:
    """A conversation file as a named dataset. Bad rows are counted by reason; a file with no usable row
    raises ValueError naming the file and the reasons, a missing file FileNotFoundError."""
    path, limits = Path(path), limits or InputLimits()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    if not path.name.lower().endswith(SUFFIXES):
        raise ValueError(f"{path}: unknown data file type (expected {', '.join(SUFFIXES)})")
    out = DataFile(_stem(path), path)
    rows = _parquet_rows(path, limits) if path.name.lower().endswith(".parquet") else _json_rows(path, limits)
    where = "line 1"
    try:
        for where, row in rows:
            try:
                if isinstance(row, BadRow):
                    raise row
                out.conversations.append(conversation(row, fmt))
            except BadRow as e:
                out.skip(str(e), where)
    except BadRow as e:  # the whole file is one bad row (a .json array that does not parse)
        out.skip(str(e), "the file")
    except Exception as e:  # a damaged gzip or Parquet file (zlib, OSError, pyarrow's own), too big: rows before kept
        out.skip(f"unreadable file ({type(e).__name__})", f"after {where}")
    if not out.conversations:
        why = out.reasons() if out.skipped else "it is empty"
        raise ValueError(f"{path}: no usable conversations ({why})")
    return out


def load_conversations(paths: list[Path], fmt: Format | None = None) -> list[DataFile]:
    """Each file as a named dataset (its stem); two files of one name raise ValueError."""
    files = [read_data_file(p, fmt) for p in paths]
    seen: dict[str, Path] = {}
    for f in files:
        if f.name in seen:
            raise ValueError(f"{seen[f.name]} and {f.path} would both be the dataset {f.name!r}: rename one")
        seen[f.name] = f.path
    return files
