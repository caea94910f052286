"""The chat session: tool calls shown and stored, multi-turn prompts, commands."""

from __future__ import annotations

import torch
from conftest import tiny_model_config

from llmstack.chat.session import ChatSession
from llmstack.inference.sample import SamplingConfig
from llmstack.tokenizer import special as S
from llmstack.tools.registry import default_toolbox


class Replay(torch.nn.Module):
    """A 'model' that emits a fixed sequence of tokens after any prompt (forced positions included)."""

    def __init__(self, seq: list[int], vocab: int) -> None:
        super().__init__()
        self.seq, self.vocab = seq, vocab
        self.config = tiny_model_config(vocab, max_seq_len=256)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.prompt_len = 0

    def forward(self, idx, cache):
        if cache.pos == 0:
            self.prompt_len = idx.shape[1]
        cache.advance(idx.shape[1])
        k = min(cache.pos - self.prompt_len, len(self.seq) - 1)
        logits = torch.full((idx.shape[0], idx.shape[1], self.vocab), -1e9)
        logits[:, -1, self.seq[k]] = 0.0
        return logits


def scripted_assistant(tok) -> Replay:
    """Answers any question by calling the calculator on 7*6, then says "ok"."""
    sid = tok.special_id
    seq = [
        sid(S.TOOL_CALL_START),
        *tok.encode_ordinary("calculator: 7*6"),
        sid(S.TOOL_CALL_END),
        sid(S.TOOL_RESULT_START),
        *tok.encode_ordinary("42"),
        sid(S.TOOL_RESULT_END),
        *tok.encode_ordinary("ok"),
        sid(S.ASSISTANT_END),
    ]
    return Replay(seq, tok.vocab_size)


def test_session_runs_tools_shows_them_and_keeps_turns(tok):
    s = ChatSession(scripted_assistant(tok), tok, default_toolbox(), SamplingConfig(max_new_tokens=40, temperature=0))
    shown = "".join(s.ask("what is 7 times 6?"))
    assert "[tool call] calculator: 7*6" in shown and "[tool result] 42" in shown and shown.endswith("ok")
    kinds = [p.kind for p in s.messages[1].parts]
    assert kinds == ["tool_call", "tool_result", "text"]
    "".join(s.ask("again"))
    conv = s.conversation()
    assert [m.role for m in conv.messages] == ["user", "assistant", "user", "assistant"]
    # the second prompt carried the first turn's call and result
    assert s.fmt.render(conv).ids.count(tok.special_id(S.TOOL_RESULT_START)) == 2


def test_session_commands(tok):
    s = ChatSession(scripted_assistant(tok), tok, None, SamplingConfig(max_new_tokens=5, temperature=0))
    "".join(s.ask("hi"))
    assert s.handle("/system Be brief.") and s.system == "Be brief." and s.messages == []
    assert s.conversation().messages[0].role == "system"
    assert "on" in s.handle("/tokens") and s.show_tokens
    assert s.handle("/reset") == "(conversation cleared)"
    assert "commands" in s.handle("/help")
    assert s.handle("plain text") is None
