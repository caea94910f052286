"""GGUF (llama.cpp's file format): import llama / qwen2 architecture models, export ours as F16 or Q8_0.

Read and written with the ``gguf`` package (``GGUFReader`` + ``gguf.quants.dequantize`` / ``quantize``).
Two conversions matter for correctness:

- **Tensor names**: GGUF's ``blk.N.attn_q.weight`` (and Qwen2's ``blk.N.attn_q.bias``) etc. map
  one-to-one to HF Llama names (``NAMES``).
- **Q/K row order**: for the ``llama`` architecture llama.cpp applies RoPE to adjacent pairs (GPT-J style)
  while HF/our model rotates halves; its converter permutes the rows of ``attn_q``/``attn_k`` so that the
  two agree. Import undoes that permutation (``unpermute_qk``), export applies it (``permute_qk``). The
  ``qwen2`` architecture rotates halves in llama.cpp too: its rows are stored as HF has them.

Families (``ModelConfig.family``), as llama.cpp's ``convert_hf_to_gguf.py`` writes them: ``llama`` and
``mistral`` are ``general.architecture = "llama"``, ``qwen2`` is ``"qwen2"`` (with q/k/v bias tensors). A
sliding window is written as ``{arch}.attention.sliding_window``, which llama.cpp's converter does not
write for Mistral and its llama / qwen2 graphs do not read (they attend to the whole context: the same
result while it is no longer than the window); import reads it back, and a llama file with a window
imports as family ``mistral``. An explicit head_dim is ``{arch}.attention.key_length``.

RoPE scaling, as llama.cpp reads it: ``linear`` and ``yarn`` as ``{arch}.rope.scaling.*`` keys (type,
factor, original_context_length, yarn_beta_fast / slow, yarn_attn_factor); ``llama3`` as the
``rope_freqs.weight`` tensor of per-frequency divisors (``llama3_freq_factors``); ``dynamic`` as nothing
(within the context it is plain RoPE). Our exact parameters also travel in ``llmstack.rope_scaling`` (JSON;
llama.cpp ignores the key), which import prefers. A file without it (llama.cpp's own Llama 3.1-3.3
conversions) whose ``rope_freqs`` match Llama 3's (factor, 1, 4, 8192), llama.cpp's converter's
defaults, imports as that ``llama3`` scaling; other factors are refused.

The tokenizer travels as GGUF metadata: ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE), the
vocabulary as byte-level strings indexed by id, merges as "a b" strings, token types (control for
specials), bos/eos ids, ``tokenizer.chat_template`` and ``tokenizer.ggml.pre``, llama.cpp's name for the
split before BPE (``gguf_pre_name``: the name an imported tokenizer came with, "qwen2" for ours).
Imported tokenizers become ``HFTokenizer`` (see ``interop/tokenizer.py`` for why not tiktoken ranks).

``import_gguf(path, emulate="llama.cpp")`` computes as llama.cpp's CPU backend does on the file's tensor
types (``interop/llamacpp_numerics.py``), for comparisons with llama.cpp.

What is not covered: architectures other than ``llama`` and ``qwen2``, rope scaling types other than the
above, partial RoPE, the llama.cpp emulation of anything but plain llama models, and quantisation types
outside ``SUPPORTED_TYPES`` (each refused by name); export quantises 2-D weights only, norms and biases
stay F32.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmstack.interop.bundle import Bundle, check_vocab
from llmstack.interop.gguf_experts import (
    EXPERT_LAYER_NAMES,
    moe_from_metadata,
    split_experts,
    stack_experts,
    write_experts_metadata,
)
from llmstack.interop.gguf_layout import check_gguf_layout
from llmstack.interop.llamacpp_numerics import emulate_llamacpp
from llmstack.interop.tokenizer import (
    HFTokenizer,
    byte_level,
    gguf_pre_name,
    hf_from_vocab_merges,
    merges_from_ranks,
)
from llmstack.model.config import ModelConfig, RopeScaling
from llmstack.model.llama import GPT
from llmstack.model.rope import llama3_freq_factors
from llmstack.tokenizer.bpe import Tokenizer
from llmstack.training.checkpoint import ModelFileError, load_state

NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    **EXPERT_LAYER_NAMES,
}
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
"""Tensor types import dequantises (``gguf.quants`` implements them in numpy)."""

ARCHITECTURES = ("llama", "qwen2")
"""GGUF ``general.architecture`` values import reads."""
ROPE_FREQS = "rope_freqs.weight"
"""llama.cpp's per-frequency RoPE divisors (Llama 3.1's scaling), one per rotated pair."""
ROPE_SCALING_KEY = "llmstack.rope_scaling"
"""Our exact ``RopeScaling`` as JSON, beside llama.cpp's keys (which cannot hold all of it)."""

EXPORT_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
"""f16 and q8_0 are the ones to ship; f32, q4_0 and q4_1 exist so tests can write every type import reads."""
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3  # gguf.TokenType values
EMULATIONS = (None, "llama.cpp")
"""``import_gguf(emulate=...)``: None computes in float32; "llama.cpp" rounds as its CPU backend does."""


def gguf_to_hf_name(name: str) -> str:
    if name in NAMES:
        return NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise ValueError(f"unknown GGUF tensor {name!r}")


def hf_to_gguf_name(name: str) -> str:
    inverse = {v: k for k, v in NAMES.items()}
    if name in inverse:
        return inverse[name]
    layer_inverse = {v: k for k, v in LAYER_NAMES.items()}
    _, _, idx, *rest = name.split(".")
    module, param = ".".join(rest[:-1]), rest[-1]
    return f"blk.{idx}.{layer_inverse[module]}.{param}"


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp interleaved pairs (as ``convert_hf_to_gguf.py``'s ``permute``)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of ``permute_qk``."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- import
def import_gguf(path: str | Path, emulate: str | None = None) -> Bundle:
    """Load a llama / qwen2 architecture GGUF file: config from metadata, dequantised weights, tokenizer, template.

    ``emulate="llama.cpp"`` makes the model round activations, the KV cache and RoPE angles as llama.cpp's
    CPU backend does on this file's tensor types (``interop/llamacpp_numerics.py``): for comparisons
    with llama.cpp. The default computes in float32 on the exactly dequantised weights.
    """
    from gguf import GGUFReader  # heavy: ~0.1 s to import; only GGUF files need it
    from gguf.quants import dequantize  # heavy: see import_gguf

    if emulate not in EMULATIONS:
        raise ValueError(f"unknown emulation {emulate!r} (supported: {', '.join(e for e in EMULATIONS if e)})")

    path = Path(path)
    check_gguf_layout(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises several kinds for a truncated or foreign file
        raise ModelFileError(path, f"not a readable GGUF file ({e})") from None
    meta = {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")
    state: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}  # GGML type of each tensor, and Q4_1 / Q5_1 block minima, for emulation
    mins: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        qtype = t.tensor_type.name
        if qtype not in SUPPORTED_TYPES:
            raise ValueError(f"{path}: tensor {t.name} has unsupported type {qtype} (supported: {SUPPORTED_TYPES})")
        try:
            name = t.name if t.name == ROPE_FREQS else gguf_to_hf_name(t.name)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        shape = tuple(reversed(t.shape.tolist()))
        try:
            array = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        except ValueError as e:  # a size that is no whole number of blocks
            raise ModelFileError(path, f"tensor {t.name} is unreadable ({e})") from None
        state[name], types[name] = torch.from_numpy(array), qtype
        if emulate and qtype in ("Q4_1", "Q5_1"):
            mins[name] = _block_minima(t.data, t.tensor_type, shape)
    if "model.embed_tokens.weight" not in state:
        raise ValueError(f"{path}: tensor token_embd.weight is missing")
    rope_freqs = state.pop(ROPE_FREQS, None)
    cfg = _config_from_metadata(meta, arch, path, state["model.embed_tokens.weight"].shape[0], rope_freqs)
    if emulate and (cfg.family != "llama" or cfg.rope_scaling):
        raise ValueError(f"{path}: llama.cpp emulation covers plain llama models (no biases, window, rope scaling)")
    for tensors in (state, mins) if arch == "llama" else ():
        for name in list(tensors):
            if name.endswith("q_proj.weight"):
                tensors[name] = unpermute_qk(tensors[name], cfg.n_head)
            elif name.endswith("k_proj.weight"):
                tensors[name] = unpermute_qk(tensors[name], cfg.n_kv_head)
    if "lm_head.weight" not in state:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "tie_embeddings": True})
        types["lm_head.weight"] = types["model.embed_tokens.weight"]  # the head multiplies by the embedding
        if "model.embed_tokens.weight" in mins:
            mins["lm_head.weight"] = mins["model.embed_tokens.weight"]
    model = GPT(cfg)
    load_state(model, split_experts(state), str(path), tied=cfg.tie_embeddings)
    if emulate == "llama.cpp":
        emulate_llamacpp(model, types, mins)
    tok = _tokenizer(reader, path)
    check_vocab(cfg.vocab_size, tok, str(path))
    template = meta.get("tokenizer.chat_template")
    return Bundle(model.eval(), tok, template if isinstance(template, str) else None, tok.bos_token, tok.eos_token)


def _block_minima(data: np.ndarray, qtype: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """The f16 minimum ``m`` of every Q4_1 / Q5_1 block (bytes 2..3 of each, after the scale ``d``)."""
    from gguf import GGML_QUANT_SIZES  # heavy: see import_gguf

    block, size = GGML_QUANT_SIZES[qtype]
    raw = np.ascontiguousarray(data).reshape(-1, size)[:, 2:4]
    m = np.ascontiguousarray(raw).view(np.float16).astype(np.float32)
    return torch.from_numpy(m.reshape(*shape[:-1], shape[-1] // block))


def _field_value(field: Any) -> Any:
    try:
        return field.contents()
    except Exception:  # a value type this gguf version cannot render; we do not read it anyway
        return None


def _config_from_metadata(
    meta: dict[str, Any], arch: str, path: Path, vocab_size: int, rope_freqs: torch.Tensor | None
) -> ModelConfig:
    def get(key: str, default: Any = None, kind: type = int) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelFileError(path, f"metadata {arch}.{key} is missing")
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise ModelFileError(path, f"metadata {arch}.{key} is {str(value)[:40]!r}, not a number") from None

    n_embd, n_head = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", n_embd // max(1, n_head))
    if get("attention.value_length", head_dim) != head_dim:
        raise ValueError(f"{path}: attention.value_length != attention.key_length is not supported")
    if get("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(
            f"{path}: rope.dimension_count {get('rope.dimension_count')} != head dim {head_dim} (partial RoPE)"
        )
    theta = get("rope.freq_base", 10000.0, float)
    window = get("attention.sliding_window", 0) or None  # 0: none (llama.cpp's way of saying so)
    scaling = _rope_scaling(meta, arch, path, head_dim, theta, rope_freqs)
    moe = moe_from_metadata(meta, arch, get("feed_forward_length"))
    try:
        return ModelConfig(
            vocab_size=vocab_size,  # the embedding's rows; the tokenizer is checked against it
            n_layer=get("block_count"),
            n_embd=n_embd,
            n_head=n_head,
            n_kv_head=get("attention.head_count_kv", n_head),
            intermediate_size=get("feed_forward_length"),
            max_seq_len=get("context_length"),
            rope_theta=theta,
            norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5, float),
            tie_embeddings=False,
            head_dim=head_dim,
            attention_bias=arch == "qwen2",
            sliding_window=window,
            rope_scaling=scaling,
            family="qwen2" if arch == "qwen2" else "mixtral" if moe else "mistral" if window else "llama",
            moe=moe,
        )
    except ValueError as e:  # ModelConfig's own checks: sizes that cannot go together
        raise ModelFileError(path, f"metadata is not a usable {arch} configuration ({e})") from None


def _rope_scaling(
    meta: dict[str, Any], arch: str, path: Path, head_dim: int, theta: float, rope_freqs: torch.Tensor | None
) -> RopeScaling | None:
    """The file's RoPE scaling: ours if stored, else llama.cpp's keys, else Llama 3's from ``rope_freqs``."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    stored = meta.get(ROPE_SCALING_KEY)

    def key(name: str) -> Any:
        return meta.get(f"{arch}.rope.scaling.{name}")

    try:
        if stored is not None:
            scaling = RopeScaling(**json.loads(stored))
        elif kind in (None, "none"):
            scaling = None
        elif kind == "linear":
            scaling = RopeScaling("linear", float(key("factor")))
        elif kind == "yarn":
            scaling = RopeScaling(
                "yarn",
                float(key("factor")),
                original_max_position_embeddings=int(key("original_context_length")),
                attention_factor=key("yarn_attn_factor"),
                beta_fast=key("yarn_beta_fast"),
                beta_slow=key("yarn_beta_slow"),
            )
        else:
            raise ValueError(f"{path}: unsupported rope scaling {kind!r} (supported: none, linear, yarn, llama3)")
    except (TypeError, json.JSONDecodeError) as e:  # a missing key (None), a mistyped value, broken JSON
        raise ModelFileError(path, f"unreadable rope scaling metadata ({e})") from None
    if rope_freqs is None:
        return scaling
    if scaling is None:  # llama.cpp's conversion of Llama 3.1-3.3: the factors alone, made with these defaults
        factor = float(rope_freqs.max())
        scaling = RopeScaling(
            "llama3", factor, original_max_position_embeddings=8192, low_freq_factor=1.0, high_freq_factor=4.0
        )
    expected = llama3_freq_factors(head_dim, theta, scaling) if scaling.rope_type == "llama3" else None
    if expected is None or expected.shape != rope_freqs.shape or not torch.allclose(expected, rope_freqs, rtol=1e-5):
        raise ValueError(f"{path}: {ROPE_FREQS} does not hold Llama 3 rope scaling factors of {scaling} (unsupported)")
    return scaling


def _tokenizer(reader: Any, path: Path) -> HFTokenizer:
    fields = reader.fields

    def value(key: str) -> Any:
        return _field_value(fields[key]) if key in fields else None

    model = value("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{path}: unsupported tokenizer model {model!r} (supported: gpt2, i.e. byte-level BPE)")
    tokens, merges, types = (
        value("tokenizer.ggml.tokens"),
        value("tokenizer.ggml.merges"),
        value("tokenizer.ggml.token_type"),
    )
    if not tokens or merges is None:
        raise ValueError(f"{path}: tokenizer.ggml.tokens / tokenizer.ggml.merges are missing")
    if not all(isinstance(t, str) for t in [*tokens, *merges]):
        raise ModelFileError(path, "tokenizer.ggml.tokens / tokenizer.ggml.merges must be lists of strings")
    types = types or [TOKEN_NORMAL] * len(tokens)
    specials = [i for i, kind in enumerate(types) if kind == TOKEN_CONTROL]
    pre = value("tokenizer.ggml.pre")
    try:
        raw = hf_from_vocab_merges(tokens, merges, specials, pre)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    except Exception as e:  # the tokenizers library raises a plain Exception for inconsistent merges
        raise ModelFileError(path, f"unreadable tokenizer metadata ({e})") from None

    def token(key: str) -> str | None:
        i = value(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    add_bos = value("tokenizer.ggml.add_bos_token")  # absent: llama.cpp's default, yes only for Llama 3's split
    add_bos = add_bos if isinstance(add_bos, bool) else pre in ("llama3", "llama-v3", "llama-bpe")
    bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
    return HFTokenizer(raw, bos, eos, gguf_pre=pre, add_bos=add_bos)


# ----------------------------------------------------------------------------- export
def export_gguf(bundle: Bundle, out: str | Path, quant: str = "f16") -> Path:
    """Write ``bundle`` (a ``GPT`` of any family) to ``out`` as GGUF; written to a temp file, then renamed."""
    from gguf import GGUFWriter  # heavy: see import_gguf

    out = Path(out)
    if quant not in EXPORT_TYPES:
        raise ValueError(f"unsupported export quantisation {quant!r} (supported: {', '.join(EXPORT_TYPES)})")
    if out.exists():
        raise ValueError(f"{out}: already exists; choose a new --out (export never overwrites)")
    if not isinstance(bundle.model, GPT):
        raise ValueError(f"GGUF export supports Llama-architecture models, not {bundle.architecture}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = GGUFWriter(str(tmp), gguf_architecture(bundle.model.config))
        _write_metadata(writer, bundle, bundle.model.config, quant)
        _write_tokenizer(writer, bundle)
        _write_tensors(writer, bundle.model, quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.rename(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def gguf_architecture(cfg: ModelConfig) -> str:
    """llama.cpp's architecture for a family: Mistral is a llama to it."""
    return "qwen2" if cfg.family == "qwen2" else "llama"


def _write_metadata(writer: Any, bundle: Bundle, cfg: ModelConfig, quant: str) -> None:
    from gguf import LlamaFileType  # heavy: see import_gguf

    writer.add_name("llmstack")
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.sliding_window is not None:
        writer.add_sliding_window(cfg.sliding_window)
    write_experts_metadata(writer, cfg)
    if cfg.rope_scaling is not None:
        _write_rope_scaling(writer, cfg.rope_scaling)
    writer.add_file_type(LlamaFileType["ALL_F32" if quant == "f32" else f"MOSTLY_{quant.upper()}"])


def _write_rope_scaling(writer: Any, s: RopeScaling) -> None:
    """llama.cpp's keys where it has them (as its converter writes them), and ours in full."""
    from gguf import RopeScalingType  # heavy: see import_gguf

    if s.rope_type in ("linear", "yarn"):
        writer.add_rope_scaling_type(RopeScalingType(s.rope_type))
        writer.add_rope_scaling_factor(s.factor)
    if s.rope_type == "yarn":
        assert s.original_max_position_embeddings is not None
        writer.add_rope_scaling_orig_ctx_len(s.original_max_position_embeddings)
        for value, add in (
            (s.attention_factor, writer.add_rope_scaling_yarn_attn_factor),
            (s.beta_fast, writer.add_rope_scaling_yarn_beta_fast),
            (s.beta_slow, writer.add_rope_scaling_yarn_beta_slow),
        ):
            if value is not None:
                add(value)
    writer.add_string(ROPE_SCALING_KEY, json.dumps(s.to_hf()))


def _write_tokenizer(writer: Any, bundle: Bundle) -> None:
    """Vocabulary padded to the embedding size, so llama.cpp's vocab and the model's rows agree."""
    tok, n_rows = bundle.tokenizer, bundle.model.config.vocab_size
    if isinstance(tok, Tokenizer):
        id_to_token = {rank: byte_level(token) for token, rank in tok.mergeable_ranks.items()}
        merges = [f"{a} {b}" for a, b in merges_from_ranks(tok.mergeable_ranks)]
    else:
        vocab = tok.raw.get_vocab(with_added_tokens=True)
        id_to_token = {i: t for t, i in vocab.items()}
        stored = json.loads(tok.raw.to_str())["model"].get("merges", [])
        merges = [m if isinstance(m, str) else " ".join(m) for m in stored]
    id_to_token.update({i: name for name, i in tok.special_tokens.items()})
    tokens = [id_to_token.get(i, f"<|unused_{i}|>") for i in range(n_rows)]
    types = [TOKEN_CONTROL if (i not in id_to_token or tok.is_special(i)) else TOKEN_NORMAL for i in range(n_rows)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(gguf_pre_name(tok))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (
        (bundle.bos_token, writer.add_bos_token_id),
        (bundle.eos_token, writer.add_eos_token_id),
    ):
        if name and name in tok.special_tokens:
            add(tok.special_tokens[name])
    writer.add_add_bos_token(bool(bundle.add_bos))  # llama.cpp drops a template's own leading bos when set
    if bundle.chat_template:
        writer.add_chat_template(bundle.chat_template)


def _write_tensors(writer: Any, model: GPT, quant: str) -> None:
    from gguf import GGMLQuantizationType  # heavy: see import_gguf
    from gguf.quants import quantize  # heavy: see import_gguf

    cfg = model.config
    state = stack_experts(model.state_dict())
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")
    permute = gguf_architecture(cfg) == "llama"
    scaling = cfg.rope_scaling
    if scaling is not None and scaling.rope_type == "llama3":
        writer.add_tensor(ROPE_FREQS, llama3_freq_factors(cfg.head_dim, cfg.rope_theta, scaling).numpy())
    for name, tensor in state.items():
        w = tensor.detach().float().cpu()
        if permute and name.endswith("q_proj.weight"):
            w = permute_qk(w, cfg.n_head)
        elif permute and name.endswith("k_proj.weight"):
            w = permute_qk(w, cfg.n_kv_head)
        array = w.numpy()
        gguf_name = hf_to_gguf_name(name)
        if array.ndim == 1 or quant == "f32":
            writer.add_tensor(gguf_name, array.astype(np.float32))
        elif quant.startswith("q") and array.shape[-1] % 32 == 0:  # blocks of 32 along a row
            qtype = GGMLQuantizationType[quant.upper()]
            writer.add_tensor(gguf_name, quantize(array, qtype), raw_dtype=qtype)
        else:  # f16, and rows too short for a block
            writer.add_tensor(gguf_name, array.astype(np.float16))
