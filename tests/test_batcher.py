"""Continuous batching (``inference/batcher.py``) against the engine it replaces in the server: rows
that arrive at different steps, prompts fed in chunks, slots reused, prefixes shared and tools run
off the decode step must give each row exactly what it gets decoded alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import bigram_model, script_transitions, tiny_model_config

from llmstack.inference.batcher import Batcher, PrefixCache
from llmstack.inference.engine import Engine, Event, Request, ToolUse
from llmstack.inference.sample import SamplingConfig
from llmstack.model.llama import GPT
from llmstack.tokenizer import special as S


class Sink:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.ended: list[BaseException | None] = []

    def event(self, ev: Event) -> None:
        self.events.append(ev)

    def end(self, error: BaseException | None) -> None:
        self.ended.append(error)

    @property
    def tokens(self) -> list[int]:
        return [e.token for e in self.events]


def drive(batcher: Batcher, arrivals: dict[int, list[tuple[Request, Sink]]], max_steps: int = 2000) -> int:
    """Step the batcher, adding each step's arrivals first; returns the steps taken."""
    step = 0
    while step < max_steps and (batcher.busy or any(k >= step for k in arrivals)):
        for req, sink in arrivals.get(step, []):
            batcher.add(req, sink)
        if batcher.stalled:  # only tools are running: wait for them, as the server's scheduler does
            time.sleep(0.01)
            continue
        batcher.step()
        step += 1
    assert not batcher.busy, "the batcher did not finish"
    return step


def alone(model, req: Request, tools=None) -> list[tuple[int, float | None]]:
    return [(e.token, e.logprob) for e in Engine(model, tools).run([req])]


@pytest.mark.parametrize(("temperature", "fixed"), [(0.0, False), (1.0, False), (0.0, True)])
def test_rows_joining_and_leaving_equal_rows_decoded_alone(temperature, fixed):
    """Staggered arrivals, two slots for six rows (queueing, slot reuse, the last slot moved into a
    freed one), prompts fed three tokens a step, a shared prefix served from the prefix cache: every
    row's tokens and log-probabilities equal a batch of one through ``Engine``."""
    torch.manual_seed(0)
    model = GPT(tiny_model_config(100, max_seq_len=128)).eval()
    prefix = [7, 8, 9, 10, 11, 12, 13, 14]
    prompts = [prefix + [1, 2], [5], prefix + [3], [4, 4, 4, 4, 4, 4, 4], prefix + prefix + [6], [9, 9]]
    budgets = [30, 5, 17, 9, 25, 12]
    reqs = [
        Request(p, SamplingConfig(max_new_tokens=n, temperature=temperature, seed=10 + i), stop_ids={99}, logprobs=2)
        for i, (p, n) in enumerate(zip(prompts, budgets, strict=True))
    ]
    cache = PrefixCache(block=4)
    # fixed: decode steps over batch buckets and whole slots (what CUDA graphs replay), run eagerly here
    batcher = Batcher(Engine(model, static=fixed), max_rows=2, chunk=3, prefix_cache=cache)
    assert batcher.fixed == fixed
    sinks = [Sink() for _ in reqs]
    arrivals = {
        0: [(reqs[0], sinks[0]), (reqs[1], sinks[1])],
        4: [(reqs[2], sinks[2])],
        9: list(zip(reqs[3:], sinks[3:], strict=True)),
    }
    drive(batcher, arrivals)
    for req, sink in zip(reqs, sinks, strict=True):
        assert sink.ended == [None]
        want = alone(model, req)
        got = [(e.token, e.logprob) for e in sink.events]
        assert [t for t, _ in got] == [t for t, _ in want]
        assert max(abs(a[1] - b[1]) for a, b in zip(got, want, strict=True)) < 1e-4
        assert sink.events[-1].finish in ("stop", "length")
    assert cache.hits >= 8, "the shared prefix was not reused"
    assert batcher.running == 0 and (batcher.k == []) != fixed, "the slots are freed when nothing runs"


def test_a_row_joins_a_running_batch_and_a_short_row_leaves_early():
    torch.manual_seed(1)
    model = GPT(tiny_model_config(100, max_seq_len=128)).eval()
    greedy = SamplingConfig(max_new_tokens=40, temperature=0.0)
    long, short, late = Sink(), Sink(), Sink()
    batcher = Batcher(Engine(model), max_rows=4)
    batcher.add(Request([1, 2, 3], greedy), long)
    batcher.add(Request([4], SamplingConfig(max_new_tokens=3, temperature=0.0)), short)
    for _ in range(5):
        batcher.step()
    assert short.ended == [None] and len(short.events) == 3 and batcher.running == 1
    batcher.add(Request([5, 6], greedy), late)
    batcher.step()
    assert batcher.running == 2 and 1 <= len(late.events) <= 2, "a new row starts while the first one decodes"
    drive(batcher, {})
    assert long.tokens == [t for t, _ in alone(model, Request([1, 2, 3], greedy))]
    assert late.tokens == [t for t, _ in alone(model, Request([5, 6], greedy))]


def test_a_slow_tool_does_not_stall_the_other_rows(tok):
    """A row whose tool call is still running waits off the decode step: the other row finishes meanwhile,
    then the call's result is fed and its row ends as it does alone."""
    model = bigram_model(tok, script_transitions(tok))
    started, release = threading.Event(), threading.Event()

    def run(call: str) -> str:
        started.set()
        release.wait(30)  # the tool takes as long as the test wants
        return "42"

    sid = tok.special_id
    tools = ToolUse(
        sid(S.TOOL_CALL_START),
        sid(S.TOOL_CALL_END),
        sid(S.TOOL_RESULT_START),
        sid(S.TOOL_RESULT_END),
        run,
        tok.encode_ordinary,
        tok.decode,
    )
    cfg = SamplingConfig(max_new_tokens=40, temperature=0.0)
    stops = {sid(S.ASSISTANT_END)}
    calling = Request([*tok.encode_ordinary("x")], cfg, stops)
    chatting = Request([sid(S.ASSISTANT_START)], cfg, stops)
    batcher = Batcher(Engine(model, tools), max_rows=4)
    a, b = Sink(), Sink()
    batcher.add(calling, a)
    batcher.add(chatting, b)
    for _ in range(200):
        if b.ended:
            break
        batcher.step()
    assert b.ended and not a.ended, "the chat row waited for the tool"
    assert started.wait(10), "the call never reached the tool"
    release.set()
    drive(batcher, {})
    assert a.tokens == [t for t, _ in alone(model, calling, tools)]
    assert any(e.forced for e in a.events) and a.events[-1].finish == "stop"


def test_cancelled_rows_leave_and_errors_reach_every_row():
    torch.manual_seed(2)
    model = GPT(tiny_model_config(100, max_seq_len=64)).eval()
    batcher = Batcher(Engine(model), max_rows=4)
    cfg = SamplingConfig(max_new_tokens=30, temperature=0.0)
    gone, stays = Request([1, 2], cfg), Sink()
    sink = Sink()
    batcher.add(gone, sink)
    batcher.add(Request([3], cfg), stays)
    batcher.step()
    gone.cancelled = True
    batcher.step()
    assert sink.ended == [None] and batcher.running == 1
    drive(batcher, {})
    assert len(stays.events) == 30
    too_long, err = Request(list(range(64)), cfg), Sink()
    batcher.add(too_long, err)
    batcher.step()
    assert isinstance(err.ended[0], ValueError) and "context" in str(err.ended[0])


def test_penalties_and_logit_bias_change_what_is_sampled():
    torch.manual_seed(3)
    model = GPT(tiny_model_config(100, max_seq_len=64)).eval()
    plain = SamplingConfig(max_new_tokens=20, temperature=0.0)
    base = alone(model, Request([1, 2, 3], plain))
    first = base[0][0]
    banned = alone(model, Request([1, 2, 3], SamplingConfig(20, 0.0, logit_bias=((first, -100.0),))))
    assert first not in [t for t, _ in banned]
    forced = alone(model, Request([1, 2, 3], SamplingConfig(20, 0.0, logit_bias=((42, 100.0),))))
    assert [t for t, _ in forced] == [42] * 20
    repeats = alone(model, Request([1, 2, 3], SamplingConfig(20, 0.0, presence_penalty=100.0)))
    toks = [t for t, _ in repeats]
    assert len(set(toks)) == len(toks), "a presence penalty of 100 lets no token come twice"
