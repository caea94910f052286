"""A decoder-only Transformer whose modules and weight names equal Hugging Face ``LlamaForCausalLM``.

RoPE (rotate-half layout, as HF; scaled as ``model/rope.py`` describes), RMSNorm, SwiGLU MLP,
grouped-query attention, tied or untied embeddings. ``GPT.state_dict()`` keys are HF's keys, so a Llama
checkpoint loads with ``load_state_dict`` and ours saves as one. The same class runs the Qwen2 and
Mistral families (``ModelConfig.family``), whose weight names are Llama's: Qwen2's q/k/v biases
(``attention_bias``; HF's ``q_proj.bias`` etc.) and a sliding window (``sliding_window``: a token attends
to the latest ``sliding_window`` keys, itself included, as transformers' mask). The window is a mask
over a cache that keeps every position (no rolling buffer); where no query can see past it, attention
takes the same unmasked / ``is_causal`` paths as a model without one. With ``ModelConfig.moe`` every
layer's MLP is a mixture of experts (``model/moe.py``: the Mixtral and Qwen2-MoE families).

Attention is ``scaled_dot_product_attention``. (Running q/k/v, and gate/up, as one matmul over
concatenated weights was measured slower on CPU: the concatenation and its backward cost more than
the larger matmul saves. bench/RESULTS.md has the figures.)

``forward(idx, targets=y)`` returns the mean next-token cross-entropy instead of the logits, computed
by ``linear_cross_entropy`` over chunks of rows: the (B*T, vocab) logits of the whole batch (fp32 for
the loss: 8.6 GB at B=32, T=2048, vocab 32768) never exist at once, and their gradient is computed
chunk by chunk in the forward, so the backward keeps nothing of that size either. It lives here, not
in training, because only the head can skip materialising the logits (and so that a compiled or
DDP-wrapped model runs it inside its own forward).

What is not here: optimizers, distribution, compilation, tokenization; they are applied to this model
from outside (``llmstack.training``). A ``KVCache`` serves generation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmstack.model.config import ModelConfig
from llmstack.model.moe import MoE
from llmstack.model.rope import apply_rope, rope_tables


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF computes the norm in float32 and casts back before the weight; so do we (parity under bf16).
        dtype = x.dtype
        x = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(dtype)
        return self.weight * x


def causal_mask(T: int, S: int, window: int | None, device: torch.device) -> torch.Tensor:
    """(T, S) bool for the last T of S positions: each query sees keys up to itself, and with ``window``
    only the latest ``window`` of them (transformers' sliding window: key > query - window)."""
    q_T1 = torch.arange(S - T, S, device=device)[:, None]
    k_S = torch.arange(S, device=device)
    mask = k_S <= q_T1
    if window is not None:
        mask &= k_S > q_T1 - window
    return mask


class KVCache:
    """Pre-allocated keys/values for every layer: (B, n_kv_head, max_len, head_dim) each.

    All rows share one position counter ``pos``. Prompts of different lengths are left-padded by
    the caller, who marks the padding in ``key_valid`` (B, max_len): attention then skips those keys.
    RoPE scores depend only on position differences, so a row's left padding does not change its
    result. ``advance`` is called once per forward, after all layers wrote.
    """

    _rows: torch.Tensor  # per-row mode: 0..B-1, the rows the new keys go to
    _slots: torch.Tensor  # static mode: 0..max_len-1

    def __init__(
        self, cfg: ModelConfig, batch_size: int, max_len: int, device: torch.device | str, dtype: torch.dtype
    ) -> None:
        if max_len > cfg.max_seq_len:
            raise ValueError(f"KV cache length {max_len} exceeds the model's context of {cfg.max_seq_len}")
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.max_len = max_len
        self.pos = 0
        self.key_valid: torch.Tensor | None = None  # (B, max_len) bool; None: every key is valid
        self.pos_t: torch.Tensor | None = None  # static mode: the position as a device tensor
        self.fused = False  # the model's fused projections are current (``GPT.fuse_for_decode``): use them
        self.window: int | None = getattr(cfg, "sliding_window", None)  # GPT2 shares this cache and has none
        self._static = False
        self.per_row = False  # static mode with a position per row (``over``): continuous batching

    @classmethod
    def over(
        cls,
        cfg: ModelConfig,
        k: list[torch.Tensor],
        v: list[torch.Tensor],
        pos: int = 0,
        pos_B: torch.Tensor | None = None,
    ) -> KVCache:
        """A cache over tensors someone else owns (views into a batcher's slots; writes land there).
        With ``pos_B`` (B,) it is in static mode with one position per row: each row's new key is written
        at its own position and sees keys up to it (rows of different lengths, no padding); the caller
        advances ``pos_B``. Without it, an ordinary cache whose next position is ``pos``."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.max_len, cache.pos = k, v, k[0].shape[2], pos
        cache.key_valid, cache.pos_t, cache.fused, cache.per_row = None, pos_B, False, pos_B is not None
        cache.window = getattr(cfg, "sliding_window", None)
        cache._static = pos_B is not None
        if pos_B is not None:
            cache._slots = torch.arange(cache.max_len, device=pos_B.device)
            cache._rows = torch.arange(pos_B.shape[0], device=pos_B.device)
        return cache

    @property
    def static(self) -> bool:
        return self._static

    def reset(self) -> None:
        """Empty the cache for reuse (same buffers: a captured CUDA graph keeps pointing at them)."""
        self.pos, self._static = 0, False
        if self.key_valid is not None:
            self.key_valid.fill_(True)

    def make_static(self) -> None:
        """Switch to fixed-shape one-token steps (for CUDA graphs): the position lives in a device tensor,
        keys are written with ``index_copy_`` and attention always spans the whole cache under a mask.
        The caller sets ``pos_t`` before each step and calls ``advance`` after it."""
        device = self.k[0].device
        B = self.k[0].shape[0]
        if self.key_valid is None:
            self.key_valid = torch.ones(B, self.max_len, dtype=torch.bool, device=device)
        if self.pos_t is None:
            self.pos_t = torch.zeros(1, dtype=torch.long, device=device)
            self._slots = torch.arange(self.max_len, device=device)
        self.pos_t.fill_(self.pos)
        self._static = True

    def static_mask(self) -> torch.Tensor:
        """(B, 1, 1, max_len): valid keys up to and including the current position (within the window)."""
        assert self.pos_t is not None
        pos = self.pos_t[:, None]  # (B or 1, 1)
        visible = self._slots <= pos
        if self.key_valid is not None:
            visible = visible & self.key_valid
        if self.window is not None:
            visible &= self._slots > pos - self.window
        return visible[:, None, None, :]

    def update_static(
        self, layer: int, k_BH1D: torch.Tensor, v_BH1D: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.pos_t is not None
        if self.per_row:  # row b's key at its own position pos_t[b]
            self.k[layer][self._rows, :, self.pos_t] = k_BH1D[:, :, 0].to(self.k[layer].dtype)
            self.v[layer][self._rows, :, self.pos_t] = v_BH1D[:, :, 0].to(self.v[layer].dtype)
            return self.k[layer], self.v[layer]
        # under autocast the new keys may be bf16 while the cache holds the weights' dtype; slicing
        # assignment (``update``) casts by itself, ``index_copy_`` does not
        self.k[layer].index_copy_(2, self.pos_t, k_BH1D.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, self.pos_t, v_BH1D.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]

    def attention_mask(self, T: int, S: int, device: torch.device) -> torch.Tensor | None:
        """(B, 1, T, S) bool: causal (within the window), minus padded keys; a padded query still sees itself
        (stays finite). None without padding."""
        if self.key_valid is None:
            return None
        mask = causal_mask(T, S, self.window, device)[None, None] & self.key_valid[:, None, None, :S]
        idx = torch.arange(T, device=device)
        mask[:, :, idx, idx + S - T] = True
        return mask

    def update(self, layer: int, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k_BHTD.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {self.pos} + {T} tokens > {self.max_len}")
        self.k[layer][:, :, self.pos : end] = k_BHTD
        self.v[layer][:, :, self.pos : end] = v_BHTD
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.window = cfg.sliding_window
        d, bias = cfg.n_embd, cfg.attention_bias
        self.q_proj = nn.Linear(d, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, d, bias=False)
        self.qkv: torch.Tensor | None = None  # fused q/k/v weight for static decode steps (``GPT.fuse_for_decode``)
        self.qkv_bias: torch.Tensor | None = None  # and its fused bias, with attention_bias

    def forward(self, x_BTC: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x_BTC.shape
        H, KV, D = self.n_head, self.n_kv_head, self.head_dim
        if cache is not None and cache.static:
            return self._static_step(x_BTC, cos, sin, cache)
        # RoPE in the projections' own (B, T, H, D) layout, then one transpose to (B, H, T, D); all three
        # in the same dtype for SDPA (under autocast the rotation would otherwise promote q, k to fp32)
        q, k, v = self._qkv(x_BTC, cache)
        v_BTHD = v.view(B, T, KV, D)
        cos_T1D, sin_T1D = cos[:, None].to(v_BTHD.dtype), sin[:, None].to(v_BTHD.dtype)
        q_BHTD = apply_rope(q.view(B, T, H, D), cos_T1D, sin_T1D).transpose(1, 2)
        k_BHTD = apply_rope(k.view(B, T, KV, D), cos_T1D, sin_T1D).transpose(1, 2)
        v_BHTD = v_BTHD.transpose(1, 2)

        past = 0
        if cache is not None:
            past = cache.pos
            k_BHTD, v_BHTD = cache.update(self.layer_idx, k_BHTD, v_BHTD)
        if KV != H:  # grouped-query attention: each kv head serves H // KV query heads
            k_BHTD = k_BHTD.repeat_interleave(H // KV, dim=1)
            v_BHTD = v_BHTD.repeat_interleave(H // KV, dim=1)

        S = k_BHTD.shape[2]
        windowed = self.window is not None and self.window < S  # a query has keys beyond its window
        pad_mask = cache.attention_mask(T, S, x_BTC.device) if cache is not None else None
        if pad_mask is not None:
            y = F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, attn_mask=pad_mask)
        elif past == 0 and not windowed:
            y = F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, is_causal=True)
        elif T == 1 and not windowed:  # one new token sees the whole cache
            y = F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD)
        else:  # a chunk after a non-empty cache, or a window: the mask aligned to the end (bottom-right)
            mask = causal_mask(T, S, self.window, x_BTC.device)
            y = F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, attn_mask=mask)
        y_BTC = y.transpose(1, 2).reshape(B, T, H * D)
        return self.o_proj(y_BTC)

    def _qkv(self, x_BTC: torch.Tensor, cache: KVCache | None) -> tuple[torch.Tensor, ...]:
        """q, k, v projections: one fused matmul when the engine prepared it for this cache."""
        if cache is not None and cache.fused and self.qkv is not None:
            H, KV, D = self.n_head, self.n_kv_head, self.head_dim
            return F.linear(x_BTC, self.qkv, self.qkv_bias).split((H * D, KV * D, KV * D), dim=-1)
        return self.q_proj(x_BTC), self.k_proj(x_BTC), self.v_proj(x_BTC)

    def _static_step(self, x_BTC: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per row with fixed shapes and no host-side position (graph-capturable); one fused
        q/k/v matmul when ``qkv`` is set, attention over the whole cache under its mask."""
        B, T, _ = x_BTC.shape
        H, KV, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self._qkv(x_BTC, cache)
        cos_T1D, sin_T1D = cos[:, None].to(v.dtype), sin[:, None].to(v.dtype)
        q_BHTD = apply_rope(q.view(B, T, H, D), cos_T1D, sin_T1D).transpose(1, 2)
        k_BHTD = apply_rope(k.view(B, T, KV, D), cos_T1D, sin_T1D).transpose(1, 2)
        k_all, v_all = cache.update_static(self.layer_idx, k_BHTD, v.view(B, T, KV, D).transpose(1, 2))
        y = F.scaled_dot_product_attention(q_BHTD, k_all, v_all, attn_mask=cache.static_mask(), enable_gqa=KV != H)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)
        self.gate_up: torch.Tensor | None = None  # fused gate/up weight for static decode steps

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        if fused and self.gate_up is not None:
            gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg) if cfg.moe is None else MoE(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x), fused=cache is not None and cache.fused)


class Backbone(nn.Module):
    """HF's ``LlamaModel``: embeddings, layers, final norm (the ``model.`` prefix of the weight names)."""

    layers: list[DecoderLayer]  # an nn.ModuleList at run time

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layer))  # type: ignore[assignment]
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)


IGNORE_INDEX = -100  # targets with this id count neither in the loss nor in its mean (F.cross_entropy's default)


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk so that one chunk's fp32 logits are ~512 MB (4,096 rows at vocab 32,768)."""
    return max(256, (1 << 27) // vocab_size)


class LinearCrossEntropy(torch.autograd.Function):
    """mean(cross_entropy(x @ W^T, targets)) over chunks of rows, its gradient computed in the forward.

    Per chunk: logits in the matmul's dtype (bf16 under autocast, exactly as ``lm_head`` gives them),
    log-softmax in fp32, then d(loss)/d(logits) = (softmax - onehot) / n, cast back to the matmul's
    dtype (as autograd would) for the two gradient matmuls. The backward only scales the two saved
    gradients, which are the size of ``x`` and ``W``: no (N, vocab) tensor outlives its chunk.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x_NC: torch.Tensor, weight_VC: torch.Tensor, targets_N: torch.Tensor, chunk_rows: int
    ) -> torch.Tensor:
        valid_N = targets_N != IGNORE_INDEX
        safe_N = targets_N.masked_fill(~valid_N, 0)
        inv_n = 1.0 / valid_N.sum().clamp(min=1).float()
        loss = torch.zeros((), dtype=torch.float32, device=x_NC.device)
        grad_x_chunks = []
        grad_w_VC = torch.zeros_like(weight_VC, dtype=torch.float32)
        for start in range(0, x_NC.shape[0], chunk_rows):
            x_nC = x_NC[start : start + chunk_rows]
            logits_nV = F.linear(x_nC, weight_VC)  # bf16 under autocast
            logits32 = logits_nV.float()
            lse_n = torch.logsumexp(logits32, dim=-1)
            t_n1, v_n = safe_N[start : start + chunk_rows, None], valid_N[start : start + chunk_rows]
            loss = loss + ((lse_n - logits32.gather(1, t_n1)[:, 0]) * v_n).sum()
            dlogits = logits32.sub_(lse_n[:, None]).exp_()  # softmax in place, (n, V) fp32
            dlogits.scatter_add_(1, t_n1, torch.full_like(t_n1, -1, dtype=dlogits.dtype))
            dlogits = (dlogits * (v_n[:, None] * inv_n)).to(logits_nV.dtype)
            grad_x_chunks.append((dlogits @ weight_VC).to(x_NC.dtype))  # (n, C)
            grad_w_VC += (dlogits.t() @ x_nC).float()  # (V, C), fp32 accumulation over chunks
        ctx.save_for_backward(torch.cat(grad_x_chunks), grad_w_VC.to(weight_VC.dtype))
        return loss * inv_n

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss.to(grad_x.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None


def linear_cross_entropy(
    x_NC: torch.Tensor, weight_VC: torch.Tensor, targets_N: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(x, W).float(), targets, ignore_index=IGNORE_INDEX)`` without the (N, V) logits.

    With gradients off (evaluation) it only sums the loss chunk by chunk."""
    chunk_rows = chunk_rows or default_chunk_rows(weight_VC.shape[0])
    if torch.is_grad_enabled() and (x_NC.requires_grad or weight_VC.requires_grad):
        return LinearCrossEntropy.apply(x_NC, weight_VC, targets_N, chunk_rows)
    total = torch.zeros((), dtype=torch.float32, device=x_NC.device)
    for start in range(0, x_NC.shape[0], chunk_rows):
        logits = F.linear(x_NC[start : start + chunk_rows], weight_VC).float()
        total = total + F.cross_entropy(logits, targets_N[start : start + chunk_rows], reduction="sum")
    return total / (targets_N != IGNORE_INDEX).sum().clamp(min=1)


def _concat_into(buffer: torch.Tensor | None, parts: tuple[Any, ...] | None) -> torch.Tensor | None:
    """``torch.cat(parts)``, written into ``buffer`` when it fits (a captured CUDA graph keeps its address)."""
    if parts is None:
        return None
    if buffer is None or buffer.dtype != parts[0].dtype or buffer.device != parts[0].device:
        return torch.cat(parts)
    return torch.cat(parts, out=buffer)


class GPT(nn.Module):
    supports_static_cache = True  # KVCache.make_static: fixed-shape decode steps (CUDA graphs)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.rope_cos: torch.Tensor
        self.rope_sin: torch.Tensor
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) everywhere; residual output projections scaled by 1/sqrt(2 * n_layer) (GPT-2)."""
        out_std = std / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)  # RMSNorm gains
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, out_std)
            else:
                p.normal_(0.0, std)
        cfg = self.config
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(
        self,
        idx_BT: torch.Tensor,
        cache: KVCache | None = None,
        targets_BT: torch.Tensor | None = None,
        last_only: bool = False,
        embeds_BTC: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> next-token logits (B, T, vocab), or (B, 1, vocab) with ``last_only``. With
        ``cache``, positions continue from it.

        With ``targets_BT`` (B, T) it returns the mean cross-entropy (fp32 scalar) over targets other than
        ``IGNORE_INDEX`` instead, without materialising the logits (``linear_cross_entropy``).

        ``embeds_BTC`` (B, T, C), when given, is the input instead of ``idx_BT``'s embeddings (a
        vision-language model puts image features at some positions); ``idx_BT`` still gives the shape."""
        B, T = idx_BT.shape
        if cache is not None and cache.static:  # one token per row at cache.pos_t; the caller advances
            assert cache.pos_t is not None and T == 1
            cos, sin = self.rope_cos.index_select(0, cache.pos_t), self.rope_sin.index_select(0, cache.pos_t)
            if cache.per_row:  # (B, 1, D): each row rotated at its own position
                cos, sin = cos[:, None], sin[:, None]
        else:
            start = cache.pos if cache is not None else 0
            if start + T > self.config.max_seq_len:
                raise ValueError(
                    f"sequence of {start + T} tokens exceeds the model's context of {self.config.max_seq_len}"
                )
            cos = self.rope_cos[start : start + T]
            sin = self.rope_sin[start : start + T]
        x = self.model.embed_tokens(idx_BT) if embeds_BTC is None else embeds_BTC  # (B, T, C)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache)
        if cache is not None and not cache.static:
            cache.advance(T)
        if last_only:  # a prompt's prefill needs the next-token logits of its last position only
            x = x[:, -1:]
        x = self.model.norm(x)
        if targets_BT is not None:
            return linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets_BT.flatten())
        return self.lm_head(x)

    def balancing(self) -> torch.Tensor | float:
        """A mixture's load-balancing loss of the last training forward (mean over layers, times its
        coefficient) as a term whose value is 0 and whose gradient is its own: the training loop adds it to
        every stage's loss, however the loss was computed, and the loss still reads as the plain
        cross-entropy. 0 for a dense model, or outside training."""
        layers = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None] if self.training else []
        if not layers or self.config.moe is None:
            return 0.0
        aux = self.config.moe.aux_loss_coef * torch.stack(layers).mean()
        return aux - aux.detach()

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    def train_stats(self) -> dict[str, Any]:
        """Routing since the last call, for the training log (a dense model has none): per layer the share of
        routed slots each expert took; over layers the largest share relative to uniform (1.0 is balanced),
        the share of slots dropped over capacity, and the balancing loss."""
        stats = [s for s in (m.read_stats() for m in self.moe_layers()) if s is not None]
        if not stats:
            return {}
        loads = [load for load, _, _ in stats]
        return {
            "moe_load": loads,
            "moe_load_max": max(max(load) for load in loads) * len(loads[0]),
            "moe_dropped": sum(dropped for _, dropped, _ in stats) / len(stats),
            "moe_aux": sum(aux for _, _, aux in stats) / len(stats),
        }

    @torch.no_grad()
    def fuse_for_decode(self) -> None:
        """(Re)build the fused q/k/v (and q/k/v bias) and gate/up weights static decode steps use: one
        matmul instead of three, and of two. Copies the current weights into the same buffers each time (a
        captured CUDA graph keeps pointing at them), so call it again after the weights change (the engine
        does at every generation). Costs the memory of those weights once more."""
        for layer in self.model.layers:
            a = layer.self_attn
            qkv = (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)
            biases = (a.q_proj.bias, a.k_proj.bias, a.v_proj.bias) if a.q_proj.bias is not None else None
            a.qkv, a.qkv_bias = _concat_into(a.qkv, qkv), _concat_into(a.qkv_bias, biases)
            if isinstance(layer.mlp, MLP):  # a mixture of experts keeps its experts' projections apart
                m = layer.mlp
                m.gate_up = _concat_into(m.gate_up, (m.gate_proj.weight, m.up_proj.weight))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
