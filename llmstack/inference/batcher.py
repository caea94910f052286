"""Continuous batching: rows join and leave the running batch between decode steps.

``Engine.run`` decodes a fixed set of rows from start to end; a server using it makes a request that
arrives mid-batch wait for the whole batch. Here every ``step`` admits waiting rows into free slots,
runs at most ``chunk`` prompt tokens of prefill, one decode step for every decoding row, and frees the
slots of rows that finished, so a short reply leaves as soon as it is done and its slot is taken by
the next request.

* **Slots.** Each layer's keys and values are one (slots, kv heads, length, head dim) tensor; a row
  owns a slot and has its own position (``lens``). A decode step runs the first ``m`` slots together
  with one position per row (``KVCache.over`` with ``pos_B``): each row writes its key at its own
  position and attends to its own keys only, so rows of different lengths need no padding. When a row
  leaves, the last slot moves into its place (one slot copy), keeping the running rows in front.
  Slots and length grow by doubling as rows need them, and are freed when nothing runs: memory follows
  the rows in use and the longest of them, not the context times the batch limit.
* **Chunked prefill.** A prompt is fed ``chunk`` tokens per step, between decode steps: a long prompt
  slows the decoding rows by one chunk per step, it does not stall them until it is done.
* **Prefix cache** (``PrefixCache``). Keys and values of prompt blocks are kept, keyed by every token
  up to the block's end; a prompt that starts the same way (a system prompt, an assistant's
  instructions) copies those blocks into its slot instead of computing them.
* **Tools off the decode step.** A finished tool call (``tool_mode="run"``) runs in a thread pool;
  its row waits (in its slot, decoded as a dummy) while the others go on, and its result is then
  fed like a prompt chunk.

A row's events go to its ``RowSink`` (``event`` per token, ``end`` once); sampling, penalties,
grammars and tool-call states are the engine's (``_Row.choose``, ``open_row``, ``advance_row``).
"""

from __future__ import annotations

import queue
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from llmstack.inference.engine import (
    MAX_GRAPHS,
    Engine,
    Event,
    Request,
    _Row,
    advance_row,
    capture_graph,
    open_row,
)
from llmstack.inference.sample import SamplingConfig, sampling_probs
from llmstack.model.llama import KVCache

MIN_LENGTH = 64  # the smallest slot length allocated, and the granularity of attention spans


class RowSink(Protocol):
    def event(self, ev: Event) -> None: ...

    def end(self, error: BaseException | None) -> None: ...


@dataclass
class _Seq(_Row):
    sink: Any = None  # RowSink
    slot: int = -1
    feed: list[int] = field(default_factory=list)  # ids to put into the cache before the next sample
    n_cached: int = 0
    pending: int | None = None  # sampled and shown, not yet in the cache
    tool: Future[list[int]] | None = None
    prompt_cached: bool = False  # its prompt's blocks went into the prefix cache


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class PrefixCache:
    """Keys and values of prompt prefixes in blocks of ``block`` tokens, least recently used dropped
    past ``max_bytes``. A block's key is a hash chained over every token up to its end, so a block is
    reused only after the same tokens (RoPE positions included: blocks start at multiples of ``block``)."""

    def __init__(self, block: int = 32, max_bytes: int = 256 << 20) -> None:
        self.block, self.max_bytes = block, max_bytes
        self.blocks: OrderedDict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.bytes = 0
        self.hits = self.lookups = 0  # tokens reused, tokens looked up

    def _keys(self, ids: list[int], upto: int) -> list[tuple[int, tuple[int, ...]]]:
        keys, h = [], 0
        for a in range(0, upto - self.block + 1, self.block):
            key = (h, tuple(ids[a : a + self.block]))
            keys.append(key)
            h = hash(key)
        return keys

    def match(self, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cached blocks at the start of ``ids``, leaving at least its last token to compute."""
        found = []
        for key in self._keys(ids, len(ids) - 1):
            kv = self.blocks.get(key)
            if kv is None:
                break
            self.blocks.move_to_end(key)
            found.append(kv)
        self.hits += len(found) * self.block
        self.lookups += len(ids)
        return found

    def insert(self, ids: list[int], k: list[torch.Tensor], v: list[torch.Tensor], slot: int) -> None:
        """Keep the blocks of ``ids`` (all in ``slot`` of the layers' ``k``/``v``) not kept yet."""
        for i, key in enumerate(self._keys(ids, len(ids))):
            if key in self.blocks:
                self.blocks.move_to_end(key)
                continue
            a, b = i * self.block, (i + 1) * self.block
            kb = torch.stack([t[slot, :, a:b] for t in k])
            vb = torch.stack([t[slot, :, a:b] for t in v])
            self.blocks[key] = (kb, vb)
            self.bytes += 2 * kb.numel() * kb.element_size()
        while self.bytes > self.max_bytes and self.blocks:
            _, (kb, _vb) = self.blocks.popitem(last=False)
            self.bytes -= 2 * kb.numel() * kb.element_size()


class Batcher:
    """Continuous batching over one engine's model (see the module's docstring). ``add`` may be called
    from any thread; ``step`` from one thread only (the scheduler's)."""

    def __init__(
        self,
        engine: Engine,
        max_rows: int = 32,
        chunk: int = 256,
        prefix_cache: PrefixCache | None = None,
        tool_workers: int = 4,
    ) -> None:
        if not getattr(engine.model, "supports_static_cache", False):
            raise ValueError(f"continuous batching needs a model with slot caches (GPT), not {type(engine.model)}")
        self.engine, self.model, self.cfg = engine, engine.model, engine.config
        self.max_rows, self.chunk, self.prefix = max_rows, chunk, prefix_cache
        self._inbox: queue.SimpleQueue[tuple[Request, Any]] = queue.SimpleQueue()
        self.waiting: deque[_Seq] = deque()
        self.rows: list[_Seq] = []  # rows[i] owns slot i
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.lens = torch.zeros(0, dtype=torch.long)
        self._pool = ThreadPoolExecutor(tool_workers, thread_name_prefix="llmstack-tool")
        self.steps = self.prefilled = 0
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        # fixed-shape decode steps over batch buckets: CUDA graphs on a GPU (as the engine's static step)
        self.fixed = engine._use_static(self.device)
        self._graphs: dict[tuple[int, int, int], tuple[Any, ...]] = {}

    # ---- the outside: add, and how much there is --------------------------------------------------
    def add(self, req: Request, sink: RowSink) -> None:
        self._inbox.put((req, sink))

    @property
    def queued(self) -> int:
        return self._inbox.qsize() + len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.rows)

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting or not self._inbox.empty())

    @property
    def stalled(self) -> bool:
        """Every row waits for a tool and nothing else can run: a step now would do nothing."""
        return (
            bool(self.rows)
            and self._inbox.empty()
            and not self.waiting
            and all(s.tool is not None and not s.tool.done() for s in self.rows)
        )

    @property
    def cache_bytes(self) -> int:
        return sum(2 * t.numel() * t.element_size() for t in self.k)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- one step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """Admit, run one chunk of prefill and one decode step, retire finished rows. An error fails
        every row in the batch (their sinks get it) and leaves the batcher empty and usable."""
        try:
            self._take_inbox()
            self._admit()
            self._tool_results()
            self._prefill()
            self._decode()
            self._retire()
        except Exception as e:  # noqa: BLE001 - delivered to every row, then the batcher starts clean
            for seq in [*self.rows, *self.waiting]:
                seq.sink.end(e)
            self.rows, self.waiting = [], deque()
        if not self.rows and not self.fixed:  # fixed steps keep their slots: captured graphs point at them
            self.k, self.v, self.lens = [], [], torch.zeros(0, dtype=torch.long)
        self.steps += 1

    def _take_inbox(self) -> None:
        ctx = self.cfg.max_seq_len
        while not self._inbox.empty():
            req, sink = self._inbox.get()
            if len(req.prompt) >= ctx:
                sink.end(ValueError(f"a prompt has {len(req.prompt)} tokens; the model's context is {ctx}"))
                continue
            gen = torch.Generator().manual_seed(req.cfg.seed) if req.cfg.seed is not None else None
            max_new = min(req.cfg.max_new_tokens, ctx - len(req.prompt))
            self.waiting.append(_Seq(req, gen, max_new, sink=sink))

    def _admit(self) -> None:
        for seq in [s for s in self.waiting if s.req.cancelled]:
            self.waiting.remove(seq)
            seq.sink.end(None)
        while self.waiting and len(self.rows) < self.max_rows:
            seq = self.waiting.popleft()
            seq.slot = len(self.rows)
            self.rows.append(seq)
            self._ensure(len(self.rows), len(seq.req.prompt) + 1)
            self.lens[seq.slot] = 0
            prompt = seq.req.prompt
            blocks = self.prefix.match(prompt) if self.prefix is not None and seq.req.embeds is None else []
            for i, (kb, vb) in enumerate(blocks):
                a, b = i * self.prefix.block, (i + 1) * self.prefix.block  # type: ignore[union-attr]
                for layer in range(len(self.k)):
                    self.k[layer][seq.slot, :, a:b] = kb[layer]
                    self.v[layer][seq.slot, :, a:b] = vb[layer]
            seq.n_cached = len(blocks) * (self.prefix.block if self.prefix else 0)
            self.lens[seq.slot] = seq.n_cached
            seq.feed = list(prompt[seq.n_cached :])
            open_row(seq, self.engine.tools)

    def _ensure(self, rows: int, length: int) -> None:
        """Slots for ``rows`` rows of ``length`` tokens, growing by doubling (contents kept)."""
        have_rows = self.k[0].shape[0] if self.k else 0
        have_len = self.k[0].shape[2] if self.k else 0
        if rows <= have_rows and length <= have_len:
            return
        new_rows = max(have_rows, min(self.max_rows, _pow2(rows)), rows)
        new_len = max(have_len, min(self.cfg.max_seq_len, max(MIN_LENGTH, _pow2(length))))
        shape = (new_rows, self.cfg.n_kv_head, new_len, self.cfg.head_dim)
        if not self.k:
            self.model.fuse_for_decode()  # type: ignore[operator]  # current weights into the fused buffers
        self._graphs.clear()  # captured over the old tensors
        for store in (self.k, self.v):
            old = list(store)
            store.clear()
            for layer in range(self.cfg.n_layer):
                store.append(torch.zeros(shape, device=self.device, dtype=self.dtype))
                if old:
                    store[layer][:have_rows, :, :have_len] = old[layer]
        lens = torch.zeros(new_rows, dtype=torch.long, device=self.device)
        lens[: self.lens.shape[0]] = self.lens
        self.lens = lens

    def _emit(self, seq: _Seq, tok: int, forced: bool, logits_1V: torch.Tensor | None = None) -> bool:
        """Show ``tok`` to the row's sink and move its state; True when a tool call must run."""
        seq.n_new += 1
        ev = Event(0, tok, forced)
        if logits_1V is not None and seq.req.logprobs is not None:
            logp = logits_1V[0].float().log_softmax(dim=-1)
            ev.logprob = float(logp[tok])
            if seq.req.logprobs > 0:
                v, ix = logp.topk(seq.req.logprobs)
                ev.top = list(zip(ix.tolist(), v.tolist(), strict=True))
        run = advance_row(seq, tok, forced, self.engine.tools, self.engine.token_bytes)
        if not seq.done and seq.n_new >= seq.max_new:
            seq.done, seq.finish, run = True, "length", False
        ev.finish = seq.finish
        seq.sink.event(ev)
        return run

    def _sampled(self, seq: _Seq, logits_1V: torch.Tensor, greedy: int | None = None) -> None:
        self._after_sample(seq, seq.choose(logits_1V, greedy), logits_1V)

    def _after_sample(self, seq: _Seq, tok: int, logits_1V: torch.Tensor) -> None:
        if self._emit(seq, tok, False, logits_1V):
            tools = self.engine.tools
            assert tools is not None
            seq.tool = self._pool.submit(tools.result_tokens, list(seq.call_ids))
        if not seq.done:
            seq.pending = tok

    def _tool_results(self) -> None:
        for seq in self.rows:
            if seq.tool is None or not seq.tool.done() or seq.done:
                continue
            try:
                result = seq.tool.result()
            except Exception as e:  # noqa: BLE001 - a tool that raised is an error result, as a malformed call
                tools = self.engine.tools
                assert tools is not None
                result = [tools.result_start, *tools.encode(f"error: {e}"), tools.result_end]
            seq.tool = None
            assert seq.pending is not None
            fed = [seq.pending]
            for t in result:
                self._emit(seq, t, True)
                fed.append(t)
                if seq.done:
                    break
            seq.pending, seq.feed = None, fed

    def _prefill(self) -> None:
        budget = self.chunk
        for seq in self.rows:
            if budget <= 0:
                break
            if not seq.feed or seq.done or seq.req.cancelled:
                continue
            part = seq.feed[:budget]
            self._ensure(len(self.rows), seq.n_cached + len(part) + 1)
            s = seq.slot
            view = KVCache.over(self.cfg, [t[s : s + 1] for t in self.k], [t[s : s + 1] for t in self.v], seq.n_cached)
            view.fused = True
            embeds = seq.req.embeds  # a prompt given as embeddings: this chunk's rows of them
            kw = {} if embeds is None else {"embeds_BTC": embeds[seq.n_cached : seq.n_cached + len(part)][None]}
            logits = self.model(torch.tensor([part], device=self.device), view, last_only=True, **kw)[:, -1]
            seq.n_cached += len(part)
            self.lens[s] = seq.n_cached
            seq.feed = seq.feed[len(part) :]
            budget -= len(part)
            self.prefilled += len(part)
            if seq.feed:
                continue
            if self.prefix is not None and not seq.prompt_cached and seq.req.embeds is None:
                self.prefix.insert(seq.req.prompt, self.k, self.v, s)
                seq.prompt_cached = True
            self._sampled(seq, logits)

    def _decode(self) -> None:
        live = [s for s in self.rows if s.pending is not None and not s.done and not s.feed and s.tool is None]
        if not live:
            return
        m = 1 + max(s.slot for s in live)
        ids = torch.zeros(m, 1, dtype=torch.long)
        for s in live:
            ids[s.slot, 0] = s.pending  # type: ignore[assignment]
        longest = int(self.lens[:m].max()) + 1
        self._ensure(len(self.rows), longest)
        span = min(self.k[0].shape[2], max(MIN_LENGTH, -(-longest // MIN_LENGTH) * MIN_LENGTH))
        if self.fixed:
            logits = self._fixed_step(m, ids)
        else:
            pos = self.lens[:m].clone()
            k, v = [t[:m, :, :span] for t in self.k], [t[:m, :, :span] for t in self.v]
            view = KVCache.over(self.cfg, k, v, pos_B=pos)
            view.fused = True
            logits = self.model(ids.to(self.device), view)[:, -1]  # (m, V)
        want_greedy = any(s.req.cfg.temperature == 0 for s in live)
        greedy = logits.argmax(dim=-1).tolist() if want_greedy else None
        self.lens[torch.tensor([s.slot for s in live], device=self.device)] += 1
        drawn = self._draw(live, logits)
        for s in live:
            s.n_cached += 1
            s.pending = None
            tok = drawn.get(s.slot)
            if tok is None:
                tok = s.choose(logits[s.slot : s.slot + 1], greedy[s.slot] if greedy is not None else None)
            self._after_sample(s, tok, logits[s.slot : s.slot + 1])

    @staticmethod
    def _draw(live: list[_Seq], logits: torch.Tensor) -> dict[int, int]:
        """Tokens of the plainly sampled rows (no grammar, penalty or bias), slot -> id: rows with the same
        settings share one softmax over their logits, then draw with their own generators (what
        ``sample_next`` does row by row, at a fraction of the cost with many rows)."""
        groups: dict[SamplingConfig, list[_Seq]] = {}
        for s in live:
            cfg = s.req.cfg
            if cfg.temperature > 0 and not cfg.adjusts and s.constraint is None:
                groups.setdefault(replace(cfg, seed=None, max_new_tokens=1), []).append(s)
        out: dict[int, int] = {}
        for cfg, rows in groups.items():
            probs = sampling_probs(logits[[s.slot for s in rows]], cfg)
            for s, p in zip(rows, probs, strict=True):
                out[s.slot] = int(torch.multinomial(p, 1, generator=s.gen))
        return out

    def _fixed_step(self, m: int, ids: torch.Tensor) -> torch.Tensor:
        """The decode step over a fixed batch bucket (a power of two of slots) and the whole slot length:
        fixed shapes, so on CUDA it is captured once per bucket as a graph and replayed (the engine's
        static step). Rows in the bucket that are not decoding write a dummy key at their own position,
        overwritten before it is ever attended to."""
        B, L = min(self.k[0].shape[0], _pow2(m)), self.k[0].shape[2]
        key = (B, L, self.k[0].data_ptr())  # slots regrown: new tensors, a new graph
        entry = self._graphs.get(key)
        if entry is None:
            ids_buf = torch.zeros(B, 1, dtype=torch.long, device=self.device)
            pos_buf = torch.zeros(B, dtype=torch.long, device=self.device)
            view = KVCache.over(self.cfg, [t[:B] for t in self.k], [t[:B] for t in self.v], pos_B=pos_buf)
            view.fused = True
            entry = (ids_buf, pos_buf, view, None, None)
        ids_buf, pos_buf, view, graph, out = entry
        ids_buf.zero_()
        ids_buf[:m].copy_(ids)
        pos_buf.copy_(self.lens[:B])
        fn = self.engine._step_fn()
        if self.device.type != "cuda":
            self._graphs[key] = entry
            return fn(ids_buf, view)[:m]
        if graph is None:
            graph, out = capture_graph(fn, ids_buf, view, self.device)
            while len(self._graphs) >= MAX_GRAPHS:
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[key] = (ids_buf, pos_buf, view, graph, out)
        graph.replay()
        assert out is not None
        return out[:m]

    def _retire(self) -> None:
        for seq in self.rows:
            if seq.req.cancelled and not seq.done:
                seq.done, seq.finish = True, "cancelled"
        for seq in sorted((s for s in self.rows if s.done), key=lambda s: -s.slot):
            last = self.rows[-1]
            if last is not seq:  # the last slot moves into the freed one: running rows stay in front
                for t in (*self.k, *self.v):
                    t[seq.slot].copy_(t[last.slot])
                self.lens[seq.slot] = self.lens[last.slot]
                self.rows[seq.slot], last.slot = last, seq.slot
            self.rows.pop()
            seq.sink.end(None)
