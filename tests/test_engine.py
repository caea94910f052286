"""The inference engine: batching with padding, seeded sampling, the tool state machine."""

from __future__ import annotations

import torch
from conftest import tiny_model_config

from llmstack.inference.engine import Engine, ToolUse
from llmstack.inference.sample import SamplingConfig
from llmstack.model.llama import GPT
from llmstack.tools.calculator import calculator
from llmstack.tools.registry import ToolBox, default_toolbox

GREEDY = SamplingConfig(max_new_tokens=12, temperature=0.0)


def test_batch_of_different_lengths_equals_one_by_one():
    torch.manual_seed(0)
    model = GPT(tiny_model_config(100, max_seq_len=64)).eval()
    prompts = [[1, 5, 9, 13, 2, 7, 8], [4], [3, 3, 3, 11]]
    engine = Engine(model)
    batched = engine.generate(prompts, GREEDY)
    single = [engine.generate([p], GREEDY)[0] for p in prompts]
    assert batched == single
    assert all(len(b) == 12 for b in batched)


def test_seeded_sampling_is_reproducible_and_seed_sensitive():
    torch.manual_seed(1)
    engine = Engine(GPT(tiny_model_config(100)).eval())
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.9, seed=3)
    a = engine.generate([[1, 2, 3]], cfg)
    assert a == engine.generate([[1, 2, 3]], cfg)
    assert a != engine.generate([[1, 2, 3]], SamplingConfig(max_new_tokens=20, temperature=1.0, seed=4))


def test_stop_ids_end_a_row():
    torch.manual_seed(2)
    engine = Engine(GPT(tiny_model_config(100)).eval())
    free = engine.generate([[1, 2]], GREEDY)[0]
    stop = free[3]
    out = engine.generate([[1, 2]], GREEDY, stop_ids={stop})[0]
    assert out == free[: free.index(stop) + 1]


class Scripted(torch.nn.Module):
    """A 'model' whose next token is a fixed function of the last input token."""

    def __init__(self, plan: dict[int, int], vocab: int = 64) -> None:
        super().__init__()
        self.plan, self.vocab = plan, vocab
        self.config = tiny_model_config(vocab, max_seq_len=128)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx, cache=None):
        B, T = idx.shape
        if cache is not None:
            cache.advance(T)
        logits = torch.full((B, T, self.vocab), -1e9)
        for b in range(B):
            logits[b, -1, self.plan.get(int(idx[b, -1]), 0)] = 0.0
        return logits


CS, CE, RS, RE, X, T, END = 50, 51, 52, 53, 10, 11, 12


def tool_use(run, text_of_x: str) -> ToolUse:
    return ToolUse(
        CS,
        CE,
        RS,
        RE,
        run,
        encode=lambda s: [20 + (ord(c) % 20) for c in s],
        decode=lambda ids: text_of_x if ids == [X] else "?",
    )


def test_tool_call_runs_and_result_is_forced_then_generation_continues():
    calls = []

    def run(text):
        calls.append(text)
        return ToolBox({"calculator": calculator}).call(text)

    model = Scripted({1: CS, CS: X, X: CE, RE: T, T: END})
    engine = Engine(model, tool_use(run, "calculator: 2+3"))
    events = list(engine.stream([[1]], SamplingConfig(max_new_tokens=20, temperature=0.0), stop_ids={END}))
    tokens = [e.token for e in events]
    forced = [e.token for e in events if e.forced]
    assert calls == ["calculator: 2+3"]
    assert tokens == [CS, X, CE, RS, 20 + ord("5") % 20, RE, T, END]
    assert forced == [RS, 20 + ord("5") % 20, RE]


def test_malformed_and_unknown_calls_return_errors_not_crashes():
    for text in ("no colon here", "rm: -rf /"):
        results = []

        def run(t, results=results):
            out = default_toolbox().call(t)
            results.append(out)
            return out

        engine = Engine(Scripted({1: CS, CS: X, X: CE, RE: T, T: END}), tool_use(run, text))
        toks = engine.generate([[1]], SamplingConfig(max_new_tokens=80, temperature=0.0), stop_ids={END})[0]
        assert results[0].startswith("error:") and toks[-1] == END


def test_toolbox_runs_real_tools():
    box = default_toolbox()
    assert box.call("calculator: 123*456") == "56088"
    assert box.call("python: print(len('strawberry'.split('r')) - 1)") == "3"
    assert "unknown tool" in box.call("browser: x")
