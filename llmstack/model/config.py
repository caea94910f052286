"""Model configuration: the shape of a Llama-compatible decoder-only Transformer.

Field meanings follow Hugging Face's ``LlamaConfig`` so that a config converts one-to-one
(``to_hf_dict`` / ``from_hf_dict``). Presets that derive a whole config from one depth dial live
in ``llmstack.training.presets``; this file only describes a shape.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    n_layer: int
    n_embd: int  # hidden_size
    n_head: int  # query heads
    n_kv_head: int  # key/value heads (grouped-query attention when < n_head)
    intermediate_size: int  # SwiGLU hidden width
    max_seq_len: int  # longest context the RoPE tables are built for
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "vocab_size",
            "n_layer",
            "n_embd",
            "n_head",
            "n_kv_head",
            "intermediate_size",
            "max_seq_len",
        ):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive (got {getattr(self, name)})")
        if self.n_head > 0 and self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_kv_head > 0 and self.n_head % self.n_kv_head:
            problems.append(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.n_head > 0 and (self.n_embd // self.n_head) % 2:
            problems.append(f"head_dim={self.n_embd // self.n_head} must be even for rotary embeddings")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def num_params(self, include_embedding: bool = True) -> int:
        d, h, kv = self.n_embd, self.head_dim, self.n_kv_head
        attn = d * (self.n_head * h) + 2 * d * (kv * h) + (self.n_head * h) * d
        mlp = 3 * d * self.intermediate_size
        per_layer = attn + mlp + 2 * d
        emb = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        total = self.n_layer * per_layer + d + head
        return total + (emb if include_embedding else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul params + attention (12 x layers x d x T), as in PaLM/nanoGPT."""
        matmul_params = self.num_params(include_embedding=False) - (2 * self.n_layer + 1) * self.n_embd
        if self.tie_embeddings:
            matmul_params += self.vocab_size * self.n_embd  # the tied head is still a matmul
        return 6.0 * matmul_params + 12.0 * self.n_layer * self.n_embd * seq_len

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)

    def to_hf_dict(self) -> dict[str, Any]:
        """The equivalent ``LlamaConfig`` keyword arguments."""
        return dict(
            vocab_size=self.vocab_size,
            hidden_size=self.n_embd,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.n_layer,
            num_attention_heads=self.n_head,
            num_key_value_heads=self.n_kv_head,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_seq_len,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.norm_eps,
            tie_word_embeddings=self.tie_embeddings,
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
        )

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Read a Llama ``config.json``; refuse features this model does not implement."""
        arch = d.get("architectures") or ["LlamaForCausalLM"]
        if d.get("model_type", "llama") != "llama" and "LlamaForCausalLM" not in arch:
            raise ValueError(f"unsupported architecture {arch} (model_type={d.get('model_type')!r}); expected llama")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d.get('hidden_act')!r}; expected 'silu'")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ValueError("attention_bias / mlp_bias are not supported")
        rope_scaling = d.get("rope_scaling")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
            raise ValueError(f"unsupported rope_scaling {rope_scaling}")
        n_head = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // n_head
        if head_dim * n_head != d["hidden_size"]:
            raise ValueError("head_dim * num_attention_heads != hidden_size is not supported")
        rope_theta = d.get("rope_theta")
        if rope_theta is None:
            rope_theta = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            vocab_size=d["vocab_size"],
            n_layer=d["num_hidden_layers"],
            n_embd=d["hidden_size"],
            n_head=n_head,
            n_kv_head=d.get("num_key_value_heads") or n_head,
            intermediate_size=d["intermediate_size"],
            max_seq_len=d.get("max_position_embeddings", 2048),
            rope_theta=float(rope_theta),
            norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        )
