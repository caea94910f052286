"""llama.cpp's CPU arithmetic, reproduced in our model (opt-in: to compare with llama.cpp, not to serve).

On the same GGUF weights, llama.cpp and our float32 engine pick different next tokens where the top
two are nearly tied, because llama.cpp's CPU kernels round what we keep in float32.
``emulate_llamacpp`` makes a model round at the same places, so that agreement with llama.cpp measures
the conversion (weights, RoPE layout, tokenizer) rather than arithmetic. What it rounds:

- **Matmul inputs.** ggml converts a matmul's activations to the weight type's "vec_dot" type before
  the dot products: Q8_0 for Q4_0 / Q5_0 / Q8_0 weights, Q8_1 for Q4_1 / Q5_1, Q8_K for the K-quants,
  f16 for F16, bf16 for BF16. Q8_0 / Q8_1 blocks of 32 (x86 SIMD path): ``d = max|x| / 127`` stored as
  f16, ``q = round-half-even(x * (127 / max|x|))`` with a true float32 division. Q8_1 also stores
  ``s = f16(d * sum q)``, which the Q4_1 / Q5_1 dot product multiplies by the weight block's minimum
  instead of the exact sum (``GGMLLinear.block_min`` adds that difference). Q8_K: blocks of 256, f32
  scale, ``iscale = -127 / max`` with ``max`` the element of largest magnitude (signed),
  ``q = min(127, round(iscale * x))``, ``d = 1 / iscale``.
- **Attention** (llama-cpp-python's default path, no flash attention): K (after RoPE) and V are stored
  in an f16 cache, Q is rounded to f16 for ``K·Q``, the softmax runs in float32 and its
  probabilities are rounded to f16 for the product with V.
- **RMSNorm** as ggml computes it (its output is quantised next, so its last bit matters), and **RoPE
  angles** ``p * base^(-2i/d)`` by repeated float32 multiplication, as llama.cpp builds them.

Checked against llama.cpp tensor by tensor (its eval callback): fed the same inputs, every operation
agrees to float32 rounding. What is not emulated: the order of float32 sums in its SIMD kernels, the
exp approximation in its softmax / SiLU, the flash-attention path (f16 accumulation of V), GPU and
repacked (AMX, ARM) CPU kernels. Those last-bit differences remain, and a deep model amplifies them
through the 8-bit roundings (SmolLM2-135M: ~96% top-1 agreement, no better than the model agrees with
itself under 1-ulp noise; docs/interop.md and docs/LOG.md). The emulated model runs eagerly only (no static decode
steps / CUDA graphs), at about 2.5x the plain model's CPU time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmstack.model.llama import GPT, MLP, Attention, KVCache, RMSNorm, apply_rope

VEC_DOT_TYPES = {
    "F32": None,
    "F16": "f16",
    "BF16": "bf16",
    "Q8_0": "q8_0",
    "Q4_0": "q8_0",
    "Q5_0": "q8_0",
    "Q4_1": "q8_1",
    "Q5_1": "q8_1",
    "Q4_K": "q8_k",
    "Q5_K": "q8_k",
    "Q6_K": "q8_k",
}
"""GGML weight type -> the type ggml's CPU backend converts the other matmul operand to."""


def round_like_ggml(x: torch.Tensor, vec_dot: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` (..., K) quantised to ``vec_dot`` and back to float32, as a ggml CPU matmul sees it.

    Second result, for Q8_1 only: per block (..., K / 32), the stored ``s`` minus the ``d * sum q`` that
    the dequantised values imply (the weight's block minimum multiplies ``s``).
    """
    x = x.float()
    if vec_dot is None:
        return x, None
    if vec_dot == "f16":
        return x.half().float(), None
    if vec_dot == "bf16":
        return x.bfloat16().float(), None
    block = 256 if vec_dot == "q8_k" else 32
    if x.shape[-1] % block:
        raise ValueError(f"{vec_dot} activations need rows that are a multiple of {block}, got {x.shape[-1]}")
    xb = x.reshape(*x.shape[:-1], -1, block)  # (..., n_blocks, block)
    if vec_dot == "q8_k":
        idx = xb.abs().argmax(-1, keepdim=True)
        signed_max = xb.gather(-1, idx)
        iscale = torch.where(signed_max != 0, torch.full_like(signed_max, -127.0) / signed_max, signed_max * 0)
        q = torch.round(xb * iscale).clamp(max=127)
        return (q * torch.where(iscale != 0, 1.0 / iscale, iscale)).reshape(x.shape), None
    amax = torch.linalg.vector_norm(xb, ord=math.inf, dim=-1, keepdim=True)
    # 127.f / amax as C divides it (torch computes `scalar / tensor` as a reciprocal times the scalar, an ulp
    # off often enough to flip ties: x * id landing on .5); an all-zero block gets id 0
    inv = torch.full_like(amax, 127.0).div_(amax).nan_to_num_(posinf=0.0)
    q = (xb * inv).round_()  # half to even, as _mm256_round_ps
    d = amax / 127
    d16 = d.half().float()
    xq = (q * d16).reshape(x.shape)
    if vec_dot == "q8_0":
        return xq, None
    qsum = q.sum(-1)
    s = (d.squeeze(-1) * qsum).half().float()
    return xq, s - d16.squeeze(-1) * qsum


class GGMLLinear(nn.Linear):
    """A bias-free ``nn.Linear`` (same weight, same state-dict key) that rounds its input as ggml does
    for a weight of type ``ggml_type``; ``block_min`` (out, in / 32) are the minima of Q4_1 / Q5_1 weight
    blocks, for the Q8_1 ``s`` correction."""

    def __init__(self, linear: nn.Linear, ggml_type: str, block_min: torch.Tensor | None = None) -> None:
        if ggml_type not in VEC_DOT_TYPES:
            raise ValueError(f"no llama.cpp emulation for weight type {ggml_type} (known: {list(VEC_DOT_TYPES)})")
        if linear.bias is not None:
            raise ValueError("GGMLLinear emulates bias-free projections only")
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = linear.weight  # shared: a tied head stays tied
        self.ggml_type: str = ggml_type
        self.vec_dot: str | None = VEC_DOT_TYPES[ggml_type]
        self.block_min: torch.Tensor | None
        self.register_buffer("block_min", block_min, persistent=False)

    def forward(self, x: torch.Tensor, rounded: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
        """``rounded``: ``round_like_ggml(x, self.vec_dot)`` when the caller has it already."""
        xq, s_err = rounded if rounded is not None else round_like_ggml(x, self.vec_dot)
        y = F.linear(xq, self.weight)
        if s_err is not None and self.block_min is not None:
            y = y + F.linear(s_err, self.block_min)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ggml_type={self.ggml_type}"


def project(x: torch.Tensor, *linears: nn.Module) -> list[torch.Tensor]:
    """Several projections of one input (q/k/v, gate/up), rounding it once per vec_dot type."""
    rounded: dict[str | None, tuple[torch.Tensor, torch.Tensor | None]] = {}
    out = []
    for linear in linears:
        assert isinstance(linear, GGMLLinear), "emulate_llamacpp replaces every projection"
        if linear.vec_dot not in rounded:
            rounded[linear.vec_dot] = round_like_ggml(x, linear.vec_dot)
        out.append(linear(x, rounded[linear.vec_dot]))
    return out


def f16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


class LlamaCppAttention(Attention):
    """``Attention`` with llama.cpp's f16 KV cache and f16 operands (non-flash path, see the module doc)."""

    def forward(self, x_BTC: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x_BTC.shape
        H, KV, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = project(x_BTC, self.q_proj, self.k_proj, self.v_proj)
        cos_T1D, sin_T1D = cos[:, None], sin[:, None]
        q_BHTD = f16(apply_rope(q.view(B, T, H, D), cos_T1D, sin_T1D).transpose(1, 2))  # f16 for K.Q
        k_BHTD = f16(apply_rope(k.view(B, T, KV, D), cos_T1D, sin_T1D).transpose(1, 2))  # the f16 cache
        v_BHTD = f16(v.view(B, T, KV, D).transpose(1, 2))
        mask = None
        if cache is not None:
            if cache.static:
                raise ValueError("llama.cpp emulation runs eagerly; static decode steps are not supported")
            k_BHTD, v_BHTD = cache.update(self.layer_idx, k_BHTD, v_BHTD)
            mask = cache.attention_mask(T, k_BHTD.shape[2], x_BTC.device)
        S = k_BHTD.shape[2]
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=x_BTC.device).tril(diagonal=S - T)
        # grouped-query attention without copying K/V: the H // KV query heads of a kv head share a matmul
        q_BKtD = q_BHTD.reshape(B, KV, H // KV * T, D)
        scores_BHTS = (q_BKtD @ k_BHTD.transpose(-1, -2)).view(B, H, T, S).mul_(1.0 / math.sqrt(D))
        probs_BHTS = scores_BHTS.masked_fill_(~mask, float("-inf")).softmax(dim=-1)
        # the probabilities meet the f16 V cache as f16
        y_BHTD = (f16(probs_BHTS).view(B, KV, H // KV * T, S) @ v_BHTD).view(B, H, T, D)
        return self.o_proj(y_BHTD.transpose(1, 2).reshape(B, T, H * D))


class LlamaCppMLP(MLP):
    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        gate, up = project(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class LlamaCppRMSNorm(RMSNorm):
    """ggml's ``rms_norm`` then ``mul``: squares in float32 summed in float64, ``1 / sqrtf(mean + eps)`` in
    float32. Its output is quantised next, so a last-bit difference here flips roundings there."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = (x * x).double().sum(-1, keepdim=True).div(x.shape[-1]).float()
        scale = 1.0 / torch.sqrt(mean + torch.tensor(self.eps, dtype=torch.float32))
        return (x * scale) * self.weight


def llamacpp_rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (T, head_dim) in our rotate-half layout, with llama.cpp's float32 angles."""
    scale = np.float32(theta) ** np.float32(-2.0 / head_dim)
    angle = np.arange(max_seq_len, dtype=np.float32)
    angles = np.empty((max_seq_len, head_dim // 2), dtype=np.float32)
    for i in range(head_dim // 2):
        angles[:, i] = angle
        angle = angle * scale  # float32 * float32, rounded each step as in C
    half = torch.from_numpy(angles)
    emb = torch.cat((half, half), dim=-1)
    return emb.cos(), emb.sin()


@torch.no_grad()
def emulate_llamacpp(
    model: GPT, weight_types: Mapping[str, str], block_mins: Mapping[str, torch.Tensor] | None = None
) -> GPT:
    """Switch ``model`` (in place) to llama.cpp's CPU arithmetic; returns it.

    ``weight_types``: GGML type name of every projection weight, by state-dict name (``lm_head.weight``
    included: for a tied head, the embedding's type); ``block_mins``: for Q4_1 / Q5_1 weights, the
    per-block minima (out, in / 32), rows in our (unpermuted) order. The state dict is unchanged.
    """
    block_mins = block_mins or {}
    cfg = model.config
    if model.model.embed_tokens.weight.dtype != torch.float32:
        raise ValueError("llama.cpp emulation needs a float32 model")

    # the subclasses only override forward: same state, same state-dict keys
    for layer in model.model.layers:
        layer.input_layernorm.__class__ = layer.post_attention_layernorm.__class__ = LlamaCppRMSNorm
        layer.self_attn.__class__, layer.mlp.__class__ = LlamaCppAttention, LlamaCppMLP
    model.model.norm.__class__ = LlamaCppRMSNorm
    for name, module in list(model.named_modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                key = f"{name}.{attr}.weight".lstrip(".")
                if key not in weight_types:
                    raise ValueError(f"llama.cpp emulation: no GGML type given for {key}")
                setattr(module, attr, GGMLLinear(child, weight_types[key], block_mins.get(key)))
    cos, sin = llamacpp_rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    model.rope_cos.copy_(cos)
    model.rope_sin.copy_(sin)
    model.supports_static_cache = False  # fused decode weights would bypass the rounding
    return model
