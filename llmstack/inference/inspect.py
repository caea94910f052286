"""What a model computes inside, for one text: the data of the web UI's Inside tab (``POST /api/inspect``).

For token ids and a model (``llama.GPT``: ours and every imported Llama-family model; ``gpt2.GPT2``):

- the next-token distribution at each position: top-k, its entropy, and the surprise of the token that
  actually follows (-log2 p), which colours the text: where the model is confident, where it is lost;
- attention probabilities, softmax(q k^T / sqrt(d)) under the causal mask (and the sliding window), per
  layer and query head (GQA: ``kv_head`` says which key/value head each query head reads);
- a logit lens: every layer's residual stream through the final norm and the head, which shows at what
  depth the prediction forms (the last layer's row is the model's own output);
- across a run's checkpoints, the probability of each actual next token: what training taught, and when;
- for a mixture of experts, the experts each token is routed to in each layer, with their weights.

The residual stream is computed by walking the model's own layers (embedding, then each layer as the
model's forward calls it), not with hooks: a server decodes with the same module in another thread, and a
hook would fire there too. Attention probabilities are recomputed from each layer's input with the layer's
own norm, q/k projections and RoPE tables (SDPA returns none); ``tests/test_inspect.py`` checks that they
times V through ``o_proj`` give the layer's attention output, and equal transformers' eager weights.

What is not covered: batches (one text at a time), attention over padded or cached keys, attribution
methods (gradients, activation patching), finding and loading a run's checkpoints (``Checkpoints``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from llmstack.model.gpt2 import GPT2
from llmstack.model.llama import GPT, causal_mask
from llmstack.model.moe import MoE
from llmstack.model.rope import apply_rope

MAX_TOKENS = 256  # attention is L x H x T x T numbers: 256 tokens of a 30-layer, 9-head model are 18M
MAX_TOP_K = 20
MAX_CHECKPOINTS = 16  # spread over the run (first and last included): each is a model load and a forward
LN2 = math.log(2.0)

Model = GPT | GPT2
Checkpoints = Sequence[tuple[int, Callable[[], Model]]]
"""A run's checkpoints, oldest first: (step, a function that loads its model). The caller finds them (checkpoint
files are the training layer's, which this layer does not import); only those shown are loaded."""


class InspectError(ValueError):
    """A request this module refuses (too long, a top-k or a layer out of range); ``field``
    names the request field to change."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class TokenBytes(Protocol):
    """What is needed of a tokenizer (ours or an imported one): each token's bytes, to show it."""

    def decode_token_bytes(self, token_id: int) -> bytes: ...


# ----------------------------------------------------------------------------- the model's parts
def _final_norm(model: Model) -> nn.Module:
    return model.model.norm if isinstance(model, GPT) else model.transformer.ln_f


def kv_heads(model: Model) -> list[int]:
    """The key/value head each query head reads (GQA: ``H // KV`` query heads share one; GPT-2: its own)."""
    cfg = model.config
    return [h // (cfg.n_head // cfg.n_kv_head) for h in range(cfg.n_head)]


@torch.no_grad()
def residual_stream(model: Model, ids_T: torch.Tensor) -> list[torch.Tensor]:
    """L + 1 tensors (T, C): the input of each layer, then the last layer's output (before the final norm),
    computed as the model's forward computes them (same modules, same order, no cache)."""
    T = ids_T.shape[0]
    idx_1T = ids_T[None]
    if isinstance(model, GPT):
        x = model.model.embed_tokens(idx_1T)  # (1, T, C)
        cos, sin = model.rope_cos[:T], model.rope_sin[:T]
        stream = [x]
        for layer in model.model.layers:
            x = layer(x, cos, sin, None)
            stream.append(x)
    else:
        x = model.transformer.wte(idx_1T) + model.transformer.wpe(torch.arange(T, device=ids_T.device))
        stream = [x]
        for block in model.transformer.h:
            x = block(x, None)
            stream.append(x)
    return [s[0] for s in stream]


@torch.no_grad()
def attention_probs(model: Model, layer: int, x_TC: torch.Tensor) -> torch.Tensor:
    """(H, T, T) float32: layer ``layer``'s attention probabilities for its input ``x_TC`` (row: query,
    column: key; 0 where the causal mask or the sliding window hides a key)."""
    T = x_TC.shape[0]
    if isinstance(model, GPT):
        block = model.model.layers[layer]
        a = block.self_attn
        H, KV, D, window = a.n_head, a.n_kv_head, a.head_dim, a.window
        h_1TC = block.input_layernorm(x_TC[None])
        cos_T1D, sin_T1D = model.rope_cos[:T, None], model.rope_sin[:T, None]
        q_THD = apply_rope(a.q_proj(h_1TC)[0].view(T, H, D).float(), cos_T1D, sin_T1D)
        k_TKD = apply_rope(a.k_proj(h_1TC)[0].view(T, KV, D).float(), cos_T1D, sin_T1D)
        k_HTD = k_TKD.transpose(0, 1).repeat_interleave(H // KV, dim=0)
    else:
        gblock = model.transformer.h[layer]
        C, H, window = x_TC.shape[1], model.config.n_head, None
        D = C // H
        q, k, _ = gblock.attn.c_attn(gblock.ln_1(x_TC)).float().split(C, dim=-1)
        q_THD, k_HTD = q.view(T, H, D), k.view(T, H, D).transpose(0, 1)
    scores_HTT = q_THD.transpose(0, 1) @ k_HTD.transpose(1, 2) / math.sqrt(D)
    visible_TT = causal_mask(T, T, window, x_TC.device)
    return scores_HTT.masked_fill(~visible_TT, float("-inf")).softmax(dim=-1)


@torch.no_grad()
def lens_logits(model: Model, x_TC: torch.Tensor) -> torch.Tensor:
    """(T, vocab) float32: a residual stream read out as the model reads its last one (final norm, head)."""
    return model.lm_head(_final_norm(model)(x_TC)).float()


# ----------------------------------------------------------------------------- numbers for JSON
def rounded(t: torch.Tensor, decimals: int = 4) -> Any:
    """Nested lists of ``t`` rounded to ``decimals`` (in float64, so that 0.1234 prints as 0.1234)."""
    scale = 10.0**decimals
    return t.double().mul(scale).round().div(scale).tolist()


def significant(t: torch.Tensor, digits: int = 4) -> Any:
    """Nested lists of probabilities to ``digits`` significant digits: a small p keeps its size (3.1e-05, not
    0), which is what a log-scale plot of an early checkpoint needs."""
    t = t.double()
    scale = torch.pow(10.0, (digits - 1 - t.clamp(min=1e-300).log10().floor()).clamp(max=300))
    return t.mul(scale).round().div(scale).tolist()


def _top(logp_TV: torch.Tensor, k: int) -> tuple[list[list[list[Any]]], set[int]]:
    """Per position the k likeliest tokens as ``[id, p]``, and the ids named."""
    logp_Tk, ids_Tk = logp_TV.topk(k, dim=-1)
    ids, probs = ids_Tk.tolist(), significant(logp_Tk.exp())
    rows = [[[i, p] for i, p in zip(ri, rp, strict=True)] for ri, rp in zip(ids, probs, strict=True)]
    return rows, {i for r in ids for i in r}


def _next_logp(logp_TV: torch.Tensor, ids_T: torch.Tensor) -> torch.Tensor:
    """(T - 1,) log p of the token that actually follows each position (none after the last)."""
    return logp_TV[:-1].gather(1, ids_T[1:, None])[:, 0]


def token_text(tokenizer: TokenBytes, token_id: int) -> str:
    return tokenizer.decode_token_bytes(token_id).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- the panels
def next_token(logp_TV: torch.Tensor, ids_T: torch.Tensor, k: int) -> tuple[dict[str, Any], set[int]]:
    """Per position: top-k of the next-token distribution, its entropy in bits, and the surprise (-log2 p)
    of the actual next token (``None`` after the last token)."""
    top, named = _top(logp_TV, k)
    entropy_T = torch.special.entr(logp_TV.exp()).sum(dim=-1) / LN2
    surprise = rounded(-_next_logp(logp_TV, ids_T) / LN2, 3)
    return {"top": top, "entropy": rounded(entropy_T, 3), "surprise": [*surprise, None]}, named


def attention(model: Model, stream: list[torch.Tensor], layers: list[int]) -> dict[str, Any]:
    """The probabilities of ``layers``, each (H, T) rows of q + 1 weights over keys 0..q (the masked future
    is left out: half the numbers; with a window the keys before it are there as zeros)."""
    maps = []
    for layer in layers:
        probs = rounded(attention_probs(model, layer, stream[layer]))
        maps.append([[row[: q + 1] for q, row in enumerate(head)] for head in probs])
    window = getattr(model.config, "sliding_window", None)
    return {"layers": layers, "kv_head": kv_heads(model), "window": window, "maps": maps}


def logit_lens(
    model: Model, stream: list[torch.Tensor], ids_T: torch.Tensor, k: int
) -> tuple[dict[str, Any], set[int], torch.Tensor]:
    """Per layer (its output) and position: top-k tokens, and p of the actual next token. Layer by layer, so
    that only one (T, vocab) block exists at a time. Also returns the last layer's log-probs: the model's."""
    top, p_next, named = [], [], set()
    logp_TV = torch.empty(0)
    for x_TC in stream[1:]:
        logp_TV = lens_logits(model, x_TC).log_softmax(dim=-1)
        rows, ids = _top(logp_TV, k)
        top.append(rows)
        p_next.append(significant(_next_logp(logp_TV, ids_T).exp()))
        named |= ids
    return {"top": top, "p_next": p_next}, named, logp_TV


def _spread(items: list[Any], n: int) -> list[Any]:
    """At most ``n`` of ``items``, evenly spaced, the first and the last included."""
    if len(items) <= n:
        return items
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


@torch.no_grad()
def across_checkpoints(checkpoints: Checkpoints, ids_T: torch.Tensor) -> dict[str, Any]:
    """For each checkpoint (at most ``MAX_CHECKPOINTS``, spread over the run): p of each actual next token,
    and their mean surprise in bits. One model at a time is loaded onto the ids' device, used and dropped;
    one that does not load (ValueError, TypeError) is listed under ``skipped`` with the reason."""
    steps, p_next, mean_surprise, skipped = [], [], [], []
    for step, load in _spread(list(checkpoints), MAX_CHECKPOINTS):
        try:
            model = load()
        except (ValueError, TypeError) as e:
            skipped.append(f"step {step}: {e}")
            continue
        logits_TV = model.to(ids_T.device).eval()(ids_T[None])[0]
        logp_T = _next_logp(logits_TV.float().log_softmax(dim=-1), ids_T)
        steps.append(step)
        p_next.append(significant(logp_T.exp()))
        mean_surprise.append(round(float(-logp_T.mean() / LN2), 3) if len(logp_T) else None)
    return {"steps": steps, "p_next": p_next, "mean_surprise": mean_surprise, "skipped": skipped}


def check_request(model: Model, ids: list[int], top_k: int, layers: list[int] | None) -> list[int]:
    """The layers to return attention for (all when ``layers`` is None); ``InspectError`` naming the field
    for a text too long or empty, a top-k out of range, or a layer the model does not have."""
    n_layer, context = model.config.n_layer, model.config.max_seq_len
    if not ids:
        raise InspectError("text: no tokens to inspect", "text")
    if len(ids) > min(MAX_TOKENS, context):
        raise InspectError(f"text: {len(ids)} tokens; at most {min(MAX_TOKENS, context)} are inspected", "text")
    if not 1 <= top_k <= MAX_TOP_K:
        raise InspectError(f"top_k: {top_k} is not in 1..{MAX_TOP_K}", "top_k")
    wanted = list(range(n_layer)) if layers is None else layers
    bad = [i for i in wanted if not 0 <= i < n_layer]
    if bad:
        raise InspectError(f"layers: the model has layers 0..{n_layer - 1}, not {bad[0]}", "layers")
    return sorted(set(wanted))


def inspect_text(
    model: Model,
    ids: list[int],
    tokenizer: TokenBytes,
    top_k: int = 5,
    layers: list[int] | None = None,
    checkpoints: Checkpoints | None = None,
) -> dict[str, Any]:
    """Everything the Inside tab shows for token ids ``ids``, as compact JSON (``T`` tokens, ``L`` layers,
    ``H`` query heads, ``k = top_k``; a token in a top-k is ``[id, p]``, its text in ``texts``)::

        {"tokens": [{"id": 1, "text": "<|bos|>"}, ...],          # T
         "texts": {"17": " model", ...},                           # every id named below
         "layers": L, "heads": H,
         "next": {"top": T x k [id, p],                            # the distribution of the token after t
                  "entropy": T bits, "surprise": T bits (-log2 p of token t + 1; null at the last)},
         "attention": {"layers": [l, ...], "kv_head": H ints, "window": null | int,
                       "maps": per layer in "layers", H x T rows, row q: q + 1 weights over keys 0..q},
         "lens": {"top": L x T x k [id, p], "p_next": L x (T - 1)},   # row l: the output of layer l
         "checkpoints": null | {"steps": [...], "p_next": n x (T - 1), "mean_surprise": n, "skipped": [...]},
         "experts": null | {"n": E, "active": k, "routes": L x T x k [expert, weight], "load": L x E}}

    Attention weights are rounded to 4 decimals, probabilities to 4 significant digits, bits to 3
    decimals. ``layers`` picks the layers whose attention is returned (None: all); ``checkpoints`` adds
    a row per checkpoint. Limits (``check_request``): ``MAX_TOKENS`` tokens, top-k up to ``MAX_TOP_K``."""
    wanted = check_request(model, ids, top_k, layers)
    device = next(model.parameters()).device
    ids_T = torch.tensor(ids, dtype=torch.long, device=device)
    stream = residual_stream(model, ids_T)
    lens, named_lens, logp_TV = logit_lens(model, stream, ids_T, top_k)
    nxt, named_next = next_token(logp_TV, ids_T, top_k)
    named = named_lens | named_next | set(ids)
    return {
        "tokens": [{"id": i, "text": token_text(tokenizer, i)} for i in ids],
        "texts": {str(i): token_text(tokenizer, i) for i in sorted(named)},
        "layers": model.config.n_layer,
        "heads": model.config.n_head,
        "next": nxt,
        "attention": attention(model, stream, wanted),
        "lens": lens,
        "checkpoints": across_checkpoints(checkpoints, ids_T) if checkpoints is not None else None,
        "experts": routing(model, stream),
    }


@torch.no_grad()
def routing(model: Model, stream: list[torch.Tensor]) -> dict[str, Any] | None:
    """A mixture of experts' choices: per layer and token, the chosen experts and their weights (as its
    forward weighs them), and each expert's share of the layer's routed slots; None for a dense model. The
    router's input is recomputed from the layer's input: attention added, then the second norm."""
    if not isinstance(model, GPT) or model.config.moe is None:
        return None
    moe = model.config.moe
    T = stream[0].shape[0]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    routes, load = [], []
    for layer, x_TC in zip(model.model.layers, stream, strict=False):
        h_1TC = x_TC[None] + layer.self_attn(layer.input_layernorm(x_TC[None]), cos, sin, None)
        assert isinstance(layer.mlp, MoE)
        probs_TE = layer.mlp.gate(layer.post_attention_layernorm(h_1TC))[0].float().softmax(-1)
        weight_TK, expert_TK = probs_TE.topk(moe.n_active, dim=-1)
        if moe.norm_topk:
            weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True)
        weights = rounded(weight_TK)
        routes.append([list(zip(e, w, strict=True)) for e, w in zip(expert_TK.tolist(), weights, strict=True)])
        counts = torch.bincount(expert_TK.flatten(), minlength=moe.n_experts).double() / expert_TK.numel()
        load.append(rounded(counts))
    return {"n": moe.n_experts, "active": moe.n_active, "routes": routes, "load": load}
