"""Hugging Face model directories: import (Llama and GPT-2 families) and export (``LlamaForCausalLM``).

Import reads ``config.json``, the weights (``model.safetensors``, a sharded safetensors index, or
``pytorch_model.bin``) and the tokenizer (``tokenizer.json``, or GPT-2's ``vocab.json`` + ``merges.txt``)
with ``tokenizer_config.json`` for bos/eos and the chat template. It needs neither ``transformers``
nor network access. What is not covered: SentencePiece (non byte-level) tokenizers, rope scaling,
biases in Llama layers, other architectures; each is refused with its name.

Export writes what ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(dir)`` read offline:
``config.json``, ``generation_config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json`` (with the chat template) and ``special_tokens_map.json``. The directory is
assembled under a temporary name and renamed at the end, so a failure never leaves half of one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as RawHF
from tokenizers import decoders, models, pre_tokenizers

from llmstack.interop.bundle import Bundle, check_vocab
from llmstack.interop.tokenizer import HFTokenizer, hf_from_ranks
from llmstack.io import read_json, write_json
from llmstack.model.config import ModelConfig
from llmstack.model.gpt2 import GPT2, GPT2Config
from llmstack.model.llama import GPT
from llmstack.tokenizer.bpe import Tokenizer
from llmstack.tokenizer.special import PAD
from llmstack.training.checkpoint import load_state

IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
"""Buffers some HF versions save in the state dict; recomputed by the model, never learned."""

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
"""GPT-2 weights HF stores as ``Conv1D`` (in, out); ``nn.Linear`` wants (out, in)."""


# ----------------------------------------------------------------------------- import
def import_hf(path: str | Path) -> Bundle:
    """Load a local HF model directory (Llama or GPT-2 family) into our engine."""
    path = Path(path)
    config = read_json(path / "config.json")
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    model: GPT | GPT2
    if model_type == "gpt2" or "GPT2LMHeadModel" in archs:
        model = GPT2(GPT2Config.from_hf_dict(config))
        state = _gpt2_state(read_weights(path))
    elif model_type == "llama" or "LlamaForCausalLM" in archs:
        model = GPT(ModelConfig.from_hf_dict(config))
        state = read_weights(path)
        if not model.config.tie_embeddings and "lm_head.weight" not in state:
            raise ValueError(f"{path}: lm_head.weight is missing and tie_word_embeddings is false")
    else:
        raise ValueError(
            f"{path / 'config.json'}: unsupported architecture {archs or model_type!r} "
            "(supported: llama / LlamaForCausalLM, gpt2 / GPT2LMHeadModel)"
        )
    load_state(model, state, str(path), tied=isinstance(model, GPT2) or model.config.tie_embeddings)
    tok, tok_config = read_tokenizer(path)
    check_vocab(model.config.vocab_size, tok, str(path))
    return Bundle(model.eval(), tok, _chat_template(path, tok_config), tok.bos_token, tok.eos_token)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory as float32, whichever of the usual file layouts it uses."""
    single, index, pt = path / "model.safetensors", path / "model.safetensors.index.json", path / "pytorch_model.bin"
    if single.exists():
        state = load_file(str(single))
    elif index.exists():
        files = sorted(set(read_json(index)["weight_map"].values()))
        state = {k: v for f in files for k, v in load_file(str(path / f)).items()}
    elif pt.exists():
        state = torch.load(pt, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path}: no weights (expected model.safetensors, {index.name} or {pt.name})")
    return {k: v.float() for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)}


def _gpt2_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF GPT-2 names -> ours: add the ``transformer.`` prefix a bare ``GPT2Model`` lacks; transpose Conv1D."""
    out = {}
    for k, v in state.items():
        if not k.startswith(("transformer.", "lm_head.")):
            k = "transformer." + k
        out[k] = v.t().contiguous() if k.endswith(CONV1D_SUFFIXES) else v
    return out


def read_tokenizer(path: Path) -> tuple[HFTokenizer, dict[str, Any]]:
    """The directory's byte-level BPE tokenizer as an ``HFTokenizer``, plus its ``tokenizer_config.json``."""
    tok_config: dict[str, Any] = {}
    if (path / "tokenizer_config.json").exists():
        tok_config = read_json(path / "tokenizer_config.json")
    if (path / "tokenizer.json").exists():
        raw = RawHF.from_file(str(path / "tokenizer.json"))
    elif (path / "vocab.json").exists() and (path / "merges.txt").exists():
        raw = RawHF(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
    else:
        raise FileNotFoundError(f"{path}: no tokenizer (expected tokenizer.json, or vocab.json + merges.txt)")
    decoder = json.loads(raw.to_str()).get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        raise ValueError(f"{path}: unsupported tokenizer (decoder {decoder.get('type')!r}); only byte-level BPE")
    bos, eos = _token_name(tok_config.get("bos_token")), _token_name(tok_config.get("eos_token"))
    return HFTokenizer(raw, bos, eos), tok_config


def _token_name(value: Any) -> str | None:
    """tokenizer_config.json spells a token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(path: Path, tok_config: dict[str, Any]) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    return template if isinstance(template, str) else None


# ----------------------------------------------------------------------------- export
def export_hf(bundle: Bundle, out: str | Path) -> Path:
    """Write ``bundle`` (a Llama-architecture model) as an HF ``LlamaForCausalLM`` directory at ``out``."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out}: already exists; choose a new --out (export never overwrites)")
    if not isinstance(bundle.model, GPT):
        raise ValueError(f"HF export supports Llama-architecture models, not {bundle.architecture}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        _write_hf(bundle, bundle.model, tmp)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_hf(bundle: Bundle, model: GPT, tmp: Path) -> None:
    cfg, tok = model.config, bundle.tokenizer
    raw = hf_from_ranks(tok) if isinstance(tok, Tokenizer) else tok.raw
    ids = {name: (tok.special_tokens.get(name) if name else None) for name in (bundle.bos_token, bundle.eos_token)}
    pad = PAD if PAD in tok.special_tokens else None
    bos_id, eos_id = ids.get(bundle.bos_token), ids.get(bundle.eos_token)
    pad_id = tok.special_tokens.get(pad) if pad else None
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    write_json(
        tmp / "config.json",
        {
            **cfg.to_hf_dict(),
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "pad_token_id": pad_id,
            "dtype": "float32",
        },
    )
    write_json(tmp / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id})
    (tmp / "tokenizer.json").write_text(raw.to_str(pretty=False), encoding="utf-8")
    specials = {"bos_token": bundle.bos_token, "eos_token": bundle.eos_token, "pad_token": pad}
    specials = {k: v for k, v in specials.items() if v}
    write_json(
        tmp / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": cfg.max_seq_len,
            "chat_template": bundle.chat_template,
        },
    )
    write_json(tmp / "special_tokens_map.json", specials)
