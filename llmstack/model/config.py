"""Model configuration: the shape of a Llama-compatible decoder-only Transformer, and its family.

Field meanings follow Hugging Face's ``LlamaConfig`` so that a config converts one-to-one
(``to_hf_dict`` / ``from_hf_dict``). Three HF families share this one shape and differ only in a few
fields, which ``family`` names for export:

- ``llama`` (``LlamaForCausalLM``: Llama 1-3.x, SmolLM2): no biases, no sliding window;
- ``qwen2`` (``Qwen2ForCausalLM``: Qwen2 / Qwen2.5): biases on q/k/v (``attention_bias``), optionally a
  sliding window on every layer;
- ``mistral`` (``MistralForCausalLM``): optionally a sliding window, often an explicit ``head_dim``.

Every family may scale its RoPE (``RopeScaling``: transformers' ``linear``, ``dynamic``, ``yarn`` and
``llama3`` types; ``model/rope.py`` computes them). Presets that derive a whole config from one depth
dial live in ``llmstack.training.presets``; this file only describes a shape.

What is not covered (refused by ``from_hf_dict`` with its name): other model types, MLP biases, Llama's
``attention_bias`` (it puts a bias on o_proj too), partial rotary embeddings, the ``longrope`` and other
rope types, and Qwen2 configs that slide the window on some layers only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
"""Our family name (HF ``model_type``) -> the HF architecture export writes."""

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
    head_dim: int = 0  # per-head width; 0: n_embd // n_head (some Mistral / Qwen models set their own)
    attention_bias: bool = False  # biases on q/k/v, none on o_proj (qwen2)
    sliding_window: int | None = None  # a token attends to at most this many latest keys, itself included
    rope_scaling: RopeScaling | None = None
    family: str = "llama"  # the HF family export writes (FAMILIES)

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):  # from to_dict / JSON
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
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
        elif self.attention_bias != (self.family == "qwen2"):
            problems.append(f"attention_bias={self.attention_bias} does not fit family {self.family!r} (qwen2 has it)")
        if self.sliding_window is not None and (self.sliding_window <= 0 or self.family == "llama"):
            problems.append(f"sliding_window={self.sliding_window}: a positive window, for qwen2 or mistral only")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    def num_params(self, include_embedding: bool = True) -> int:
        d, h, kv = self.n_embd, self.head_dim, self.n_kv_head
        attn = d * (self.n_head * h) + 2 * d * (kv * h) + (self.n_head * h) * d + self.attention_bias_params
        mlp = 3 * d * self.intermediate_size
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
        """Training FLOPs per token: 6 x matmul params + attention (12 x layers x d x T), as in PaLM/nanoGPT."""
        vectors = (2 * self.n_layer + 1) * self.n_embd + self.n_layer * self.attention_bias_params
        matmul_params = self.num_params(include_embedding=False) - vectors
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
        elif self.family == "mistral":
            d.update(sliding_window=self.sliding_window)
        else:  # qwen2: the window covers layers from max_window_layers on; ours covers all of them
            window = self.sliding_window is not None
            d.update(
                use_sliding_window=window,
                sliding_window=self.sliding_window,
                max_window_layers=0 if window else self.n_layer,
                layer_types=["sliding_attention" if window else "full_attention"] * self.n_layer,
            )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Read a Llama, Qwen2 or Mistral ``config.json``; refuse features this model does not implement."""
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
        return cls(
            vocab_size=d["vocab_size"],
            n_layer=d["num_hidden_layers"],
            n_embd=n_embd,
            n_head=n_head,
            n_kv_head=d.get("num_key_value_heads") or n_head,
            intermediate_size=d["intermediate_size"],
            max_seq_len=max_positions,
            rope_theta=float(rope_theta),
            norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            head_dim=d.get("head_dim") or n_embd // n_head,
            attention_bias=family == "qwen2",
            sliding_window=_hf_sliding_window(d, family),
            rope_scaling=RopeScaling.from_hf(rope, max_positions, d.get("original_max_position_embeddings")),
            family=family,
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
    if family == "mistral":  # every layer, whatever layer_types says (MistralConfig's default window: 4096)
        window = d.get("sliding_window", 4096)
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
