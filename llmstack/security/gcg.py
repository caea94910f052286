"""A universal adversarial suffix by greedy coordinate gradient (GCG, Zou et al. 2023), and its transfer.

On a white-box model (ours, or an import such as SmolLM2: both are ``model.llama.GPT``) find one suffix
of ``length`` tokens that, appended to every training request, makes the model most likely to begin
its answer with that request's target ("Sure, here is ..."). The loss is the target's negative
log-likelihood in nats per token, averaged over the training requests. Each step:

1. the gradient of the loss with respect to the one-hot suffix tokens, (length, vocab): the model
   takes ids only, so it is the gradient with respect to the suffix *embeddings* times the embedding
   matrix transposed (e = onehot @ W, so dL/d onehot = dL/de @ W^T);
2. per position the ``topk`` tokens with the most negative gradient (allowed tokens only);
3. ``batch`` random single-token swaps drawn from those (all of them when the batch covers every
   position x top-k pair), each evaluated exactly by a forward pass over every training request
   (the prompt up to the request is a KV cache computed once, copied for the batch);
4. the best candidate becomes the suffix (even if worse: GCG's greedy step); the best ever is kept.

Candidate tokens are restricted to non-special tokens whose text is printable ASCII and that
re-encode to themselves, and a candidate suffix must re-tokenize to the same ids after every
training request: so the suffix can be stored and used as a *string*, which is what transfer needs.
Transfer: the string is appended to held-out requests (``attacks.gcg``) for any target of
``llmstack redteam --gcg-suffix``, including another model and endpoints.

Out of scope: the multi-model ensemble and the progressive addition of requests of the paper,
candidate filtering by perplexity, and suffixes placed anywhere but at the end of the user message.

    llmstack gcg --model smollm2 --out runs/gcg/suffix.json --max-seconds 300
    llmstack redteam --model runs/tiny/sft --families jailbreak:heldout,jailbreak:gcg --gcg-suffix runs/gcg/suffix.json
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from llmstack.chat.answer import ChatModel
from llmstack.interop.bundle import Bundle
from llmstack.io import pyplot, read_json, save_png, write_json
from llmstack.model.llama import GPT, KVCache
from llmstack.security.attacks import load

FORMAT = "llmstack-gcg-suffix/1"


@dataclass(frozen=True)
class GCGConfig:
    length: int = 12  # suffix tokens
    steps: int = 100
    topk: int = 64  # candidate tokens per position, by gradient
    batch: int = 64  # single-swap candidates evaluated per step
    init: str = " !"  # one token, repeated ``length`` times
    seed: int = 0
    max_seconds: float | None = None  # stop after this long (checked between steps)
    eval_batch: int = 64  # candidates per forward pass (memory)

    def check(self) -> None:
        for name in ("length", "topk", "batch", "eval_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"gcg: {name} must be at least 1 (got {getattr(self, name)})")
        if self.steps < 0:
            raise ValueError(f"gcg: steps must be >= 0 (got {self.steps})")


@dataclass
class Example:
    """One training request rendered for the model: ``before`` + suffix + ``after`` + ``target``."""

    before: list[int]  # the prompt up to and including the request text
    after: list[int]  # end of the user turn up to the start of the answer
    target: list[int]


@dataclass
class GCGResult:
    suffix: str
    ids: list[int]
    loss_start: float
    loss: float  # of the best suffix
    history: list[float] = field(default_factory=list)  # loss of the current suffix after each step (0: start)
    best_history: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


# ----------------------------------------------------------------------------- rendering
def chat_ids(bundle: Bundle, user: str) -> list[int]:
    """The prompt ids for one user message, as ``llmstack redteam`` renders it for this model."""
    return ChatModel(bundle).prompt([{"role": "user", "content": user}])


def check_text(bundle: Bundle, text: str, what: str) -> None:
    """Special-token names in a request, target or suffix would be prose to the tokenizer: say so."""
    for name in bundle.tokenizer.special_tokens:
        if name in text:
            raise ValueError(f"gcg: {what} contains the special token {name!r}")


def examples(bundle: Bundle, pairs: Sequence[tuple[str, str]], probe: list[int]) -> list[Example]:
    """Split each rendered prompt around the suffix slot: found by rendering with the ``probe`` suffix."""
    tok = bundle.tokenizer
    if not pairs:
        raise ValueError("gcg: no training requests")
    text = tok.decode(probe)
    out = []
    for i, (request, target) in enumerate(pairs):
        check_text(bundle, request, f"request {i}")
        check_text(bundle, target, f"target {i}")
        if not request.strip() or not target.strip():
            raise ValueError(f"gcg: request {i} or its target is empty")
        a, b = chat_ids(bundle, request), chat_ids(bundle, request + text)
        n = len(probe)
        at = next(
            (p for p in range(len(a), -1, -1) if b[:p] == a[:p] and b[p : p + n] == probe and b[p + n :] == a[p:]),
            None,
        )
        if at is None:
            raise ValueError(f"gcg: the suffix {text!r} does not tokenize to its own ids after request {i}")
        out.append(Example(a[:at], a[at:], tok.encode_ordinary(target)))
    return out


def allowed_tokens(tok: Any, vocab: int) -> torch.Tensor:
    """(vocab,) bool: not special, printable ASCII (not only spaces), and encodes back to itself."""
    ok = torch.zeros(vocab, dtype=torch.bool)
    for i in range(min(vocab, tok.vocab_size)):
        if tok.is_special(i):
            continue
        try:
            text = tok.decode_token_bytes(i).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            continue
        if text.strip() and all(32 <= ord(c) < 127 for c in text) and tok.encode_ordinary(text) == [i]:
            ok[i] = True
    return ok


def stable(tok: Any, requests: Sequence[str], ids: list[int]) -> bool:
    """The suffix re-tokenizes to ``ids`` after every request (so it can travel as a string)."""
    text = tok.decode(ids)
    return all(tok.encode_ordinary(r + text) == tok.encode_ordinary(r) + ids for r in requests)


# ----------------------------------------------------------------------------- loss and gradient
class Objective:
    """The target NLL of suffix candidates over the training examples, with each prompt prefix cached."""

    def __init__(self, model: GPT, exs: Sequence[Example]) -> None:
        self.model, self.exs = model, list(exs)
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.prefix: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        with torch.no_grad():
            for ex in self.exs:
                cache = KVCache(model.config, 1, len(ex.before), self.device, self.dtype)
                model(torch.tensor([ex.before], device=self.device), cache)
                self.prefix.append((cache.k, cache.v))

    def _cache(self, i: int, batch: int, length: int) -> KVCache:
        k, v = self.prefix[i]
        P = k[0].shape[2]
        cache = KVCache(self.model.config, batch, P + length, self.device, self.dtype)
        for layer in range(len(k)):
            cache.k[layer][:, :, :P] = k[layer]
            cache.v[layer][:, :, :P] = v[layer]
        cache.advance(P)
        return cache

    def _nll(self, i: int, suffix_BN: torch.Tensor) -> torch.Tensor:
        """(B,) mean target NLL of example ``i`` after each suffix row."""
        ex = self.exs[i]
        B, n = suffix_BN.shape
        rest = torch.tensor(ex.after + ex.target, device=self.device).expand(B, -1)
        x_BL = torch.cat([suffix_BN, rest], dim=1)
        logits = self.model(x_BL, self._cache(i, B, x_BL.shape[1]))  # (B, L, V)
        t = len(ex.target)
        start = n + len(ex.after) - 1  # the position whose next token is target[0]
        pred = logits[:, start : start + t].float()  # (B, t, V)
        want = torch.tensor(ex.target, device=self.device).expand(B, -1)
        return F.cross_entropy(pred.transpose(1, 2), want, reduction="none").mean(dim=1)

    @torch.no_grad()
    def losses(self, cands_BN: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """(B,) loss of each candidate suffix: mean over examples of the per-token target NLL."""
        out = torch.zeros(cands_BN.shape[0], device=self.device)
        for s in range(0, cands_BN.shape[0], chunk):
            rows = cands_BN[s : s + chunk].to(self.device)
            out[s : s + chunk] = sum(self._nll(i, rows) for i in range(len(self.exs))) / len(self.exs)
        return out.cpu()

    def gradient(self, ids: list[int]) -> tuple[torch.Tensor, float]:
        """(length, vocab) gradient of the loss w.r.t. the one-hot suffix, and the loss itself."""
        W = self.model.model.embed_tokens.weight  # (V, C)
        grad_NC = torch.zeros(len(ids), W.shape[1], device=self.device)
        total = 0.0
        x = torch.tensor([ids], device=self.device)
        for i in range(len(self.exs)):
            with _capture_embeddings(self.model) as emb:
                loss = self._nll(i, x)[0] / len(self.exs)
            (g,) = torch.autograd.grad(loss, emb[0])  # (1, L, C)
            grad_NC += g[0, : len(ids)].float()
            total += loss.item()
        return (grad_NC @ W.detach().float().T).cpu(), total


@contextmanager
def _capture_embeddings(model: GPT) -> Iterator[list[torch.Tensor]]:
    """The token embeddings of the next forward, as a leaf that requires grad (weights stay out of it)."""
    got: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
        leaf = out.detach().requires_grad_(True)
        got.append(leaf)
        return leaf

    handle = model.model.embed_tokens.register_forward_hook(hook)
    try:
        yield got
    finally:
        handle.remove()


def candidates(
    ids: list[int], grad_NV: torch.Tensor, allowed: torch.Tensor, topk: int, batch: int, gen: torch.Generator
) -> torch.Tensor:
    """(B, n) single-token swaps of ``ids`` among each position's top-k (most negative gradient) allowed
    tokens: every position x top-k pair when ``batch`` covers them, else ``batch`` random ones; no-ops
    and duplicates dropped."""
    n = len(ids)
    k = min(topk, int(allowed.sum()))
    if k == 0:
        raise ValueError("gcg: no allowed candidate tokens in this vocabulary")
    scores = (-grad_NV).masked_fill(~allowed[: grad_NV.shape[1]], float("-inf"))
    top_NK = scores.topk(k, dim=1).indices
    if batch >= n * k:
        pos = torch.arange(n).repeat_interleave(k)
        new = top_NK.reshape(-1)
    else:
        pos = torch.randint(n, (batch,), generator=gen)
        new = top_NK[pos, torch.randint(k, (batch,), generator=gen)]
    base = torch.tensor(ids)
    cands = base.expand(len(pos), n).clone()
    cands[torch.arange(len(pos)), pos] = new
    cands = cands[(cands != base).any(dim=1)]
    return torch.unique(cands, dim=0)  # sorted: the same order on every run


# ----------------------------------------------------------------------------- the search
def search(
    bundle: Bundle,
    pairs: Sequence[tuple[str, str]],
    cfg: GCGConfig = GCGConfig(),
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> GCGResult:
    """Find one suffix for all ``pairs`` (request, target) on ``bundle``'s model (ours or a Llama import)."""
    cfg.check()
    model, tok = bundle.model, bundle.tokenizer
    if not isinstance(model, GPT):
        raise ValueError("gcg: needs a Llama-architecture model (our GPT class); GPT-2 imports are not supported")
    if not pairs:
        raise ValueError("gcg: no training requests")
    check_text(bundle, cfg.init, "the initial suffix")
    init = tok.encode_ordinary(cfg.init)
    allowed = allowed_tokens(tok, model.config.vocab_size)
    if len(init) != 1 or not allowed[init[0]]:
        raise ValueError(f"gcg: the initial suffix token {cfg.init!r} must be one allowed token (got ids {init})")
    ids = init * cfg.length
    requests = [r for r, _ in pairs]
    if not stable(tok, requests, ids):
        raise ValueError(f"gcg: {tok.decode(ids)!r} does not re-tokenize to itself after the requests; pick --init")
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)  # the candidate draws; the global RNGs stay untouched
    try:
        obj = Objective(model, examples(bundle, pairs, ids))
        loss = float(obj.losses(torch.tensor([ids]))[0])
        result = GCGResult(tok.decode(ids), list(ids), loss, loss, [loss], [loss])
        bar = tqdm(range(cfg.steps), desc="gcg", unit="step", disable=not progress)
        for step in bar:
            if cfg.max_seconds is not None and time.perf_counter() - t0 > cfg.max_seconds:
                break
            grad, _ = obj.gradient(ids)
            cands = candidates(ids, grad, allowed, cfg.topk, cfg.batch, gen)
            keep = torch.tensor([stable(tok, requests, c.tolist()) for c in cands], dtype=torch.bool)
            cands = cands[keep] if len(cands) else cands
            if not len(cands):
                if log:
                    log(f"gcg: step {step}: no stable candidate; stopping")
                break
            scores = obj.losses(cands, cfg.eval_batch)
            j = int(scores.argmin())
            ids, loss = cands[j].tolist(), float(scores[j])
            if loss < result.loss:
                result.ids, result.loss, result.suffix = list(ids), loss, tok.decode(ids)
            result.history.append(loss)
            result.best_history.append(result.loss)
            result.steps = step + 1
            bar.set_postfix(loss=f"{loss:.3f}", best=f"{result.loss:.3f}")
        bar.close()
    finally:
        model.train(was_training)
    result.seconds = time.perf_counter() - t0
    return result


# ----------------------------------------------------------------------------- the asks, and the suffix file
def split(n: int, n_train: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Train / held-out indices of ``n`` asks: a seeded shuffle, both sorted."""
    if not 0 < n_train < n:
        raise ValueError(f"gcg: --train must be between 1 and {n - 1} of the {n} asks (got {n_train})")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[:n_train]), sorted(order[n_train:])


def save_suffix(path: str | Path, result: GCGResult, meta: dict[str, Any]) -> None:
    write_json(path, {"format": FORMAT, **meta, **asdict(result)})


def load_suffix(path: str | Path) -> dict[str, Any]:
    """A suffix file from ``llmstack gcg``, checked: a non-empty suffix and held-out ask indices."""
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a GCG suffix file (format {FORMAT!r}); write one with `llmstack gcg`")
    n = len(load("jailbreaks")["asks"])
    suffix, held = data.get("suffix"), data.get("held_out")
    if not isinstance(suffix, str) or not suffix.strip():
        raise ValueError(f"{path}: the suffix is empty")
    if not isinstance(held, list) or not held or not all(isinstance(i, int) and 0 <= i < n for i in held):
        raise ValueError(f"{path}: held_out must be a non-empty list of ask indices in [0, {n})")
    return data


def plot(result: GCGResult, title: str, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(result.history, label="current suffix", lw=1)
    ax.plot(result.best_history, label="best so far", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("target NLL (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
