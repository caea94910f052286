"""GGUF (llama.cpp's file format): import Llama-architecture models, export ours as F16 or Q8_0.

Read and written with the ``gguf`` package (``GGUFReader`` + ``gguf.quants.dequantize`` / ``quantize``).
Two conversions matter for correctness:

- **Tensor names**: GGUF's ``blk.N.attn_q.weight`` etc. map one-to-one to HF Llama names (``NAMES``).
- **Q/K row order**: llama.cpp applies RoPE to adjacent pairs (GPT-J style) while HF/our model rotates
  halves; its converter permutes the rows of ``attn_q``/``attn_k`` so that the two agree. Import undoes
  that permutation (``unpermute_qk``), export applies it (``permute_qk``).

The tokenizer travels as GGUF metadata: ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE), the
vocabulary as byte-level strings indexed by id, merges as "a b" strings, token types (control for
specials), bos/eos ids, ``tokenizer.chat_template`` and ``tokenizer.ggml.pre``, llama.cpp's name for the
split before BPE (``gguf_pre_name``: the name an imported tokenizer came with, "qwen2" for ours).
Imported tokenizers become ``HFTokenizer`` (see ``interop/tokenizer.py`` for why not tiktoken ranks).

``import_gguf(path, emulate="llama.cpp")`` computes as llama.cpp's CPU backend does on the file's tensor
types (``interop/llamacpp_numerics.py``), for comparisons with llama.cpp.

What is not covered: architectures other than ``llama``, rope scaling, and quantisation types outside
``SUPPORTED_TYPES`` (each refused by name); export quantises 2-D weights only, norms stay F32.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmstack.interop.bundle import Bundle, check_vocab
from llmstack.interop.llamacpp_numerics import emulate_llamacpp
from llmstack.interop.tokenizer import (
    HFTokenizer,
    byte_level,
    gguf_pre_name,
    hf_from_vocab_merges,
    merges_from_ranks,
)
from llmstack.model.config import ModelConfig
from llmstack.model.llama import GPT
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
}
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
"""Tensor types import dequantises (``gguf.quants`` implements them in numpy)."""

EXPORT_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
"""f16 and q8_0 are the ones to ship; f32, q4_0 and q4_1 exist so tests can write every type import reads."""
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3  # gguf.TokenType values
EMULATIONS = (None, "llama.cpp")
"""``import_gguf(emulate=...)``: None computes in float32; "llama.cpp" rounds as its CPU backend does."""

VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
"""Bytes of each fixed-size GGUF metadata value type (uint8 .. float64; 8 is a string, 9 an array)."""
GGUF_STRING, GGUF_ARRAY, GGUF_UINT32 = 8, 9, 4
MAX_METADATA_ITEMS, MAX_TENSORS = 1 << 21, 1 << 16
"""Bounds on a file's metadata array elements (``GGUFReader`` keeps a numpy view per element, ~0.7 KB and ~8 us
each with gguf 0.19; Llama 3's 128k tokens + 280k merges stay well under) and on its tensors (a few thousand)."""


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
    """Load a llama-architecture GGUF file: config from metadata, dequantised weights, tokenizer, template.

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
    if arch != "llama":
        raise ValueError(f"{path}: unsupported architecture {arch!r} (supported: llama)")
    state: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}  # GGML type of each tensor, and Q4_1 / Q5_1 block minima, for emulation
    mins: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        qtype = t.tensor_type.name
        if qtype not in SUPPORTED_TYPES:
            raise ValueError(f"{path}: tensor {t.name} has unsupported type {qtype} (supported: {SUPPORTED_TYPES})")
        try:
            name = gguf_to_hf_name(t.name)
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
    cfg = _config_from_metadata(meta, path, vocab_size=state["model.embed_tokens.weight"].shape[0])
    for tensors in (state, mins):
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
    load_state(model, state, str(path), tied=cfg.tie_embeddings)
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


def _config_from_metadata(meta: dict[str, Any], path: Path, vocab_size: int) -> ModelConfig:
    def get(key: str, default: Any = None, kind: type = int) -> Any:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise ModelFileError(path, f"metadata llama.{key} is missing")
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise ModelFileError(path, f"metadata llama.{key} is {str(value)[:40]!r}, not a number") from None

    if meta.get("llama.rope.scaling.type") not in (None, "none"):
        raise ValueError(f"{path}: unsupported rope scaling {meta['llama.rope.scaling.type']!r}")
    n_embd, n_head = get("embedding_length"), get("attention.head_count")
    head_dim = get("rope.dimension_count", n_embd // max(1, n_head))
    if head_dim != n_embd // max(1, n_head):
        raise ValueError(f"{path}: rope.dimension_count {head_dim} != embedding_length / head_count (partial RoPE)")
    try:
        return ModelConfig(
            vocab_size=vocab_size,  # the embedding's rows; the tokenizer is checked against it
            n_layer=get("block_count"),
            n_embd=n_embd,
            n_head=n_head,
            n_kv_head=get("attention.head_count_kv", n_head),
            intermediate_size=get("feed_forward_length"),
            max_seq_len=get("context_length"),
            rope_theta=get("rope.freq_base", 10000.0, float),
            norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5, float),
            tie_embeddings=False,
        )
    except ValueError as e:  # ModelConfig's own checks: sizes that cannot go together
        raise ModelFileError(path, f"metadata is not a usable llama configuration ({e})") from None


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

    return HFTokenizer(raw, token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"), gguf_pre=pre)


def check_gguf_layout(path: Path) -> None:
    """Refuse a GGUF file whose header promises more than the file holds, before ``GGUFReader`` allocates for it.

    The reader trusts every count and length in the header (a 121-byte file claiming a 2**40-element array grew
    it to 7 GB). Here each one is checked against the bytes left in the file, the metadata's array elements and
    the tensor count against ``MAX_METADATA_ITEMS`` / ``MAX_TENSORS``, and each tensor's data against the end
    of the file. Raises ``ModelFileError`` naming the file and the first field that does not fit.
    """
    size = path.stat().st_size
    if size < 24:
        raise ModelFileError(path, f"not a GGUF file ({size} bytes, shorter than a GGUF header)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        _GGUFHeader(buf, path).check()


class _GGUFHeader:
    """A walk over a GGUF header (magic, version, counts, metadata, tensor infos) with every length bounded."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.path, self.size, self.pos, self.order, self.items = buf, path, len(buf), 0, "<", 0

    def fail(self, reason: str) -> ModelFileError:
        return ModelFileError(self.path, f"damaged GGUF file: {reason}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(
                f"{what} needs {n:,} bytes at offset {self.pos:,}; the file has {self.size - self.pos:,} left"
            )

    def read(self, fmt: str, what: str) -> int:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> bytes:
        n = self.read("Q", f"{what}'s length")
        self.need(n, f"{what} ({n:,} bytes)")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos])

    def value(self, vtype: int, what: str) -> None:
        if vtype == GGUF_ARRAY:
            itype, count = self.read("I", what), self.read("Q", what)
            self.items += count
            if self.items > MAX_METADATA_ITEMS:
                raise self.fail(f"{what}: {self.items:,} metadata array elements, more than {MAX_METADATA_ITEMS:,}")
            if itype not in VALUE_SIZES and itype != GGUF_STRING:  # llama.cpp reads no nested arrays either
                raise self.fail(f"{what}: an array of value type {itype}")
            self.need(count * VALUE_SIZES.get(itype, 8), f"{what} (an array of {count:,} elements)")
            for _ in range(count if itype == GGUF_STRING else 0):
                self.string(what)
            self.pos += count * VALUE_SIZES.get(itype, 0)
        elif vtype == GGUF_STRING:
            self.string(what)
        elif vtype in VALUE_SIZES:
            self.need(VALUE_SIZES[vtype], what)
            self.pos += VALUE_SIZES[vtype]
        else:
            raise self.fail(f"{what}: unknown value type {vtype}")

    def check(self) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # heavy: see import_gguf

        if bytes(self.buf[:4]) != b"GGUF":
            raise self.fail(f"the file starts with {bytes(self.buf[:4])!r}, not the GGUF magic")
        self.pos = 4
        version = self.read("I", "version")
        if version & 0xFFFF == 0:  # written on a big-endian machine
            self.order, self.pos = ">", 4
            version = self.read("I", "version")
        if version not in (2, 3):
            raise self.fail(f"version {version} (supported: 2, 3)")
        n_tensors, n_kv = self.read("Q", "tensor count"), self.read("Q", "metadata count")
        if n_tensors > MAX_TENSORS:
            raise self.fail(f"{n_tensors:,} tensors, more than {MAX_TENSORS:,}")
        self.need(n_kv * 13 + n_tensors * 24, f"{n_kv:,} metadata entries and {n_tensors:,} tensor infos")
        alignment = 32
        for i in range(n_kv):
            key = self.string(f"metadata key {i}")
            what = f"metadata {key[:60].decode('utf-8', 'replace')!r}"
            vtype = self.read("I", what)
            if key == b"general.alignment" and vtype == GGUF_UINT32:
                alignment = self.read("I", what)
            else:
                self.value(vtype, what)
        if alignment <= 0 or alignment & (alignment - 1):
            raise self.fail(f"general.alignment {alignment} is not a power of two")
        tensors = []
        for i in range(n_tensors):
            name = self.string(f"tensor {i}'s name").decode("utf-8", "replace")
            n_dims = self.read("I", f"tensor {name}'s dimension count")
            if n_dims > 4:
                raise self.fail(f"tensor {name} has {n_dims} dimensions (GGUF allows 4)")
            dims = [self.read("Q", f"tensor {name}'s shape") for _ in range(n_dims)]
            tensors.append(
                (name, dims, self.read("I", f"tensor {name}'s type"), self.read("Q", f"tensor {name}'s offset"))
            )
        data_start = -(-self.pos // alignment) * alignment
        for name, dims, ttype, offset in tensors:
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                raise self.fail(f"tensor {name} has unknown type {ttype}") from None
            start = data_start + offset
            end = start + math.prod(dims) * type_size // block
            if end > self.size:
                raise self.fail(f"tensor {name}'s data (bytes {start:,}..{end:,}) runs past the end ({self.size:,})")


# ----------------------------------------------------------------------------- export
def export_gguf(bundle: Bundle, out: str | Path, quant: str = "f16") -> Path:
    """Write ``bundle`` (Llama architecture) to ``out`` as GGUF; written to a temp file, then renamed."""
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
        writer = GGUFWriter(str(tmp), "llama")
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


def _write_metadata(writer: Any, bundle: Bundle, cfg: ModelConfig, quant: str) -> None:
    from gguf import LlamaFileType  # heavy: see import_gguf

    writer.add_name("llmstack")
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(LlamaFileType["ALL_F32" if quant == "f32" else f"MOSTLY_{quant.upper()}"])


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
    writer.add_add_bos_token(False)
    if bundle.chat_template:
        writer.add_chat_template(bundle.chat_template)


def _write_tensors(writer: Any, model: GPT, quant: str) -> None:
    from gguf import GGMLQuantizationType  # heavy: see import_gguf
    from gguf.quants import quantize  # heavy: see import_gguf

    cfg = model.config
    state = model.state_dict()
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")
    for name, tensor in state.items():
        w = tensor.detach().float().cpu()
        if name.endswith("q_proj.weight"):
            w = permute_qk(w, cfg.n_head)
        elif name.endswith("k_proj.weight"):
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
