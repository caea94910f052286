"""Log-likelihood of text continuations, batched: what multiple-choice scoring and bits per byte need.

A request is a (context, continuation) pair of strings. It is tokenized the way lm-evaluation-harness
does for causal models, so that scores agree with it on the same requests: trailing whitespace of the
context moves to the continuation, the pair is encoded whole, and the continuation is what follows
the context's own tokens; a context too long for the model loses its oldest tokens.

Requests with the same context (the choices of one question) share it: the contexts of a batch run
once, left-padded, into a KV cache whose rows are then repeated for every continuation, and the
continuations run on top, right-padded (causal attention never looks at the padding after a row's
end). A multiple-choice question thus costs its context once plus its choices, not the context once
per choice. Batches hold at most ``max_batch_tokens`` padded tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmstack.interop.bundle import Bundle
from llmstack.model.llama import KVCache


@dataclass(frozen=True)
class Scored:
    logprob: float  # sum over the continuation's tokens, in nats
    greedy: bool  # every continuation token is the argmax given what precedes it
    n_tokens: int


class LoglikScorer:
    """``bos``: prepended to every sequence (our models saw ``<|bos|>`` before every document);
    ``prefix``: the token that stands for an empty context (lm-eval's ``prefix_token_id``)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        bos: int | None,
        prefix: int,
        max_batch_tokens: int = 2048,
    ) -> None:
        self.model, self.tok, self.bos, self.prefix = model, tokenizer, bos, prefix
        self.max_len: int = model.config.max_seq_len  # type: ignore[union-attr,assignment]
        self.max_batch_tokens = max_batch_tokens

    @classmethod
    def for_bundle(cls, bundle: Bundle, max_batch_tokens: int = 2048) -> LoglikScorer:
        tok = bundle.tokenizer
        bos_id = tok.special_tokens.get(bundle.bos_token) if bundle.bos_token else None
        adds = bool(bundle.add_bos) and bos_id is not None  # as the model's files say (ours: yes; SmolLM2: no)
        specials = tok.special_tokens
        fallback = [specials.get("<|endoftext|>"), getattr(tok, "eos_id", None), tok.bos_id]
        prefix = next((i for i in fallback if i is not None), None)
        if prefix is None:
            raise ValueError("the tokenizer has no bos, eos or <|endoftext|> token to start a text with")
        return cls(bundle.model, tok, bos_id if adds else None, prefix, max_batch_tokens)

    # ------------------------------------------------------------------------------------- tokens
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        start = [self.bos] if self.bos is not None else []
        if not context:
            return start or [self.prefix], self.tok.encode_ordinary(continuation)
        whole = self.tok.encode_ordinary(context + continuation)
        ctx = self.tok.encode_ordinary(context)
        return start + ctx, whole[len(ctx) :]

    def fits(self, continuation_ids: Sequence[int]) -> bool:
        return 0 < len(continuation_ids) <= self.max_len

    # ------------------------------------------------------------------------------------- scoring
    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[Scored]:
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in pairs])

    @torch.no_grad()
    def loglikelihood_tokens(self, requests: Sequence[tuple[list[int], list[int]]]) -> list[Scored]:
        """Score token-level requests (context ids, continuation ids), in order."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, cont) in enumerate(requests):
            if not self.fits(cont):
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit a context of {self.max_len}")
            if not ctx:
                raise ValueError("a request needs at least one context token")
            groups.setdefault(tuple(ctx), []).append(i)
        # a context too long for its longest continuation loses its oldest tokens (lm-eval cuts each
        # choice's row on its own: the same unless a question's choices differ in length and overflow)
        cut = []
        for key, members in groups.items():
            longest = max(len(requests[m][1]) for m in members)
            cut.append((list(key[-(self.max_len + 1 - longest) :]), longest, members))
        cut.sort(key=lambda g: -len(g[0]))  # longest context first, so that a batch's contexts pad little
        out: list[Scored | None] = [None] * len(requests)
        i = 0
        while i < len(cut):
            j, width, rows, cont_w = i, 0, 0, 0
            while j < len(cut):  # grow the batch while it fits the model and the token budget
                ctx, longest, members = cut[j]
                w, c = max(width, len(ctx)), max(cont_w, longest)
                too_big = (j - i + 1) * w + (rows + len(members)) * c > self.max_batch_tokens
                if j > i and (w + c - 1 > self.max_len or too_big):
                    break
                width, rows, cont_w, j = w, rows + len(members), c, j + 1
            batch = [(ctx, [requests[m][1] for m in members]) for ctx, _, members in cut[i:j]]
            for (_, _, members), scored in zip(cut[i:j], self._shared(batch), strict=True):
                for m, sc in zip(members, scored, strict=True):
                    out[m] = sc
            i = j
        return [s for s in out if s is not None]

    def _shared(self, batch: list[tuple[list[int], list[list[int]]]]) -> list[list[Scored]]:
        """Contexts once into a KV cache, its rows repeated per continuation, continuations on top."""
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        self.model.eval()
        W = max(len(c) for _, conts in batch for c in conts)  # continuation tokens; W - 1 are inputs
        ctxs = [ctx for ctx, _ in batch]
        C = max(len(c) for c in ctxs)
        G, R = len(batch), sum(len(conts) for _, conts in batch)
        cfg = self.model.config  # type: ignore[union-attr]
        cache = KVCache(cfg, G, C + W - 1, device, dtype)  # type: ignore[arg-type]
        ctx_GC = torch.zeros(G, C, dtype=torch.long)
        if any(len(c) < C for c in ctxs):
            cache.key_valid = torch.ones(G, cache.max_len, dtype=torch.bool, device=device)
        for g, ctx in enumerate(ctxs):  # left-pad: every context ends at position C - 1
            ctx_GC[g, C - len(ctx) :] = torch.tensor(ctx)
            if len(ctx) < C:
                assert cache.key_valid is not None
                cache.key_valid[g, : C - len(ctx)] = False
        first_GV = self.model(ctx_GC.to(device), cache)[:, -1].float().log_softmax(dim=-1)
        owner = torch.tensor([g for g, (_, conts) in enumerate(batch) for _ in conts], device=device)
        conts = [c for _, cs in batch for c in cs]
        first = torch.tensor([c[0] for c in conts], device=device)
        lp_R = first_GV[owner].gather(1, first.view(-1, 1)).squeeze(1)  # (R,)
        greedy_R = first_GV[owner].argmax(dim=-1) == first
        if W > 1:
            rep = KVCache(cfg, R, cache.max_len, device, dtype)  # type: ignore[arg-type]
            for layer in range(len(cache.k)):
                rep.k[layer].copy_(cache.k[layer].index_select(0, owner))
                rep.v[layer].copy_(cache.v[layer].index_select(0, owner))
            rep.pos = cache.pos
            if cache.key_valid is not None:
                rep.key_valid = cache.key_valid.index_select(0, owner)
            inp_RW = torch.zeros(R, W - 1, dtype=torch.long)
            tgt_RW = torch.zeros(R, W - 1, dtype=torch.long)
            for r, c in enumerate(conts):
                inp_RW[r, : len(c) - 1] = torch.tensor(c[:-1])
                tgt_RW[r, : len(c) - 1] = torch.tensor(c[1:])
            tgt_RW = tgt_RW.to(device)
            logp_RWV = self.model(inp_RW.to(device), rep).float().log_softmax(dim=-1)
            valid_RW = (
                torch.arange(W - 1, device=device)[None]
                < torch.tensor([len(c) - 1 for c in conts], device=device)[:, None]
            )
            chosen_RW = logp_RWV.gather(2, tgt_RW.unsqueeze(-1)).squeeze(-1)
            lp_R = lp_R + (chosen_RW * valid_RW).sum(dim=1)
            greedy_R = greedy_R & ((logp_RWV.argmax(dim=-1) == tgt_RW) | ~valid_RW).all(dim=1)
        scored = [
            Scored(float(lp), bool(gr), len(c))
            for lp, gr, c in zip(lp_R.tolist(), greedy_R.tolist(), conts, strict=True)
        ]
        out, k = [], 0
        for _, cs in batch:
            out.append(scored[k : k + len(cs)])
            k += len(cs)
        return out

    def rolling(self, texts: Sequence[str]) -> list[Scored]:
        """Log-likelihood of each whole text after ``prefix``: windows of the model's context, each
        target predicted once with as much context as fits (lm-eval's ``loglikelihood_rolling``)."""
        windows: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for t, text in enumerate(texts):
            start = [self.bos] if self.bos is not None else [self.prefix]
            full = start + self.tok.encode_ordinary(text)
            n, L = len(full) - 1, self.max_len  # targets are full[1:]
            done = 0
            while done < n:
                end = min(done + L, n)  # targets full[done + 1 : end + 1], inputs full[end - L or 0 : end]
                lo = max(0, end - L)
                windows.append((full[lo : done + 1], full[done + 1 : end + 1]))
                owner.append(t)
                done = end
        scored = self.loglikelihood_tokens(windows)
        total = [0.0] * len(texts)
        tokens = [0] * len(texts)
        greedy = [True] * len(texts)
        for t, s in zip(owner, scored, strict=True):
            total[t] += s.logprob
            tokens[t] += s.n_tokens
            greedy[t] = greedy[t] and s.greedy
        return [Scored(total[t], greedy[t], tokens[t]) for t in range(len(texts))]
