"""The inference engine: batching with padding, seeded sampling, the tool state machine."""

from __future__ import annotations

import pytest
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


def test_static_decode_steps_equal_dynamic_ones():
    """The fixed-shape step (what a CUDA graph replays) gives the dynamic path's tokens and log-probs,
    with left padding, GQA and rows that finish early."""
    from llmstack.inference.engine import Request

    torch.manual_seed(5)
    model = GPT(tiny_model_config(100, max_seq_len=64)).eval()
    prompts = [[1, 5, 9, 13, 2, 7, 8], [4], [3, 3, 3, 11]]
    cfg = SamplingConfig(max_new_tokens=15, temperature=0.0)

    def run(static: bool):
        engine = Engine(model, static=static)
        reqs = [Request(p, cfg, stop_ids={17}, logprobs=2) for p in prompts]
        return [(e.row, e.token, round(e.logprob, 4)) for e in engine.run(reqs)]

    dynamic, static = run(False), run(True)
    assert static == dynamic and len(dynamic) > 15
    sampled = SamplingConfig(max_new_tokens=10, temperature=1.0, seed=3)
    assert Engine(model, static=True).generate(prompts, sampled) == Engine(model, static=False).generate(
        prompts, sampled
    )


def test_static_steps_run_under_bf16_autocast():
    """The training loop evaluates under bf16 autocast (on CUDA, where decoding is static): the fp32
    cache takes the bf16 keys, and the tokens are the dynamic path's under the same autocast."""
    torch.manual_seed(5)
    model = GPT(tiny_model_config(100, max_seq_len=64)).eval()
    prompts = [[1, 5, 9, 13, 2, 7, 8], [4], [3, 3, 3, 11]]
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        static = Engine(model, static=True).generate(prompts, cfg)
        dynamic = Engine(model, static=False).generate(prompts, cfg)
    assert static == dynamic and all(len(r) == 12 for r in static)


def test_no_cuda_graphs_under_cuda_autocast(monkeypatch):
    """Graphs captured under autocast replay its freed / stale weight casts (NaN on a GPU): the engine
    decodes eagerly while CUDA autocast is on, with graphs otherwise."""
    model = GPT(tiny_model_config(100))
    engine = Engine(model)
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda")
    assert not engine._use_static(cuda)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: False)
    assert engine._use_static(cuda) and not engine._use_static(torch.device("cpu"))
    assert Engine(model, static=True)._use_static(torch.device("cpu"))  # CPU static steps do not capture


def test_non_finite_logits_stop_sampling_with_a_clear_error():
    from llmstack.inference.sample import sample_next

    logits = torch.zeros(2, 5)
    assert sample_next(logits, SamplingConfig(max_new_tokens=1, temperature=1.0), None).shape == (2,)
    logits[1, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="logits are not finite"):
        sample_next(logits, SamplingConfig(max_new_tokens=1, temperature=1.0), None)


def test_stop_texts_end_a_row_and_tool_mode_return_stops_at_the_call():
    from llmstack.inference.engine import Request

    torch.manual_seed(2)
    model = GPT(tiny_model_config(100)).eval()
    token_bytes = lambda t: bytes([97 + t % 26])  # noqa: E731  # token t "spells" one letter
    engine = Engine(model, token_bytes=token_bytes)
    free = engine.generate([[1, 2]], GREEDY)[0]
    text = b"".join(token_bytes(t) for t in free)
    stop = text[4:6]
    events = list(engine.run([Request([1, 2], GREEDY, stop_texts=(stop,))]))
    got = b"".join(token_bytes(e.token) for e in events)
    assert got.endswith(stop) and stop not in got[:-1] and events[-1].finish == "stop"
    scripted = Scripted({1: CS, CS: X, X: CE, CE: 5})
    out = list(Engine(scripted, tool_use(lambda call: "never run", "")).run([Request([1], GREEDY, tool_mode="return")]))
    assert [e.token for e in out] == [CS, X, CE] and out[-1].finish == "tool_calls"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decode_equals_dynamic_decode():
    torch.manual_seed(5)
    model = GPT(tiny_model_config(100, max_seq_len=64)).to("cuda").eval()
    prompts = [[1, 5, 9, 13, 2, 7, 8], [4], [3, 3, 3, 11]]
    cfg = SamplingConfig(max_new_tokens=20, temperature=0.0)
    graphs, dynamic = Engine(model, static=True), Engine(model, static=False)
    assert graphs.generate(prompts, cfg) == dynamic.generate(prompts, cfg)
    # the captured graph and its cache are reused by the next call, with other prompts
    other = [[7, 7, 1], [2, 9, 4, 4, 4, 1, 1, 3], [5]]
    assert graphs.generate(other, cfg) == dynamic.generate(other, cfg)
    assert len(graphs._graphs) == 1


def test_engine_with_fused_projections_equals_a_plain_forward_loop():
    """The engine decodes with fused q/k/v and gate/up weights and a KV cache; a loop of full forwards
    with the separate weights and no cache must pick the same tokens, and the fused copies follow
    the weights when they change."""
    torch.manual_seed(7)
    model = GPT(tiny_model_config(100, max_seq_len=64)).eval()
    engine = Engine(model)

    def plain(prompt: list[int], n: int) -> list[int]:
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(n):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        return ids[len(prompt) :]

    assert engine.generate([[3, 1, 4, 1, 5]], GREEDY)[0] == plain([3, 1, 4, 1, 5], 12)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    assert engine.generate([[3, 1, 4, 1, 5]], GREEDY)[0] == plain([3, 1, 4, 1, 5], 12)
