"""GPT-2: the other model family Hugging Face import supports, as its own small file.

Learned absolute positions, pre-LayerNorm with biases, GELU (tanh approximation by default), fused
q/k/v projection, tied output head. Module and weight names equal Hugging Face ``GPT2LMHeadModel``'s
(``transformer.h.0.attn.c_attn.weight``...), but HF stores its ``Conv1D`` weights as (in, out);
``llmstack.interop.hf`` transposes them into these ``nn.Linear`` (out, in) weights on import.

The forward signature and KV cache equal ``llmstack.model.llama.GPT``'s, so the sampler and the chat
loop run either model. What is not here: the variants HF flags (``scale_attn_by_inverse_layer_idx``,
``reorder_and_upcast_attn``, cross-attention); the importer refuses configs that use them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmstack.model.llama import KVCache

ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}
"""HF ``activation_function`` -> the ``approximate`` argument of ``F.gelu``."""


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int
    max_seq_len: int  # n_positions: rows of the learned position table
    norm_eps: float = 1e-5
    activation: str = "gelu_new"

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"invalid GPT2Config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unsupported activation_function {self.activation!r} (known: {sorted(ACTIVATIONS)})")

    @property
    def n_kv_head(self) -> int:
        """No grouped-query attention in GPT-2; named so that ``KVCache`` sizes itself from this config."""
        return self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> GPT2Config:
        """Read a GPT-2 ``config.json``; refuse the flags this model does not implement."""
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if d.get(flag):
                raise ValueError(f"unsupported GPT-2 option {flag}=true")
        if d.get("scale_attn_weights") is False:
            raise ValueError("unsupported GPT-2 option scale_attn_weights=false")
        return cls(
            vocab_size=d["vocab_size"],
            n_layer=d["n_layer"],
            n_embd=d["n_embd"],
            n_head=d["n_head"],
            max_seq_len=d.get("n_positions", 1024),
            norm_eps=d.get("layer_norm_epsilon", 1e-5),
            activation=d.get("activation_function", "gelu_new"),
        )


class GPT2Attention(nn.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx, self.n_head = layer_idx, cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x_BTC: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        B, T, C = x_BTC.shape
        H, D = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x_BTC).split(C, dim=-1)
        q_BHTD, k_BHTD, v_BHTD = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
        past = 0
        if cache is not None:
            past = cache.pos
            k_BHTD, v_BHTD = cache.update(self.layer_idx, k_BHTD, v_BHTD)
        pad_mask = cache.attention_mask(T, k_BHTD.shape[2], x_BTC.device) if cache is not None else None
        if pad_mask is not None:  # left-padded batch: causal minus padded keys
            y = F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, attn_mask=pad_mask)
        elif past == 0:
            y = F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, is_causal=True)
        else:  # new tokens see the whole cache; a chunk is masked causally from the end (bottom-right)
            S = k_BHTD.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=x_BTC.device).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.approximate = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class GPT2Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT2Body(nn.Module):
    """HF's ``GPT2Model`` (the ``transformer.`` prefix of the weight names)."""

    h: list[GPT2Block]  # an nn.ModuleList at run time

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.n_embd)
        self.h = nn.ModuleList(GPT2Block(cfg, i) for i in range(cfg.n_layer))  # type: ignore[assignment]
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)


class GPT2(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = GPT2Body(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # GPT-2 always ties its head

    def forward(self, idx_BT: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Token ids (B, T) -> next-token logits (B, T, vocab). With ``cache``, positions continue from it."""
        B, T = idx_BT.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the model's context of {self.config.max_seq_len}")
        pos_BT = torch.arange(start, start + T, device=idx_BT.device).expand(B, T)
        if cache is not None and cache.key_valid is not None:
            # absolute positions count real tokens only, so a left-padded row sees the positions it would alone
            valid = cache.key_valid[:, : start + T].long()
            pos_BT = (valid.cumsum(dim=-1) - 1).clamp(min=0)[:, start:]
        x = self.transformer.wte(idx_BT) + self.transformer.wpe(pos_BT)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, cache)
        if cache is not None:
            cache.advance(T)
        return self.lm_head(self.transformer.ln_f(x))
