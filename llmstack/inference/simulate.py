"""Base models as simulators: documents whose natural continuation is the answer to a task.

A pretrained (not finetuned) model only continues documents. Written the right way, a document
makes that continuation do a job:

* few-shot: worked examples, then the question in the same format with its answer left open::

      Input: cheese          <- one block per example
      Output: fromage
                             <- SEPARATOR (a blank line) between blocks
      Input: <prompt>
      Output:                <- the model writes the output; we stop at the next blank line

  A ``.jsonl`` file holds one ``{"input": ..., "output": ...}`` object per line; any other file is
  text in a format of your own, used verbatim, and ``--prompt`` is appended to it as is (so it must
  end with the open cue, e.g. ``Q: ...\\nA:``). Either way generation stops at the blank line.
* the conversation document (``prompts/conversation.txt``): a page that reads as the transcript of a
  helpful AI assistant talking with a human, a few exchanges long, ending ``Human: <prompt>\\nAssistant:``.
  The model plays the assistant until it starts the human's next line.

What is not here: choosing examples by similarity to the question, calibrating answers, and
trusting them: a base model simulates an assistant, it has not been taught to be one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmstack.inference.engine import Engine, Request
from llmstack.inference.sample import SamplingConfig, stream_text

SEPARATOR = "\n\n"
"""Between few-shot examples: a blank line. Generation stops when the model writes one."""
HUMAN_TURN = "\nHuman:"
"""Where the conversation document's assistant turn ends."""
CONVERSATION_TEMPLATE = Path(__file__).with_name("prompts") / "conversation.txt"
PLACEHOLDER = "{prompt}"


@dataclass(frozen=True)
class Example:
    input: str
    output: str


@dataclass(frozen=True)
class SimPrompt:
    """A document for a base model to continue, and the text that ends the part we want."""

    text: str
    stop: str


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_examples(path: str | Path) -> list[Example]:
    """``{"input": str, "output": str}`` per line; blank lines are skipped. Errors name file and line."""
    path = Path(path)
    examples = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f'{path}:{n}: expected an object {{"input": ..., "output": ...}}')
        for key in ("input", "output"):
            if key not in obj:
                raise ValueError(f'{path}:{n}: "{key}" is missing')
            if not isinstance(obj[key], str):
                raise ValueError(f'{path}:{n}: "{key}" must be a string (got {type(obj[key]).__name__})')
            if SEPARATOR in obj[key].strip():
                raise ValueError(f'{path}:{n}: "{key}" holds a blank line, which separates examples')
        examples.append(Example(obj["input"].strip(), obj["output"].strip()))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def format_examples(examples: Iterable[Example]) -> str:
    return "".join(f"Input: {ex.input}\nOutput: {ex.output}{SEPARATOR}" for ex in examples)


def few_shot_prompt(source: str | Path, prompt: str) -> SimPrompt:
    """The few-shot document for ``prompt`` from a ``.jsonl`` file of examples or a verbatim text file."""
    source = Path(source)
    if source.suffix == ".jsonl":
        examples = read_examples(source)
        if SEPARATOR in prompt.strip():
            raise ValueError("the prompt holds a blank line, which separates few-shot examples")
        return SimPrompt(f"{format_examples(examples)}Input: {prompt.strip()}\nOutput:", SEPARATOR)
    text = _read_text(source)
    if not text.strip():
        raise ValueError(f"{source}: empty (a few-shot file needs examples)")
    return SimPrompt(text + prompt, SEPARATOR)


def conversation_prompt(prompt: str, template: str | Path = CONVERSATION_TEMPLATE) -> SimPrompt:
    """The conversation document with ``prompt`` as the human's last line."""
    text = _read_text(Path(template)).rstrip()
    if text.count(PLACEHOLDER) != 1:
        raise ValueError(f"{template}: a conversation template needs {PLACEHOLDER} exactly once")
    return SimPrompt(text.replace(PLACEHOLDER, " ".join(prompt.split())), HUMAN_TURN)


def until_stop(pieces: Iterable[str], stop: str) -> Iterator[str]:
    """Stream text pieces up to (not including) the first ``stop``, without the surrounding white space.

    The engine ends a row once ``stop`` is among its generated bytes, but the last token may carry
    text past it; and while the model is part-way through writing ``stop`` we cannot yet know, so
    text that could begin it (or trailing white space) is held back until the next piece decides.
    """
    buf, started = "", False
    for piece in pieces:
        buf += piece
        cut = buf.find(stop)
        if cut >= 0:
            end = len(buf[:cut].rstrip())
        else:
            keep = next((k for k in range(min(len(stop) - 1, len(buf)), 0, -1) if stop.startswith(buf[-k:])), 0)
            end = min(len(buf) - keep, len(buf.rstrip()))
        out, buf = buf[:end], buf[end:]
        if not started:
            out = out.lstrip()
        if out:
            started = True
            yield out
        if cut >= 0:
            return
    if tail := buf.rstrip() if started else buf.strip():
        yield tail


def sample(model: Any, tok: Any, text: str, cfg: SamplingConfig, sim: SimPrompt | None = None) -> Iterator[str]:
    """Stream a continuation of ``text`` (after <|bos|> when the tokenizer has one) as text pieces.

    With ``sim`` the model continues the simulator's document instead, and only the answer comes back.
    """
    prompt_ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode_ordinary(sim.text if sim else text)
    if sim and len(prompt_ids) >= model.config.max_seq_len:
        raise ValueError(
            f"the simulator prompt is {len(prompt_ids)} tokens; the model's context is {model.config.max_seq_len}: "
            "use fewer or shorter examples, or a shorter --prompt"
        )
    engine = Engine(model, token_bytes=tok.decode_token_bytes)
    stops = {tok.bos_id} if tok.bos_id is not None else set()
    req = Request(prompt_ids, cfg, stops, stop_texts=(sim.stop.encode(),) if sim else (), tool_mode="off")
    pieces = stream_text((ev.token for ev in engine.run([req]) if ev.token not in stops), tok.decode_token_bytes)
    return until_stop(pieces, sim.stop) if sim else pieces  # a simulator's answer only: the document is ours
