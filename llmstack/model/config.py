"""Model configuration: the shape of a Llama-compatible decoder-only Transformer, and its family.

Field meanings follow Hugging Face's ``LlamaConfig`` so that a config converts one-to-one
(``to_hf_dict`` / ``from_hf_dict``). Three HF families share this one shape and differ only in a few
fields, which ``family`` names for export:

- ``llama`` (``LlamaForCausalLM``: Llama 1-3.x, SmolLM2): no biases, no sliding window;
- ``qwen2`` (``Qwen2ForCausalLM``: Qwen2 / Qwen2.5): biases on q/k/v (``attention_bias``), optionally a
  sliding window on every layer;
- ``mistral`` (``MistralForCausalLM``): optionally a sliding window, often an explicit ``head_dim``;
- ``mixtral`` (``MixtralForCausalLM``) and ``qwen2_moe`` (``Qwen2MoeForCausalLM``): every layer's MLP is a
  mixture of experts (``MoEConfig``, ``model/moe.py``); Qwen2-MoE may add a shared expert and q/k/v biases.

Every family may scale its RoPE (``RopeScaling``: transformers' ``linear``, ``dynamic``, ``yarn`` and
``llama3`` types; ``model/rope.py`` computes them). Presets that derive a whole config from one depth
dial live in ``llmstack.training.presets``; this file only describes a shape.

What is not covered (refused by ``from_hf_dict`` with its name): other model types, MLP biases, Llama's
``attention_bias`` (it puts a bias on o_proj too), partial rotary embeddings, the ``longrope`` and other
rope types, Qwen2 configs that slide the window on some layers only, and Qwen2-MoE configs with dense
layers among the sparse ones (``mlp_only_layers``, ``decoder_sparse_step`` > 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

FAMILIES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}
"""Our family name (HF ``model_type``) -> the HF architecture export writes."""

MOE_FAMILIES = ("mixtral", "qwen2_moe")
"""The families whose layers are mixtures of experts (``ModelConfig.moe``)."""

ROPE_FIELDS: dict[str, tuple[str, ...]] = {
    "linear": (),
    "dynamic": (),
    "yarn": (
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    ),
    "llama3": ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
}
"""The rope types we implement, and the optional ``RopeScaling`` fields (besides ``factor``) each reads."""

ROPE_REQUIRED = {
    "yarn": ("original_max_position_embeddings",),
    "llama3": ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
}


@dataclass(frozen=True)
class RopeScaling:
    """transformers' ``rope_parameters`` of a scaled RoPE, ``rope_theta`` aside (it is ``ModelConfig``'s).

    Names and defaults as transformers' ``modeling_rope_utils.py``; None where a type does not read a
    field, or where transformers' default applies (yarn: beta_fast 32, beta_slow 1, truncate True,
    attention_factor from factor and mscale)."""

    rope_type: str  # linear | dynamic | yarn | llama3
    factor: float
    original_max_position_embeddings: int | None = None  # yarn, llama3: the pretraining context
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    attention_factor: float | None = None  # yarn: scales cos/sin
    beta_fast: float | None = None  # yarn
    beta_slow: float | None = None  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool | None = None  # yarn

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_FIELDS:
            raise ValueError(f"unsupported rope type {self.rope_type!r} (supported: default, {', '.join(ROPE_FIELDS)})")
        if not self.factor > 0:
            raise ValueError(f"rope scaling factor must be positive (got {self.factor})")
        used = ("rope_type", "factor", *ROPE_FIELDS[self.rope_type])
        unused = [f.name for f in fields(self) if f.name not in used and getattr(self, f.name) is not None]
        if unused:
            raise ValueError(f"rope type {self.rope_type!r} does not use {unused}")
        missing = [name for name in ROPE_REQUIRED.get(self.rope_type, ()) if not getattr(self, name)]
        if missing:
            raise ValueError(f"rope type {self.rope_type!r} needs {missing}")

    def to_hf(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_hf(cls, d: dict[str, Any], max_positions: int, top_level_original: int | None) -> RopeScaling | None:
        """A config.json's ``rope_parameters`` / ``rope_scaling``; None for unscaled RoPE. Keys transformers
        does not read for the type are ignored, as transformers ignores them; missing ones default as it does."""
        rope_type = d.get("rope_type", d.get("type", "default"))
        if rope_type == "default":
            return None
        if rope_type not in ROPE_FIELDS:
            raise ValueError(f"unsupported rope type {rope_type!r} (supported: default, {', '.join(ROPE_FIELDS)})")
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(
                f"partial rotary embeddings are not supported (partial_rotary_factor={d['partial_rotary_factor']})"
            )
        kw = {k: d[k] for k in ROPE_FIELDS[rope_type] if d.get(k) is not None}
        if rope_type in ROPE_REQUIRED:  # transformers' standardize_rope_params: a top-level value first
            original = top_level_original or kw.get("original_max_position_embeddings", max_positions)
            kw["original_max_position_embeddings"] = int(original)
        factor = d.get("factor")
        if factor is None and rope_type == "yarn":
            factor = max_positions / kw["original_max_position_embeddings"]
        if factor is None:
            raise ValueError(f"rope type {rope_type!r} needs 'factor'")
        return cls(rope_type, float(factor), **kw)


@dataclass(frozen=True)
class MoEConfig:
    """The mixture of experts that replaces every layer's MLP (``model/moe.py``)."""

    n_experts: int  # experts per layer (Mixtral's num_local_experts, Qwen2-MoE's num_experts)
    n_active: int  # experts each token is routed to (num_experts_per_tok)
    expert_size: int  # each expert's SwiGLU width (Mixtral's intermediate_size, Qwen2-MoE's moe_intermediate_size)
    shared_size: int = 0  # width of an always-on shared expert with a sigmoid gate (Qwen2-MoE); 0: none
    norm_topk: bool = True  # renormalise the chosen experts' weights to sum to 1 (Mixtral; Qwen2-MoE's option)
    aux_loss_coef: float = 0.01  # weight of the load-balancing loss in training (router_aux_loss_coef)
    capacity_factor: float = 0.0  # training only: > 0 caps each expert's slots, dropping the excess; 0 dropless

    def __post_init__(self) -> None:
        problems = []
        if self.n_experts < 2:
            problems.append(f"n_experts must be at least 2 (got {self.n_experts})")
        if not 1 <= self.n_active <= self.n_experts:
            problems.append(f"n_active must be between 1 and n_experts={self.n_experts} (got {self.n_active})")
        if self.expert_size <= 0:
            problems.append(f"expert_size must be positive (got {self.expert_size})")
        if self.shared_size < 0:
            problems.append(f"shared_size must be >= 0 (got {self.shared_size})")
        if self.aux_loss_coef < 0 or self.capacity_factor < 0:
            problems.append("aux_loss_coef and capacity_factor must be >= 0")
        if problems:
            raise ValueError("invalid MoEConfig: " + "; ".join(problems))


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    n_layer: int
    n_embd: int  # hidden_size
    n_head: int  # query heads
    n_kv_head: int  # key/value heads (grouped-query attention when < n_head)
    intermediate_size: int  # SwiGLU hidden width (a mixture of experts: each expert's, = moe.expert_size)
    max_seq_len: int  # longest context the RoPE tables are built for
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    head_dim: int = 0  # per-head width; 0: n_embd // n_head (some Mistral / Qwen models set their own)
    attention_bias: bool = False  # biases on q/k/v, none on o_proj (qwen2)
    sliding_window: int | None = None  # a token attends to at most this many latest keys, itself included
    rope_scaling: RopeScaling | None = None
    family: str = "llama"  # the HF family export writes (FAMILIES)
    moe: MoEConfig | None = None  # every layer's MLP a mixture of experts (families mixtral, qwen2_moe)

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):  # from to_dict / JSON
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", MoEConfig(**self.moe))
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
        if self.head_dim < 0:
            problems.append(f"head_dim must be positive, or 0 for n_embd // n_head (got {self.head_dim})")
        elif not self.head_dim and self.n_head > 0:
            if self.n_embd % self.n_head:
                problems.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
            object.__setattr__(self, "head_dim", self.n_embd // self.n_head)
        if self.n_kv_head > 0 and self.n_head % self.n_kv_head:
            problems.append(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.family not in FAMILIES:
            problems.append(f"unknown family {self.family!r} (known: {', '.join(FAMILIES)})")
        elif self.attention_bias != (self.family == "qwen2") and self.family != "qwen2_moe":
            problems.append(f"attention_bias={self.attention_bias} does not fit family {self.family!r} (qwen2 has it)")
        if (self.moe is not None) != (self.family in MOE_FAMILIES):
            want = "needs" if self.moe is None else "has no"
            problems.append(f"family {self.family!r} {want} moe (the MoE families: {', '.join(MOE_FAMILIES)})")
        elif self.moe is not None and self.intermediate_size != self.moe.expert_size:
            problems.append(
                f"intermediate_size={self.intermediate_size} must equal moe.expert_size={self.moe.expert_size}"
                " (a mixture's MLP width is its experts', as in Mixtral's config)"
            )
        elif self.family == "mixtral" and self.moe is not None and (self.moe.shared_size or not self.moe.norm_topk):
            problems.append("mixtral has no shared expert and renormalises its top-k weights (use family qwen2_moe)")
        if self.sliding_window is not None and (self.sliding_window <= 0 or self.family == "llama"):
            problems.append(f"sliding_window={self.sliding_window}: a positive window, for qwen2 or mistral only")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    def num_params(self, include_embedding: bool = True, active: bool = False) -> int:
        """Parameters; ``active``: those one token uses (a mixture counts its chosen experts only)."""
        d, h, kv = self.n_embd, self.head_dim, self.n_kv_head
        attn = d * (self.n_head * h) + 2 * d * (kv * h) + (self.n_head * h) * d + self.attention_bias_params
        mlp = 3 * d * self.intermediate_size
        if self.moe is not None:
            m = self.moe
            experts = m.n_active if active else m.n_experts
            shared = 3 * d * m.shared_size + d if m.shared_size else 0  # the shared expert and its gate
            mlp = experts * 3 * d * m.expert_size + m.n_experts * d + shared
        per_layer = attn + mlp + 2 * d
        emb = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        total = self.n_layer * per_layer + d + head
        return total + (emb if include_embedding else 0)

    @property
    def attention_bias_params(self) -> int:
        """Bias entries of one layer's q/k/v projections."""
        return (self.n_head + 2 * self.n_kv_head) * self.head_dim if self.attention_bias else 0

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul params + attention (12 x layers x d x T), as in PaLM/nanoGPT;
        a mixture of experts counts the parameters a token uses (its chosen experts)."""
        vectors = (2 * self.n_layer + 1) * self.n_embd + self.n_layer * self.attention_bias_params
        matmul_params = self.num_params(include_embedding=False, active=True) - vectors
        if self.tie_embeddings:
            matmul_params += self.vocab_size * self.n_embd  # the tied head is still a matmul
        return 6.0 * matmul_params + 12.0 * self.n_layer * self.n_embd * seq_len

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values; the family fields only where they differ from a plain llama, so that a
        plain model's meta.json reads as it did before they existed."""
        d = asdict(self)
        plain = dict(head_dim=self.n_embd // self.n_head, attention_bias=False, sliding_window=None, family="llama")
        for name, value in plain.items():
            if d[name] == value:
                del d[name]
        if self.rope_scaling is None:
            del d["rope_scaling"]
        else:
            d["rope_scaling"] = self.rope_scaling.to_hf()
        if self.moe is None:
            del d["moe"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)

    def to_hf_dict(self) -> dict[str, Any]:
        """The equivalent HF config (``config.json`` keys) of this family, ``model_type`` and ``architectures``
        included: ``AutoConfig.for_model(**d)`` / ``AutoModelForCausalLM`` build the same model from it."""
        d: dict[str, Any] = dict(
            model_type=self.family,
            architectures=[FAMILIES[self.family]],
            vocab_size=self.vocab_size,
            hidden_size=self.n_embd,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.n_layer,
            num_attention_heads=self.n_head,
            num_key_value_heads=self.n_kv_head,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_seq_len,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling.to_hf() if self.rope_scaling else None,
            rms_norm_eps=self.norm_eps,
            tie_word_embeddings=self.tie_embeddings,
            hidden_act="silu",
        )
        if self.family == "llama":
            d.update(attention_bias=False, mlp_bias=False)
        elif self.family in ("mistral", "mixtral"):
            d.update(sliding_window=self.sliding_window)
        else:  # qwen2(_moe): the window covers layers from max_window_layers on; ours covers all of them
            window = self.sliding_window is not None
            d.update(
                use_sliding_window=window,
                sliding_window=self.sliding_window,
                max_window_layers=0 if window else self.n_layer,
                layer_types=["sliding_attention" if window else "full_attention"] * self.n_layer,
            )
        if self.moe is not None:
            d.update(_moe_to_hf(self.family, self.moe, self.attention_bias))
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Read a Llama, Qwen2, Mistral, Mixtral or Qwen2-MoE ``config.json``; refuse features this model does
        not implement."""
        family = _hf_family(d)
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d.get('hidden_act')!r}; expected 'silu'")
        if d.get("mlp_bias"):
            raise ValueError("mlp_bias is not supported")
        if family == "llama" and d.get("attention_bias"):
            raise ValueError("attention_bias is not supported for llama (it biases o_proj too)")
        n_head, n_embd = d["num_attention_heads"], d["hidden_size"]
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_theta = d.get("rope_theta") or rope.get("rope_theta") or 10000.0
        max_positions = d.get("max_position_embeddings", 2048)
        moe = _moe_from_hf(family, d)
        return cls(
            vocab_size=d["vocab_size"],
            n_layer=d["num_hidden_layers"],
            n_embd=n_embd,
            n_head=n_head,
            n_kv_head=d.get("num_key_value_heads") or n_head,
            intermediate_size=moe.expert_size if moe else d["intermediate_size"],
            max_seq_len=max_positions,
            rope_theta=float(rope_theta),
            norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            head_dim=d.get("head_dim") or n_embd // n_head,
            attention_bias=family == "qwen2" or (family == "qwen2_moe" and d.get("qkv_bias", True)),
            sliding_window=_hf_sliding_window(d, family),
            rope_scaling=RopeScaling.from_hf(rope, max_positions, d.get("original_max_position_embeddings")),
            family=family,
            moe=moe,
        )


def _hf_family(d: dict[str, Any]) -> str:
    """The family of a config.json, from ``model_type`` (or, lacking it, ``architectures``)."""
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    by_arch = [family for family, arch in FAMILIES.items() if arch in archs]
    if model_type in FAMILIES:
        return model_type
    if model_type is None and by_arch:
        return by_arch[0]
    if model_type is None and not archs:
        return "llama"
    supported = ", ".join(f"{family} / {arch}" for family, arch in FAMILIES.items())
    raise ValueError(f"unsupported architecture {archs} (model_type={model_type!r}); supported: {supported}")


def _hf_sliding_window(d: dict[str, Any], family: str) -> int | None:
    """The window every layer slides, as transformers masks it, or None; refuses one on some layers only."""
    if family == "llama":
        return None
    if family in ("mistral", "mixtral"):  # every layer, whatever layer_types says (MistralConfig's default: 4096)
        window = d.get("sliding_window", 4096 if family == "mistral" else None)
        return None if window is None else int(window)
    window = d.get("sliding_window", 4096)
    if not d.get("use_sliding_window", False) or window is None:
        return None
    n_layer, first = d["num_hidden_layers"], d.get("max_window_layers", 28)
    layer_types = d.get("layer_types") or [  # as Qwen2Config derives them
        "sliding_attention" if i >= first else "full_attention" for i in range(n_layer)
    ]
    if set(layer_types) == {"sliding_attention"}:
        return int(window)
    if set(layer_types) == {"full_attention"}:
        return None
    raise ValueError(f"a sliding window on some layers only is not supported (layer_types={layer_types})")


def _moe_to_hf(family: str, moe: MoEConfig, attention_bias: bool) -> dict[str, Any]:
    """The mixture's config.json keys in the family's own names."""
    d: dict[str, Any] = dict(num_experts_per_tok=moe.n_active, router_aux_loss_coef=moe.aux_loss_coef)
    if family == "mixtral":
        return d | dict(num_local_experts=moe.n_experts, intermediate_size=moe.expert_size, router_jitter_noise=0.0)
    return d | dict(
        num_experts=moe.n_experts,
        moe_intermediate_size=moe.expert_size,
        intermediate_size=moe.expert_size,  # a dense layer's width; every layer is sparse here
        shared_expert_intermediate_size=moe.shared_size,
        norm_topk_prob=moe.norm_topk,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        qkv_bias=attention_bias,
    )


def _moe_from_hf(family: str, d: dict[str, Any]) -> MoEConfig | None:
    """A Mixtral or Qwen2-MoE config.json's mixture; None for the dense families."""
    coef = float(d.get("router_aux_loss_coef", 0.001))
    if family == "mixtral":
        n_experts, n_active = d.get("num_local_experts", 8), d.get("num_experts_per_tok", 2)
        return MoEConfig(n_experts, n_active, d["intermediate_size"], aux_loss_coef=coef)
    if family != "qwen2_moe":
        return None
    if d.get("mlp_only_layers") or d.get("decoder_sparse_step", 1) != 1:
        raise ValueError(
            "Qwen2-MoE with dense layers among the sparse ones is not supported "
            f"(mlp_only_layers={d.get('mlp_only_layers')}, decoder_sparse_step={d.get('decoder_sparse_step', 1)})"
        )
    return MoEConfig(
        n_experts=d.get("num_experts", 60),
        n_active=d.get("num_experts_per_tok", 4),
        expert_size=d["moe_intermediate_size"],
        shared_size=d.get("shared_expert_intermediate_size", 0) or 0,
        norm_topk=bool(d.get("norm_topk_prob", False)),
        aux_loss_coef=coef,
    )
