"""Rotary position embeddings: the cos/sin tables of every rope type we run, and the rotation.

``rope_tables`` computes what transformers' ``*RotaryEmbedding`` computes (``modeling_rope_utils.py``), in
the same float32 operations and order, so that logits match at long positions too. Per rope type, the
inverse frequencies ``inv_freq[i] = theta^(-2i/d)`` become:

- ``linear``: ``inv_freq / factor`` (positions interpolated by ``factor``).
- ``dynamic`` (NTK): theta grows with the sequence length, but only once it passes
  ``max_position_embeddings``; within it the table is the default one. Our model's context *is*
  ``max_position_embeddings`` (``max_seq_len``) and longer sequences are refused, so the default table is
  exact here. (Beyond it transformers recomputes ``inv_freq`` for the whole sequence from the new
  length, re-rotating every position, which keys already in a KV cache do not follow.)
- ``yarn``: a per-frequency blend of ``inv_freq`` (extrapolation, high frequencies) and
  ``inv_freq / factor`` (interpolation, low ones) along a linear ramp between the correction dims of
  ``beta_fast`` and ``beta_slow`` rotations over ``original_max_position_embeddings``; cos and sin are
  then multiplied by the attention factor (``0.1 ln(factor) + 1`` unless given, or the ``mscale`` ratio).
- ``llama3``: wavelengths shorter than ``original / high_freq_factor`` are kept, longer than
  ``original / low_freq_factor`` divided by ``factor``, and smoothly interpolated in between.
  ``llama3_freq_factors`` gives the same as llama.cpp's per-frequency divisors (GGUF ``rope_freqs``).

What is not covered: partial rotary embeddings, ``longrope`` and the multimodal / per-layer rope types
(``ModelConfig`` refuses them).
"""

from __future__ import annotations

import math

import torch

from llmstack.model.config import RopeScaling


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i/d), i < d/2, float32 (HF's order of operations)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def inv_freq_and_scale(head_dim: int, theta: float, scaling: RopeScaling | None) -> tuple[torch.Tensor, float]:
    """The inverse frequencies (head_dim / 2,) and the factor cos/sin are multiplied by."""
    inv_freq = default_inv_freq(head_dim, theta)
    if scaling is None or scaling.rope_type == "dynamic":  # dynamic: see the module docstring
        return inv_freq, 1.0
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor, 1.0
    if scaling.rope_type == "yarn":
        return _yarn(head_dim, theta, scaling)
    return _llama3(inv_freq, scaling), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(head_dim: int, theta: float, s: RopeScaling) -> tuple[torch.Tensor, float]:
    assert s.original_max_position_embeddings is not None
    dim, factor, original = head_dim, s.factor, s.original_max_position_embeddings
    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = _yarn_mscale(factor, s.mscale) / _yarn_mscale(factor, s.mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        """The dim whose wavelength makes ``rotations`` turns over the original context."""
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast or 32), correction_dim(s.beta_slow or 1)
    if s.truncate is None or s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1: keep the frequency, 0: interpolate it by factor
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _llama3(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    assert s.original_max_position_embeddings and s.low_freq_factor and s.high_freq_factor
    original, low, high = s.original_max_position_embeddings, s.low_freq_factor, s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / s.factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, smoothed, scaled)


def llama3_freq_factors(head_dim: int, theta: float, s: RopeScaling) -> torch.Tensor:
    """What Llama 3.1's scaling divides each inverse frequency by (head_dim / 2,), float32, computed as
    llama.cpp's ``convert_hf_to_gguf.py`` writes them to the GGUF ``rope_freqs`` tensor: 1 for short
    wavelengths, ``factor`` for long ones, ``1 / ((1 - smooth) / factor + smooth)`` in between."""
    assert s.original_max_position_embeddings and s.low_freq_factor and s.high_freq_factor
    original, low, high = s.original_max_position_embeddings, s.low_freq_factor, s.high_freq_factor
    factors = []
    for freq in default_inv_freq(head_dim, theta).tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            factors.append(1.0)
        elif wavelen > original / low:
            factors.append(s.factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / s.factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, scaling: RopeScaling | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (T, head_dim) in HF's rotate-half layout (frequencies repeated twice)."""
    inv_freq, scale = inv_freq_and_scale(head_dim, theta, scaling)
    t = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, head_dim)
    if scale == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * scale, emb.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the last dim; cos/sin broadcast over the leading dims."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin
